"""What `mvd list`, `mvd info` and `mvd doctor` report, as plain dicts."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from .exporters.formats import FORMATS
from .limits import check_image_hw, check_num_classes
from .machine import machine_stamp, stamp_line
from .platforms import ARM_INSTALLS, platform_key
from .reparam import reparameterize
from .runtimes import openvino
from .zoo import list_models


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def zoo_rows(family: str | None = None) -> list[dict]:
    rows = []
    for spec in list_models(family):
        with torch.device("meta"):  # shapes only: the whole zoo in well under a second
            params = count_params(spec.build())
        rows.append(
            {
                "name": spec.name,
                "family": spec.family,
                "task": spec.task,
                "input_size": list(spec.input_hw),
                "params": params,
                "weights": sorted({s.tag for s in spec.weight_sources}),
            }
        )
    return rows


def count_macs(model: torch.nn.Module, image_size: tuple[int, int]) -> int:
    """Multiply-accumulates of one image, from torch's own FLOP counter (FLOPs / 2)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, *image_size))
    return counter.get_total_flops() // 2


def model_info(
    name: str,
    image_size: int | tuple[int, int] | str | None = None,
    *,
    weights: str | Path | None = None,
    num_classes: int | None = None,
    labels: Path | None = None,
    features: bool | tuple[int, ...] | None = None,
    request=None,
) -> dict:
    """What the model is; with `weights`, the user's model as their checkpoint sizes it.
    `request` (request.py, what the CLI passes) holds the same options."""
    from .api import load_model, parse_image_size
    from .exporters.metadata import describe_outputs

    if request is not None:
        weights, image_size = request.weights, request.image_size
        num_classes, labels, features = request.num_classes, request.labels, request.features

    asked = parse_image_size(image_size)
    if asked is not None:  # FLOPs are counted on a real image of that size
        check_image_hw(asked)
    if num_classes is not None:
        check_num_classes(num_classes)
    train = load_model(
        name,
        weights,
        image_size=image_size,
        num_classes=num_classes,
        labels=labels,
        features=features,
        progress=False,
    )
    spec = train.mvd_spec
    size = spec.input_hw
    deploy = reparameterize(train, fold_affine=False, image_size=size)
    fused = reparameterize(train, image_size=size)
    provenance = train.mvd_provenance
    return {
        "name": spec.name,
        "family": spec.family,
        "task": spec.output_kind,
        "description": spec.description,
        "input_size": list(size),
        "num_classes": spec.num_classes,
        "labels": spec.labels,
        "class_names": list(spec.class_names) if spec.class_names else None,
        "outputs": describe_outputs(spec, fused),
        "configured_by": list(spec.configured_by),
        "adaptations": list(spec.adaptations),
        "weights_file": provenance.source if provenance else None,
        "weights_form": provenance.form if provenance else None,
        "params": {
            "train": count_params(train),
            "deploy": count_params(deploy),
            "fused": count_params(fused),
        },
        "macs": count_macs(fused, size),
        "preprocessing": {
            "mean": list(spec.preprocessing.mean),
            "std": list(spec.preprocessing.std),
            "crop_pct": spec.preprocessing.crop_pct,
            "interpolation": spec.preprocessing.interpolation,
        },
        "formats": {f.name: ", ".join(f.precisions) for f in FORMATS.values()},
        "weights": [
            {"tag": s.tag, "url": s.url, "sha256": s.sha256, "fused": s.fused}
            for s in spec.weight_sources
        ],
    }


def doctor_info() -> dict:
    stamp = machine_stamp()
    formats = []
    for f in FORMATS.values():
        ready = f.available()
        # Where a format does not run (CoreML off macOS), verify checks the file.
        run = "yes" if f.runs_here() else (f"no ({f.runs_only_on})" if ready else "no")
        formats.append(
            {
                "name": f.name,
                "export": "yes" if ready else "no",
                "run": run,
                "install": f.install_hint() or None,
            }
        )
    return {
        "machine": stamp,
        "machine_line": stamp_line(stamp),
        "formats": formats,
        "runtimes": runtime_rows(stamp["versions"]),
        "not_on_this_platform": dict(ARM_INSTALLS.get(platform_key() or "", {})),
    }


def runtime_rows(versions: dict[str, str | None]) -> list[dict]:
    """Each runtime `mvd bench --runtime` takes, with the files it runs and its version
    (None: not installed, and `install` says how). OpenVINO is a second runtime of the
    ONNX files and no format's own, so it follows onnxruntime; its row adds the reduced
    precisions this CPU computes natively, since only those are worth timing here."""
    rows = []
    for f in FORMATS.values():
        runs = f"{f.name} ({f.runs_only_on})" if f.runs_only_on else f.name
        rows.append(_runtime_row(f.runtime, runs, versions.get(f.runtime_dist), f.install_hint()))
    ov = _runtime_row("openvino", "onnx", versions.get(openvino.DIST), openvino.INSTALL_HINT)
    ov["inference_precisions"] = list(openvino.inference_precisions()) if ov["version"] else None
    rows.insert(1, ov)
    return rows


def _runtime_row(name: str, runs: str, version: str | None, hint: str) -> dict:
    return {
        "name": name,
        "runs": runs,
        "version": version,
        "install": None if version else hint or None,
    }
