"""Bench the zoo; write benchmarks/RESULTS.md, results.json and zoo_latency.png.

    python benchmarks/run_zoo.py                      # every model, all cores
    python benchmarks/run_zoo.py --family fastvit --threads 1 --min-time 5
    python benchmarks/run_zoo.py --resume             # reuse runs/ records, fill gaps
    python benchmarks/run_zoo.py --models fastvit_t8 levit_128s \
        --runtimes onnxruntime,openvino,torch --precisions fp32,int8,bf16

Each model: the plain unfused ONNX export (the baseline a user would otherwise ship)
against the fused export, both in onnxruntime at ORT_ENABLE_ALL, timed interleaved,
plus PyTorch eager for reference, and every other candidate of --runtimes x
--precisions (mvd bench's): each is judged against the float64 unfused model at its
precision's bound, and the table names the fastest one that passed. Segmenters run
at their native resolution and at a mobile-sized one (half the height and width);
above 512x512 pixels a run takes seconds, so those take 5 runs minimum instead of
20, and skip eager PyTorch.
Every model's report is kept in runs/ as it finishes, so an interrupted run resumes;
runs/ is committed, so a later session resumes too, but only on the same machine and
stack: a record from another CPU or other library versions is measured again, since
one table's latencies must come from one machine. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

from mobilevit_deploy.bench import BASELINE, DEFAULT_RUNTIMES, PRECISIONS, RUNTIMES, benchmark
from mobilevit_deploy.info import count_params
from mobilevit_deploy.judge import DEFAULT_TOLERANCES, NOISE_FLOOR_FACTOR, REDUCED_PRECISION
from mobilevit_deploy.machine import machine_stamp
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
    "fastest verified",
    "verified ms (vs plain)",
    "verified PSNR dB",
]
# What a record was asked to measure, kept in it: --resume reuses a record only when
# it measured the same candidates (a record from before candidates were judged has none).
ASKED = "zoo_candidates"
NOT_MEASURED = "not measured"


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
        "eager_ms": [by[k]["median_ms"] if k in by else None for k in EAGER],
        **fastest_verified(report, by),
    }


def fastest_verified(report: dict, by: dict[str, dict]) -> dict:
    """The report's `fastest_passing` row as the table shows it: its runtime and
    precision ("openvino bf16"), median, ratio to the plain export and PSNR. A report
    from before candidates were judged has no `fastest_passing`: "not measured"."""
    label = report.get("fastest_passing")
    if label is None:
        words = "none passed" if "fastest_passing" in report else NOT_MEASURED
        return {
            "fastest": words,
            **dict.fromkeys(("fastest_ms", "fastest_ratio", "fastest_psnr_db")),
        }
    row = by[label]
    plain = " (plain export)" if row["runtime"] == BASELINE else ""
    return {
        "fastest": f"{row['runtime_name']} {row['precision']}{plain}",
        "fastest_ms": row["median_ms"],
        "fastest_ratio": row["ratio_to_baseline"],
        "fastest_psnr_db": row["psnr_db"],
    }


def table_row(s: dict, peak_gflops: float) -> list[str]:
    return [
        s["name"],
        s["input"],
        f"{s['params_m']:.2f} / {s['fused_params_m']:.2f}",
        f"{s['gmacs']:.2f}",
        f"{s['unfused_ms']:.1f}",
        f"{s['fused_ms']:.1f}",
        f"**{s['ratio']:.2f}**",
        f"{s['fused_gflops']:.0f} ({100 * s['fused_gflops'] / peak_gflops:.0f}%)",
        *(f"{ms:.1f}" if ms is not None else "-" for ms in s["eager_ms"]),
        s["fastest"],
        "-" if s["fastest_ms"] is None else f"{s['fastest_ms']:.1f} ({s['fastest_ratio']:.2f}x)",
        "-" if s["fastest_psnr_db"] is None else f"{s['fastest_psnr_db']:.1f}",
    ]


def results_markdown(
    reports: list[dict], summaries: list[dict], min_time: float, note: str = ""
) -> str:
    """`min_time`: the stopping time of records too old to carry their own; `note`: a
    sentence ending the method paragraph (e.g. which records were reused)."""
    first = reports[0]
    min_time = min(r.get("stopping", {}).get("min_time_s", min_time) for r in reports)
    runtimes, precisions = asked_union(reports)
    # The machine's rate is the highest a job measured: a job's own measurement comes out
    # low when something else ran (records of 109-207 GFLOP/s here), which showed
    # models at 100% of "the peak".
    peak = max(r["matmul_peak_gflops"] for r in reports)
    classifiers = [table_row(s, peak) for s in summaries if s["task"] == "classification"]
    segmenters = [table_row(s, peak) for s in summaries if s["task"] == "segmentation"]
    machine = " ".join(
        [
            f"Machine: {first['machine_line']}.",
            isa_sentence(first.get("machine") or {}, runtimes, precisions),
            *skipped_sentences(reports),
        ]
    )
    text = (
        "# Measured results\n\n"
        f"Written by `python benchmarks/run_zoo.py` on {datetime.date.today().isoformat()}.\n\n"
        f"{machine}\n\n"
        f"Batch 1, {first['threads']} threads, onnxruntime CPU at ORT_ENABLE_ALL (which folds "
        "Conv+BN itself), median latency of interleaved runs in rotating order (at least "
        f"{min_time:g} s and 20 runs each, 5 above 512x512 pixels; slow outliers above "
        "median + 3 x 1.4826 x MAD dropped). *fused / unfused* is the fused export's median "
        "over the plain unfused export's, measured in the same run: below 1 is faster. "
        "GFLOP/s counts the fused model's MACs; the peak is this machine's fp32 matmul "
        f"rate, the highest that a job measured ({peak:.0f} GFLOP/s)."
        f"{' ' + note if note else ''}"
        f"\n\n{verified_paragraph(reports, runtimes, precisions)}\n\n"
        "## Classification\n\n" + markdown_table(HEADERS, classifiers)
    )
    if segmenters:
        text += (
            "\n## Segmentation\n\nAt the native resolution and/or at half its height and width "
            "(mobile-sized): the input column says which. Eager PyTorch is skipped above "
            "512x512 pixels.\n\n" + markdown_table(HEADERS, segmenters)
        )
    return text + "\n![latency against GMACs, unfused to fused](zoo_latency.png)\n"


def asked_of(report: dict) -> dict | None:
    """The candidates a record measured: those run_zoo kept in it, else mvd bench's
    defaults for a record that judged its candidates before run_zoo kept them, else
    None (a record from before candidates were judged)."""
    if report.get(ASKED):
        return report[ASKED]
    return asked_dict(DEFAULT_RUNTIMES, ("fp32",)) if "fastest_passing" in report else None


# What must match for a kept record's latencies to sit in one table with new ones (the
# kernel build in `os` changes with every boot of the same machine).
SAME_MACHINE = ("cpu_model", "arch", "isa", "logical_cores", "versions")


def rerun_reason(kept: dict, asked: dict, here: dict) -> str | None:
    """Why --resume measures a kept record again, or None to reuse it."""
    if asked_of(kept) != asked:
        return f"measured {asked_of(kept)}"
    stamp = kept.get("machine") or {}
    if any(stamp.get(key) != here.get(key) for key in SAME_MACHINE):
        return "is from another machine or stack"
    return None


def asked_dict(runtimes, precisions) -> dict:
    return {"runtimes": list(runtimes), "precisions": list(precisions)}


def asked_union(reports: list[dict]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Every runtime and precision some record measured, in mvd bench's order."""
    asked = [a for a in map(asked_of, reports) if a]
    runtimes = {n for a in asked for n in a["runtimes"]}
    precisions = {p for a in asked for p in a["precisions"]}
    return (
        tuple(n for n in RUNTIMES if n in runtimes),
        tuple(p for p in PRECISIONS if p in precisions),
    )


def _words(items) -> str:
    """Names as prose: a; a and b; a, b and c."""
    items = list(items)
    return ", ".join(items[:-1]) + " and " + items[-1] if len(items) > 1 else "".join(items)


def bound_words(precisions) -> str:
    """Each precision's bound as mvd bench judges it, precisions with one rule joined."""
    fp32 = DEFAULT_TOLERANCES["fp32"]
    rules = {
        "fp32": f"within {fp32:g} of the output scale (or {NOISE_FLOOR_FACTOR:g} x the unfused "
        "model's own fp32 error, where that is larger)"
    }
    for p in ("fp16", "bf16"):
        rule = REDUCED_PRECISION[p]
        rules[p] = (
            f"at least {rule['min_psnr_db']:g} dB PSNR with decisive agreement "
            f">= {rule['min_agreement']:g}"
        )
    rules["int8"] = (
        "at least its file's own accuracy target (the int8_target_db its export searched for, "
        f"else {REDUCED_PRECISION['int8']['min_psnr_db']:g} dB) with decisive agreement "
        f">= {REDUCED_PRECISION['int8']['min_agreement']:g}"
    )
    grouped: dict[str, list[str]] = {}
    for p in (p for p in PRECISIONS if p in ("fp32", *precisions)):
        grouped.setdefault(rules[p], []).append(p)
    return "; ".join(f"{_words(ps)} {rule}" for rule, ps in grouped.items())


def verified_paragraph(reports: list[dict], runtimes, precisions) -> str:
    """Which candidates ran and what *fastest verified* means."""
    asked = [asked_of(r) for r in reports]
    kinds = {json.dumps(a, sort_keys=True) for a in asked if a}
    names = _words("torch eager" if n == "torch" else n for n in runtimes)
    if not kinds:
        text = "No record judged its candidates: every *fastest verified* reads 'not measured'."
    else:
        bf16 = ", bf16 being OpenVINO computing the fp32 file" if "bf16" in precisions else ""
        text = (
            f"Candidates: the fused model in {names} at {_words(precisions)} (each precision "
            f"in the runtimes that run it{bf16}), and the plain export itself"
        )
        if len(kinds) > 1:
            text += " (not the same for every model: each record's `zoo_candidates` says)"
        text += (
            ". *Fastest verified* is the fastest of them whose outputs on "
            f"{reports[0].get('accuracy_inputs', 'natural-looking images')} stayed within its "
            "precision's bound against the float64 unfused model: "
            f"{bound_words(precisions)}. Torch eager is judged but never chosen (no file "
            "ships it). *vs plain* is its median over the plain export's; *none passed*: "
            "no candidate held its bound."
        )
    old = sum(a is None for a in asked)
    if kinds and old:
        text += f" {old} of {len(reports)} records predate candidate judging: "
        text += f"their *fastest verified* reads '{NOT_MEASURED}'."
    return text


def isa_sentence(stamp: dict, runtimes=(), precisions=()) -> str:
    """Whether this CPU has BF16 and VNNI, from the machine stamp's ISA flags (what
    OpenVINO bf16 and fast int8 need): a CPU without them is said to be without."""
    isa = {str(name).lower() for name in stamp.get("isa") or []}
    if not isa:
        return (
            "The machine stamp records no ISA flags: whether this CPU has BF16 or VNNI is unknown."
        )
    flags = " ".join(sorted(name.upper() for name in isa))
    if "bf16" not in isa:
        bf16 = "has no BF16: OpenVINO bf16 not measured"
    elif "openvino" in runtimes and "bf16" in precisions:
        bf16 = "has BF16: OpenVINO bf16 is a candidate"
    else:
        bf16 = "has BF16, but OpenVINO bf16 was not asked for"
    if "vnni" in isa:
        vnni = "has VNNI" + (": int8 can use its int8 dot products" if "int8" in precisions else "")
    elif "neon" in isa or stamp.get("arch") in ("aarch64", "arm64"):
        dots = [n.upper() for n in ("dotprod", "i8mm") if n in isa]
        vnni = f"has no VNNI (x86's; ARM int8 dot products here: {' '.join(dots) or 'none'})"
    else:
        vnni = "has no VNNI" + (
            ": int8 is timed without its int8 dot products" if "int8" in precisions else ""
        )
    return f"From the stamp's ISA flags ({flags}), this CPU {bf16}, and {vnni}."


def skipped_sentences(reports: list[dict]) -> list[str]:
    """mvd bench's `skipped` notes: those of every record once (this CPU's), the rest
    by model (an int8 export that missed its target is no candidate)."""
    notes = [[n.splitlines()[0] for n in r.get("skipped", [])] for r in reports]
    common = [n for n in notes[0] if all(n in ns for ns in notes)]
    out = [f"Skipped: {'; '.join(common)}."] if common else []
    own = []
    for report, ns in zip(reports, notes, strict=True):
        if labels := [n.split(":")[0] for n in ns if n not in common]:
            size = "x".join(map(str, report["image_size"]))
            own.append(f"{report['model']} {size} ({', '.join(labels)})")
    if own:
        out.append(f"Not candidates (results.json `skipped` says why): {'; '.join(own)}.")
    return out


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
    """One model's report, with the candidates it was asked for kept in it."""
    big = size[0] * size[1] > 512 * 512
    report = benchmark(
        spec.name,
        image_size=size,
        threads=args.threads,
        min_time_s=args.min_time,
        min_runs=5 if big else 20,
        runtimes=tuple(n for n in args.runtimes if not big or n != "torch"),
        precisions=args.precisions,
    )
    return {**report, ASKED: asked_dict(args.runtimes, args.precisions)}


def name_list(choices: tuple[str, ...], always: tuple[str, ...] = ()):
    """An argparse type: comma-separated names from `choices`, in their order."""

    def parse(text: str) -> tuple[str, ...]:
        names = {n.strip() for n in text.split(",") if n.strip()}
        if unknown := names - set(choices):
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(sorted(unknown))}; choose from {','.join(choices)}"
            )
        return tuple(n for n in choices if n in names or n in always)

    return parse


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    specs = selected_specs(parser, args)
    runs = args.out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    reports, summaries = [], []
    asked, here = asked_dict(args.runtimes, args.precisions), machine_stamp()
    for spec, size in jobs(specs, args.seg_sizes):
        record = runs / f"{spec.name}@{size[0]}x{size[1]}.json"
        report = job_report(spec, size, record, args, asked, here)
        if report is None:
            continue
        reports.append(report)
        summaries.append(summarize(report, spec))
        print(progress_line(summaries[-1]), file=sys.stderr)
    if not reports:
        parser.error(f"no report in {runs} to write RESULTS.md from")
    text = results_markdown(reports, summaries, args.min_time, args.note)
    (args.out / "RESULTS.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps(reports, indent=2, sort_keys=True) + "\n")
    plot_zoo(summaries, args.out / "zoo_latency.png")
    print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
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
        "--runtimes",
        type=name_list(RUNTIMES),
        default=DEFAULT_RUNTIMES,
        help=f"Comma-separated, of {','.join(RUNTIMES)} (default: {','.join(DEFAULT_RUNTIMES)}); "
        "onnxruntime is needed (the table's ORT columns).",
    )
    parser.add_argument(
        "--precisions",
        type=name_list(PRECISIONS, always=("fp32",)),
        default=("fp32",),
        help=f"Comma-separated, of {','.join(PRECISIONS)} (default: fp32, always measured).",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="Run nothing: write RESULTS.md from the reports already in runs/.",
    )
    return parser


def selected_specs(parser: argparse.ArgumentParser, args) -> list:
    """The models of --family and --models; a usage error (exit 2) for a run without
    onnxruntime, an unknown model or none at all, before anything is measured."""
    if "onnxruntime" not in args.runtimes:
        parser.error("--runtimes needs onnxruntime: the table's ORT columns are its")
    known = {s.name for s in list_models()}
    if args.models and (unknown := sorted(set(args.models) - known)):
        parser.error(f"unknown model {', '.join(unknown)}")
    specs = [s for s in list_models(args.family) if not args.models or s.name in args.models]
    if not specs:
        parser.error("no model matches")
    return specs


def job_report(
    spec, size: tuple[int, int], record: Path, args, asked: dict, here: dict
) -> dict | None:
    """The job's report: its kept record when --report-only, or when --resume and the
    record measured what is asked on this machine and stack (rerun_reason); else
    measured now and kept in `record`. None when --report-only finds no record."""
    kept = None
    if (args.resume or args.report_only) and record.exists():
        kept = json.loads(record.read_text())
    reason = None if kept is None else rerun_reason(kept, asked, here)
    if kept is not None and (args.report_only or reason is None):
        return kept
    if args.report_only:
        return None
    if reason is not None:
        print(f"  {record.name} {reason}: re-running", file=sys.stderr)
    print(f"benchmarking {spec.name} at {size[0]}x{size[1]} ...", file=sys.stderr)
    report = run_job(spec, size, args)
    record.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report


def progress_line(s: dict) -> str:
    """A finished job's summary for stderr: the fused-over-unfused ratio and the fastest
    verified candidate, what a long run is watched for."""
    fastest = (
        s["fastest"] if s["fastest_ms"] is None else f"{s['fastest']} {s['fastest_ratio']:.2f}x"
    )
    return f"  {s['name']}: fused/unfused = {s['ratio']:.2f}, fastest verified: {fastest}"


if __name__ == "__main__":
    sys.exit(main())
