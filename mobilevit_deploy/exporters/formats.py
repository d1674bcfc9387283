"""The table of export formats and what each allows.

CoreML and TFLite need their extras (heavy, imported only when used); `mvd doctor`
tells a user what to install. CoreML's default precision is fp16, as on device.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from torch import nn

from ..errors import BackendUnavailable, BadInput


@dataclass(frozen=True)
class FormatInfo:
    name: str
    suffix: str
    precisions: tuple[str, ...]
    python_modules: tuple[str, ...]
    extra: str | None
    default_precision: str = "fp32"
    dists: tuple[str, ...] = ()  # whose versions the metadata records
    has_bicubic: bool = False

    def available(self) -> bool:
        return all(importlib.util.find_spec(m) is not None for m in self.python_modules)

    def install_hint(self) -> str:
        return f"pip install 'mobilevit_deploy[{self.extra}]'" if self.extra else ""


# What torch's TorchScript-based ONNX exporter emits; below 13 the models' ops
# (LayerNorm, GELU, dynamic Slice) need decompositions it does not offer.
ONNX_OPSETS = range(13, 21)

FORMATS: dict[str, FormatInfo] = {
    "onnx": FormatInfo(
        "onnx", ".onnx", ("fp32", "fp16", "int8"), ("onnx", "onnxruntime"), None, has_bicubic=True
    ),
    "coreml": FormatInfo(
        "coreml",
        ".mlpackage",
        ("fp16", "fp32"),
        ("coremltools",),
        "coreml",
        "fp16",
        ("coremltools",),
    ),
    "tflite": FormatInfo(
        "tflite",
        ".tflite",
        ("fp32", "fp16", "int8"),
        ("litert_torch", "ai_edge_litert"),
        "tflite",
        dists=("litert-torch", "ai-edge-litert", "ai-edge-quantizer"),
    ),
}


def check_format(name: str, precision: str | None = None) -> FormatInfo:
    """The format's entry, or the error a user should see (before any slow work)."""
    info = FORMATS.get(name)
    if info is None:
        raise BadInput(f"unknown format {name!r}; choose from {', '.join(FORMATS)}")
    if precision is not None and precision not in info.precisions:
        raise BadInput(f"{name} supports precisions {', '.join(info.precisions)}, not {precision}")
    if not info.available():
        missing = ", ".join(info.python_modules)
        raise BackendUnavailable(f"{name} needs {missing}: {info.install_hint()}")
    return info


def float_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of each module that int8 exports leave in float: those whose class
    says `int8_keeps_float` (a range uint8 cannot hold; the class's docstring says why)."""
    return [
        (path, module)
        for path, module in model.named_modules()
        if getattr(module, "int8_keeps_float", False)
    ]
