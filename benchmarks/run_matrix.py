"""Every model through every format and precision this machine can export; a
pass/fail table with the measured metrics in benchmarks/MATRIX.md (+ matrix.json).

    python benchmarks/run_matrix.py                       # the whole zoo (make matrix)
    python benchmarks/run_matrix.py --family levit --formats onnx --precisions fp32,int8
    python benchmarks/run_matrix.py --shard 2/4 --resume   # one of four slices (CI jobs)
    python benchmarks/run_matrix.py --merge shard-*/matrix.shard-*.json   # join them

Each cell is one `mvd verify` run under stress weights: the fused artifact against the
unfused model in float64, judged by the precision's rule (metrics.py). A format whose
backend is not installed is listed as skipped rather than silently left out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

from mobilevit_deploy.api import HELD_OUT_IMAGES
from mobilevit_deploy.errors import MvdError, one_line
from mobilevit_deploy.exporters.formats import FORMATS
from mobilevit_deploy.exporters.int8_search import JUDGED_QUANTILE, JUDGED_SET, SEARCH_MARGIN_DB
from mobilevit_deploy.files import atomic_path, write_json_atomic
from mobilevit_deploy.judge import REDUCED_PRECISION
from mobilevit_deploy.machine import machine_stamp, stamp_line
from mobilevit_deploy.metrics import NEAR_TIE_FACTOR
from mobilevit_deploy.report import markdown_table
from mobilevit_deploy.verify import verify
from mobilevit_deploy.zoo import get_spec, list_models

HERE = Path(__file__).parent
# How today's int8 search judges a file; an int8 cell searched by another rule is
# measured again by --resume (settled).
INT8_RULE = (
    f"{SEARCH_MARGIN_DB:g} dB above the target on {1 - JUDGED_QUANTILE:.0%} of the sets of "
    f"{JUDGED_SET} of {HELD_OUT_IMAGES} held-out images"
)
# Which fp16 and int8 decisions verify counts as decisive (metrics.NEAR_TIE_FACTOR); a
# cell judged by another rule is kept, and the table marks its rule (RULE).
TIE_RULE = f"margin over {NEAR_TIE_FACTOR:.1f}x the RMS error of the agreeing decisions"
# The judging rule a cell was measured by, marked in the table: RULE is today's (the
# preamble states it), and an older cell keeps its number until it is measured again
# (the whole zoo takes hours). The older ones in a few words, for the table's legend.
RULE = 3
OLDER_RULES = {
    1: "judged on 4 images",
    2: "near-ties counted from 3x the RMS error of all decisions, or int8 searched on "
    "one set of 8 held-out images",
}


def run_format(name: str, fmt: str, precisions: list[str], args) -> list[dict]:
    """One `verify` per model and format: the float64 reference is computed once for all
    of the format's precisions. A converter that crashes is a cell's error, not the end
    of a run that takes hours; then each precision runs alone, so the error lands on the
    precision that has it and the others still get their numbers."""
    cells = _verify_cells(name, fmt, precisions, args)
    if len(precisions) > 1 and cells[0]["status"] == "error":
        cells = [c for p in precisions for c in _verify_cells(name, fmt, [p], args)]
    return cells


def _verify_cells(name: str, fmt: str, precisions: list[str], args) -> list[dict]:
    start = time.perf_counter()
    cells = [{"model": name, "format": fmt, "precision": p} for p in precisions]
    try:
        report = verify(
            name,
            formats=(fmt,),
            precisions=precisions,
            num_images=args.num_images,
            image_size=matrix_size(get_spec(name), args.seg_size),
        )
    except Exception as exc:  # recorded in the table; the run goes on
        detail = str(exc) if isinstance(exc, MvdError) else f"{type(exc).__name__}: {exc}"
        return [{**c, "status": "error", "detail": one_line(detail)} for c in cells]
    seconds = (time.perf_counter() - start) / len(cells)
    artifacts = [p for p in report.pairs if p.format == fmt]
    for cell, pair in zip(cells, artifacts, strict=True):
        problems = [*report.problems]
        if pair.estimated:
            problems.append("estimated, not run on device")
        cell.update(
            status="pass" if pair.passed and not report.problems else "FAIL",
            detail="; ".join(problems),
            bound=pair.bound,
            metrics=pair.metrics.to_dict(),
            input="x".join(map(str, report.image_size)),
            images=args.num_images,
            seconds=seconds,
        )
        if cell["precision"] in REDUCED_PRECISION:
            cell["tie_rule"] = TIE_RULE
        if cell["precision"] == "int8":
            cell["int8_rule"] = INT8_RULE
    return cells


def matrix_size(spec, seg_size: str) -> tuple[int, int]:
    """Classifiers at their own size; segmenters at their native size or the mobile one
    (half the height and width), the one phones run and that keeps the zoo in hours."""
    h, w = spec.input_hw
    if spec.task != "segmentation" or seg_size == "native":
        return (h, w)
    m = spec.size_multiple
    return (max(m, h // 2 // m * m), max(m, w // 2 // m * m))


def row(c: dict) -> list[str]:
    m = c.get("metrics") or {}
    agreement = m.get("agreement", m.get("top1", m.get("pixel_agreement")))  # older cells
    return [
        c["model"],
        c["format"],
        c["precision"],
        c.get("input", "-"),
        f"**{c['status']}**" if c["status"] != "pass" else "pass",
        f"{m['max_rel']:.1e}" if m else "-",
        f"{m['psnr_db']:.1f}" if m else "-",
        f"{agreement:.3f}" if agreement is not None else "-",
        c.get("bound", "-"),
        str(rule(c)) if m else "-",
        c.get("detail") or "",
    ]


def main() -> int:
    args = build_parser().parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        return exit_code(write(merge(args.out / "matrix.json", args.merge), args))
    formats = args.formats.split(",")
    asked = args.precisions.split(",")
    specs = selected_specs(args, formats, asked)
    cells = measure_all(starting_cells(args, {s.name for s in specs}), specs, formats, asked, args)
    return exit_code(write(cells, args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default=None)
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--precisions", default="fp32,fp16,int8")
    parser.add_argument("--num-images", type=int, default=8, help="as verify's default")
    parser.add_argument("--seg-size", choices=("mobile", "native"), default="mobile")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the cells of matrix.json that passed as today, run the rest",
    )
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument(
        "--shard",
        type=parse_shard,
        default=None,
        metavar="K/N",
        help="run the K-th of N slices (of equal hours by benchmarks/matrix.json's timings) into "
        "matrix.shard-K-of-N.json; --merge joins the slices",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        default=None,
        metavar="JSON",
        help="join shard files into matrix.json and MATRIX.md (later files win); runs nothing",
    )
    return parser


def exit_code(counts: dict[str, int]) -> int:
    """1 when a cell failed or errored, so that CI's matrix job fails with it."""
    return 1 if counts["FAIL"] or counts["error"] else 0


def selected_specs(args, formats: list[str], asked: list[str]) -> list:
    """The models asked for (--family, --models), and of those, with --shard, the
    shard's slice."""
    specs = [s for s in list_models(args.family) if not args.models or s.name in args.models]
    if not args.shard:
        return specs
    k, n = args.shard
    costs = model_costs([s.name for s in specs], formats, asked, args)
    mine = slices(costs, n)[k - 1]
    hours = sum(costs[name] for name in mine) / 3600
    print(
        f"shard {k}/{n}: {len(mine)} models, about {hours:.1f} h by matrix.json's timings",
        file=sys.stderr,
        flush=True,
    )
    return [s for s in specs if s.name in mine]


def measure_all(cells: list[dict], specs, formats: list[str], asked: list[str], args) -> list:
    """`cells` with every asked cell of `specs` measured again, except, with --resume,
    those settled (passed under today's rules at the asked input size). An old cell
    stays in the table until its new one replaces it, and the cells not asked for stay
    as they are. Cells never measured run first, so that a run cut short by a session's
    end fills the table's holes before it measures stale cells again. The table is
    written after every model and format, so a stopped run keeps what it measured."""
    done = {key(c) for c in cells if args.resume and settled(c, args.seg_size)}
    for missing_only in (True, False):
        measured = {key(c) for c in cells} if missing_only else set()
        for spec in specs:
            for fmt in formats:
                precisions = to_measure(spec.name, fmt, asked, done | measured)
                if precisions:
                    fresh = measure(spec.name, fmt, precisions, args)
                    cells = replaced(cells, fresh)
                    done |= {key(c) for c in fresh}
                    write(cells, args)
    return cells


def to_measure(name: str, fmt: str, asked: list[str], passed_over: set[tuple]) -> list[str]:
    """The asked precisions the format exports, but for the cells in `passed_over`."""
    return [p for p in asked if p in FORMATS[fmt].precisions and (name, fmt, p) not in passed_over]


def measure(name: str, fmt: str, precisions: list[str], args) -> list[dict]:
    """The cells of one model in one format: verified, or skipped when the format's
    backend is not installed (listed, rather than silently left out)."""
    info = FORMATS[fmt]
    if not info.available():
        detail = f"needs {info.install_hint()}"
        return [
            {"model": name, "format": fmt, "precision": p, "status": "skipped", "detail": detail}
            for p in precisions
        ]
    print(f"{name} {fmt} {','.join(precisions)} ...", file=sys.stderr, flush=True)
    fresh = run_format(name, fmt, precisions, args)
    print("  " + " ".join(c["status"] for c in fresh), file=sys.stderr, flush=True)
    return fresh


def model_costs(models: list[str], formats: list[str], precisions: list[str], args) -> dict:
    """The seconds each model's cells took in benchmarks/matrix.json, counting only
    the cells this run will measure (with --resume, those not settled). A cell never
    timed counts as the mean cell of its format at its input size (a 512x1024 segmenter
    takes ten times a 224 classifier), or of its format (1 s in a table without
    timings)."""
    path = HERE / "matrix.json"
    whole = json.loads(path.read_text()) if path.is_file() else []
    settled_keys = {
        key(c) for c in whole if args.resume and c["model"] in models and settled(c, args.seg_size)
    }
    table = [c for c in whole if "seconds" in c]
    timed = {key(c): c["seconds"] for c in table}

    def estimate(name: str, fmt: str) -> float:
        size = "x".join(map(str, matrix_size(get_spec(name), args.seg_size)))
        same = [c["seconds"] for c in table if c["format"] == fmt]
        alike = [c["seconds"] for c in table if c["format"] == fmt and c.get("input") == size]
        pool = alike or same
        return sum(pool) / len(pool) if pool else 1.0

    return {
        name: sum(
            timed[name, fmt, p] if (name, fmt, p) in timed else estimate(name, fmt)
            for fmt in formats
            for p in precisions
            if p in FORMATS[fmt].precisions and (name, fmt, p) not in settled_keys
        )
        for name in models
    }


def slices(costs: dict[str, float], n: int) -> list[list[str]]:
    """N slices of about equal seconds: the costliest model first, each into the slice
    with the fewest seconds so far (then the fewest models, then the first). Every
    N-th model of the zoo put 3.8 h and 1.9 h of the matrix in two of 8 slices; CI's
    wall time is its slowest slice. Every shard reads the same benchmarks/matrix.json
    (the committed one, in CI), so the slices agree without talking; with equal costs
    this is every N-th model."""
    loads, out = [0.0] * n, [[] for _ in range(n)]
    for name in sorted(costs, key=lambda m: -costs[m]):  # stable: zoo order on ties
        i = min(range(n), key=lambda j: (loads[j], len(out[j]), j))
        out[i].append(name)
        loads[i] += costs[name]
    return out


def starting_cells(args, shard_models: set[str]) -> list[dict]:
    """The cells a run starts from, so that a run of a few models (`--family levit`)
    replaces theirs and keeps the rest of the table: its own JSON. A shard starts from
    its models' cells in matrix.json with its own file's over them, so that shards run
    side by side on one machine resume what a whole run measured, and each shard's file
    holds only the models it has now: the slices follow the table's timings, and a model
    that moved to another slice would otherwise stay in this file, and a merge could
    let that stale copy win."""
    own = args.out / json_name(args.shard)
    if not args.shard:
        return json.loads(own.read_text()) if own.is_file() else []
    cells = {}
    for path in (args.out / "matrix.json", own):
        for cell in json.loads(path.read_text()) if path.is_file() else []:
            if cell["model"] in shard_models:
                cells[key(cell)] = cell
    return list(cells.values())


def replaced(cells: list[dict], fresh: list[dict]) -> list[dict]:
    """`cells` with `fresh` in place of the cells of the same model, format and
    precision."""
    new = {key(c) for c in fresh}
    return [c for c in cells if key(c) not in new] + fresh


def key(cell: dict) -> tuple[str, str, str]:
    return cell["model"], cell["format"], cell["precision"]


def settled(cell: dict, seg_size: str) -> bool:
    """Passed, at the input size this run asks for, and made and judged as today."""
    size = "x".join(map(str, matrix_size(get_spec(cell["model"]), seg_size)))
    return cell["status"] == "pass" and cell.get("input") == size and not old_int8(cell)


def old_int8(cell: dict) -> bool:
    """An int8 cell searched by another rule (INT8_RULE), or bounded by the old 15 dB
    floor from before the int8 search: measured again."""
    return cell["precision"] == "int8" and cell.get("int8_rule") != INT8_RULE


def old_ties(cell: dict) -> bool:
    """An fp16 or int8 cell with decisions whose decisive ones were counted by another
    rule (TIE_RULE). Kept, not measured again: where no decision flipped, its pass
    stands (the noise is the same, and today's decisive decisions are some of the old
    ones, which all agreed); where some did, the table marks its rule. An int8 cell of
    an older int8 search is old_int8's, which measures it again."""
    return (
        cell["precision"] in REDUCED_PRECISION
        and _raw_agreement(cell) is not None
        and cell.get("tie_rule") != TIE_RULE
        and not old_int8(cell)
    )


def rule(cell: dict) -> int:
    """The version of the rule a measured cell was judged by (RULE, OLDER_RULES)."""
    if "images" not in cell:
        return 1
    return 2 if old_int8(cell) or old_ties(cell) else RULE


def _raw_agreement(cell: dict) -> float | None:
    """The share of decisions (top-1, or argmax pixels) that agree; None for outputs
    without a decision (features)."""
    metrics = cell.get("metrics", {})
    return metrics.get("top1", metrics.get("pixel_agreement"))


def parse_shard(text: str) -> tuple[int, int]:
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes K/N, e.g. 2/4, not {text!r}") from None
    if not 1 <= k <= n:
        raise argparse.ArgumentTypeError(f"--shard {text}: K must be 1 to N")
    return k, n


def json_name(shard: tuple[int, int] | None) -> str:
    return "matrix.json" if shard is None else f"matrix.shard-{shard[0]}-of-{shard[1]}.json"


def merge(base: Path, files: list[Path]) -> list[dict]:
    """The cells of matrix.json (if any), then of each file: a later cell of the same
    model, format and precision replaces an earlier one."""
    cells: dict[tuple, dict] = {}
    for path in [base, *files] if base.is_file() else files:
        for cell in json.loads(path.read_text()):
            cells[cell["model"], cell["format"], cell["precision"]] = cell
    return list(cells.values())


def zoo_order(cells: list[dict]) -> list[dict]:
    """The zoo's order, whatever order a resumed run measured the cells in."""
    models = {s.name: i for i, s in enumerate(list_models())}
    formats, precisions = list(FORMATS), ["fp32", "fp16", "int8"]
    return sorted(
        cells,
        key=lambda c: (
            models.get(c["model"], len(models)),
            formats.index(c["format"]),
            precisions.index(c["precision"]),
        ),
    )


def rule_legend(cells: list[dict]) -> str:
    """How many measured cells each older rule judged, and what it was, in a sentence."""
    older = [rule(c) for c in cells if "metrics" in c and rule(c) != RULE]
    if not older:
        return ""
    counts = "; ".join(
        f"{older.count(v)} of rule {v} ({text})" for v, text in OLDER_RULES.items() if v in older
    )
    return (
        f"*rule* is the judging rule a cell was measured by, {RULE} being the one above: "
        f"{counts}. `--resume` measures the older int8 cells again, `--models` any. "
    )


def write(cells: list[dict], args) -> dict[str, int]:
    """matrix.json and MATRIX.md; a shard writes its own JSON only (--merge makes the
    table)."""
    cells = zoo_order(cells)
    counts = {s: sum(c["status"] == s for c in cells) for s in ("pass", "FAIL", "error", "skipped")}
    out_json = args.out / json_name(args.shard)
    write_json_atomic(out_json, cells)  # a run stopped mid-write keeps the last table
    if args.shard:
        return counts
    headers = [
        "model",
        "format",
        "precision",
        "input",
        "result",
        "max rel",
        "PSNR dB",
        "agreement",
        "bound",
        "rule",
        "detail",
    ]
    missing = [s.name for s in list_models() if s.name not in {c["model"] for c in cells}]
    text = (
        "# Format x precision matrix\n\n"
        f"Written by `python benchmarks/run_matrix.py` (`make matrix`) on "
        f"{datetime.date.today()}.\n\nMachine: {stamp_line(machine_stamp())}.\n\n"
        "Every cell is `mvd verify MODEL --formats F --precisions P` under stress weights, on "
        f"{args.num_images} natural-looking images and {max(args.num_images // 2, 2)} random "
        "normals (int8: the images alone), at the model's default size (segmenters: "
        + ("native" if args.seg_size == "native" else "half the height and width, the mobile size")
        + "): the fused artifact against the unfused model in "
        "float64. fp32 is held to 1e-5 of the output scale; fp16 to 40 dB and 0.9 top-1 "
        f"(or argmax-pixel) agreement on decisive inputs ({TIE_RULE}); "
        "int8 to its file's target (the default, 25 dB) with the same agreement rule. "
        + rule_legend(cells)
        + ", ".join(f"{n} {s}" for s, n in counts.items())
        + f", {sum(c.get('seconds', 0) for c in cells) / 60:.0f} minutes of verifying."
        + (f" Not in this table (not run): {', '.join(missing)}." if missing else "")
        + "\n\n"
        + markdown_table(headers, [row(c) for c in cells])
    )
    with atomic_path(args.out / "MATRIX.md") as tmp:
        tmp.write_text(text)
    return counts


if __name__ == "__main__":
    sys.exit(main())
