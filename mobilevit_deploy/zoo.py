"""Lookups in the zoo. Importing this module imports every family (models/), whose
modules register their specs in registry.py's table; the families import only the
registry, so nothing imports back."""

from __future__ import annotations

import difflib

from . import models  # noqa: F401  (importing registers every family)
from .errors import BadInput
from .registry import SPECS, ModelSpec


def list_models(family: str | None = None) -> list[ModelSpec]:
    families = sorted({s.family for s in SPECS.values()})
    if family is not None and family not in families:
        raise BadInput(f"unknown family {family!r}; choose from {', '.join(families)}")
    return [s for s in SPECS.values() if family is None or s.family == family]


def _edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: ranks 'fastvit_sa12' before 'fastvit_sa36' for 'fastvit_sa13'."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def get_spec(name: str) -> ModelSpec:
    """The spec for `name`; an unknown name raises BadInput with close matches."""
    key = name.strip().lower().replace("-", "_")
    if key in SPECS:
        return SPECS[key]
    close = difflib.get_close_matches(key, list(SPECS), n=5, cutoff=0.5)
    close = sorted(close, key=lambda c: _edit_distance(key, c))[:3]
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise BadInput(f"Unknown model {name!r}.{hint} `mvd list` shows the zoo.")
