"""`mvd verify`: prove that every deployable form computes the original's function.

The reference is the unfused model in float64, so fp32 noise of the reference itself
(2e-3 on a stressed LeViT, docs/architecture.md) never masks or fakes a fold error. Pairs:
  torch fused (fp64)  a float64 copy fused and run in float64 vs the reference: the
                      fuse math alone, held to 1e-9 (exact folds land near 1e-14);
  torch fused (fp32)  vs reference: what fp32 execution adds;
  <file>              vs reference: each artifact, end to end, judged at its
                      precision's bound (judge.py).
Two forms share the checking: `verify_files` checks files the user already has (the
model rebuilt from each file's record, rebuild.py), `verify` exports a model's files
into a temporary folder and checks those. Without real weights the model-name form
gets stress weights first (stress.py).
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
from .exporters.formats import FORMATS, check_format
from .exporters.int8_search import describe as describe_int8
from .exporters.metadata import output_names
from .images import natural_images, random_normal_inputs, to_model_input
from .judge import bound_for, judge
from .metrics import MIN_DECISIVE, NEAR_TIE_FACTOR, Metrics, compare
from .rebuild import FileToCheck, Rebuilt, open_files, rebuild
from .reparam import reparameterize, training_leftovers
from .request import Request
from .runtimes import open_runner, run_per_sample
from .runtimes.torch_runtime import TorchRunner
from .stress import apply_stress_weights, check_sane_outputs
from .user_images import load_images
from .weights import Provenance

STRESSED = "stress weights (no weights given)"


@dataclass
class PairResult:
    """One candidate against the reference. `candidate` is for display only; what the
    row is lies in `format` (None for a torch row), `precision`, `file` and `estimated`
    (the numbers come from torch at the file's precision: the format does not run here)."""

    candidate: str
    precision: str
    tolerance: float
    metrics: Metrics
    passed: bool
    bound: str = ""
    format: str | None = None
    estimated: bool = False
    file: str | None = None


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
    # Where each fact about the model came from, for files checked as they are.
    facts: dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.problems and all(p.passed for p in self.pairs)

    def to_dict(self) -> dict:
        data = asdict(self)
        for pair, row in zip(self.pairs, data["pairs"], strict=True):
            row["metrics"] = pair.metrics.to_dict()
        data["passed"] = self.passed
        return data


def check_formats(formats: Sequence[str], precisions: Sequence[str] | None = None) -> None:
    """Refuse unknown or unavailable formats before the minutes of work, not after."""
    for fmt in formats:
        for precision in precisions or (None,):
            check_format(fmt, precision)


def near_tie_note(metrics: Metrics, task: str) -> str:
    """Why a row's raw agreement is not what was judged: its flips were near-ties, and
    with fewer than MIN_DECISIVE decisive inputs no agreement rate was judged at all."""
    units = "pixels" if task == "segmentation" else "inputs"
    judgement = (
        f"agreement judged on decisive {units} ({metrics.decisive_agreement:.3f})"
        if metrics.decisive >= MIN_DECISIVE
        else f"agreement not judged ({metrics.decisive} decisive {units})"
    )
    return (
        f"{judgement}; {metrics.near_ties:.1%} are near-ties (reference margin within "
        f"{NEAR_TIE_FACTOR:.1f}x the RMS error of the agreeing ones), where a flip is not a "
        "defect"
    )


@dataclass
class Inputs:
    """What every candidate runs: `n` images, then random normals."""

    x: np.ndarray
    n: int
    described: str


def make_inputs(spec, num_images: int, seed: int, images_dir, warn) -> Inputs:
    size = spec.input_hw
    if images_dir is not None:
        pictures = load_images(Path(images_dir), spec, size, num_images, warn)
        described = f"{len(pictures)} images from {images_dir}"
    else:
        pictures = natural_images(num_images, size, seed)
        described = f"{num_images} natural-looking images"
    images = to_model_input(pictures, spec)
    normals = random_normal_inputs(max(num_images // 2, 2), size, seed)
    return Inputs(
        np.concatenate([images, normals]),
        len(images),
        f"{described} + {len(normals)} random normals",
    )


class _Checker:
    """The reference of one model and the rows judged against it."""

    def __init__(self, model, inputs: Inputs, weights: str, progress) -> None:
        spec = model.mvd_spec
        self.model, self.spec, self.inputs, self.progress = model, spec, inputs, progress
        self.report = VerifyReport(
            spec.name,
            spec.input_hw,
            weights,
            inputs.described,
            task=spec.output_kind,
            outputs=output_names(spec),
        )
        self.report.notes += list(spec.adaptations)
        progress("running the unfused reference in float64")
        self.reference = TorchRunner(model, torch.float64)(inputs.x)
        self.report.problems += [f"reference: {p}" for p in check_sane_outputs(self.reference)]
        own = compare(self.reference, TorchRunner(model)(inputs.x), spec.output_kind)
        self.report.fp32_noise_floor = own.max_rel
        self._bilinear = None

    def add(self, candidate: str, precision: str, output, target=None, record=None, **row):
        metrics = compare(self.reference if target is None else target, output, self.report.task)
        bound = bound_for(
            precision,
            record=record,
            tolerances=self.spec.tolerances,
            noise_floor=self.report.fp32_noise_floor,
        )
        verdict = judge(metrics, bound)
        self.report.pairs.append(
            PairResult(
                candidate, precision, bound.limit, metrics, verdict.passed, verdict.words, **row
            )
        )
        decisive = metrics.decisive_agreement
        if bound.by_psnr and decisive is not None and metrics.agreement < decisive:
            self.report.notes.append(f"{candidate}: {near_tie_note(metrics, self.report.task)}")

    def check_fusion(self) -> torch.nn.Module:
        """The torch rows: the fuse math in float64, then the fused model in fp32."""
        x, size = self.inputs.x, self.spec.input_hw
        self.progress("fusing a float64 copy (the fuse math alone)")
        fused64 = reparameterize(copy.deepcopy(self.model).double(), image_size=size)
        self.add("torch fused (fp64)", "fp64", TorchRunner(fused64, torch.float64)(x))
        del fused64
        fused = reparameterize(self.model, image_size=size)
        self.report.problems += [f"left after reparam: {m}" for m in training_leftovers(fused)]
        self.progress("running the fused model")
        self.add("torch fused (fp32)", "fp32", TorchRunner(fused, torch.float32)(x))
        return fused

    def bilinear(self) -> np.ndarray:
        """The unfused model upsampling bilinear, in float64: the reference of a file
        whose record says it upsamples bilinear (runtimes without bicubic resize)."""
        if self._bilinear is None:
            swapped = copy.deepcopy(self.model)
            swapped.set_upsample("bilinear")
            self._bilinear = TorchRunner(swapped, torch.float64)(self.inputs.x)
            self.report.pairs.append(
                PairResult(
                    "torch bilinear upsample",
                    "fp64",
                    0.0,
                    compare(self.reference, self._bilinear, self.report.task),
                    True,
                    "informational",
                )
            )
            self.report.notes.append(
                "bilinear upsample: files that upsample bilinear (formats without bicubic "
                "resize) are compared with the unfused model upsampling bilinear; the row "
                "'torch bilinear upsample' is what the swap costs against the bicubic original"
            )
        return self._bilinear

    def _note_device(self, device: str, facts: dict) -> None:
        """Where the files ran, said once: the reference and the judging stayed here."""
        from .device.stamp import device_stamp
        from .machine import stamp_line

        note = f"files ran on the device {device!r}: {stamp_line(device_stamp(facts))}"
        if note not in self.report.notes:
            self.report.notes.append(note)

    def check_file(self, file: FileToCheck, fused, label: str, device: str | None) -> None:
        """One file against the reference, judged at its precision's bound."""
        record = file.record or {}
        fmt = FORMATS[file.format]
        target = self.reference
        if record.get("upsample") == "bilinear" and hasattr(self.model, "set_upsample"):
            target = self.bilinear()
        estimated = device is None and not fmt.runs_here()
        if estimated:
            output = _static_check(file, fused, self.inputs.x, self.report)
            label = (
                label.removesuffix(")") + ", estimated)"
                if label.endswith(")")
                else f"{label} ({file.precision}, estimated)"
            )
        else:
            self.progress(f"running {file.label}")
            runner = open_runner(file.format, file.path, device=device)
            output = run_per_sample(runner, self.inputs.x)
            if device is not None:
                self._note_device(device, runner.facts)
            if record.get("probabilities"):  # a classifier answering with probabilities
                target = softmax(target)
        n = self.inputs.n
        if not estimated and str(record.get("input_type", "")).startswith("image"):
            # An image input takes 8-bit pixels: random normals are no image it can hold.
            output, target = _rows(output, n), _rows(target, n)
        if file.precision == "int8":  # calibrated for images: judged on the images alone
            output, target = _rows(output, n), _rows(target, n)
            search = record.get("int8_search")
            if search:
                self.report.notes.append(
                    f"{label}: {describe_int8(search)}; held to its "
                    f"{record['int8_target_db']:g} dB target on the {n} images"
                )
        self.add(
            label,
            file.precision,
            output,
            target,
            record,
            format=file.format,
            estimated=estimated,
            file=str(file.path),
        )
        self.report.notes += [f"{label}: {n}" for n in record.get("delegate_report") or []]


def verify(
    name: str,
    *,
    formats: Sequence[str] = ("onnx",),
    request: Request | None = None,
    num_images: int = 8,
    seed: int = 0,
    work_dir: Path | None = None,
    images_dir: Path | None = None,
    progress: Callable[[str], None] = lambda _msg: None,
    warn: Callable[[str], None] = lambda _msg: None,
    **options,
) -> VerifyReport:
    """Export `name` to each format at each precision asked (`request.precisions`, else
    the format's own) into a temporary folder, and check those files. `options` are
    Request fields or format options (request.py). `images_dir`: the user's images
    (the model's preprocessing) instead of made ones. An int8 file is held to the
    target it was searched to, on the images alone (calibration is for images; random
    normals lie outside any calibrated range)."""
    request = Request.of(request, **options)
    check_formats(formats, request.precisions)
    request.check_formats(formats)
    _check_count(num_images)
    model = api.load_model(name, request.weights, **request.model_options)
    spec = model.mvd_spec
    inputs = make_inputs(spec, num_images, seed, images_dir, warn)
    if model.mvd_provenance is None:
        progress("applying stress weights")
        calibration = to_model_input(natural_images(8, spec.input_hw, seed + 1000), spec)
        apply_stress_weights(model, torch.from_numpy(calibration), seed)
        # The files made from it record what they hold, not the initialisation.
        model.mvd_provenance = Provenance(STRESSED, None, "train")
    weights = model.mvd_provenance.source
    checker = _Checker(model, inputs, weights, progress)
    fused = checker.check_fusion()
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        for fmt in formats:
            for precision in request.precisions or (FORMATS[fmt].default_precision,):
                progress(f"exporting {fmt} {precision}")
                artifact = api.export(
                    spec.name,
                    fmt,
                    model=model,
                    output=Path(tmp) / f"{spec.name}.{precision}{FORMATS[fmt].suffix}",
                    precision=precision,
                    request=request.for_loaded_model(fmt, precision),
                    progress=progress,
                )
                file = FileToCheck(artifact.path, fmt, artifact.metadata, {})
                label = f"{fmt} fused" + ("" if precision == "fp32" else f" ({precision})")
                checker.check_file(file, fused, label, request.device)
    return checker.report


def verify_files(
    paths: Sequence[str | Path],
    *,
    request: Request | None = None,
    num_images: int = 8,
    seed: int = 0,
    images_dir: Path | None = None,
    progress: Callable[[str], None] = lambda _msg: None,
    warn: Callable[[str], None] = lambda _msg: None,
    **options,
) -> VerifyReport:
    """Check files the user already has, each against the model its record describes
    (rebuild.py): mvd files by their record, other tools' files with `model_name` and
    `weights`. The model is not stressed: the files hold the weights they hold."""
    request = Request.of(request, **options)
    if not paths:
        raise BadInput("give at least one file to verify")
    _check_count(num_images)
    files = open_files([Path(p) for p in paths])
    for file in files:
        check_format(file.format)
    rebuilt: Rebuilt = rebuild(files, request)
    model = rebuilt.model
    inputs = make_inputs(model.mvd_spec, num_images, seed, images_dir, warn)
    provenance = model.mvd_provenance
    weights = provenance.source if provenance else "the seeded initialisation (no weights)"
    checker = _Checker(model, inputs, weights, progress)
    checker.report.facts = rebuilt.facts
    fused = checker.check_fusion()
    for file in files:
        checker.check_file(file, fused, file.label, request.device)
    return checker.report


def _check_count(num_images: int) -> None:
    from .limits import check_count

    check_count("--num-images", num_images, 1, 1024)


def _rows(outputs, n: int):
    """The first `n` inputs' outputs (the images, before the random normals)."""
    return tuple(o[:n] for o in outputs) if isinstance(outputs, tuple) else outputs[:n]


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _static_check(file: FileToCheck, fused, x: np.ndarray, report: VerifyReport) -> np.ndarray:
    """Where a format cannot run here (CoreML off macOS): check the file statically, and
    estimate its numbers with the fused model in torch at the file's precision (fp16 on
    every op, as CoreML's ANE and GPU compute; a CPU may use fp32 for some, so the
    estimate is the harsher one)."""
    dtype = torch.float16 if file.precision == "fp16" else torch.float32
    record = file.record or {}
    if "upsample" in record:  # the file's resize mode, not the model's
        fused = copy.deepcopy(fused)
        fused.set_upsample(record["upsample"])
    estimate = TorchRunner(fused, dtype)(x)
    if isinstance(estimate, tuple):
        estimate = tuple(e.astype(np.float32) for e in estimate)
        shapes = [(1, *e.shape[1:]) for e in estimate]
    else:
        estimate = estimate.astype(np.float32)
        shapes = [(1, *estimate.shape[1:])]
    fmt = FORMATS[file.format]
    checked = fmt.load("static_check")(file.path, shapes)
    report.problems += [f"{fmt.name} file: {p}" for p in checked["problems"]]
    checks = (
        checked["summary"]
        if not checked["problems"]
        else "the file failed its static checks (listed below)"
    )
    report.notes.append(
        f"{fmt.name} {file.precision}: device numerics were NOT run ({fmt.name} runs on "
        f"{fmt.runs_only_on}); {checks}; the row's numbers are the fused model run in torch "
        f"{str(dtype).removeprefix('torch.')} on every op"
    )
    return estimate
