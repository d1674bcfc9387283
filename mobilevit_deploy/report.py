"""Report writers: JSON for machines, JUnit XML for CI dashboards, Markdown for PRs."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

from .files import atomic_path, write_json_atomic


def _clean(value):
    """JSON has no Infinity: a perfect PSNR becomes the string "inf"."""
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, data: dict) -> Path:
    return write_json_atomic(path, _clean(data))


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
        summary = ", ".join(f"{k}={v:.3g}" for k, v in pair.metrics.items())
        if not ok:
            ET.SubElement(
                case,
                "failure",
                message=f"max_rel {pair.metrics['max_rel']:.3g} > {pair.tolerance:.0e}",
            ).text = summary
        ET.SubElement(case, "system-out").text = summary
    with atomic_path(path) as tmp:
        ET.ElementTree(suite).write(tmp, encoding="utf-8", xml_declaration=True)
    return path


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
