"""Every model through every format and precision this machine can export; a
pass/fail table with the measured metrics in benchmarks/MATRIX.md (+ matrix.json).

    python benchmarks/run_matrix.py                       # the whole zoo (make matrix)
    python benchmarks/run_matrix.py --family levit --formats onnx --precisions fp32,int8

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

from mobilevit_deploy.errors import MvdError
from mobilevit_deploy.exporters.formats import FORMATS
from mobilevit_deploy.machine import machine_stamp, stamp_line
from mobilevit_deploy.registry import list_models
from mobilevit_deploy.report import markdown_table
from mobilevit_deploy.verify import verify

HERE = Path(__file__).parent


def run_cell(name: str, fmt: str, precision: str, num_images: int) -> dict:
    start = time.perf_counter()
    cell = {"model": name, "format": fmt, "precision": precision}
    try:
        report = verify(name, formats=(fmt,), precisions=(precision,), num_images=num_images)
    except MvdError as exc:
        return {**cell, "status": "error", "detail": str(exc)}
    artifact = report.pairs[-1]
    return {
        **cell,
        "status": "pass" if report.passed else "FAIL",
        "detail": "; ".join(
            [
                *report.problems,
                *(["estimated, not run on device"] if "estimated" in artifact.candidate else []),
            ]
        ),
        "bound": artifact.bound,
        "metrics": artifact.metrics,
        "seconds": time.perf_counter() - start,
    }


def row(c: dict) -> list[str]:
    m = c.get("metrics") or {}
    agreement = m.get("top1", m.get("pixel_agreement"))
    return [
        c["model"],
        c["format"],
        c["precision"],
        f"**{c['status']}**" if c["status"] != "pass" else "pass",
        f"{m['max_rel']:.1e}" if m else "-",
        f"{m['psnr_db']:.1f}" if m else "-",
        f"{agreement:.3f}" if agreement is not None else "-",
        c.get("bound", "-"),
        c.get("detail") or "",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default=None)
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--precisions", default="fp32,fp16,int8")
    parser.add_argument("--num-images", type=int, default=4)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    cells = []
    specs = [s for s in list_models(args.family) if not args.models or s.name in args.models]
    for spec in specs:
        for fmt in args.formats.split(","):
            info = FORMATS[fmt]
            for precision in args.precisions.split(","):
                if precision not in info.precisions:
                    continue
                if not info.available():
                    cell = {"status": "skipped", "detail": f"needs {info.install_hint()}"}
                    cells.append(
                        {"model": spec.name, "format": fmt, "precision": precision, **cell}
                    )
                    continue
                print(f"{spec.name} {fmt} {precision} ...", file=sys.stderr, flush=True)
                cells.append(run_cell(spec.name, fmt, precision, args.num_images))
                print(f"  {cells[-1]['status']}", file=sys.stderr, flush=True)
    headers = [
        "model",
        "format",
        "precision",
        "result",
        "max rel",
        "PSNR dB",
        "agreement",
        "bound",
        "detail",
    ]
    counts = {s: sum(c["status"] == s for c in cells) for s in ("pass", "FAIL", "error", "skipped")}
    text = (
        "# Format x precision matrix\n\n"
        f"Written by `python benchmarks/run_matrix.py` (`make matrix`) on "
        f"{datetime.date.today()}.\n\nMachine: {stamp_line(machine_stamp())}.\n\n"
        "Every cell is `mvd verify MODEL --formats F --precisions P` under stress weights "
        "at the model's default size: the fused artifact against the unfused model in "
        "float64. fp32 is held to 1e-5 of the output scale; fp16 and int8 to a PSNR floor "
        "and top-1 (or argmax-pixel) agreement. "
        + ", ".join(f"{n} {s}" for s, n in counts.items())
        + ".\n\n"
        + markdown_table(headers, [row(c) for c in cells])
    )
    (args.out / "MATRIX.md").write_text(text)
    (args.out / "matrix.json").write_text(json.dumps(cells, indent=2, sort_keys=True) + "\n")
    print(text)
    return 1 if counts["FAIL"] or counts["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
