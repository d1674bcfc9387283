"""`mvd verify`: prove that every deployable form computes the original's function.

The reference is the unfused model in float64, so fp32 noise of the reference itself
(2e-3 on a stressed LeViT, DESIGN.md) never masks or fakes a fold error. Pairs:
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
from .errors import BadInput
from .exporters.formats import FORMATS
from .images import natural_images, random_normal_inputs, to_model_input
from .metrics import DEFAULT_TOLERANCES, NOISE_FLOOR_FACTOR, REDUCED_PRECISION, compare, judge
from .registry import get_spec
from .reparam import reparameterize, training_leftovers
from .runtimes.torch_runtime import TorchRunner
from .stress import apply_stress_weights, check_sane_outputs
from .user_images import load_images


@dataclass
class PairResult:
    candidate: str
    precision: str
    tolerance: float
    metrics: dict
    passed: bool
    bound: str = ""


@dataclass
class VerifyReport:
    model: str
    image_size: tuple[int, int]
    weights: str
    inputs: str
    pairs: list[PairResult] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    reference: str = "torch unfused (fp64)"
    # How far the unfused model's own fp32 run is from the reference (max rel).
    fp32_noise_floor: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.problems and all(p.passed for p in self.pairs)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["passed"] = self.passed
        return data


def check_formats(formats: Sequence[str], precisions: Sequence[str] = ("fp32",)) -> None:
    """Refuse unknown or unavailable formats before the minutes of work, not after."""
    for fmt in formats:
        info = FORMATS.get(fmt)
        if info is None:
            raise BadInput(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
        if not info.implemented:
            raise BadInput(f"{fmt} export is not available in this version; use onnx")
        for precision in precisions:
            if precision not in info.precisions:
                raise BadInput(
                    f"{fmt} supports precisions {', '.join(info.precisions)}, not {precision}"
                )


def _run(runner: Callable[[np.ndarray], np.ndarray], x: np.ndarray, per_sample: bool) -> np.ndarray:
    if not per_sample:
        return runner(x)
    return np.concatenate([runner(x[i : i + 1]) for i in range(len(x))])


def verify(
    name: str,
    *,
    weights: str | Path | None = None,
    pretrained: bool | str = False,
    formats: Sequence[str] = ("onnx",),
    precisions: Sequence[str] = ("fp32",),
    image_size: api.ImageSize = None,
    num_images: int = 8,
    seed: int = 0,
    work_dir: Path | None = None,
    images_dir: Path | None = None,
    progress: Callable[[str], None] = lambda _msg: None,
    warn: Callable[[str], None] = lambda _msg: None,
) -> VerifyReport:
    """`images_dir`: the user's images (the model's preprocessing) instead of made ones."""
    spec = get_spec(name)
    size = api.check_image_size(spec, image_size)
    check_formats(formats, precisions)
    if num_images < 1:
        raise BadInput(f"--num-images must be at least 1, got {num_images}")
    model = api.load_model(name, weights, pretrained=pretrained)
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
    if provenance is None:
        progress("applying stress weights")
        calibration = to_model_input(natural_images(8, size, seed + 1000), spec)
        apply_stress_weights(model, torch.from_numpy(calibration), seed)
    report = VerifyReport(
        spec.name,
        size,
        provenance.source if provenance else "stress weights (no weights given)",
        f"{described} + {len(normals)} random normals",
    )
    tolerances = {**DEFAULT_TOLERANCES, **spec.tolerances}

    def add(candidate: str, precision: str, output: np.ndarray) -> None:
        metrics = compare(reference, output, spec.task)
        if precision in REDUCED_PRECISION:  # judged by PSNR; the bound recorded is its floor
            tol = REDUCED_PRECISION[precision]["min_psnr_db"]
        else:
            tol = tolerances[precision]
        if precision == "fp32":
            tol = max(tol, NOISE_FLOOR_FACTOR * report.fp32_noise_floor)
        passed, bound = judge(metrics, precision, tol)
        report.pairs.append(PairResult(candidate, precision, tol, metrics, passed, bound))

    progress("running the unfused reference in float64")
    reference = TorchRunner(model, torch.float64)(x)
    report.problems += [f"reference: {p}" for p in check_sane_outputs(reference)]
    report.fp32_noise_floor = compare(reference, TorchRunner(model)(x), spec.task)["max_rel"]
    progress("fusing a float64 copy (the fuse math alone)")
    fused64 = reparameterize(copy.deepcopy(model).double(), image_size=size)
    add("torch fused (fp64)", "fp64", TorchRunner(fused64, torch.float64)(x))
    del fused64
    fused = reparameterize(model, image_size=size)
    report.problems += [f"left after reparam: {m}" for m in training_leftovers(fused)]
    progress("running the fused model")
    add("torch fused (fp32)", "fp32", TorchRunner(fused, torch.float32)(x))
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        for fmt in formats:
            for precision in precisions:
                progress(f"exporting and running {fmt} {precision}")
                artifact = api.export(
                    spec.name,
                    fmt,
                    model=model,
                    output=Path(tmp) / f"{spec.name}.{precision}{FORMATS[fmt].suffix}",
                    image_size=size,
                    precision=precision,
                )
                label = f"{fmt} fused" + ("" if precision == "fp32" else f" ({precision})")
                add(label, precision, _run(_runner(artifact), x, per_sample=True))
    return report


def _runner(artifact) -> Callable[[np.ndarray], np.ndarray]:
    if artifact.format == "onnx":
        from .runtimes.onnxruntime import OrtRunner

        return OrtRunner(artifact.path)
    raise ValueError(f"no runtime for {artifact.format}")
