"""`mvd verify`: prove that every deployable form computes the original's function.

The reference is the unfused model in float64, so fp32 noise of the reference itself
(2e-3 on a stressed LeViT, docs/architecture.md) never masks or fakes a fold error. Pairs:
  torch fused (fp64)  a float64 copy fused and run in float64 vs the reference: the
                      fuse math alone, held to 1e-9 (exact folds land near 1e-14);
  torch fused (fp32)  vs reference: what fp32 execution adds;
  <format> (precision) vs reference: each exported artifact, end to end.
fp32 candidates are held to 1e-5 of the output scale, or to twice the unfused model's
own fp32 error where that is larger (a 512x512 SeaFormer-L segmenter: 1.5e-5): no fused
fp32 model can beat the arithmetic it runs on, and the fp64 pair still catches every
fold error far below that.
Without real weights the model gets stress weights first (stress.py).
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import api
from .configure import Features
from .errors import BadInput
from .exporters.formats import FORMATS, check_format
from .exporters.int8_search import describe as describe_int8
from .exporters.metadata import output_names
from .images import natural_images, random_normal_inputs, to_model_input
from .metrics import (
    DEFAULT_TOLERANCES,
    MIN_DECISIVE,
    NEAR_TIE_FACTOR,
    NOISE_FLOOR_FACTOR,
    REDUCED_PRECISION,
    compare,
    judge,
)
from .reparam import reparameterize, training_leftovers
from .runtimes import run_per_sample
from .runtimes.torch_runtime import TorchRunner
from .stress import apply_stress_weights, check_sane_outputs
from .user_images import load_images


@dataclass
class PairResult:
    """One candidate against the reference. `candidate` is for display only; what the
    row is lies in `format` (None for a torch row), `precision` and `estimated` (the
    numbers come from torch at the file's precision: the format does not run here)."""

    candidate: str
    precision: str
    tolerance: float
    metrics: dict
    passed: bool
    bound: str = ""
    format: str | None = None
    estimated: bool = False


@dataclass
class VerifyReport:
    model: str
    image_size: tuple[int, int]
    weights: str
    inputs: str
    pairs: list[PairResult] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    reference: str = "torch unfused (fp64)"
    # What is compared: classification, segmentation or features (maps or embeddings),
    # and the graph's output names (every one of them is compared).
    task: str = "classification"
    outputs: list[str] = field(default_factory=lambda: ["output"])
    # How far the unfused model's own fp32 run is from the reference (max rel).
    fp32_noise_floor: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.problems and all(p.passed for p in self.pairs)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["passed"] = self.passed
        return data


def check_formats(formats: Sequence[str], precisions: Sequence[str] | None = None) -> None:
    """Refuse unknown or unavailable formats before the minutes of work, not after."""
    for fmt in formats:
        for precision in precisions or (None,):
            check_format(fmt, precision)


def _precisions_of(fmt: str, precisions: Sequence[str] | None) -> Sequence[str]:
    """The asked precisions, or the format's own default (CoreML: fp16)."""
    return precisions or (FORMATS[fmt].default_precision,)


def near_tie_note(metrics: dict, task: str) -> str:
    """Why a row's raw agreement is not what was judged: its flips were near-ties, and
    with fewer than MIN_DECISIVE decisive inputs no agreement rate was judged at all."""
    units = "pixels" if task == "segmentation" else "inputs"
    judgement = (
        f"agreement judged on decisive {units} ({metrics['decisive_agreement']:.3f})"
        if metrics.get("decisive", MIN_DECISIVE) >= MIN_DECISIVE
        else f"agreement not judged ({metrics['decisive']} decisive {units})"
    )
    return (
        f"{judgement}; {metrics['near_ties']:.1%} are near-ties (reference margin within "
        f"{NEAR_TIE_FACTOR:.1f}x the RMS error of the agreeing ones), where a flip is not a "
        "defect"
    )


def verify(
    name: str,
    *,
    weights: str | Path | None = None,
    pretrained: bool | str = False,
    formats: Sequence[str] = ("onnx",),
    precisions: Sequence[str] | None = None,
    image_size: api.ImageSize = None,
    num_images: int = 8,
    seed: int = 0,
    work_dir: Path | None = None,
    images_dir: Path | None = None,
    num_classes: int | None = None,
    labels: Path | Sequence[str] | None = None,
    features: Features = None,
    int8_target: float | None = None,
    calibration_images: int | str | Path = 32,
    progress: Callable[[str], None] = lambda _msg: None,
    warn: Callable[[str], None] = lambda _msg: None,
) -> VerifyReport:
    """`images_dir`: the user's images (the model's preprocessing) instead of made ones.
    `num_classes`, `labels`, `features`: the model as `api.load_model` configures it;
    every output of a feature model is compared. `int8_target` and
    `calibration_images` go to the int8 exports (api.export); an int8 file is held to
    the target it was searched to, on the images alone (calibration is for images;
    random normals lie outside any calibrated range), with its decision judged on
    decisive inputs as fp16's is."""
    check_formats(formats, precisions)
    if num_images < 1:
        raise BadInput(f"--num-images must be at least 1, got {num_images}")
    model = api.load_model(
        name,
        weights,
        pretrained=pretrained,
        image_size=image_size,
        num_classes=num_classes,
        labels=labels,
        features=features,
    )
    spec = model.mvd_spec
    size = spec.input_hw
    task = spec.output_kind
    provenance = model.mvd_provenance
    if images_dir is not None:
        pictures = load_images(Path(images_dir), spec, size, num_images, warn)
        described = f"{len(pictures)} images from {images_dir}"
    else:
        pictures = natural_images(num_images, size, seed)
        described = f"{num_images} natural-looking images"
    images = to_model_input(pictures, spec)
    normals = random_normal_inputs(max(num_images // 2, 2), size, seed)
    x = np.concatenate([images, normals])
    n = len(images)
    if provenance is None:
        progress("applying stress weights")
        calibration = to_model_input(natural_images(8, size, seed + 1000), spec)
        apply_stress_weights(model, torch.from_numpy(calibration), seed)
    report = VerifyReport(
        spec.name,
        size,
        provenance.source if provenance else "stress weights (no weights given)",
        f"{described} + {len(normals)} random normals",
        task=task,
        outputs=output_names(spec),
    )
    report.notes += list(spec.adaptations)
    tolerances = {**DEFAULT_TOLERANCES, **spec.tolerances}

    def add(candidate: str, precision: str, output, against=None, psnr_floor=None, **row) -> None:
        metrics = compare(reference if against is None else against, output, task)
        if precision in REDUCED_PRECISION:  # judged by PSNR: the file's own target or the floor
            tol = psnr_floor or REDUCED_PRECISION[precision]["min_psnr_db"]
        else:
            tol = tolerances[precision]
        if precision == "fp32":
            tol = max(tol, NOISE_FLOOR_FACTOR * report.fp32_noise_floor)
        passed, bound = judge(metrics, precision, tol)
        report.pairs.append(PairResult(candidate, precision, tol, metrics, passed, bound, **row))
        raw = metrics.get("agreement", 1.0)
        judged = REDUCED_PRECISION.get(precision, {}).get("min_agreement")
        if judged and "decisive_agreement" in metrics and raw < metrics["decisive_agreement"]:
            report.notes.append(f"{candidate}: {near_tie_note(metrics, task)}")

    progress("running the unfused reference in float64")
    reference = TorchRunner(model, torch.float64)(x)
    report.problems += [f"reference: {p}" for p in check_sane_outputs(reference)]
    report.fp32_noise_floor = compare(reference, TorchRunner(model)(x), task)["max_rel"]
    progress("fusing a float64 copy (the fuse math alone)")
    fused64 = reparameterize(copy.deepcopy(model).double(), image_size=size)
    add("torch fused (fp64)", "fp64", TorchRunner(fused64, torch.float64)(x))
    del fused64
    fused = reparameterize(model, image_size=size)
    report.problems += [f"left after reparam: {m}" for m in training_leftovers(fused)]
    progress("running the fused model")
    add("torch fused (fp32)", "fp32", TorchRunner(fused, torch.float32)(x))
    bilinear = _bilinear_reference(model, formats, x)
    if bilinear is not None:
        metrics = compare(reference, bilinear, task)
        report.pairs.append(
            PairResult("torch bilinear upsample", "fp64", 0.0, metrics, True, "informational")
        )
        report.notes.append(
            "bilinear upsample: the formats without bicubic resize ("
            + ", ".join(f for f in formats if not FORMATS[f].has_bicubic)
            + ") are compared with the unfused model upsampling bilinear; the row "
            "'torch bilinear upsample' is what the swap costs against the bicubic original"
        )
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        for fmt in formats:
            against = None if FORMATS[fmt].has_bicubic else bilinear
            for precision in _precisions_of(fmt, precisions):
                progress(f"exporting and running {fmt} {precision}")
                artifact = api.export(
                    spec.name,
                    fmt,
                    model=model,
                    output=Path(tmp) / f"{spec.name}.{precision}{FORMATS[fmt].suffix}",
                    image_size=size,
                    precision=precision,
                    int8_target=int8_target if precision == "int8" else None,
                    calibration_images=calibration_images,
                )
                label = f"{fmt} fused" + ("" if precision == "fp32" else f" ({precision})")
                estimated = not FORMATS[fmt].runs_here()
                if estimated:
                    output = _static_check(artifact, fused, x, report)
                    label = f"{fmt} fused ({precision}, estimated)"
                else:
                    output = run_per_sample(FORMATS[fmt].open_runner(artifact.path), x)
                target = against
                if not estimated and artifact.metadata.get("probabilities"):  # a classifier
                    target = _softmax(reference if against is None else against)
                floor = None
                if precision == "int8":  # calibrated for images: judged on the images alone
                    output, target = (
                        _rows(output, n),
                        _rows(reference if target is None else target, n),
                    )
                    floor = artifact.record.int8_target_db
                    report.notes.append(
                        f"{label}: {describe_int8(artifact.metadata['int8_search'])}; held "
                        f"to its {floor:g} dB target on the {n} images"
                    )
                add(label, precision, output, target, floor, format=fmt, estimated=estimated)
                report.notes += [f"{label}: {n}" for n in artifact.record.delegate_report or []]
    return report


def _rows(outputs, n: int):
    """The first `n` inputs' outputs (the images, before the random normals)."""
    return tuple(o[:n] for o in outputs) if isinstance(outputs, tuple) else outputs[:n]


def _bilinear_reference(model, formats: Sequence[str], x: np.ndarray) -> np.ndarray | None:
    """The unfused model upsampling bilinear, in float64: the reference for formats
    without bicubic resize (the export switches them), or None if none is needed."""
    if all(FORMATS[f].has_bicubic for f in formats) or not hasattr(model, "set_upsample"):
        return None
    swapped = copy.deepcopy(model)
    swapped.set_upsample("bilinear")
    return TorchRunner(swapped, torch.float64)(x)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _static_check(artifact, fused, x: np.ndarray, report: VerifyReport) -> np.ndarray:
    """Where a format cannot run here (CoreML off macOS): check the file statically, and
    estimate its numbers with the fused model in torch at the file's precision (fp16 on
    every op, as CoreML's ANE and GPU compute; a CPU may use fp32 for some, so the
    estimate is the harsher one)."""
    dtype = torch.float16 if artifact.precision == "fp16" else torch.float32
    if "upsample" in artifact.metadata:  # the file's resize mode, not the model's
        fused = copy.deepcopy(fused)
        fused.set_upsample(artifact.metadata["upsample"])
    estimate = TorchRunner(fused, dtype)(x)
    if isinstance(estimate, tuple):
        estimate = tuple(e.astype(np.float32) for e in estimate)
        shapes = [(1, *e.shape[1:]) for e in estimate]
    else:
        estimate = estimate.astype(np.float32)
        shapes = [(1, *estimate.shape[1:])]
    fmt = FORMATS[artifact.format]
    checked = fmt.load("static_check")(artifact.path, shapes)
    report.problems += [f"{fmt.name} file: {p}" for p in checked["problems"]]
    checks = (
        checked["summary"]
        if not checked["problems"]
        else "the file failed its static checks (listed below)"
    )
    report.notes.append(
        f"{fmt.name} {artifact.precision}: device numerics were NOT run ({fmt.name} runs on "
        f"{fmt.runs_only_on}); {checks}; the row's numbers are the fused model run in torch "
        f"{str(dtype).removeprefix('torch.')} on every op"
    )
    return estimate
