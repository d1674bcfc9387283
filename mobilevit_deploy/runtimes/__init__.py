"""One module per runtime; each turns a model or artifact into numpy -> numpy."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

Outputs = np.ndarray | tuple[np.ndarray, ...]


def open_runner(
    format_name: str, path: Path, threads: int | None = None, device: str | None = None
) -> Callable[[np.ndarray], Outputs]:
    """The runner of a file: here by its format's runtime, or on `device` (a command
    that starts a Python on the target; docs/architecture.md, "Devices"). Every command
    that runs a file opens it here."""
    from ..exporters.formats import FORMATS

    if device is None:
        return FORMATS[format_name].open_runner(path, threads)
    from ..device import open_remote_runner  # also has .time(x, ...) and .facts

    return open_remote_runner(format_name, path, threads, device)


def run_per_sample(
    runner: Callable[[np.ndarray], Outputs], x: np.ndarray, batch: int = 1
) -> Outputs:
    """`batch` images at a time, joined: exported files have a static batch. A short
    last chunk is padded with its own first image, and the padding dropped."""
    runs = []
    for start in range(0, len(x), batch):
        chunk = x[start : start + batch]
        pad = batch - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], pad, axis=0)])
        out = runner(chunk)
        keep = batch - pad
        runs.append(tuple(o[:keep] for o in out) if isinstance(out, tuple) else out[:keep])
    if isinstance(runs[0], tuple):  # several outputs: join each across the samples
        return tuple(np.concatenate(column) for column in zip(*runs, strict=True))
    return np.concatenate(runs)
