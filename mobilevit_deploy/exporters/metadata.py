"""The metadata record every artifact carries (embedded where possible + sidecar).

An exported file without its preprocessing is a trap: the app feeding it must know
the input size, mean/std and label set. The record holds no timestamp, so the same
export twice gives byte-identical files.
"""

from __future__ import annotations

from importlib import metadata as importlib_metadata

from ..registry import ModelSpec
from ..weights import Provenance

_TOOLS = ("mobilevit_deploy", "torch", "onnx", "onnxruntime", "onnxslim")


def tool_versions(extra: tuple[str, ...] = ()) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in (*_TOOLS, *extra):
        try:
            out[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            out[dist] = None
    return out


def artifact_metadata(
    spec: ModelSpec,
    *,
    provenance: Provenance | None,
    image_size: tuple[int, int],
    batch: int | str,
    reparameterized: bool,
    precision: str,
    fmt: str,
    extra_tools: tuple[str, ...] = (),
) -> dict:
    pre = spec.preprocessing
    return {
        "model": spec.name,
        "family": spec.family,
        "task": spec.task,
        "format": fmt,
        "precision": precision,
        "reparameterized": reparameterized,
        "input_name": "input",
        "input_shape": [batch, 3, *image_size],
        "input_layout": "NCHW",
        "input_range": "RGB in [0, 1], then (x - mean) / std",
        "mean": list(pre.mean),
        "std": list(pre.std),
        "crop_pct": pre.crop_pct,
        "interpolation": pre.interpolation,
        "num_classes": spec.num_classes,
        "labels": spec.labels,
        "weights": provenance.source if provenance else "random initialisation (no weights)",
        "weights_sha256": provenance.sha256 if provenance else None,
        "weights_form": provenance.form if provenance else None,
        "tool_versions": tool_versions(extra_tools),
    }
