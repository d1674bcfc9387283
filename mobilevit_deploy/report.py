"""Report writers: JSON for machines, JUnit XML for CI dashboards, Markdown for PRs."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path

from .files import atomic_path, write_json_atomic
from .metrics import Metrics


def _clean(value):
    """JSON has no Infinity: a perfect PSNR becomes the string "inf"."""
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, Mapping):  # dicts, and metrics.Metrics as its report keys
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, data: dict) -> Path:
    return write_json_atomic(path, _clean(data))


def write_text(path: Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def write_verify_junit(path: Path, report) -> Path:
    """One testsuite per model, one testcase per compared pair (+ one for problems)."""
    cases = [(p.candidate, p.passed, p) for p in report.pairs]
    suite = ET.Element(
        "testsuite",
        name=f"mvd verify {report.model}",
        tests=str(len(cases) + 1),
        failures=str(sum(not ok for _, ok, _ in cases) + bool(report.problems)),
    )
    sanity = ET.SubElement(suite, "testcase", classname=report.model, name="sanity")
    if report.problems:
        ET.SubElement(sanity, "failure", message="; ".join(report.problems))
    for name, ok, pair in cases:
        case = ET.SubElement(suite, "testcase", classname=report.model, name=name)
        summary = _metrics_summary(pair.metrics, report.outputs)
        if not ok:
            ET.SubElement(
                case,
                "failure",
                message=f"outside the bound {pair.bound} (max_rel {pair.metrics.max_rel:.3g}, "
                f"PSNR {pair.metrics.psnr_db:.1f} dB)",
            ).text = summary
        ET.SubElement(case, "system-out").text = summary
    with atomic_path(path) as tmp:
        ET.ElementTree(suite).write(tmp, encoding="utf-8", xml_declaration=True)
    return path


def _metrics_summary(metrics: Metrics, outputs: list[str]) -> str:
    """'max_abs=1e-06, ...'; a model with several outputs adds each one's line."""
    line = ", ".join(f"{k}={v:.3g}" for k, v in metrics.items() if k != "outputs")
    for name, each in zip(outputs, metrics.outputs, strict=False):
        line += f"\n{name}: " + ", ".join(f"{k}={v:.3g}" for k, v in each.items())
    return line


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def bench_markdown(report: dict) -> str:
    """The table a person pastes into a PR, with the machine under it."""
    size = "x".join(map(str, report["image_size"]))
    rows = [
        [
            r["runtime"],
            f"{r['median_ms']:.2f}",
            f"{r['p90_ms']:.2f}",
            f"{r['throughput_per_s']:.1f}",
            f"{r['gflops']:.1f}",
            f"{r['ratio_to_baseline']:.2f}x",
        ]
        for r in report["results"]
    ]
    head = (
        f"**{report['model']}** @ {size}, batch {report['batch']}, {report['threads']} threads\n\n"
    )
    table = markdown_table(
        ["runtime", "median ms", "p90 ms", "img/s", "GFLOP/s", "vs plain export"], rows
    )
    return head + table + f"\nMachine: {report['machine_line']}\n"


def verify_markdown(report) -> str:
    size = "x".join(map(str, report.image_size))
    rows = [
        [
            p.candidate,
            f"{p.metrics.max_rel:.2e}",
            p.bound,
            f"{p.metrics.psnr_db:.1f}",
            "pass" if p.passed else "**FAIL**",
        ]
        for p in report.pairs
    ]
    verdict = "verified" if report.passed else "**verification failed**"
    problems = "".join(f"- {p}\n" for p in report.problems)
    return (
        f"**{report.model}** @ {size} vs {report.reference}: {verdict}\n\n"
        + markdown_table(["candidate", "max rel error", "bound", "PSNR dB", ""], rows)
        + problems
    )
