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

from .errors import BadInput
from .exporters.formats import FORMATS, all_options, shown_choices
from .judge import DEFAULT_INT8_TARGET_DB

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
    str | None,
    typer.Option(
        help=f"With a model name: comma-separated formats to export and check, from "
        f"{', '.join(FORMATS)} (default onnx)."
    ),
]


def _own_defaults() -> str:
    """'fp16 for coreml, else fp32': the formats whose default precision is not fp32."""
    others = [f"{f.default_precision} for {f.name}" for f in FORMATS.values()]
    return ", ".join(o for o in others if not o.startswith("fp32")) + ", else fp32"


Precisions = Annotated[
    str,
    typer.Option(
        "--precision",
        "--precisions",
        help="Comma-separated precisions: fp32, fp16, int8 (export: one; default the "
        f"format's own, {_own_defaults()}); bench also bf16 (openvino, where the CPU has it).",
    ),
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
BenchRuntimes = Annotated[
    str,
    typer.Option(
        "--runtime",
        help="Comma-separated: onnxruntime, openvino (the ONNX files), torch (eager), "
        + ", ".join(f"{f.runtime} ({f.name})" for f in FORMATS.values() if f.name != "onnx")
        + ".",
    ),
]


Model = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="The zoo model of a file made by another tool (mvd files name their own).",
    ),
]
Device = Annotated[
    str | None,
    typer.Option(
        help="Run the files on another machine: a command that starts a Python there "
        "(e.g. 'ssh pi@raspberrypi python3'), or arm64 (the emulated ARM device)."
    ),
]

# The option group every command that builds a model or makes files takes
# (request.py): name -> (annotation, default). The format options follow from the table.
SHARED = {
    "model_name": (Model, None),
    "weights": (Weights, None),
    "pretrained": (Pretrained, None),
    "image_size": (ImageSize, None),
    "num_classes": (NumClasses, None),
    "labels": (Labels, None),
    "features": (FeaturesFlag, False),
    "stages": (Stages, None),
    "precisions": (Precisions, ""),
    "int8_target": (Int8Target, None),
    "calibration_images": (CalibrationImages, "32"),
    "device": (Device, None),
}
# The shared options that make or run files, which commands of the model alone refuse.
FILE_OPTIONS = ("precisions", "int8_target", "calibration_images", "device")


def _format_parameters() -> tuple[dict, list[inspect.Parameter]]:
    """One flag per field of every format's options (exporters/formats.py), typed,
    defaulted and described by the table, so a format's options reach the CLI without
    a line here."""
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
    return defaults, added


def shared_options(command: str, unused: tuple[str, ...] = ()):
    """Give the decorated command every option of the shared group and every format's
    options, and call it with `request`: the typed Request built and checked from them
    (request.py). Options in `unused` (and format options, where FILE_OPTIONS are
    unused) do nothing for this command: given, they are refused by name."""

    def decorate(fn):
        signature = inspect.signature(fn)
        hints = typing.get_type_hints(fn, include_extras=True)
        own = [
            p.replace(annotation=hints[p.name])
            for p in signature.parameters.values()
            if p.name != "request"
        ]
        format_defaults, format_params = _format_parameters()
        shared = [
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
            )
            for name, (annotation, default) in SHARED.items()
        ]

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            context = kwargs.pop("mvd_context")  # typer passes the click context by its type
            given = {
                name
                for name in (*SHARED, *format_defaults)
                if getattr(context.get_parameter_source(name), "name", "") == "COMMANDLINE"
            }
            values = {name: kwargs.pop(name) for name in SHARED}
            options = {name: kwargs.pop(name) for name in format_defaults}
            refused = set(unused) | (
                set(format_defaults) if set(FILE_OPTIONS) <= set(unused) else set()
            )
            for name in sorted(given & refused):
                raise BadInput(f"{_flag(name)} does not apply to mvd {command}")
            return fn(*args, request=build_request(values, options, given), **kwargs)

        context = inspect.Parameter(
            "mvd_context", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context
        )
        params = [*own, *shared, *format_params, context]
        wrapper.__signature__ = signature.replace(parameters=params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper

    return decorate


def _flag(name: str) -> str:
    return {"model_name": "--model"}.get(name, "--" + name.replace("_", "-"))


def build_request(values: dict, format_options: dict, given: set[str]):
    """The Request of the typed options: format options only where typed (api.export
    refuses another format's option, given at all)."""
    from .request import Request, parse_features

    tag = values.pop("pretrained")
    features = parse_features(values.pop("features"), values.pop("stages"))
    typed = {k: v for k, v in format_options.items() if k in given}
    return Request.of(
        **values,
        pretrained=True if tag == "default" else (tag or False),
        features=features,
        format_options=typed,
    )
