"""`mvd bench`: what reparameterization buys at inference, measured fairly, and which
deployable candidate is fastest while still computing the model's function.

The baseline is what a user would otherwise ship: the unfused training-time model
through a plain `torch.onnx.export`, run by onnxruntime at its highest optimisation
level, which already folds Conv+BN by itself. The fused export runs in the same
session settings, and all candidates are timed interleaved (timing.interleaved) so
drifts of the machine hit them alike. PyTorch eager is shown for reference.

A latency alone does not decide a deployment: a reduced precision is only worth its
speed if its outputs stay close. So every candidate (runtime x precision) is also
compared with the float64 unfused reference on natural-looking images and judged at
its precision's bound (metrics.judge), and the report names the fastest candidate that
passed (`fastest_passing`). Torch eager is timed and judged but never chosen: it is
not an artifact one ships.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from . import api
from .errors import BackendUnavailable, BadInput, ExportFailed, VerificationFailed
from .exporters.formats import FORMATS, check_format
from .files import artifact_size
from .images import natural_images, to_model_input
from .info import count_macs
from .machine import machine_stamp, stamp_line
from .metrics import DEFAULT_TOLERANCES, NOISE_FLOOR_FACTOR, REDUCED_PRECISION, compare, judge
from .reparam import reparameterize
from .runtimes import openvino as ov_runtime
from .runtimes import run_per_sample
from .runtimes.onnxruntime import OrtRunner
from .runtimes.torch_runtime import TorchRunner, torch_threads
from .stress import apply_stress_weights
from .timing import interleaved, time_callable
from .verify import _bilinear_reference, _softmax
from .zoo import get_spec

BASELINE = "onnxruntime, unfused (plain export)"
# onnxruntime, OpenVINO (both run the ONNX files) and torch eager, then each other
# format's runtime from the table.
RUNTIMES = (
    "onnxruntime",
    "openvino",
    "torch",
    *(f.runtime for f in FORMATS.values() if f.name != "onnx"),
)
DEFAULT_RUNTIMES = ("onnxruntime", "torch")
# bf16 is no file's precision: OpenVINO computes the fp32 file in it where the CPU can.
PRECISIONS = (*FORMATS["onnx"].precisions, "bf16")
ORT_LEVEL = "all"
# Images each candidate's accuracy is measured on: natural-looking ones, as verify's
# (random normals would judge int8 on inputs it was never calibrated for).
ACCURACY_IMAGES = 8


@dataclass(frozen=True)
class Candidate:
    """One timed row and what the decision table needs to judge it."""

    run: Callable[[np.ndarray], object]
    runtime: str  # its runtime's name in --runtime
    precision: str
    path: Path | None = None  # the file the runtime ran (None: torch eager)
    metadata: Mapping = field(default_factory=dict)  # the file's record


def matmul_peak_gflops(threads: int, n: int = 1024, min_time_s: float = 0.5) -> float:
    """This machine's measured fp32 matrix-multiply rate (best run of torch.mm).

    The practical ceiling for a network made of convolutions and matmuls: printing
    each model's achieved rate next to it shows how far from the hardware it runs.
    """
    a, b = torch.randn(n, n), torch.randn(n, n)
    with torch_threads(threads):
        result = time_callable(lambda: torch.mm(a, b), warmup=3, min_runs=10, min_time_s=min_time_s)
    return 2 * n**3 / (result.min_ms / 1e3) / 1e9


def int8_bound_db(metadata: Mapping) -> float:
    """The PSNR an int8 file is held to: the accuracy target its export searched for
    and recorded (`int8_target_db`), else REDUCED_PRECISION's floor. A file is judged
    by what it was made to meet, so a stricter export is not passed on a looser rule."""
    target = metadata.get("int8_target_db")
    return float(target) if target is not None else REDUCED_PRECISION["int8"]["min_psnr_db"]


def benchmark(
    name: str,
    *,
    weights: str | Path | None = None,
    image_size: api.ImageSize = None,
    batch: int = 1,
    threads: int | None = None,
    min_time_s: float = 3.0,
    min_runs: int = 20,
    runtimes: tuple[str, ...] = DEFAULT_RUNTIMES,
    precisions: tuple[str, ...] = ("fp32",),
    progress: Callable[[str], None] = lambda _msg: None,
) -> dict:
    """`precisions` beyond fp32 add the fused file at fp16 / int8 as candidates, for
    onnxruntime and for each other format whose runtime is among `runtimes` (litert:
    the TFLite file; executorch: the .pte), at the precisions that format has.
    openvino runs the fused ONNX file at fp32 and at each of bf16 / fp16 this CPU
    computes natively, and the int8 QDQ file; a precision no asked runtime runs here
    is skipped, and the report's `skipped` says why."""
    api.check_image_size(get_spec(name), image_size)
    unknown = set(runtimes) - set(RUNTIMES)
    if unknown or not runtimes:
        raise BadInput(f"unknown runtime {sorted(unknown)}; choose from {', '.join(RUNTIMES)}")
    if not set(precisions) <= set(PRECISIONS):
        choices = ", ".join(PRECISIONS)
        raise BadInput(f"unknown precision in {', '.join(precisions)}; choose from {choices}")
    others = [f for f in FORMATS.values() if f.name != "onnx" and f.runtime in runtimes]
    for fmt in others:
        check_format(fmt.name)
        if not fmt.runs_here():
            raise BadInput(f"{fmt.runtime} runs {fmt.runs_only_on}: it cannot be timed here")
    if "openvino" in runtimes and not ov_runtime.available():
        raise BackendUnavailable(f"the openvino runtime needs openvino: {ov_runtime.INSTALL_HINT}")
    threads = threads or os.cpu_count() or 1
    model = api.load_model(name, weights, image_size=image_size)
    # The model the checkpoint makes: a LeViT fine-tuned at 256 runs at 256.
    spec = model.mvd_spec
    size = spec.input_hw
    if model.mvd_provenance is None:
        # Realistic magnitudes: freshly initialised weights can hit denormal slow paths.
        calibration = to_model_input(natural_images(4, size, 1), spec)
        apply_stress_weights(model, torch.from_numpy(calibration))
    x = to_model_input(natural_images(batch, size, 0), spec)
    native = ov_runtime.inference_precisions() if "openvino" in runtimes else ()
    skipped = _skipped(runtimes, precisions, native)
    candidates: dict[str, Candidate] = {}
    with tempfile.TemporaryDirectory() as tmp:
        progress("exporting unfused and fused ONNX")
        plain = api.export(
            spec.name,
            model=model,
            output=Path(tmp) / "unfused.onnx",
            image_size=size,
            batch=batch,
            reparam=False,
            simplify=False,
        )
        onnx_files = _FormatFiles(
            FORMATS["onnx"], spec.name, model, size, batch, Path(tmp), progress, skipped
        )
        fused = onnx_files.get("fp32")
        unfused_ort = OrtRunner(plain.path, threads, ORT_LEVEL, spinning=False)
        fused_ort = OrtRunner(fused.path, threads, ORT_LEVEL, spinning=False)
        # The plain export is the baseline of every ratio, so it always runs.
        candidates[BASELINE] = Candidate(
            unfused_ort, "onnxruntime", "fp32", plain.path, plain.metadata
        )
        if "onnxruntime" in runtimes:
            candidates["onnxruntime, fused (mvd)"] = Candidate(
                fused_ort, "onnxruntime", "fp32", fused.path, fused.metadata
            )
            for precision in (
                p for p in precisions if p != "fp32" and p in onnx_files.fmt.precisions
            ):
                reduced = onnx_files.get(precision)
                if reduced is None:
                    continue
                runner = OrtRunner(reduced.path, threads, ORT_LEVEL, spinning=False)
                candidates[f"onnxruntime, fused {precision} (mvd)"] = Candidate(
                    runner, "onnxruntime", precision, reduced.path, reduced.metadata
                )
        if "openvino" in runtimes:
            candidates.update(_openvino_candidates(onnx_files, precisions, native, threads))
        for fmt in others:
            files = _FormatFiles(fmt, spec.name, model, size, batch, Path(tmp), progress, skipped)
            candidates.update(_format_candidates(files, precisions, threads))
        if "torch" in runtimes:
            fused_model = reparameterize(model, image_size=size)
            candidates["torch eager, unfused"] = Candidate(TorchRunner(model), "torch", "fp32")
            candidates["torch eager, fused (mvd)"] = Candidate(
                TorchRunner(fused_model), "torch", "fp32"
            )
        progress(f"measuring the accuracy of {len(candidates)} candidates")
        with torch_threads(threads):
            accuracy = _accuracy(model, spec, size, batch, candidates)
        progress(f"timing {len(candidates)} candidates interleaved")
        timed = {label: partial(c.run, x) for label, c in candidates.items()}
        with torch_threads(threads):
            results = interleaved(timed, batch=batch, min_runs=min_runs, min_time_s=min_time_s)
    base = results[BASELINE].median_ms
    stamp = machine_stamp()
    progress("measuring the matmul peak")
    peak = matmul_peak_gflops(threads)
    # The useful work is the fused model's: unfused branches are overhead, not output.
    macs = count_macs(reparameterize(model, image_size=size), size)
    gflop = 2 * macs * batch / 1e9
    rows = [
        {
            "runtime": key,
            **res.to_dict(),
            "ratio_to_baseline": res.median_ms / base,
            "gflops": gflop / (res.median_ms / 1e3),
            "percent_of_peak": 100 * gflop / (res.median_ms / 1e3) / peak,
            **accuracy[key],
        }
        for key, res in results.items()
    ]
    return {
        "model": spec.name,
        "image_size": list(size),
        "batch": batch,
        "threads": threads,
        "onnxruntime_session": fused_ort.options,
        "baseline": BASELINE,
        "machine": stamp,
        "machine_line": stamp_line(stamp),
        "macs_per_image": macs,
        "matmul_peak_gflops": peak,
        "stopping": {"min_runs": min_runs, "min_time_s": min_time_s},
        "accuracy_inputs": f"{_accuracy_count(batch)} natural-looking images",
        "results": rows,
        "fastest_passing": fastest_passing(rows),
        "skipped": skipped,
    }


def fastest_passing(rows: list[dict]) -> str | None:
    """The label of the fastest row that passed its bound, torch eager excluded (no
    artifact ships it); None when nothing deployable passed."""
    passing = [r for r in rows if r["passed"] and r["runtime_name"] != "torch"]
    return min(passing, key=lambda r: r["median_ms"])["runtime"] if passing else None


class _FormatFiles:
    """The fused file of one format at each precision, exported once (onnxruntime and
    OpenVINO run the same ONNX files). An int8 export that cannot meet its accuracy
    target (VerificationFailed) is a candidate that does not exist, not a failed
    benchmark: it is None, `skipped` says why, and the rest is timed. So is a file the
    format cannot make (ExportFailed: XNNPACK refusing one precision's graph)."""

    def __init__(self, fmt, name, model, size, batch, tmp: Path, progress, skipped) -> None:
        self.fmt, self.name, self.model, self.size, self.batch = fmt, name, model, size, batch
        self.tmp, self.progress, self.skipped = tmp, progress, skipped
        self.files: dict[str, api.Artifact | None] = {}

    def get(self, precision: str) -> api.Artifact | None:
        if precision not in self.files:
            self.progress(f"exporting fused {self.fmt.name} at {precision}")
            try:
                self.files[precision] = api.export(
                    self.name,
                    self.fmt.name,
                    model=self.model,
                    output=self.tmp / f"fused.{precision}{self.fmt.suffix}",
                    image_size=self.size,
                    batch=self.batch,
                    precision=precision,
                )
            except (ExportFailed, VerificationFailed) as failure:
                self.skipped.append(f"{self.fmt.name} {precision}: {failure}")
                self.files[precision] = None
        return self.files[precision]


def _skipped(runtimes, precisions, native: tuple[str, ...]) -> list[str]:
    """Why an asked precision gets no row: bf16 runs only in OpenVINO, and OpenVINO
    runs bf16 and fp16 only where the CPU computes them (`native`)."""
    notes = []
    if "bf16" in precisions and "openvino" not in runtimes:
        notes.append("bf16: only the openvino runtime runs it (--runtime openvino)")
    if "openvino" in runtimes:
        notes += [
            f"openvino {p}: this CPU has no native {p}"
            for p in precisions
            if p in ov_runtime.HINTS and p != "fp32" and p not in native
        ]
    return notes


def _openvino_candidates(onnx_files: _FormatFiles, precisions, native, threads: int) -> dict:
    """The fused fp32 file at fp32 and at each native reduced precision asked, and the
    int8 QDQ file (its float parts at fp32): OpenVINO's reduced float precisions need
    no file of their own."""
    out = {}
    for precision in ("fp32", *(p for p in ("bf16", "fp16") if p in precisions and p in native)):
        fused = onnx_files.get("fp32")
        runner = ov_runtime.OpenVINORunner(fused.path, threads, precision)
        suffix = "" if precision == "fp32" else f" {precision}"
        out[f"openvino, fused{suffix} (mvd)"] = Candidate(
            runner, "openvino", precision, fused.path, fused.metadata
        )
    quantized = onnx_files.get("int8") if "int8" in precisions else None
    if quantized is not None:
        runner = ov_runtime.OpenVINORunner(quantized.path, threads)
        out["openvino, fused int8 (mvd)"] = Candidate(
            runner, "openvino", "int8", quantized.path, quantized.metadata
        )
    return out


def _format_candidates(files: _FormatFiles, precisions, threads: int) -> dict:
    """The fused file of one format at each of its precisions asked, run by its runtime."""
    out = {}
    fmt = files.fmt
    asked = ("fp32", *(p for p in precisions if p != "fp32"))
    for precision in (p for p in asked if p in fmt.precisions):
        artifact = files.get(precision)
        if artifact is None:
            continue
        runner = fmt.open_runner(artifact.path, threads)
        suffix = "" if precision == "fp32" else f" {precision}"
        out[f"{fmt.runtime}, fused{suffix} (mvd)"] = Candidate(
            runner, fmt.runtime, precision, artifact.path, artifact.metadata
        )
    return out


def _accuracy_count(batch: int) -> int:
    """At least ACCURACY_IMAGES, whole batches: the files have a static batch."""
    return batch * math.ceil(ACCURACY_IMAGES / batch)


def _accuracy(model, spec, size, batch: int, candidates: dict[str, Candidate]) -> dict:
    """Each candidate against the unfused model in float64, judged as verify judges:
    fp32 to 1e-5 of the scale (or twice the unfused model's own fp32 error, where
    that is larger), reduced precisions by PSNR and decisive agreement; a file without
    bicubic resize against the model upsampling bilinear, a classifier answering with
    probabilities against the reference's."""
    task = spec.output_kind
    images = to_model_input(natural_images(_accuracy_count(batch), size, 0), spec)
    reference = TorchRunner(model, torch.float64)(images)
    noise_floor = compare(reference, TorchRunner(model)(images), task)["max_rel"]
    fp32_bound = max(
        {**DEFAULT_TOLERANCES, **spec.tolerances}["fp32"], NOISE_FLOOR_FACTOR * noise_floor
    )
    formats = sorted({c.metadata["format"] for c in candidates.values() if c.metadata})
    bilinear = _bilinear_reference(model, formats, images)
    out = {}
    for label, candidate in candidates.items():
        output = run_per_sample(candidate.run, images, batch)
        fmt = candidate.metadata.get("format")
        target = reference
        if bilinear is not None and fmt is not None and not FORMATS[fmt].has_bicubic:
            target = bilinear
        if candidate.metadata.get("probabilities"):
            target = _softmax(target)
        metrics = compare(target, output, task)
        if candidate.precision == "int8":
            bound = int8_bound_db(candidate.metadata)
        elif candidate.precision in REDUCED_PRECISION:
            bound = REDUCED_PRECISION[candidate.precision]["min_psnr_db"]
        else:
            bound = fp32_bound
        passed, words = judge(metrics, candidate.precision, bound)
        out[label] = {
            "runtime_name": candidate.runtime,
            "precision": candidate.precision,
            "max_rel": metrics["max_rel"],
            "psnr_db": metrics["psnr_db"],
            "agreement": metrics.get("decisive_agreement"),
            "passed": passed,
            "bound": words,
            "file_bytes": artifact_size(candidate.path) if candidate.path else None,
        }
    return out


def render(report: dict, console) -> None:
    """The timing table, then the decision table: each candidate's accuracy, bound and
    size beside its latency, the fastest one that passed marked. Two tables, because
    one holding both is too wide for a terminal or a CI log."""
    from rich.table import Table

    table = Table(
        title=f"{report['model']} @ {'x'.join(map(str, report['image_size']))}, "
        f"batch {report['batch']}, "
        f"{report['threads']} threads"
    )
    columns = (
        "runtime",
        "median ms",
        "p90 ms",
        "min ms",
        "std ms",
        "img/s",
        "GFLOP/s",
        "vs baseline",
    )
    for col in columns:
        table.add_column(col, justify="left" if col == "runtime" else "right")
    for r in report["results"]:
        table.add_row(
            r["runtime"],
            f"{r['median_ms']:.2f}",
            f"{r['p90_ms']:.2f}",
            f"{r['min_ms']:.2f}",
            f"{r['std_ms']:.2f}",
            f"{r['throughput_per_s']:.1f}",
            f"{r['gflops']:.1f} ({r['percent_of_peak']:.0f}%)",
            f"{r['ratio_to_baseline']:.2f}x",
        )
    console.print(table)
    console.print(
        f"baseline: {report['baseline']}; GFLOP/s from {report['macs_per_image'] / 1e9:.2f} GMACs "
        f"per image, % of this machine's fp32 matmul peak "
        f"({report['matmul_peak_gflops']:.0f} GFLOP/s); machine: {report['machine_line']}"
    )
    console.print(_decision_table(report))
    fastest = report["fastest_passing"]
    console.print(
        "agree: top-1 (or pixel) agreement on decisive inputs; fastest: the fastest row within "
        f"its bound, torch eager aside: {fastest or 'none passed'}"
    )
    for note in report["skipped"]:
        console.print(f"skipped: {note}")


def _decision_table(report: dict):
    from rich.table import Table

    table = Table(title=f"accuracy vs torch unfused (fp64), {report['accuracy_inputs']}")
    for col in ("runtime", "median ms", "PSNR dB", "agree", "bound", "MiB", ""):
        table.add_column(col, justify="left" if col == "runtime" else "right")
    for r in report["results"]:
        if r["runtime"] == report["fastest_passing"]:
            verdict = "[bold green]fastest[/]"
        else:
            verdict = "[green]pass[/]" if r["passed"] else "[bold red]FAIL[/]"
        table.add_row(
            r["runtime"],
            f"{r['median_ms']:.2f}",
            f"{r['psnr_db']:.1f}",
            "-" if r["agreement"] is None else f"{r['agreement']:.2f}",
            r["bound"],
            "-" if not r["file_bytes"] else f"{r['file_bytes'] / 2**20:.1f}",
            verdict,
        )
    return table


__all__ = ["benchmark", "fastest_passing", "int8_bound_db", "render"]
