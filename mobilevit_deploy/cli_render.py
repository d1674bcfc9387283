"""How the CLI shows its reports: rich tables and lines, kept apart from the commands
(cli.py) so each reads as what it does."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def hw(size) -> str:
    return "x".join(map(str, size))


def fmt_int(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def weight_tags(tags: list[str]) -> str:
    """'in1k, dist_in1k (+ _reparam)': one line per model even with many files."""
    base = sorted({t.removesuffix("_reparam") for t in tags})
    fused = " (+ _reparam)" if any(t.endswith("_reparam") for t in tags) else ""
    return ", ".join(base) + fused if base else "--weights PATH"


def render_info(data: dict, out: Console) -> None:
    table = Table(title=data["name"], show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("family / task", f"{data['family']} / {data['task']}")
    table.add_row("description", data["description"])
    table.add_row("input", f"3x{hw(data['input_size'])} (NCHW, RGB)")
    table.add_row("outputs", outputs_line(data))
    for line in data["configured_by"]:
        table.add_row("configuration", line)
    for line in data["adaptations"]:
        table.add_row("note", line)
    for form in ("train", "deploy", "fused"):
        table.add_row(f"params ({form})", fmt_int(data["params"][form]))
    table.add_row("MACs (fused)", f"{data['macs'] / 1e9:.3f} G")
    pre = data["preprocessing"]
    table.add_row(
        "preprocessing",
        f"mean {pre['mean']} std {pre['std']}, crop {pre['crop_pct']}, {pre['interpolation']}",
    )
    table.add_row("formats", ", ".join(f"{k} ({v})" for k, v in data["formats"].items()))
    table.add_row(
        "weights",
        "\n".join(f"{w['tag']}: {w['url']}" for w in data["weights"])
        or "no download URL; load files with --weights",
    )
    out.print(table)


def outputs_line(data: dict) -> str:
    """'logits of 10 classes' / 'stage0 (stride 4, 48 ch), ...'."""
    outputs = data["outputs"]
    if data["task"] == "features" and "stride" in outputs[0]:
        return ", ".join(f"{o['name']} (stride {o['stride']}, {o['channels']} ch)" for o in outputs)
    if data["num_classes"] == 0:
        return "pooled features (no head)"
    what = "class map" if data["task"] == "segmentation" else "logits"
    names = f"; names: {', '.join(data['class_names'][:5])}" if data["class_names"] else ""
    more = " ..." if data["class_names"] and len(data["class_names"]) > 5 else ""
    return f"{what} of {data['num_classes']} classes ({data['labels']}){names}{more}"


def artifact_outputs(meta: dict) -> str:
    """'10 classes', '150-class map', 'pooled features', '4 feature maps'."""
    if meta["task"] == "features":
        maps = sum("stride" in o for o in meta["outputs"])
        return f"{maps} feature map{'s' * (maps > 1)}" if maps else "pooled features"
    if meta["task"] == "segmentation":
        return f"{meta['num_classes']}-class map"
    return f"{meta['num_classes']} classes"


def render_verify(report, out: Console) -> None:
    table = Table(title=f"{report.model} @ {hw(report.image_size)}: vs {report.reference}")
    segments = report.task == "segmentation"
    agreement = ("argmax px",) if segments else ("top-1", "top-5")
    if report.task == "features":
        agreement = ()
    columns = ("candidate", "max abs", "max rel", "bound", "1 - cos", "PSNR dB", *agreement)
    for col in (*columns, ""):
        table.add_column(col, justify="left" if col == "candidate" else "right")
    for p in report.pairs:
        m = p.metrics
        table.add_row(
            p.candidate,
            f"{m.max_abs:.2e}",
            f"{m.max_rel:.2e}",
            p.bound,
            f"{1 - m.cosine:.1e}",
            f"{m.psnr_db:.1f}",
            *(
                []
                if not agreement
                else [f"{m.agreement:.4f}"]
                if segments
                else [f"{m.agreement:.3f}", f"{m.top5:.3f}"]
            ),
            "[green]pass[/]" if p.passed else "[bold red]FAIL[/]",
        )
    for fact, source in report.facts.items():
        out.print(f"{fact}: {escape(source)}", soft_wrap=True)
    out.print(
        f"weights: {report.weights}; inputs: {report.inputs}; the unfused model's own fp32 "
        f"run differs from the reference by {report.fp32_noise_floor:.1e}",
        soft_wrap=True,
    )
    if len(report.outputs) > 1:
        out.print(
            f"outputs compared: {', '.join(report.outputs)} (each row: the worst of them)",
            soft_wrap=True,
        )
    out.print(table)
    for note in report.notes:
        out.print(f"note: {escape(note)}", soft_wrap=True)
    for problem in report.problems:
        out.print(f"[bold red]FAIL[/] {escape(problem)}")
    out.print("[green]verified[/]" if report.passed else "[bold red]verification failed[/]")
