"""Run a torch module: numpy in, numpy out, in a chosen dtype (float64 for references)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op thread count for a block; a process-wide setting, so restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class TorchRunner:
    def __init__(self, module: nn.Module, dtype: torch.dtype = torch.float32) -> None:
        self.dtype = dtype
        self.module = copy.deepcopy(module).to(dtype).eval()

    @torch.inference_mode()
    def __call__(self, x: np.ndarray) -> np.ndarray | tuple[np.ndarray, ...]:
        """The output, or a tuple of them (a model returning feature maps)."""
        out = self.module(torch.from_numpy(x).to(self.dtype))
        if isinstance(out, (tuple, list)):
            return tuple(self._numpy(o) for o in out)
        return self._numpy(out)

    def _numpy(self, out: torch.Tensor) -> np.ndarray:
        return out.double().numpy() if self.dtype == torch.float64 else out.numpy()
