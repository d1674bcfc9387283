"""Bench the zoo; write benchmarks/RESULTS.md, results.json and zoo_latency.png.

    python benchmarks/run_zoo.py                      # every model, all cores
    python benchmarks/run_zoo.py --family fastvit --threads 1 --min-time 5
    python benchmarks/run_zoo.py --resume             # reuse runs/ records, fill gaps

Each model: the plain unfused ONNX export (the baseline a user would otherwise ship)
against the fused export, both in onnxruntime at ORT_ENABLE_ALL, timed interleaved,
plus PyTorch eager for reference. Segmenters run at their native resolution and at a
mobile-sized one (half the height and width); above 512x512 pixels a run takes
seconds, so those take 5 runs minimum instead of 20, and skip eager PyTorch.
Every model's report is kept in runs/ as it finishes, so an interrupted run resumes.
Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

from mobilevit_deploy.bench import BASELINE, benchmark
from mobilevit_deploy.info import count_params
from mobilevit_deploy.plots import plot_zoo
from mobilevit_deploy.reparam import reparameterize
from mobilevit_deploy.report import markdown_table
from mobilevit_deploy.zoo import list_models

HERE = Path(__file__).parent
FUSED_ORT = "onnxruntime, fused (mvd)"
EAGER = ("torch eager, unfused", "torch eager, fused (mvd)")
HEADERS = [
    "model",
    "input",
    "params M (train / fused)",
    "GMACs",
    "ORT unfused ms",
    "ORT fused ms",
    "fused / unfused",
    "fused GFLOP/s (% of peak)",
    "eager unfused ms",
    "eager fused ms",
]


def summarize(report: dict, spec) -> dict:
    by = {r["runtime"]: r for r in report["results"]}
    model = spec.build()
    return {
        "name": spec.name,
        "task": spec.task,
        "input": "x".join(map(str, report["image_size"])),
        "params_m": count_params(model) / 1e6,
        "fused_params_m": count_params(
            reparameterize(model, image_size=tuple(report["image_size"]))
        )
        / 1e6,
        "gmacs": report["macs_per_image"] / 1e9,
        "unfused_ms": by[BASELINE]["median_ms"],
        "fused_ms": by[FUSED_ORT]["median_ms"],
        "ratio": by[FUSED_ORT]["ratio_to_baseline"],
        "fused_gflops": by[FUSED_ORT]["gflops"],
        "percent_of_peak": by[FUSED_ORT]["percent_of_peak"],
        "eager_ms": [by[k]["median_ms"] if k in by else None for k in EAGER],
    }


def table_row(s: dict) -> list[str]:
    return [
        s["name"],
        s["input"],
        f"{s['params_m']:.2f} / {s['fused_params_m']:.2f}",
        f"{s['gmacs']:.2f}",
        f"{s['unfused_ms']:.1f}",
        f"{s['fused_ms']:.1f}",
        f"**{s['ratio']:.2f}**",
        f"{s['fused_gflops']:.0f} ({s['percent_of_peak']:.0f}%)",
        *(f"{ms:.1f}" if ms is not None else "-" for ms in s["eager_ms"]),
    ]


def inject_readme(readme: Path, results: str) -> None:
    """Put the results (their headline dropped, the plot path made relative to the
    README) between the README's results markers, so the front page quotes this run."""
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    text = readme.read_text()
    if start not in text or end not in text:
        return
    body = results.split("\n", 2)[2].replace("## ", "### ")
    body = body.replace("(zoo_latency.png)", "(benchmarks/zoo_latency.png)")
    head, rest = text.split(start, 1)
    readme.write_text(head + start + "\n" + body.strip() + "\n" + end + rest.split(end, 1)[1])


def results_markdown(reports: list[dict], summaries: list[dict], min_time: float) -> str:
    """`min_time`: the stopping time of records too old to carry their own."""
    first = reports[0]
    min_time = min(r.get("stopping", {}).get("min_time_s", min_time) for r in reports)
    classifiers = [table_row(s) for s in summaries if s["task"] == "classification"]
    segmenters = [table_row(s) for s in summaries if s["task"] == "segmentation"]
    text = (
        "# Measured results\n\n"
        f"Written by `python benchmarks/run_zoo.py` on {datetime.date.today().isoformat()}.\n\n"
        f"Machine: {first['machine_line']}.\n\n"
        f"Batch 1, {first['threads']} threads, onnxruntime CPU at ORT_ENABLE_ALL (which folds "
        "Conv+BN itself), median latency of interleaved runs in rotating order (at least "
        f"{min_time:g} s and 20 runs each, 5 above 512x512 pixels; slow outliers above "
        "median + 3 x 1.4826 x MAD dropped). *fused / unfused* is the fused export's median "
        "over the plain unfused export's, measured in the same run: below 1 is faster. "
        "GFLOP/s counts the fused model's MACs; the peak is this machine's measured fp32 "
        f"matmul rate ({first['matmul_peak_gflops']:.0f} GFLOP/s).\n\n"
        "## Classification\n\n" + markdown_table(HEADERS, classifiers)
    )
    if segmenters:
        text += (
            "\n## Segmentation\n\nAt the native resolution and/or at half its height and width "
            "(mobile-sized): the input column says which. Eager PyTorch is skipped above "
            "512x512 pixels.\n\n" + markdown_table(HEADERS, segmenters)
        )
    return text + "\n![latency against GMACs, unfused to fused](zoo_latency.png)\n"


def jobs(specs, seg_sizes: str = "both") -> list[tuple]:
    """(spec, image size) pairs: classifiers at their size, segmenters at their native
    size and/or the mobile one (half the height and width)."""
    out = []
    for spec in specs:
        h, w = spec.input_hw
        if spec.task != "segmentation" or seg_sizes in ("native", "both"):
            out.append((spec, (h, w)))
        if spec.task == "segmentation" and seg_sizes in ("mobile", "both"):
            m = spec.size_multiple
            out.append((spec, (max(m, h // 2 // m * m), max(m, w // 2 // m * m))))
    return out


def run_job(spec, size: tuple[int, int], args) -> dict:
    big = size[0] * size[1] > 512 * 512
    return benchmark(
        spec.name,
        image_size=size,
        threads=args.threads,
        min_time_s=args.min_time,
        min_runs=5 if big else 20,
        runtimes=("onnxruntime",) if big else ("onnxruntime", "torch"),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default=None)
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--min-time", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--resume", action="store_true", help="Reuse reports in runs/.")
    parser.add_argument("--seg-sizes", choices=("native", "mobile", "both"), default="both")
    parser.add_argument("--note", default="", help="A sentence for RESULTS.md (e.g. reuse).")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="Run nothing: write RESULTS.md from the reports already in runs/.",
    )
    args = parser.parse_args()
    specs = [s for s in list_models(args.family) if not args.models or s.name in args.models]
    if not specs:
        parser.error("no model matches")
    runs = args.out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    reports, summaries = [], []
    for spec, size in jobs(specs, args.seg_sizes):
        record = runs / f"{spec.name}@{size[0]}x{size[1]}.json"
        if (args.resume or args.report_only) and record.exists():
            report = json.loads(record.read_text())
        elif args.report_only:
            continue
        else:
            print(f"benchmarking {spec.name} at {size[0]}x{size[1]} ...", file=sys.stderr)
            report = run_job(spec, size, args)
            record.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        reports.append(report)
        summaries.append(summarize(report, spec))
        print(f"  {spec.name}: fused/unfused = {summaries[-1]['ratio']:.2f}", file=sys.stderr)
    text = results_markdown(reports, summaries, args.min_time)
    if args.note:
        text = text.replace("\n\n## Classification", f" {args.note}\n\n## Classification", 1)
    (args.out / "RESULTS.md").write_text(text)
    if args.out == HERE:
        inject_readme(HERE.parent / "README.md", text)
    (args.out / "results.json").write_text(json.dumps(reports, indent=2, sort_keys=True) + "\n")
    plot_zoo(summaries, args.out / "zoo_latency.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
