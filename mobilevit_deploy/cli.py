"""`mvd`: a thin typer front-end. Parse, call the API, render with rich.

Heavy modules (torch, onnx, the optional backends) are imported inside commands so
that `mvd --help` stays instant and never needs the extras. Errors meant for people
(errors.MvdError) print one line and exit with their code: 1 verification failed,
2 bad input, 3 backend unavailable.
"""

from __future__ import annotations

import functools
import json
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .cli_options import (
    BenchPrecisions,
    CalibrationImages,
    FeaturesFlag,
    Format,
    Formats,
    ImageSize,
    Int8Target,
    JsonFlag,
    JsonPath,
    LabelledData,
    Labels,
    MarkdownPath,
    MinTime,
    NumClasses,
    NumImages,
    Precision,
    Precisions,
    Pretrained,
    Runtimes,
    Stages,
    Threads,
    Weights,
    parse_features,
    with_format_options,
)
from .errors import MvdError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Reparameterize, export, verify and benchmark efficient vision transformers.",
)
# Piped output (CI logs, README snippets) gets a fixed width rather than rich's 80.
out = Console(width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True)


def _pretrained(tag: str | None) -> bool | str:
    return True if tag == "default" else (tag or False)


def handle_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MvdError as exc:
            err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper


def _print_json(data: object) -> None:
    from .report import _clean

    sys.stdout.write(json.dumps(_clean(data), indent=2, sort_keys=True) + "\n")


def _hw(size) -> str:
    return "x".join(map(str, size))


def _fmt_int(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _weight_tags(tags: list[str]) -> str:
    """'in1k, dist_in1k (+ _reparam)': one line per model even with many files."""
    base = sorted({t.removesuffix("_reparam") for t in tags})
    fused = " (+ _reparam)" if any(t.endswith("_reparam") for t in tags) else ""
    return ", ".join(base) + fused if base else "--weights PATH"


@app.command("list")
@handle_errors
def list_cmd(
    family: Annotated[str | None, typer.Option(help="Only this family.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """The zoo: every model with its family, task, input size and parameters."""
    from .info import zoo_rows

    rows = zoo_rows(family)
    if as_json:
        return _print_json(rows)
    table = Table(title="mobilevit_deploy zoo")
    # The family is the name's prefix (and `--family` filters by it): no column for it.
    for col in ("model", "task", "input", "params (train)", "weights"):
        # Only the weights column may wrap: a cut model name cannot be copied.
        table.add_column(
            col,
            justify="right" if col.startswith("params") else "left",
            no_wrap=col != "weights",
        )
    for r in rows:
        table.add_row(
            r["name"],
            r["task"],
            _hw(r["input_size"]),
            _fmt_int(r["params"]),
            _weight_tags(r["weights"]),
        )
    out.print(table)


@app.command()
@handle_errors
def info(
    model: str,
    weights: Weights = None,
    image_size: ImageSize = None,
    num_classes: NumClasses = None,
    labels: Labels = None,
    features: FeaturesFlag = False,
    stages: Stages = None,
    as_json: JsonFlag = False,
) -> None:
    """Params unfused / deploy / fused, MACs, preprocessing, formats, weights; with
    --weights, what the checkpoint decides (head size, input size, class names)."""
    from .info import model_info

    with err.status(f"building {model} in its three forms"):
        data = model_info(
            model,
            image_size,
            weights=weights,
            num_classes=num_classes,
            labels=labels,
            features=parse_features(features, stages),
        )
    if as_json:
        return _print_json(data)
    table = Table(title=data["name"], show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("family / task", f"{data['family']} / {data['task']}")
    table.add_row("description", data["description"])
    table.add_row("input", f"3x{_hw(data['input_size'])} (NCHW, RGB)")
    table.add_row("outputs", _outputs_line(data))
    for line in data["configured_by"]:
        table.add_row("configuration", line)
    for line in data["adaptations"]:
        table.add_row("note", line)
    for form in ("train", "deploy", "fused"):
        table.add_row(f"params ({form})", _fmt_int(data["params"][form]))
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


def _outputs_line(data: dict) -> str:
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


@app.command()
@handle_errors
def reparam(
    model: str,
    output: Annotated[Path, typer.Option("--output", "-o", help=".pt or .safetensors")],
    weights: Weights = None,
    pretrained: Pretrained = None,
    as_json: JsonFlag = False,
) -> None:
    """Fuse a model into its deploy form and save its weights (loads back with --weights)."""
    from .reparam_file import reparam_to_file

    with err.status(f"fusing {model}"):
        data = reparam_to_file(model, output, weights=weights, pretrained=_pretrained(pretrained))
    if as_json:
        return _print_json(data)
    out.print(
        f"[green]wrote[/] {data['output']}: {data['model']} fused, params "
        f"{_fmt_int(data['params_before'])} -> {_fmt_int(data['params_after'])}, "
        f"{data['batchnorms_before']} BatchNorms -> 0; check on {data['check_inputs']} inputs: "
        f"max error {data['max_rel']:.1e} of the output scale",
        soft_wrap=True,
    )


@app.command()
@handle_errors
@with_format_options
def export(
    model: str,
    format: Format = "onnx",
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            help="File, or a directory (DIR/ gets DIR/<model><suffix>); a missing suffix is added.",
        ),
    ] = None,
    weights: Weights = None,
    pretrained: Pretrained = None,
    image_size: ImageSize = None,
    batch: Annotated[int, typer.Option(help="Static batch size.")] = 1,
    precision: Precision = None,
    calibration_images: CalibrationImages = "32",
    int8_target: Int8Target = None,
    upsample: Annotated[
        str | None,
        typer.Option(help="Segmenters: bicubic (official) or bilinear (runtimes without it)."),
    ] = None,
    no_reparam: Annotated[bool, typer.Option("--no-reparam", help="Export unfused.")] = False,
    labels: Labels = None,
    num_classes: NumClasses = None,
    features: FeaturesFlag = False,
    stages: Stages = None,
    as_json: JsonFlag = False,
    format_options: dict | None = None,
) -> None:
    """Export to a deployable file with its metadata (embedded and a sidecar JSON).
    Each format's own options follow (prefixed with the format's name)."""
    from . import api

    with err.status(f"exporting {model} to {format}") as status:
        artifact = api.export(
            model,
            format,
            weights=weights,
            pretrained=_pretrained(pretrained),
            output=output,
            image_size=image_size,
            batch=batch,
            reparam=not no_reparam,
            precision=precision,
            calibration_images=calibration_images,
            int8_target=int8_target,
            upsample=upsample,
            progress=lambda msg: status.update(f"exporting {model} to {format}: {msg}"),
            num_classes=num_classes,
            labels=labels,
            features=parse_features(features, stages),
            **format_options,
        )
    for note in artifact.notes:
        err.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
    from .files import artifact_size

    size = artifact_size(artifact.path) / 2**20
    if as_json:
        return _print_json(
            {
                "path": str(artifact.path),
                "sidecar": str(artifact.sidecar),
                "size_mib": size,
                "metadata": artifact.metadata,
                "notes": list(artifact.notes),
            }
        )
    out.print(
        f"[green]wrote[/] {artifact.path} ({size:.1f} MiB, {artifact.precision}, "
        f"{'fused' if not no_reparam else 'unfused'}, {_artifact_outputs(artifact.metadata)}) "
        f"+ {artifact.sidecar.name}",
        soft_wrap=True,
    )


def _artifact_outputs(meta: dict) -> str:
    """'10 classes', '150-class map', 'pooled features', '4 feature maps'."""
    if meta["task"] == "features":
        maps = sum("stride" in o for o in meta["outputs"])
        return f"{maps} feature map{'s' * (maps > 1)}" if maps else "pooled features"
    if meta["task"] == "segmentation":
        return f"{meta['num_classes']}-class map"
    return f"{meta['num_classes']} classes"


def _split(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _run_verify(
    model,
    formats,
    weights,
    pretrained,
    image_size,
    num_images,
    images=None,
    precisions="",
    **config,
):
    from . import verify as verify_mod

    fmts = _split(formats)
    with err.status(f"verifying {model}") as status:
        return verify_mod.verify(
            model,
            weights=weights,
            pretrained=_pretrained(pretrained),
            formats=fmts,
            precisions=_split(precisions) or None,
            image_size=image_size,
            num_images=num_images,
            images_dir=images,
            **config,
            progress=lambda msg: status.update(f"verifying {model}: {msg}"),
            warn=lambda msg: err.print(f"[yellow]warning:[/] {escape(msg)}"),
        )


def _run_bench(
    model, weights, image_size, batch, threads, min_time, min_runs, runtime, precisions="fp32"
):
    from . import bench as bench_mod

    with err.status(f"benchmarking {model}") as status:
        return bench_mod.benchmark(
            model,
            weights=weights,
            image_size=image_size,
            batch=batch,
            threads=threads,
            min_time_s=min_time,
            min_runs=min_runs,
            runtimes=_split(runtime),
            precisions=_split(precisions),
            progress=lambda msg: status.update(f"benchmarking {model}: {msg}"),
        )


@app.command()
@handle_errors
def verify(
    model: str,
    formats: Formats = "onnx",
    precisions: Precisions = "",
    weights: Weights = None,
    pretrained: Pretrained = None,
    image_size: ImageSize = None,
    num_images: NumImages = 8,
    images: Annotated[
        Path | None, typer.Option(help="A folder of your images to verify on (any format).")
    ] = None,
    num_classes: NumClasses = None,
    labels: Labels = None,
    features: FeaturesFlag = False,
    stages: Stages = None,
    int8_target: Int8Target = None,
    calibration_images: CalibrationImages = "32",
    json_path: JsonPath = None,
    junit: Annotated[Path | None, typer.Option(help="Write a JUnit XML report.")] = None,
    markdown: MarkdownPath = None,
) -> None:
    """Prove fused torch and every artifact match the unfused model; exit 1 if not."""
    from .files import check_output_file
    from .report import verify_markdown, write_json, write_text, write_verify_junit

    for path in (json_path, junit, markdown):
        check_output_file(path)
    report = _run_verify(
        model,
        formats,
        weights,
        pretrained,
        image_size,
        num_images,
        images,
        precisions,
        num_classes=num_classes,
        labels=labels,
        features=parse_features(features, stages),
        int8_target=int8_target,
        calibration_images=calibration_images,
    )
    if json_path == Path("-"):
        _print_json(report.to_dict())
    else:
        _render_verify(report)
        if json_path:
            write_json(json_path, report.to_dict())
    if junit:
        write_verify_junit(junit, report)
    if markdown:
        write_text(markdown, verify_markdown(report))
    if not report.passed:
        raise typer.Exit(1)


def _render_verify(report) -> None:
    table = Table(title=f"{report.model} @ {_hw(report.image_size)}: vs {report.reference}")
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
            f"{m['max_abs']:.2e}",
            f"{m['max_rel']:.2e}",
            p.bound,
            f"{1 - m['cosine']:.1e}",
            f"{m['psnr_db']:.1f}",
            *(
                []
                if not agreement
                else [f"{m['agreement']:.4f}"]
                if segments
                else [f"{m['top1']:.3f}", f"{m['top5']:.3f}"]
            ),
            "[green]pass[/]" if p.passed else "[bold red]FAIL[/]",
        )
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


@app.command("eval")
@handle_errors
def eval_cmd(
    model: str,
    weights: Weights,
    data: LabelledData,
    formats: Formats = "onnx",
    precisions: Precisions = "",
    image_size: ImageSize = None,
    labels: Labels = None,
    json_path: JsonPath = None,
    markdown: MarkdownPath = None,
) -> None:
    """Accuracy on your labelled images: torch, each artifact, and the drop between them."""
    options = dict(locals())  # the parameters above, which evaluate.run_cli takes by name
    from .evaluate import run_cli

    run_cli(out, err, _print_json, **options)


@app.command()
@handle_errors
def bench(
    model: str,
    weights: Weights = None,
    image_size: ImageSize = None,
    batch: Annotated[int, typer.Option()] = 1,
    threads: Threads = None,
    min_time: MinTime = 3.0,
    min_runs: Annotated[int, typer.Option()] = 20,
    runtime: Runtimes = "onnxruntime,torch",
    precisions: BenchPrecisions = "fp32",
    json_path: JsonPath = None,
    markdown: MarkdownPath = None,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG bar chart.")] = None,
) -> None:
    """onnxruntime CPU latency of the fused export against the plain unfused export, each
    candidate's accuracy against the float64 model, and the fastest within its bound."""
    from . import bench as bench_mod
    from .files import check_output_file
    from .report import bench_markdown, write_json, write_text

    for path in (json_path, markdown, plot):
        check_output_file(path)
    report = _run_bench(
        model, weights, image_size, batch, threads, min_time, min_runs, runtime, precisions
    )
    if json_path == Path("-"):
        _print_json(report)
    else:
        bench_mod.render(report, out)
        if json_path:
            write_json(json_path, report)
    if markdown:
        write_text(markdown, bench_markdown(report))
    if plot:
        from .plots import plot_bench

        plot_bench(report, plot)


@app.command()
@handle_errors
def report(
    model: str,
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o")] = Path("mvd-report"),
    formats: Formats = "onnx",
    weights: Weights = None,
    image_size: ImageSize = None,
    num_images: NumImages = 8,
    threads: Threads = None,
    min_time: MinTime = 3.0,
) -> None:
    """verify + bench in one CI report: report.json, report.md, junit.xml; exit 1 on failure."""
    from . import bench as bench_mod
    from .files import ensure_writable_dir
    from .report import bench_markdown, verify_markdown, write_json, write_text, write_verify_junit

    ensure_writable_dir(output_dir)
    checked = _run_verify(model, formats, weights, None, image_size, num_images)
    _render_verify(checked)
    timed = _run_bench(model, weights, image_size, 1, threads, min_time, 20, "onnxruntime")
    bench_mod.render(timed, out)
    write_json(output_dir / "report.json", {"verify": checked.to_dict(), "bench": timed})
    write_text(output_dir / "report.md", verify_markdown(checked) + "\n" + bench_markdown(timed))
    write_verify_junit(output_dir / "junit.xml", checked)
    out.print(f"[green]wrote[/] {output_dir}/report.json, report.md, junit.xml")
    if not checked.passed:
        raise typer.Exit(1)


@app.command()
@handle_errors
def doctor(as_json: JsonFlag = False) -> None:
    """Versions, machine, which formats this machine can export and run, and the runtimes."""
    from .info import doctor_info

    data = doctor_info()
    if as_json:
        return _print_json(data)
    out.print(f"machine: {data['machine_line']}")
    table = Table(title="formats")
    for col in ("format", "export", "run here", "install"):
        table.add_column(col)
    for f in data["formats"]:
        table.add_row(f["name"], f["export"], f["run"], escape(f["install"] or "-"))
    out.print(table)
    table = Table(title="runtimes")
    for col in ("runtime", "runs", "version", "this CPU", "install"):
        table.add_column(col)
    for r in data["runtimes"]:
        native = r.get("inference_precisions")
        cpu = "-" if native is None else "native " + (", ".join(native) or "fp32 only")
        version = r["version"] or "not installed"
        table.add_row(r["name"], r["runs"], version, cpu, escape(r["install"] or "-"))
    out.print(table)


def _exit_on_sigterm(signum, _frame) -> None:
    """SIGTERM (CI timeouts, `kill`) unwinds like Ctrl-C, so temporary files are removed."""
    raise SystemExit(128 + signum)


def main() -> None:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    app()
