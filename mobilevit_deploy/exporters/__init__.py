"""Exporters: one module per format, and the table of formats in formats.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Artifact:
    path: Path
    format: str
    precision: str
    metadata: dict

    @property
    def sidecar(self) -> Path:
        return self.path.with_name(self.path.name + ".json")
