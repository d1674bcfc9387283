"""`mvd bench`: what reparameterization buys at inference, measured fairly.

The baseline is what a user would otherwise ship: the unfused training-time model
through a plain `torch.onnx.export`, run by onnxruntime at its highest optimisation
level, which already folds Conv+BN by itself. The fused export runs in the same
session settings, and all candidates are timed interleaved (timing.interleaved) so
drifts of the machine hit them alike. PyTorch eager is shown for reference.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from . import api
from .errors import BadInput
from .exporters.formats import FORMATS, check_format
from .images import natural_images, to_model_input
from .info import count_macs
from .machine import machine_stamp, stamp_line
from .reparam import reparameterize
from .runtimes.onnxruntime import OrtRunner
from .runtimes.torch_runtime import TorchRunner, torch_threads
from .stress import apply_stress_weights
from .timing import interleaved, time_callable
from .zoo import get_spec

BASELINE = "onnxruntime, unfused (plain export)"
# onnxruntime and torch eager, then each other format's runtime from the table.
RUNTIMES = ("onnxruntime", "torch", *(f.runtime for f in FORMATS.values() if f.name != "onnx"))
DEFAULT_RUNTIMES = ("onnxruntime", "torch")
ORT_LEVEL = "all"


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
    the TFLite file; executorch: the .pte), at the precisions that format has."""
    api.check_image_size(get_spec(name), image_size)
    unknown = set(runtimes) - set(RUNTIMES)
    if unknown or not runtimes:
        raise BadInput(f"unknown runtime {sorted(unknown)}; choose from {', '.join(RUNTIMES)}")
    onnx_precisions = FORMATS["onnx"].precisions
    if not set(precisions) <= set(onnx_precisions):
        choices = ", ".join(onnx_precisions)
        raise BadInput(f"unknown precision in {', '.join(precisions)}; choose from {choices}")
    others = [f for f in FORMATS.values() if f.name != "onnx" and f.runtime in runtimes]
    for fmt in others:
        check_format(fmt.name)
        if not fmt.runs_here():
            raise BadInput(f"{fmt.runtime} runs {fmt.runs_only_on}: it cannot be timed here")
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
    candidates: dict[str, Callable[[], object]] = {}
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
        fused = api.export(
            spec.name, model=model, output=Path(tmp) / "fused.onnx", image_size=size, batch=batch
        )
        unfused_ort = OrtRunner(plain.path, threads, ORT_LEVEL, spinning=False)
        fused_ort = OrtRunner(fused.path, threads, ORT_LEVEL, spinning=False)
        # The plain export is the baseline of every ratio, so it always runs.
        candidates[BASELINE] = lambda: unfused_ort(x)
        if "onnxruntime" in runtimes:
            candidates["onnxruntime, fused (mvd)"] = lambda: fused_ort(x)
            for precision in (p for p in precisions if p != "fp32"):
                progress(f"exporting fused ONNX at {precision}")
                reduced = api.export(
                    spec.name,
                    model=model,
                    output=Path(tmp) / f"fused.{precision}.onnx",
                    image_size=size,
                    batch=batch,
                    precision=precision,
                )
                runner = OrtRunner(reduced.path, threads, ORT_LEVEL, spinning=False)
                candidates[f"onnxruntime, fused {precision} (mvd)"] = partial(runner, x)
        for fmt in others:
            candidates.update(
                _format_candidates(
                    fmt, spec.name, model, size, batch, precisions, threads, x, Path(tmp), progress
                )
            )
        if "torch" in runtimes:
            eager_unfused = TorchRunner(model)
            eager_fused = TorchRunner(reparameterize(model, image_size=size))
            candidates["torch eager, unfused"] = lambda: eager_unfused(x)
            candidates["torch eager, fused (mvd)"] = lambda: eager_fused(x)
        progress(f"timing {len(candidates)} candidates interleaved")
        with torch_threads(threads):
            results = interleaved(candidates, batch=batch, min_runs=min_runs, min_time_s=min_time_s)
    base = results[BASELINE].median_ms
    stamp = machine_stamp()
    progress("measuring the matmul peak")
    peak = matmul_peak_gflops(threads)
    # The useful work is the fused model's: unfused branches are overhead, not output.
    macs = count_macs(reparameterize(model, image_size=size), size)
    gflop = 2 * macs * batch / 1e9
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
        "results": [
            {
                "runtime": key,
                **res.to_dict(),
                "ratio_to_baseline": res.median_ms / base,
                "gflops": gflop / (res.median_ms / 1e3),
                "percent_of_peak": 100 * gflop / (res.median_ms / 1e3) / peak,
            }
            for key, res in results.items()
        ],
    }


def _format_candidates(fmt, name, model, size, batch, precisions, threads, x, tmp: Path, progress):
    """The fused file of one format at each of its precisions asked, run by its runtime."""
    out = {}
    asked = ("fp32", *(p for p in precisions if p != "fp32"))
    for precision in (p for p in asked if p in fmt.precisions):
        progress(f"exporting fused {fmt.name} at {precision}")
        artifact = api.export(
            name,
            fmt.name,
            model=model,
            output=tmp / f"fused.{precision}{fmt.suffix}",
            image_size=size,
            batch=batch,
            precision=precision,
        )
        runner = fmt.open_runner(artifact.path, threads)
        suffix = "" if precision == "fp32" else f" {precision}"
        out[f"{fmt.runtime}, fused{suffix} (mvd)"] = partial(runner, x)
    return out


def render(report: dict, console) -> None:
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


__all__ = ["benchmark", "render"]
