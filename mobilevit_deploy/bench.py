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
its precision's bound (judge.py), and the report names the fastest candidate that
passed (`fastest_passing`). Torch eager is timed and judged but never chosen: it is
not an artifact one ships.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from . import api
from .bench_device import device_machine, device_runtimes, emulation_note, time_on_device
from .errors import BackendUnavailable, BadInput, ExportFailed, VerificationFailed
from .exporters.formats import FORMATS, check_format
from .files import artifact_size
from .images import natural_images, to_model_input
from .info import count_macs
from .judge import bound_for, judge
from .machine import machine_stamp, precision_notes, stamp_line
from .metrics import compare
from .rebuild import open_files, rebuild
from .reparam import reparameterize
from .request import Request
from .runtimes import open_runner, run_per_sample
from .runtimes import openvino as ov_runtime
from .runtimes.onnxruntime import OrtRunner
from .runtimes.torch_runtime import TorchRunner, torch_threads
from .stress import apply_stress_weights
from .timing import interleaved, time_callable
from .verify import softmax

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


def benchmark(
    name: str | None = None,
    *,
    files: Sequence[str | Path] = (),
    request: Request | None = None,
    batch: int = 1,
    threads: int | None = None,
    min_time_s: float = 3.0,
    min_runs: int = 20,
    runtimes: tuple[str, ...] = DEFAULT_RUNTIMES,
    progress: Callable[[str], None] = lambda _msg: None,
    **options,
) -> dict:
    """Time `name`'s fused files against the plain unfused export, or the user's own
    `files` side by side with that baseline (the model rebuilt from their records,
    rebuild.py). `request.precisions` beyond fp32 add the fused file at fp16 / int8 as
    candidates, for onnxruntime and for each other format whose runtime is among
    `runtimes` (litert: the TFLite file; executorch: the .pte), at the precisions that
    format has. openvino runs the fused ONNX file at fp32 and at each of bf16 / fp16
    this CPU computes natively, and the int8 QDQ file; a precision no asked runtime
    runs here is skipped, and the report's `skipped` says why."""
    request = Request.of(request, **options)
    precisions = request.precisions or ("fp32",)
    device = request.device
    device_skipped: list[str] = []
    if device is not None:  # only files go to a device (bench_device.py)
        runtimes = device_runtimes(tuple(runtimes), device_skipped)
    others = _check_runtimes(runtimes, given_files=bool(files) or device is not None)
    threads = threads or os.cpu_count() or 1
    opened = open_files([Path(f) for f in files]) if files else []
    model = _bench_model(name, opened, request)
    if opened:
        batch = _files_batch(opened)
    spec = model.mvd_spec  # the checkpoint's model: a LeViT fine-tuned at 256 runs at 256
    size = spec.input_hw
    x = to_model_input(natural_images(batch, size, 0), spec)
    native = ov_runtime.inference_precisions() if "openvino" in runtimes else ()
    skipped = device_skipped + _skipped(runtimes, precisions, native)
    with tempfile.TemporaryDirectory() as tmp:
        progress("exporting the plain unfused ONNX file (the baseline)")
        plain = api.export(
            spec.name,
            model=model,
            output=Path(tmp) / "unfused.onnx",
            batch=batch,
            reparam=False,
            simplify=False,
        )
        unfused_ort = (
            OrtRunner(plain.path, threads, ORT_LEVEL, spinning=False)
            if device is None
            else open_runner("onnx", plain.path, threads, device)
        )
        # The plain export is the baseline of every ratio, so it always runs.
        candidates = {
            BASELINE: Candidate(unfused_ort, "onnxruntime", "fp32", plain.path, plain.metadata)
        }
        if opened:
            candidates.update(_given_candidates(opened, threads, device))
        else:
            made = _Made(spec.name, model, size, batch, Path(tmp), progress, skipped, device)
            candidates.update(_made_candidates(made, runtimes, others, precisions, native, threads))
        if "torch" in runtimes:
            candidates.update(_torch_candidates(model))
        progress(f"measuring the accuracy of {len(candidates)} candidates")
        with torch_threads(threads):
            accuracy = _accuracy(model, spec, size, batch, candidates)
        results = _timings(candidates, x, batch, threads, min_time_s, min_runs, device, progress)
    if results is None:
        skipped.append(emulation_note(device))
    stopping = {"min_runs": min_runs, "min_time_s": min_time_s}
    report = _report(
        model,
        batch,
        threads,
        results,
        accuracy,
        unfused_ort,
        skipped,
        stopping,
        progress,
        here=device is None,
    )
    if device is not None:
        report["machine"] = device_machine(device)
        report["machine_line"] = stamp_line(report["machine"])
        report["cpu_notes"] = report["machine"]["notes"]
    return report


def _timings(candidates, x, batch, threads, min_time_s, min_runs, device, progress):
    """Every candidate's latency: here interleaved, on a device by its own loop there,
    and under emulation none (None)."""
    if device is not None:
        if emulation_note(device):
            return None
        runners = {label: c.run for label, c in candidates.items()}
        return time_on_device(runners, x, batch, min_time_s, min_runs, progress)
    progress(f"timing {len(candidates)} candidates interleaved")
    timed = {label: partial(c.run, x) for label, c in candidates.items()}
    with torch_threads(threads):
        return interleaved(timed, batch=batch, min_runs=min_runs, min_time_s=min_time_s)


def _check_runtimes(runtimes: Sequence[str], given_files: bool) -> list:
    """The formats (beyond ONNX) whose runtimes were asked, each able to run here; an
    unknown or missing runtime is refused before any work."""
    unknown = set(runtimes) - set(RUNTIMES)
    if unknown or not runtimes:
        raise BadInput(f"unknown runtime {sorted(unknown)}; choose from {', '.join(RUNTIMES)}")
    others = [f for f in FORMATS.values() if f.name != "onnx" and f.runtime in runtimes]
    for fmt in others if not given_files else ():
        check_format(fmt.name)
        if not fmt.runs_here():
            raise BadInput(f"{fmt.runtime} runs {fmt.runs_only_on}: it cannot be timed here")
    if "openvino" in runtimes and not ov_runtime.available():
        raise BackendUnavailable(f"the openvino runtime needs openvino: {ov_runtime.INSTALL_HINT}")
    return others


def _bench_model(name: str | None, opened: list, request: Request):
    """The unfused model: rebuilt from the given files' records, or loaded by name (with
    stress weights where none were given: freshly initialised weights can hit denormal
    slow paths, which no trained model does)."""
    if opened:
        return rebuild(opened, request).model
    model = api.load_model(name, request.weights, **request.model_options)
    if model.mvd_provenance is None:
        spec = model.mvd_spec
        calibration = to_model_input(natural_images(4, spec.input_hw, 1), spec)
        apply_stress_weights(model, torch.from_numpy(calibration))
    return model


def _torch_candidates(model) -> dict:
    """Torch eager, unfused and fused: timed and judged for reference, never shipped."""
    fused = reparameterize(model, image_size=model.mvd_spec.input_hw)
    return {
        "torch eager, unfused": Candidate(TorchRunner(model), "torch", "fp32"),
        "torch eager, fused (mvd)": Candidate(TorchRunner(fused), "torch", "fp32"),
    }


@dataclass(frozen=True)
class _Made:
    """What the fused files of a model-name run are made from."""

    name: str
    model: object
    size: tuple[int, int]
    batch: int
    tmp: Path
    progress: Callable[[str], None]
    skipped: list[str]
    device: str | None = None  # where the files run (None: here)

    def files(self, fmt) -> _FormatFiles:
        files = _FormatFiles(
            fmt, self.name, self.model, self.size, self.batch, self.tmp, self.progress, self.skipped
        )
        files.device = self.device
        return files


def _made_candidates(made: _Made, runtimes, others, precisions, native, threads: int) -> dict:
    """The fused files of a model-name run: ONNX in onnxruntime and OpenVINO, then each
    other asked format in its runtime."""
    out = _onnx_candidates(made.files(FORMATS["onnx"]), runtimes, precisions, native, threads)
    for fmt in others:
        out.update(_format_candidates(made.files(fmt), precisions, threads))
    return out


def _report(
    model, batch, threads, results, accuracy, session, skipped, stopping, progress, here=True
) -> dict:
    """The report of a run: each row's latency, ratio, rate and accuracy (`results`
    None: accuracy alone). The matmul peak is this machine's, so only `here`."""
    spec = model.mvd_spec
    size = spec.input_hw
    stamp = machine_stamp()
    peak = None
    if here:
        progress("measuring the matmul peak")
        peak = matmul_peak_gflops(threads)
    # The useful work is the fused model's: unfused branches are overhead, not output.
    macs = count_macs(reparameterize(model, image_size=size), size)
    gflop = 2 * macs * batch / 1e9
    base = results[BASELINE].median_ms if results else None
    rows = [
        {
            "runtime": key,
            **_timing_fields(results[key] if results else None, base, gflop, peak),
            **accuracy[key],
        }
        for key in accuracy
    ]
    return {
        "model": spec.name,
        "image_size": list(size),
        "batch": batch,
        "threads": threads,
        "onnxruntime_session": session.options,
        "baseline": BASELINE,
        "machine": stamp,
        "machine_line": stamp_line(stamp),
        "macs_per_image": macs,
        "matmul_peak_gflops": peak,
        "stopping": stopping,
        "accuracy_inputs": f"{_accuracy_count(batch)} natural-looking images",
        "results": rows,
        "fastest_passing": fastest_passing(rows),
        "cpu_notes": precision_notes(stamp["isa"], stamp["arch"]),
        "skipped": skipped,
    }


def _timing_fields(res, base: float | None, gflop: float, peak: float | None) -> dict:
    if res is None:
        return {"median_ms": None}
    rate = gflop / (res.median_ms / 1e3)
    return {
        **res.to_dict(),
        "ratio_to_baseline": res.median_ms / base,
        "gflops": rate,
        "percent_of_peak": 100 * rate / peak if peak else None,
    }


def _files_batch(files) -> int:
    """The static batch the given files share (their records', else their shapes')."""
    batches = set()
    for file in files:
        shape = (file.record or {}).get("input_shape") or file.facts.get("input_shape") or [1]
        batches.add(shape[0] if isinstance(shape[0], int) else 1)
    if len(batches) > 1:
        raise BadInput(f"the files have different batch sizes ({sorted(batches)})")
    return batches.pop()


def _given_candidates(files, threads: int, device: str | None) -> dict:
    """The user's files, each run by its format's runtime."""
    out = {}
    for file in files:
        check_format(file.format)
        fmt = FORMATS[file.format]
        if device is None and not fmt.runs_here():
            raise BadInput(
                f"{file.path}: {fmt.runtime} runs {fmt.runs_only_on}; it cannot be timed here"
            )
        runner = open_runner(file.format, file.path, threads, device)
        out[f"{fmt.runtime}, {file.path.name}"] = Candidate(
            runner, fmt.runtime, file.precision, file.path, file.record or {"format": file.format}
        )
    return out


def _onnx_candidates(onnx_files, runtimes, precisions, native, threads: int) -> dict:
    """The fused ONNX file (and its reduced precisions) in onnxruntime and OpenVINO."""
    out = {}
    if "onnxruntime" in runtimes:
        out.update(_format_candidates(onnx_files, precisions, threads))
    if "openvino" in runtimes:
        out.update(_openvino_candidates(onnx_files, precisions, native, threads))
    return out


def fastest_passing(rows: list[dict]) -> str | None:
    """The label of the fastest row that passed its bound, torch eager excluded (no
    artifact ships it); None when nothing deployable passed."""
    passing = [
        r
        for r in rows
        if r["passed"] and r["runtime_name"] != "torch" and r["median_ms"] is not None
    ]
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
        self.device: str | None = None

    def runner(self, artifact: api.Artifact, threads: int):
        """onnxruntime at the benchmark's session settings here; the device's runner there."""
        if self.device is not None:
            return open_runner(self.fmt.name, artifact.path, threads, self.device)
        if self.fmt.name == "onnx":
            return OrtRunner(artifact.path, threads, ORT_LEVEL, spinning=False)
        return self.fmt.open_runner(artifact.path, threads)

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
        runner = files.runner(artifact, threads)
        suffix = "" if precision == "fp32" else f" {precision}"
        out[f"{fmt.runtime}, fused{suffix} (mvd)"] = Candidate(
            runner, fmt.runtime, precision, artifact.path, artifact.metadata
        )
    return out


def _accuracy_count(batch: int) -> int:
    """At least ACCURACY_IMAGES, whole batches: the files have a static batch."""
    return batch * math.ceil(ACCURACY_IMAGES / batch)


def _accuracy(model, spec, size, batch: int, candidates: dict[str, Candidate]) -> dict:
    """Each candidate against the unfused model in float64, judged as verify judges
    (judge.py): a file that upsamples bilinear against the model upsampling bilinear, a
    classifier answering with probabilities against the reference's."""
    task = spec.output_kind
    images = to_model_input(natural_images(_accuracy_count(batch), size, 0), spec)
    reference = TorchRunner(model, torch.float64)(images)
    noise_floor = compare(reference, TorchRunner(model)(images), task).max_rel
    bilinear = None
    out = {}
    for label, candidate in candidates.items():
        output = run_per_sample(candidate.run, images, batch)
        target = reference
        if candidate.metadata.get("upsample") == "bilinear" and hasattr(model, "set_upsample"):
            if bilinear is None:
                swapped = copy.deepcopy(model)
                swapped.set_upsample("bilinear")
                bilinear = TorchRunner(swapped, torch.float64)(images)
            target = bilinear
        if candidate.metadata.get("probabilities"):
            target = softmax(target)
        metrics = compare(target, output, task)
        bound = bound_for(
            candidate.precision,
            record=candidate.metadata,
            tolerances=spec.tolerances,
            noise_floor=noise_floor,
        )
        verdict = judge(metrics, bound)
        out[label] = {
            "runtime_name": candidate.runtime,
            "precision": candidate.precision,
            "max_rel": metrics.max_rel,
            "psnr_db": metrics.psnr_db,
            "agreement": metrics.decisive_agreement,
            "passed": verdict.passed,
            "bound": verdict.words,
            "file_bytes": artifact_size(candidate.path) if candidate.path else None,
        }
    return out


def render(report: dict, console) -> None:
    """The timing table, then the decision table: each candidate's accuracy, bound and
    size beside its latency, the fastest one that passed marked. Two tables, because
    one holding both is too wide for a terminal or a CI log. Without timings (an
    emulated device), the decision table alone."""
    if any(r["median_ms"] is not None for r in report["results"]):
        _timing_table(report, console)
    else:
        console.print(f"machine: {report['machine_line']}")
    console.print(_decision_table(report))
    fastest = report["fastest_passing"]
    console.print(
        "agree: top-1 (or pixel) agreement on decisive inputs; fastest: the fastest row within "
        f"its bound, torch eager aside: {fastest or 'none passed'}"
    )
    for note in report.get("cpu_notes", []):
        console.print(f"this CPU: {note}")
    for note in report["skipped"]:
        console.print(f"skipped: {note}")


def _timing_table(report: dict, console) -> None:
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
            f"{r['gflops']:.1f}"
            + ("" if r["percent_of_peak"] is None else f" ({r['percent_of_peak']:.0f}%)"),
            f"{r['ratio_to_baseline']:.2f}x",
        )
    console.print(table)
    peak = report["matmul_peak_gflops"]
    console.print(
        f"baseline: {report['baseline']}; GFLOP/s from {report['macs_per_image'] / 1e9:.2f} GMACs "
        "per image"
        + ("" if peak is None else f", % of this machine's fp32 matmul peak ({peak:.0f} GFLOP/s)")
        + f"; machine: {report['machine_line']}"
    )


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
            "-" if r["median_ms"] is None else f"{r['median_ms']:.2f}",
            f"{r['psnr_db']:.1f}",
            "-" if r["agreement"] is None else f"{r['agreement']:.2f}",
            r["bound"],
            "-" if not r["file_bytes"] else f"{r['file_bytes'] / 2**20:.1f}",
            verdict,
        )
    return table


__all__ = ["benchmark", "fastest_passing", "render"]
