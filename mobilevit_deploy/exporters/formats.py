"""The table of export formats and what each allows.

CoreML and TFLite are declared with their extras so `mvd doctor` can tell a user
what to install; their exporters are the subject of a later issue.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass


@dataclass(frozen=True)
class FormatInfo:
    name: str
    suffix: str
    precisions: tuple[str, ...]
    python_modules: tuple[str, ...]
    extra: str | None
    implemented: bool

    def available(self) -> bool:
        return self.implemented and all(
            importlib.util.find_spec(m) is not None for m in self.python_modules
        )


# What torch's TorchScript-based ONNX exporter emits; below 13 the models' ops
# (LayerNorm, GELU, dynamic Slice) need decompositions it does not offer.
ONNX_OPSETS = range(13, 21)

FORMATS: dict[str, FormatInfo] = {
    "onnx": FormatInfo(
        "onnx", ".onnx", ("fp32", "fp16", "int8"), ("onnx", "onnxruntime"), None, True
    ),
    "coreml": FormatInfo(
        "coreml", ".mlpackage", ("fp16", "fp32"), ("coremltools",), "coreml", False
    ),
    "tflite": FormatInfo(
        "tflite",
        ".tflite",
        ("fp32", "fp16", "int8"),
        ("litert_torch", "ai_edge_litert"),
        "tflite",
        False,
    ),
}
