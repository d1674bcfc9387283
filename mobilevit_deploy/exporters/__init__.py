"""Exporters: one module per format, the table of formats in formats.py, and the one
signature they share: an ExportJob in, the artifact's ArtifactMetadata out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..files import sidecar_path

if TYPE_CHECKING:  # `mvd --help` imports the format table, and must not import torch
    import numpy as np
    from torch import nn

    from ..registry import ModelSpec
    from .metadata import ArtifactMetadata


@dataclass(frozen=True)
class ExportJob:
    """What an exporter is given. `model` is the deployable module (fused unless asked
    otherwise, its upsampling already chosen); `example` sets the static input shape;
    `calibration` holds the int8 images (None at other precisions); `options` is the
    format's own options dataclass (formats.py); `metadata` the record so far;
    `keep_float` the module paths int8 leaves float beyond those that declare it
    (the accuracy search's choice, int8_search.py); `scratch` a directory that the
    search's steps share, which differ only in `keep_float` and `output`: an exporter
    may keep there what every step would make again (TFLite: the fp32 flatbuffer that
    each step quantizes, 27 of a step's 36 s on EfficientViT-B1)."""

    model: nn.Module
    output: Path
    example: np.ndarray
    precision: str
    options: Any
    metadata: ArtifactMetadata
    spec: ModelSpec
    calibration: np.ndarray | None = None
    keep_float: tuple[str, ...] = ()
    scratch: Path | None = None


@dataclass(frozen=True)
class Artifact:
    path: Path
    format: str
    precision: str
    record: ArtifactMetadata
    # What the user should hear: a suffix added to the output name, a LeViT table
    # resized, a resize mode swapped for the format.
    notes: tuple[str, ...] = ()

    @property
    def metadata(self) -> dict:
        """The record as the sidecar holds it."""
        return self.record.to_dict()

    @property
    def sidecar(self) -> Path:
        return sidecar_path(self.path)


def float_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of each module that int8 exports leave in float: those whose class
    says `int8_keeps_float` (a range uint8 cannot hold; the class's docstring says why).
    The search (int8_search.py) starts from these."""
    return [
        (path, module)
        for path, module in model.named_modules()
        if getattr(module, "int8_keeps_float", False)
    ]


def module_outputs(
    model: nn.Module, example: np.ndarray
) -> tuple[list[tuple[str, object]], object]:
    """(path, output) of every module whose forward ran (through its __call__) on
    `example`, in the order they returned, and the model's output. The outputs are held
    themselves, not their ids: a freed tensor's id is reused by a later one, which made
    modules far from the output look like its writers."""
    import torch

    returned: list[tuple[str, object]] = []
    hooks = [
        module.register_forward_hook(lambda _m, _i, out, path=path: returned.append((path, out)))
        for path, module in model.named_modules()
        if path
    ]
    try:
        with torch.no_grad():
            out = model(torch.from_numpy(example))
    finally:
        for hook in hooks:
            hook.remove()
    return returned, out


def called_modules(model: nn.Module, example: np.ndarray) -> set[str]:
    """Paths of the modules whose forward runs on `example`: those that get a level of
    their own in exported node names (torch.onnx scopes, litert-torch's module chains).
    A module whose parent calls its methods instead runs no forward: EfficientViT-Seg
    calls `backbone.forward_stages`, so its nodes are named "/stages.3/..." with no
    "/backbone/" level, and scopes built from module paths alone matched nothing below
    it (not even the modules that declare float)."""
    return {path for path, _ in module_outputs(model, example)[0]}


def output_writers(model: nn.Module, example: np.ndarray) -> set[str]:
    """Paths of the innermost modules whose forward returned one of the model's outputs
    (the head's last layer, not the modules around it): the ops whose output int8 files
    keep float, so that a logit past the calibrated range is not capped."""
    return writers(*module_outputs(model, example))


def writers(returned: list[tuple[str, object]], out: object) -> set[str]:
    """output_writers, from a module_outputs pass a caller already ran."""
    outs = out if isinstance(out, tuple) else (out,)
    producers = {path for path, got in returned if any(got is o for o in outs)}
    return {p for p in producers if not any(q.startswith(p + ".") for q in producers)}
