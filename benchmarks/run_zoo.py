"""Bench the zoo and write benchmarks/RESULTS.md and benchmarks/results.json.

    python benchmarks/run_zoo.py                      # every model, all cores
    python benchmarks/run_zoo.py --family fastvit --threads 1 --min-time 5

Each model: the plain unfused ONNX export (the baseline a user would otherwise ship)
against the fused export, both in onnxruntime at ORT_ENABLE_ALL, timed interleaved,
plus PyTorch eager for reference. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

from mobilevit_deploy.bench import BASELINE, benchmark
from mobilevit_deploy.info import count_macs, count_params
from mobilevit_deploy.registry import list_models
from mobilevit_deploy.reparam import reparameterize
from mobilevit_deploy.report import markdown_table

HERE = Path(__file__).parent
FUSED_ORT = "onnxruntime, fused (mvd)"


def _row(report: dict, spec) -> list[str]:
    by = {r["runtime"]: r for r in report["results"]}
    model = spec.build()
    fused = reparameterize(model)
    macs = count_macs(fused, tuple(report["image_size"]))
    base, ours = by[BASELINE], by[FUSED_ORT]
    cells = [
        spec.name,
        "x".join(map(str, report["image_size"])),
        f"{count_params(model) / 1e6:.2f} / {count_params(fused) / 1e6:.2f}",
        f"{macs / 1e9:.2f}",
        f"{base['median_ms']:.1f}",
        f"{ours['median_ms']:.1f}",
        f"**{ours['ratio_to_baseline']:.2f}**",
    ]
    for key in ("torch eager, unfused", "torch eager, fused (mvd)"):
        cells.append(f"{by[key]['median_ms']:.1f}" if key in by else "-")
    return cells


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default=None)
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--min-time", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    specs = [s for s in list_models(args.family) if not args.models or s.name in args.models]
    reports, rows = [], []
    for spec in specs:
        print(f"benchmarking {spec.name} ...", file=sys.stderr, flush=True)
        report = benchmark(spec.name, threads=args.threads, min_time_s=args.min_time)
        reports.append(report)
        rows.append(_row(report, spec))
        print(f"  fused/unfused = {rows[-1][6]}", file=sys.stderr, flush=True)
    stamp = reports[0]["machine_line"] if reports else ""
    headers = [
        "model",
        "input",
        "params M (train / fused)",
        "GMACs",
        "ORT unfused ms",
        "ORT fused ms",
        "fused / unfused",
        "eager unfused ms",
        "eager fused ms",
    ]
    date = datetime.date.today().isoformat()
    threads = reports[0]["threads"] if reports else args.threads
    text = (
        "# Measured results\n\n"
        f"Written by `python benchmarks/run_zoo.py` on {date}.\n\n"
        f"Machine: {stamp}.\n\n"
        f"Batch 1, {threads} threads, onnxruntime CPU at ORT_ENABLE_ALL (which folds Conv+BN "
        "itself), median latency of interleaved runs (at least "
        f"{args.min_time:g} s and 20 runs each; slow outliers above median + 3 x 1.4826 x MAD "
        "dropped). *fused / unfused* is the fused export's median over the plain unfused "
        "export's, measured in the same run: below 1 is faster.\n\n" + markdown_table(headers, rows)
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "RESULTS.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps(reports, indent=2, sort_keys=True) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
