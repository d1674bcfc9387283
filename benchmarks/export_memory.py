"""Peak memory of exporting the zoo's biggest models; writes benchmarks/MEMORY.md.

    python benchmarks/export_memory.py
    python benchmarks/export_memory.py --models fastvit_ma36 --formats onnx

Each export runs as its own `mvd export` process, so the figure is that process's
peak resident set (getrusage of the finished child), the number that decides whether
a CI runner or a build machine can run it. The machine has 24 GiB.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mobilevit_deploy.exporters.formats import FORMATS
from mobilevit_deploy.files import artifact_size
from mobilevit_deploy.machine import machine_stamp, stamp_line
from mobilevit_deploy.report import markdown_table
from mobilevit_deploy.zoo import get_spec, list_models

HERE = Path(__file__).parent
# The largest variant of each family, and segmentation at Cityscapes' 1024x2048.
BIG = [
    ("efficientvit_l3", None),
    ("fastvit_ma36", None),
    ("sepvit_base", None),
    ("levit_384", None),
    ("seaformer_seg_large_ade20k", "1024x2048"),
    ("efficientvit_seg_l2_cityscapes", "1024x2048"),
]


def measure(name: str, size: str | None, fmt: str) -> dict:
    """Run one export in a child process; its peak RSS and wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{name}{FORMATS[fmt].suffix}"
        cmd = [sys.executable, "-m", "mobilevit_deploy", "export", name, "-f", fmt, "-o", str(out)]
        if size:
            cmd += ["--image-size", size]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        error = proc.stderr.read().decode().strip().splitlines()[-1:] if status else []
        size_mib = artifact_size(out) / 2**20 if out.exists() else None
    return {
        "model": name,
        "image_size": size or "x".join(map(str, get_spec(name).input_hw)),
        "format": fmt,
        "ok": os.waitstatus_to_exitcode(status) == 0,
        "error": error[0] if error else None,
        "peak_rss_gib": usage.ru_maxrss / 2**20,  # ru_maxrss is KiB on Linux
        "seconds": seconds,
        "file_mib": size_mib,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--formats", default="onnx")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    known = {s.name for s in list_models()}
    jobs = [(m, s) for m, s in BIG if (not args.models or m in args.models) and m in known]
    # Rows of earlier runs stay unless this run measures the same export again.
    previous = args.out / "memory.json"
    rows = json.loads(previous.read_text()) if previous.exists() else []
    for name, size in jobs:
        for fmt in args.formats.split(","):
            print(f"exporting {name} ({size or 'default size'}) to {fmt} ...", file=sys.stderr)
            row = measure(name, size, fmt)
            key = (row["model"], row["image_size"], row["format"])
            rows = [r for r in rows if (r["model"], r["image_size"], r["format"]) != key]
            rows.append(row)
            print(f"  peak {row['peak_rss_gib']:.2f} GiB", file=sys.stderr)
    table = markdown_table(
        ["model", "input", "format", "exported", "peak RSS GiB", "seconds", "file MiB"],
        [
            [
                r["model"],
                r["image_size"],
                r["format"],
                "yes" if r["ok"] else f"no: {r['error']}",
                f"{r['peak_rss_gib']:.2f}",
                f"{r['seconds']:.0f}",
                f"{r['file_mib']:.0f}" if r["file_mib"] else "-",
            ]
            for r in rows
        ],
    )
    text = (
        "# Peak memory of exports\n\n"
        f"Written by `python benchmarks/export_memory.py` on {datetime.date.today()}.\n\n"
        f"Machine: {stamp_line(machine_stamp())}.\n\n"
        "Each row is one `mvd export` process (fused, fp32; ONNX also simplified and "
        "re-verified); peak RSS is the child's maximum resident set.\n\n" + table
    )
    (args.out / "MEMORY.md").write_text(text)
    (args.out / "memory.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
