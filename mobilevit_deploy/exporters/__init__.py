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
    # What the user should hear: a suffix added to the output name, a LeViT table
    # resized, a resize mode swapped for the format.
    notes: tuple[str, ...] = ()

    @property
    def sidecar(self) -> Path:
        return self.path.with_name(self.path.name + ".json")
