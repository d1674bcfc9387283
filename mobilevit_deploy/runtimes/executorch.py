"""Run a .pte with ExecuTorch's Python runtime (XNNPACK where delegated): numpy in and out.

`executorch.runtime` loads the program as an app's C++ runtime would. The XNNPACK
delegate runs on ExecuTorch's own thread pool, one per process: `threads` resets it
(an experimental call of its bindings), so the last runner opened sets it for all.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..quiet import quiet

# The constant method the exporter embeds the record as.
METADATA_METHOD = "mvd_metadata"


def _runtime():
    with quiet():  # the bindings import torchao and warn that they are experimental
        from executorch.runtime import Runtime

        return Runtime.get()


def read_metadata(path: Path) -> dict:
    """The record embedded in an exported .pte ({} without one)."""
    program = _runtime().load_program(Path(path))
    if METADATA_METHOD not in program.method_names:
        return {}
    return json.loads(program.load_method(METADATA_METHOD).execute([])[0])


class ExecuTorchRunner:
    def __init__(self, path: Path | str, threads: int | None = None) -> None:
        import torch

        self._torch = torch
        runtime = _runtime()
        if threads:
            from executorch.extension.pybindings import portable_lib

            portable_lib._unsafe_reset_threadpool(threads)
        with quiet():  # cpuinfo prints what it cannot read about the CPU, from C++
            self.method = runtime.load_program(Path(path)).load_method("forward")
        self.options = {"threads": threads or 0, "delegate": "XNNPACK"}

    def __call__(self, x: np.ndarray) -> np.ndarray | tuple[np.ndarray, ...]:
        """The output, or a tuple of them in the model's order (feature maps)."""
        outs = self.method.execute([self._torch.from_numpy(np.ascontiguousarray(x))])
        arrays = tuple(o.numpy() for o in outs)
        return arrays[0] if len(arrays) == 1 else arrays
