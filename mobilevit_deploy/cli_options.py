"""The CLI's shared options, and the format options it reads from the format table.

Kept apart from cli.py so the commands read as commands. Nothing here imports torch:
`mvd --help` stays instant.
"""

from __future__ import annotations

import functools
import inspect
import typing
from pathlib import Path
from typing import Annotated

import typer

from .exporters.formats import FORMATS, all_options, shown_choices
from .metrics import DEFAULT_INT8_TARGET_DB

Weights = Annotated[
    str | None, typer.Option("--weights", "-w", help="Checkpoint path or http(s) URL.")
]
Pretrained = Annotated[
    str | None,
    typer.Option(
        help="Download a published checkpoint by tag (see `mvd info`); 'default' = first."
    ),
]
ImageSize = Annotated[
    str | None, typer.Option(help="N or HxW (e.g. 224, 1024x2048); default: the model's.")
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
NumClasses = Annotated[
    int | None,
    typer.Option(
        help="Head size: builds a fresh model of it, or checks a checkpoint against it "
        "(default: read from the checkpoint's head; 0 = headless)."
    ),
]
Labels = Annotated[
    Path | None,
    typer.Option(help="Class names, one per line (default: the checkpoint's, if it has any)."),
]
FeaturesFlag = Annotated[
    bool,
    typer.Option(
        "--features", help="Export the backbone's multi-scale feature maps instead of the head."
    ),
]
Stages = Annotated[
    str | None,
    typer.Option(help="With --features: the stage indices wanted, e.g. 1,2,3 (default: all)."),
]
Format = Annotated[str, typer.Option("--format", "-f", help=", ".join(FORMATS) + ".")]
JsonPath = Annotated[Path | None, typer.Option("--json", help="Write a JSON report ('-': stdout).")]
MarkdownPath = Annotated[Path | None, typer.Option("--markdown", help="Write a Markdown table.")]
Formats = Annotated[
    str, typer.Option(help=f"Comma-separated formats to export and check: {', '.join(FORMATS)}.")
]


def _own_defaults() -> str:
    """'fp16 for coreml, else fp32': the formats whose default precision is not fp32."""
    others = [f"{f.default_precision} for {f.name}" for f in FORMATS.values()]
    return ", ".join(o for o in others if not o.startswith("fp32")) + ", else fp32"


Precisions = Annotated[
    str,
    typer.Option(
        help="Comma-separated precisions of each format: fp32, fp16, int8 "
        f"(default: the format's own, {_own_defaults()})."
    ),
]
Precision = Annotated[
    str | None,
    typer.Option(help=f"fp32, fp16 or int8; default the format's own: {_own_defaults()}."),
]
NumImages = Annotated[int, typer.Option(help="Natural-looking test images.")]
CalibrationImages = Annotated[
    str,
    typer.Option(
        "--calibration-images",
        help="int8: N natural-looking images, or a folder of your own images "
        "(every fourth held out to judge the result).",
    ),
]
Int8Target = Annotated[
    float | None,
    typer.Option(
        "--int8-target",
        help="int8: the PSNR (dB) on held-out images that the search keeps the most "
        f"sensitive layers float for. Default {DEFAULT_INT8_TARGET_DB:g}.",
    ),
]
LabelledData = Annotated[
    Path,
    typer.Option(
        "--data",
        help="Labelled images: DIR/<class>/<image>, a CSV of path,label, or (segmenters) "
        "DIR/images + DIR/masks.",
    ),
]
Threads = Annotated[int | None, typer.Option(help="Intra-op threads; default all cores.")]
MinTime = Annotated[float, typer.Option(help="Seconds of timed runs per candidate.")]
Runtimes = Annotated[
    str,
    typer.Option(
        "--runtime",
        help="Comma-separated: onnxruntime, openvino (the ONNX files), torch (eager), "
        + ", ".join(f"{f.runtime} ({f.name})" for f in FORMATS.values() if f.name != "onnx")
        + ".",
    ),
]
BenchPrecisions = Annotated[
    str,
    typer.Option(
        help="Comma-separated: fp32, fp16, int8 (each format that has it), bf16 (openvino "
        "only, where the CPU computes it; other runtimes skip it)."
    ),
]


def with_format_options(command):
    """Give `command` one flag per field of every format's options (exporters/formats.py),
    typed, defaulted and described by the table, so a format's options reach the CLI
    without a line here. The command receives `format_options`: the ones the user typed
    (api.export refuses another format's option, given at all)."""
    signature = inspect.signature(command)
    hints = typing.get_type_hints(command, include_extras=True)
    own = [
        p.replace(annotation=hints[p.name])
        for p in signature.parameters.values()
        if p.name != "format_options"
    ]
    defaults, added = {}, []
    for fmt, f in all_options():
        text = f"{fmt.name}: {f.metadata['help']}"
        choices = f.metadata["choices"]
        if choices:
            text += f" Choose {shown_choices(choices)}."
        kind = typing.get_type_hints(fmt.options)[f.name]
        annotation = Annotated[kind, typer.Option(help=text)]
        defaults[f.name] = f.default
        added.append(
            inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=annotation
            )
        )

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        context = kwargs.pop("mvd_context")  # typer passes the click context by its type
        typed = {
            name
            for name in defaults
            if getattr(context.get_parameter_source(name), "name", "") == "COMMANDLINE"
        }
        chosen = {name: kwargs.pop(name, defaults[name]) for name in defaults}
        return command(*args, format_options={k: chosen[k] for k in typed}, **kwargs)

    context = inspect.Parameter(
        "mvd_context", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context
    )
    params = [*own, *added, context]
    wrapper.__signature__ = signature.replace(parameters=params)
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper


def parse_features(features: bool, stages: str | None) -> bool | tuple[int, ...] | None:
    """--features alone: every stage; --stages picks some (and implies --features)."""
    if stages is None:
        return True if features else None
    try:
        return tuple(int(part) for part in stages.split(",") if part.strip())
    except ValueError:
        from .errors import BadInput

        raise BadInput(f"--stages takes comma-separated stage indices, not {stages!r}") from None
