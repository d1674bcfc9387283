"""Silence libraries that talk on stdout/stderr, C++ code included."""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Iterator


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """litert-torch, absl and the quantizer log progress and banners on both streams,
    some from C++ (below Python's sys.stderr); the CLI shows its own status."""
    for name in ("absl", "litert_torch", "ai_edge_quantizer", "torch.utils._pytree", "jax"):
        logging.getLogger(name).setLevel(logging.ERROR)
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
        os.dup2(null.fileno(), 2)
        try:
            with (
                contextlib.redirect_stdout(io.StringIO()),
                contextlib.redirect_stderr(io.StringIO()),
            ):
                yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


@contextlib.contextmanager
def no_root_warnings() -> Iterator[None]:
    """onnxruntime's quantizer warns through the root logger about norms it leaves
    per-tensor; `logging.warning` would also install a stderr handler on the host
    program's root logger for good, so a null handler stands in while it runs."""
    root, null = logging.getLogger(), logging.NullHandler()
    root.addHandler(null)
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)
        root.removeHandler(null)
