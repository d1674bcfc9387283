"""`mvd`: a thin typer front-end. Parse, call the API, render with rich.

Heavy modules (torch, onnx, the optional backends) are imported inside commands so
that `mvd --help` stays instant and never needs the extras. Every command that builds
a model or makes files takes the one shared option group (cli_options.shared_options)
as a typed Request. Errors meant for people (errors.MvdError) print one line and exit
with their code: 1 verification failed, 2 bad input, 3 backend unavailable.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .cli_options import (
    FILE_OPTIONS,
    BenchRuntimes,
    Device,
    Format,
    Formats,
    JsonPath,
    LabelledData,
    MarkdownPath,
    MinTime,
    NumImages,
    Threads,
    shared_options,
)
from .cli_render import artifact_outputs, fmt_int, hw, render_info, render_verify, weight_tags
from .errors import BadInput, MvdError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Reparameterize, export, verify and benchmark efficient vision transformers.",
)
# Piped output (CI logs, README snippets) gets a fixed width rather than rich's 80.
out = Console(width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True)

Targets = Annotated[
    list[str],
    typer.Argument(
        help="A zoo model (its files are exported, then checked), or files you already "
        "have (.onnx, .mlpackage, .tflite, .pte), checked as they are."
    ),
]
# Seconds of timed runs and how many at least: beyond these a benchmark is hours long.
MAX_MIN_TIME_S = 3600.0
MAX_MIN_RUNS = 100_000


def handle_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MvdError as exc:
            err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper


def _emit_json(path: Path | None, data: object) -> bool:
    """Write `data` as JSON to `path` ('-': stdout). True when it went to stdout, so
    the caller prints nothing else there."""
    if path is None:
        return False
    from .report import _clean, write_json

    if str(path) == "-":
        sys.stdout.write(json.dumps(_clean(data), indent=2, sort_keys=True) + "\n")
        return True
    write_json(path, data)
    return False


def _check_outputs(*paths: Path | None) -> None:
    """Every file a command will write, checked writable before any work."""
    from .files import check_output_file

    for path in paths:
        check_output_file(path)


def _split(text: str | None, what: str, choices) -> tuple[str, ...]:
    from .request import parse_list

    return parse_list(text, what, tuple(choices))


def _targets(targets: list[str]) -> tuple[str | None, list[Path]]:
    """A model name, or files: a target that exists or carries a format's suffix is a file."""
    from .exporters.formats import FORMATS

    suffixes = {f.suffix for f in FORMATS.values()}
    files = [t for t in targets if Path(t).exists() or Path(t.rstrip("/")).suffix in suffixes]
    if not files:
        if len(targets) != 1:
            raise BadInput("give one model name, or the files to check")
        return targets[0], []
    if len(files) != len(targets):
        raise BadInput("give a model name or files, not both")
    return None, [Path(t) for t in files]


@app.command("list")
@handle_errors
def list_cmd(
    family: Annotated[str | None, typer.Option(help="Only this family.")] = None,
    json_path: JsonPath = None,
) -> None:
    """The zoo: every model with its family, task, input size and parameters."""
    from .info import zoo_rows

    _check_outputs(json_path)
    rows = zoo_rows(family)
    if _emit_json(json_path, rows):
        return
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
            hw(r["input_size"]),
            fmt_int(r["params"]),
            weight_tags(r["weights"]),
        )
    out.print(table)


@app.command()
@handle_errors
@shared_options("info", unused=FILE_OPTIONS)
def info(model: str, json_path: JsonPath = None, request=None) -> None:
    """Params unfused / deploy / fused, MACs, preprocessing, formats, weights; with
    --weights, what the checkpoint decides (head size, input size, class names)."""
    from .info import model_info

    _check_outputs(json_path)
    with err.status(f"building {model} in its three forms"):
        data = model_info(model, request=request)
    if not _emit_json(json_path, data):
        render_info(data, out)


@app.command()
@handle_errors
@shared_options("reparam", unused=FILE_OPTIONS)
def reparam(
    model: str,
    output: Annotated[Path, typer.Option("--output", "-o", help=".pt or .safetensors")],
    json_path: JsonPath = None,
    request=None,
) -> None:
    """Fuse a model into its deploy form and save its weights (loads back with --weights)."""
    from .reparam_file import reparam_to_file

    _check_outputs(json_path)
    with err.status(f"fusing {model}"):
        data = reparam_to_file(model, output, request=request)
    if _emit_json(json_path, data):
        return
    out.print(
        f"[green]wrote[/] {data['output']}: {data['model']} fused, params "
        f"{fmt_int(data['params_before'])} -> {fmt_int(data['params_after'])}, "
        f"{data['batchnorms_before']} BatchNorms -> 0; check on {data['check_inputs']} inputs: "
        f"max error {data['max_rel']:.1e} of the output scale",
        soft_wrap=True,
    )


@app.command()
@handle_errors
@shared_options("export", unused=("device",))
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
    batch: Annotated[int, typer.Option(help="Static batch size.")] = 1,
    upsample: Annotated[
        str | None,
        typer.Option(help="Segmenters: bicubic (official) or bilinear (runtimes without it)."),
    ] = None,
    no_reparam: Annotated[bool, typer.Option("--no-reparam", help="Export unfused.")] = False,
    json_path: JsonPath = None,
    request=None,
) -> None:
    """Export to a deployable file with its metadata (embedded and a sidecar JSON).
    Each format's own options follow (prefixed with the format's name)."""
    import dataclasses

    from . import api
    from .files import artifact_size

    _check_outputs(json_path)
    if len(request.precisions) > 1:
        raise BadInput("export writes one file: give one --precision")
    precision = request.precisions[0] if request.precisions else None
    with err.status(f"exporting {model} to {format}") as status:
        artifact = api.export(
            model,
            format,
            output=output,
            batch=batch,
            reparam=not no_reparam,
            precision=precision,
            upsample=upsample,
            request=dataclasses.replace(request, precisions=()),
            progress=lambda msg: status.update(f"exporting {model} to {format}: {msg}"),
        )
    for note in artifact.notes:
        err.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
    size = artifact_size(artifact.path) / 2**20
    data = {
        "path": str(artifact.path),
        "sidecar": str(artifact.sidecar),
        "size_mib": size,
        "metadata": artifact.metadata,
        "notes": list(artifact.notes),
    }
    if _emit_json(json_path, data):
        return
    out.print(
        f"[green]wrote[/] {artifact.path} ({size:.1f} MiB, {artifact.precision}, "
        f"{'fused' if not no_reparam else 'unfused'}, {artifact_outputs(artifact.metadata)}) "
        f"+ {artifact.sidecar.name}",
        soft_wrap=True,
    )


def _formats_for(name: str | None, formats: str | None, none_ok: bool = False) -> tuple[str, ...]:
    """The formats a model-name run exports; files are checked as they are. verify
    refuses none (it would check no file); eval with none scores the model alone."""
    from .exporters.formats import FORMATS

    if name is None:
        if formats is not None:
            raise BadInput(
                "--formats picks what to export from a model; files are checked as they are"
            )
        return ()
    picked = _split("onnx" if formats is None else formats, "format", FORMATS)
    if not picked and not none_ok:
        raise BadInput(
            "--formats names no format: verify would check no file (e.g. --formats onnx)"
        )
    return picked


def _run_verify(targets, formats, request, num_images: int, images: Path | None = None):
    from . import verify as verify_mod

    name, files = _targets(targets)
    picked = _formats_for(name, formats)
    common = dict(
        request=request,
        num_images=num_images,
        images_dir=images,
        warn=lambda msg: err.print(f"[yellow]warning:[/] {escape(msg)}"),
    )
    what = name or ", ".join(f.name for f in files)
    with err.status(f"verifying {what}") as status:
        progress = lambda msg: status.update(f"verifying {what}: {msg}")  # noqa: E731
        if name is not None:
            return verify_mod.verify(name, formats=picked, progress=progress, **common)
        return verify_mod.verify_files(files, progress=progress, **common)


@app.command()
@handle_errors
@shared_options("verify")
def verify(
    targets: Targets,
    formats: Formats = None,
    num_images: NumImages = 8,
    images: Annotated[
        Path | None, typer.Option(help="A folder of your images to verify on (any format).")
    ] = None,
    json_path: JsonPath = None,
    junit: Annotated[Path | None, typer.Option(help="Write a JUnit XML report.")] = None,
    markdown: MarkdownPath = None,
    request=None,
) -> None:
    """Prove that files compute the unfused model's function (and that fusing does);
    exit 1 if not. Give a model (its files are exported first) or your files."""
    from .report import verify_markdown, write_text, write_verify_junit

    _check_outputs(json_path, junit, markdown)
    report = _run_verify(targets, formats, request, num_images, images)
    if not _emit_json(json_path, report.to_dict()):
        render_verify(report, out)
    if junit:
        write_verify_junit(junit, report)
    if markdown:
        write_text(markdown, verify_markdown(report))
    if not report.passed:
        raise typer.Exit(1)


@app.command("eval")
@handle_errors
@shared_options("eval")
def eval_cmd(
    targets: Targets,
    data: LabelledData,
    formats: Formats = None,
    json_path: JsonPath = None,
    markdown: MarkdownPath = None,
    request=None,
) -> None:
    """Accuracy on your labelled images: torch, each file, and the drop between them."""
    from .evaluate import run_cli

    _check_outputs(json_path, markdown)
    name, files = _targets(targets)
    picked = _formats_for(name, formats, none_ok=True)
    run_cli(
        out, err, _emit_json, name=name, files=files, data=data, formats=picked,
        request=request, json_path=json_path, markdown=markdown,
    )  # fmt: skip


def _bench_numbers(threads: int | None, min_time: float, min_runs: int) -> None:
    from .limits import check_count, check_real

    if threads is not None:
        check_count("--threads", threads, 1, os.cpu_count() or 1)
    check_real("--min-time", min_time, 0.0, MAX_MIN_TIME_S)
    check_count("--min-runs", min_runs, 1, MAX_MIN_RUNS)


def _run_bench(targets, request, batch, threads, min_time, min_runs, runtime):
    from . import bench as bench_mod

    name, files = _targets(targets)
    what = name or ", ".join(f.name for f in files)
    with err.status(f"benchmarking {what}") as status:
        return bench_mod.benchmark(
            name,
            files=files,
            request=request,
            batch=batch,
            threads=threads,
            min_time_s=min_time,
            min_runs=min_runs,
            runtimes=_split(runtime, "runtime", bench_mod.RUNTIMES),
            progress=lambda msg: status.update(f"benchmarking {what}: {msg}"),
        )


@app.command()
@handle_errors
@shared_options("bench")
def bench(
    targets: Targets,
    batch: Annotated[int, typer.Option(help="Static batch size.")] = 1,
    threads: Threads = None,
    min_time: MinTime = 3.0,
    min_runs: Annotated[int, typer.Option(help="Timed runs at least.")] = 20,
    runtime: BenchRuntimes = "onnxruntime,torch",
    json_path: JsonPath = None,
    markdown: MarkdownPath = None,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG bar chart.")] = None,
    request=None,
) -> None:
    """CPU latency of the fused export (or your files) against the plain unfused export,
    each candidate's accuracy against the float64 model, and the fastest within its bound."""
    from . import bench as bench_mod
    from .report import bench_markdown, write_text

    _check_outputs(json_path, markdown, plot)
    _bench_numbers(threads, min_time, min_runs)
    report = _run_bench(targets, request, batch, threads, min_time, min_runs, runtime)
    if not _emit_json(json_path, report):
        bench_mod.render(report, out)
    if markdown:
        write_text(markdown, bench_markdown(report))
    if plot:
        from .plots import plot_bench

        plot_bench(report, plot)


@app.command()
@handle_errors
@shared_options("report")
def report(
    model: str,
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o")] = Path("mvd-report"),
    formats: Formats = None,
    num_images: NumImages = 8,
    threads: Threads = None,
    min_time: MinTime = 3.0,
    request=None,
) -> None:
    """verify + bench in one CI report: report.json, report.md, junit.xml; exit 1 on failure."""
    from . import bench as bench_mod
    from .files import ensure_writable_dir
    from .report import bench_markdown, verify_markdown, write_json, write_text, write_verify_junit

    _bench_numbers(threads, min_time, 20)
    ensure_writable_dir(output_dir)
    checked = _run_verify([model], formats, request, num_images)
    render_verify(checked, out)
    timed = _run_bench([model], request, 1, threads, min_time, 20, "onnxruntime")
    bench_mod.render(timed, out)
    write_json(output_dir / "report.json", {"verify": checked.to_dict(), "bench": timed})
    write_text(output_dir / "report.md", verify_markdown(checked) + "\n" + bench_markdown(timed))
    write_verify_junit(output_dir / "junit.xml", checked)
    out.print(f"[green]wrote[/] {output_dir}/report.json, report.md, junit.xml")
    if not checked.passed:
        raise typer.Exit(1)


@app.command()
@handle_errors
def doctor(json_path: JsonPath = None, device: Device = None) -> None:
    """Versions, machine, which formats this machine can export and run, and the runtimes;
    with --device, that device's CPU and which files it can run."""
    from .info import doctor_info

    _check_outputs(json_path)
    if device is not None:
        _doctor_device(device, json_path)
        return
    data = doctor_info()
    if _emit_json(json_path, data):
        return
    out.print(f"machine: {data['machine_line']}")
    for extra, why in data["not_on_this_platform"].items():
        out.print(f"[{extra}] does not install on this platform: {escape(why)}")
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


def _doctor_device(device: str, json_path) -> None:
    from .device import describe

    data = describe(device)
    if _emit_json(json_path, data):
        return
    out.print(f"device {escape(device)}: {escape(data['machine_line'])}")
    if data["emulated"]:
        out.print("emulated: its numbers are the core's, its timings the emulator's")
    for note in data["notes"]:
        out.print(f"  {escape(note)}")
    table = Table(title="files it runs")
    for col in ("format", "runtime", "version", "install"):
        table.add_column(col)
    for f in data["formats"]:
        version = f["version"] or "not installed"
        table.add_row(f["name"], f["runtime"], version, escape(f["install"] or "-"))
    out.print(table)


def _exit_on_sigterm(signum, _frame) -> None:
    """SIGTERM (CI timeouts, `kill`) unwinds like Ctrl-C, so temporary files are removed."""
    raise SystemExit(128 + signum)


def main() -> None:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    app()
