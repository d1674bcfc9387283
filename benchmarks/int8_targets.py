"""What the int8 search keeps float to meet a target; writes benchmarks/INT8.md.

    python benchmarks/int8_targets.py --resume
    python benchmarks/int8_targets.py --models fastvit_t8 --formats onnx --target 30

One classifier of each family at its default size, under stress weights (no weights
are reachable here), exported int8 at the target (default: judge.DEFAULT_INT8_TARGET_DB)
in each format. Each row is the export's own record (`int8_search`): PSNR on held-out
images before and after the search (the one that 90% of their sets of 8 reach), the
modules kept float and their share of the weights, and size and latency against the
all-int8 file; then `mvd verify`'s judgement of the same file on other images. Results
are kept in int8.json after each row, so a stopped run resumes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

import torch

from mobilevit_deploy import api
from mobilevit_deploy.errors import MvdError
from mobilevit_deploy.exporters.formats import FORMATS
from mobilevit_deploy.images import natural_images, to_model_input
from mobilevit_deploy.judge import DEFAULT_INT8_TARGET_DB
from mobilevit_deploy.machine import machine_stamp, stamp_line
from mobilevit_deploy.metrics import MIN_DECISIVE
from mobilevit_deploy.report import markdown_table
from mobilevit_deploy.stress import apply_stress_weights
from mobilevit_deploy.verify import verify

HERE = Path(__file__).parent
MODELS = ["fastvit_t8", "efficientvit_b0", "levit_128s", "seaformer_tiny", "sepvit_lite"]


def measure(name: str, fmt: str, target: float) -> dict:
    """One int8 export at `target` under stress weights, and verify's row for it."""
    model = api.load_model(name)
    spec = model.mvd_spec
    calibration = to_model_input(natural_images(8, spec.input_hw, 1000), spec)
    apply_stress_weights(model, torch.from_numpy(calibration))
    row = {"model": name, "format": fmt, "target_db": target}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            art = api.export(
                name,
                fmt,
                model=model,
                output=Path(tmp) / f"q{FORMATS[fmt].suffix}",
                precision="int8",
                int8_target=target,
            )
        except MvdError as exc:
            return {**row, "error": str(exc)}
    search = art.metadata["int8_search"]
    report = verify(name, formats=(fmt,), precisions=("int8",), int8_target=target)
    judged = next(p for p in report.pairs if p.format == fmt)
    return {
        **row,
        **{k: search[k] for k in ("psnr_db_all_int8", "psnr_db", "float_weight_share")},
        "kept_float": len(search["kept_float"]),
        "declared_float": len(search["declared_float"]),
        "ranked": search["ranked_modules"],
        "steps": len(search["steps"]),
        "size_ratio": search["bytes"] / search["bytes_all_int8"],
        "latency_ratio": search["latency_ratio_to_all_int8"],
        "verify_psnr_db": judged.metrics.psnr_db,
        "verify_agreement": judged.metrics.decisive_agreement,
        "verify_decisive": judged.metrics.decisive,
        "verify": "pass" if judged.passed else "FAIL",
    }


def _agreement(row: dict) -> str:
    """Decisive agreement and over how many inputs; verify does not judge too few."""
    if row["verify_agreement"] is None:
        return ""
    decisive = row["verify_decisive"]
    if decisive == 0:
        return "no decisive input"
    judged = "" if decisive >= MIN_DECISIVE else ", not judged"
    return f"{row['verify_agreement']:.2f} of {decisive}{judged}"


def _zoo_order(row: dict) -> tuple:
    """The table's order, whatever order a resumed run measured the rows in: MODELS,
    then the models asked for beside them, each through the formats in the order of
    exporters.formats.FORMATS."""
    known = MODELS.index(row["model"]) if row["model"] in MODELS else len(MODELS)
    return known, row["model"], list(FORMATS).index(row["format"]), row["target_db"]


def render(rows: list[dict], stamp: dict) -> str:
    header = [
        "model",
        "format",
        "target dB",
        "all-int8 dB",
        "searched dB",
        "kept float",
        "float weights",
        "size",
        "latency",
        "steps",
        "verify dB",
        "agreement",
        "verify",
    ]
    body = []
    for r in sorted(rows, key=_zoo_order):
        if "error" in r:
            body.append([r["model"], r["format"], f"{r['target_db']:g}", r["error"], *[""] * 9])
            continue
        body.append(
            [
                r["model"],
                r["format"],
                f"{r['target_db']:g}",
                f"{r['psnr_db_all_int8']:.1f}",
                f"{r['psnr_db']:.1f}",
                f"{r['kept_float']} of {r['ranked']} (+{r['declared_float']} declared)",
                f"{r['float_weight_share']:.0%}",
                f"{r['size_ratio']:.2f}x",
                f"{r['latency_ratio']:.2f}x",
                str(r["steps"]),
                f"{r['verify_psnr_db']:.1f}",
                _agreement(r),
                r["verify"],
            ]
        )
    return (
        "# int8 at a target PSNR\n\n"
        f"Written by `python benchmarks/int8_targets.py` on {datetime.date.today()}.\n\n"
        f"Machine: {stamp_line(stamp)}.\n\n"
        "Each row: one classifier at its default size under stress weights (adversarial "
        "for quantization: random-sign scales widen every activation range), exported "
        "int8 with the search of `exporters/int8_search.py`. *all-int8* and *searched* "
        "are PSNR on the export's 32 held-out images before and after the search, the "
        "one that 90% of their sets of 8 reach (verify's default count); *kept "
        "float* the modules it returned to float, *float weights* their share of the "
        "weights with the declared ones; *size* and *latency* against the all-int8 file "
        "(latency timed briefly in the export). *verify* is `mvd verify` of the same "
        "export on its own images, held to the target with agreement >= 0.9 on its "
        "decisive inputs (their count follows; fewer than 3 are not judged).\n\n"
        + markdown_table(header, body)
        + "\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=MODELS)
    parser.add_argument("--formats", default="onnx,tflite")
    parser.add_argument("--target", type=float, default=DEFAULT_INT8_TARGET_DB)
    parser.add_argument("--resume", action="store_true", help="keep the rows of int8.json")
    args = parser.parse_args()
    out_json = HERE / "int8.json"
    rows = json.loads(out_json.read_text()) if args.resume and out_json.is_file() else []
    done = {(r["model"], r["format"], r["target_db"]) for r in rows}
    stamp = machine_stamp()
    for name in args.models:
        for fmt in args.formats.split(","):
            if (name, fmt, args.target) in done:
                continue
            print(f"{name} {fmt} at {args.target:g} dB ...", flush=True)
            rows.append(measure(name, fmt, args.target))
            print(f"  {rows[-1].get('verify', rows[-1].get('error'))}", flush=True)
            out_json.write_text(json.dumps(rows, indent=1))
            (HERE / "INT8.md").write_text(render(rows, stamp))
    (HERE / "INT8.md").write_text(render(rows, stamp))  # --resume alone re-renders
    return 0 if all(r.get("verify") == "pass" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
