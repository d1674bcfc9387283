"""The table of export formats: one row per format, and everything a format is.

A row owns the format's suffix, precisions and default precision, the extra that
installs it, what it can do (bicubic resize, run on this machine), its options (a
frozen dataclass validated once; the CLI makes one flag per field from its type,
default, help and choices), and its exporter, runner, static check, record reader
and facts (records.py), named "module:attribute" and imported only when used, so a
missing extra costs nothing until its format is asked for. api, verify, bench, info
and the CLI find formats only here; an unknown name is an error, never a fallthrough.
Adding a format is its exporter, its runner, its reader and one row
(docs/architecture.md).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import BackendUnavailable, BadInput, one_line


def option(default: Any, help: str, choices: tuple | None = None, note: str | None = None) -> Any:
    """A format option: its default, its help line, and the values it takes. `note` is
    what an export left at this default says (a default that changed: CHANGELOG.md)."""
    return field(default=default, metadata={"help": help, "choices": choices, "note": note})


@dataclass(frozen=True)
class OnnxOptions:
    # What torch's TorchScript-based ONNX exporter emits; below 13 the models' ops
    # (LayerNorm, GELU, dynamic Slice) need decompositions it does not offer.
    opset: int = option(17, "ONNX opset.", tuple(range(13, 21)))
    dynamic_batch: bool = option(False, "Leave the batch dimension free.")
    simplify: bool = option(True, "Run onnxslim, then re-verify.")
    ort: bool = option(
        False, "Also write the ORT-format file for ONNX Runtime Mobile, and its operators config."
    )


@dataclass(frozen=True)
class CoreMLOptions:
    # An image input is what Vision (VNCoreMLModel) and Xcode's preview take.
    image_input: bool = option(
        True,
        "An image input (RGB pixels), preprocessing inside; else a normalised tensor.",
        note="an image input, as Vision and Xcode take it (a new default); "
        "--no-image-input gives the normalised tensor input",
    )
    min_target: str = option(
        "iOS16",
        "Deployment target.",
        ("iOS15", "iOS16", "iOS17", "iOS18", "macOS12", "macOS13", "macOS14", "macOS15"),
    )
    compress: str | None = option(None, "Weight compression.", ("palettize8", "int8"))


@dataclass(frozen=True)
class TFLiteOptions:
    # The defaults are what MediaPipe, the Task Library and Android bitmaps take:
    # channels-last, and RGB in [0, 1] (MediaPipe normalises with one mean and std for
    # all channels, so a per-channel one must be inside the file).
    nhwc: bool = option(
        True,
        "Channels-last input and output, as MediaPipe takes them.",
        note="channels-last (NHWC) input, as MediaPipe takes it (a new default); "
        "--no-nhwc keeps NCHW",
    )
    normalize_inside: bool = option(
        True,
        "(x - mean) / std in the file, which then takes RGB in [0, 1].",
        note="RGB input in [0, 1], (x - mean) / std inside the file (a new default); "
        "--no-normalize-inside takes the normalised input",
    )
    int8_mode: str = option(
        "static", "int8: static (full integer) or dynamic (range).", ("static", "dynamic")
    )


@dataclass(frozen=True)
class ExecuTorchOptions:
    """No options yet: XNNPACK is the one delegate, and the precision picks the rest."""


def _everywhere() -> bool:
    return True


def _on_macos() -> bool:
    return platform.system() == "Darwin"


@dataclass(frozen=True)
class Format:
    name: str
    suffix: str
    precisions: tuple[str, ...]
    python_modules: tuple[str, ...]  # what must import for the format to export
    extra: str | None  # the pip extra that installs them
    options: type
    exporter: str  # "module:function", taking an ExportJob, returning ArtifactMetadata
    runner: str  # "module:Class", called as Class(path, threads) -> numpy in, numpy out
    runtime: str  # the runtime's name in `mvd bench --runtime`
    runtime_dist: str  # the distribution whose kernels run the file (machine stamps)
    default_precision: str = "fp32"
    dists: tuple[str, ...] = ()  # whose versions the metadata records
    has_bicubic: bool = False
    package: bool = False  # the artifact is a directory
    # Where the runner cannot run, verify checks the file statically ("module:function"
    # taking (path, expected output shapes), returning {"problems", "summary"}) and
    # estimates the numbers in torch at the file's precision.
    runs_on: Callable[[], bool] = _everywhere
    runs_only_on: str = ""
    static_check: str | None = None
    # Replaces the record embedded in a file ("module:function" taking (path, record));
    # the int8 search stamps its chosen file with it. Without one, it exports that
    # file again with the final record.
    restamp: str | None = None
    # What a file says about itself, read without the sidecar (records.py): the reader
    # ("module:function", path -> the embedded record, {} for a file another tool made)
    # and the facts ("module:function", path -> its input, outputs and weights' precision).
    reader: str = ""
    facts: str = ""

    def __post_init__(self) -> None:
        if not (self.reader and self.facts):
            raise ValueError(f"format {self.name}: every format needs a reader and facts")
        if self.static_check is None and self.runs_on is not _everywhere:
            raise ValueError(
                f"format {self.name}: a format that runs only somewhere needs a static_check"
            )

    def available(self) -> bool:
        return all(importlib.util.find_spec(m) is not None for m in self.python_modules)

    def runs_here(self) -> bool:
        return self.available() and self.runs_on()

    def import_backend(self, *modules: str) -> None:
        """Import the converter's modules (quietly: they print banners and warnings),
        where `available()` only found them. One installed beside another torch than
        its wheel was built for fails to import; that is a BackendUnavailable naming
        the fix, not a traceback."""
        from ..quiet import quiet

        try:
            with quiet():
                for module in modules:
                    importlib.import_module(module)
        except (ImportError, OSError) as exc:
            raise BackendUnavailable(
                f"{self.name}: {module} is installed but does not import "
                f"({one_line(str(exc)) or type(exc).__name__}); reinstall it with the "
                f"tested stack: {self.install_hint()} -c constraints.txt"
            ) from exc

    def install_hint(self) -> str:
        return f"pip install 'mobilevit_deploy[{self.extra}]'" if self.extra else ""

    def load(self, which: str) -> Callable:
        """The exporter, runner or static check, imported now."""
        module, _, attribute = getattr(self, which).partition(":")
        return getattr(importlib.import_module(module, __package__), attribute)

    def open_runner(self, path, threads: int | None = None) -> Callable:
        return self.load("runner")(path, threads)

    def default_notes(self, options: Any) -> list[str]:
        """What the export says of the options left at a default that changed."""
        return [
            f"{self.name}: {f.metadata['note']}"
            for f in dataclasses.fields(self.options)
            if f.metadata.get("note") and getattr(options, f.name) == f.default
        ]

    def make_options(self, values: dict) -> Any:
        """The typed options from the values given (the rest take their defaults),
        with the error a user should see for a value outside an option's choices."""
        for f in dataclasses.fields(self.options):
            choices = f.metadata["choices"]
            value = values.get(f.name, f.default)
            optional = f.default is None  # None is "not asked for" only where it is the default
            if choices and not (optional and value is None) and value not in choices:
                raise BadInput(
                    f"{flag(f.name)} {value!r} is not supported; choose {shown_choices(choices)}"
                )
        return self.options(**values)


def shown_choices(choices: tuple) -> str:
    """'from a, b, c', or a run of integers as '13 to 20'."""
    if all(isinstance(c, int) for c in choices) and list(choices) == list(
        range(choices[0], choices[-1] + 1)
    ):
        return f"{choices[0]} to {choices[-1]}"
    return "from " + ", ".join(map(str, choices))


def flag(option_name: str) -> str:
    return "--" + option_name.replace("_", "-")


FORMATS: dict[str, Format] = {
    "onnx": Format(
        "onnx",
        ".onnx",
        ("fp32", "fp16", "int8"),
        ("onnx", "onnxruntime"),
        None,
        OnnxOptions,
        ".onnx:export_onnx",
        "..runtimes.onnxruntime:OrtRunner",
        "onnxruntime",
        "onnxruntime",
        has_bicubic=True,
        restamp=".onnx:restamp_onnx",
        reader="..runtimes.onnxruntime:read_record",
        facts="..runtimes.onnxruntime:file_facts",
    ),
    "coreml": Format(
        "coreml",
        ".mlpackage",
        ("fp16", "fp32"),
        ("coremltools",),
        "coreml",
        CoreMLOptions,
        ".coreml:export_coreml",
        "..runtimes.coreml:CoreMLRunner",
        "coremltools",
        "coremltools",
        default_precision="fp16",  # as on device
        dists=("coremltools",),
        package=True,
        runs_on=_on_macos,  # coremltools predicts on macOS only
        runs_only_on="macOS only",
        static_check="..runtimes.coreml:check_package",
        reader="..runtimes.coreml:read_metadata",
        facts="..runtimes.coreml:file_facts",
    ),
    "tflite": Format(
        "tflite",
        ".tflite",
        ("fp32", "fp16", "int8"),
        ("litert_torch", "ai_edge_litert"),
        "tflite",
        TFLiteOptions,
        ".tflite:export_tflite",
        "..runtimes.litert:LiteRTRunner",
        "litert",
        "ai-edge-litert",
        dists=("litert-torch", "ai-edge-litert", "ai-edge-quantizer"),
        restamp=".tflite:embed_metadata",
        reader="..runtimes.litert:read_metadata",
        facts="..runtimes.litert:file_facts",
    ),
    "executorch": Format(
        "executorch",
        ".pte",
        ("fp32", "fp16", "int8"),
        ("executorch",),
        "executorch",
        ExecuTorchOptions,
        ".executorch:export_executorch",
        "..runtimes.executorch:ExecuTorchRunner",
        "executorch",
        "executorch",
        dists=("executorch", "torchao"),
        reader="..runtimes.executorch:read_metadata",
        facts="..runtimes.executorch:file_facts",
    ),
}


def option_owner(option_name: str) -> Format | None:
    """The format whose option this is."""
    for fmt in FORMATS.values():
        if option_name in {f.name for f in dataclasses.fields(fmt.options)}:
            return fmt
    return None


def all_options() -> list[tuple[Format, dataclasses.Field]]:
    """Every format's option fields, in table order (one CLI flag each)."""
    return [(fmt, f) for fmt in FORMATS.values() for f in dataclasses.fields(fmt.options)]


def check_format(name: str, precision: str | None = None) -> Format:
    """The format's row, or the error a user should see (before any slow work)."""
    info = FORMATS.get(name)
    if info is None:
        raise BadInput(f"unknown format {name!r}; choose from {', '.join(FORMATS)}")
    if precision is not None and precision not in info.precisions:
        raise BadInput(f"{name} supports precisions {', '.join(info.precisions)}, not {precision}")
    if not info.available():
        missing = ", ".join(info.python_modules)
        raise BackendUnavailable(f"{name} needs {missing}: {info.install_hint()}")
    return info


def check_options(fmt: Format, values: dict) -> Any:
    """The format's typed options from keyword values; another format's option, given
    at all, is a mistake the user should hear about (it would do nothing)."""
    own = {f.name for f in dataclasses.fields(fmt.options)}
    for key in values:
        owner = option_owner(key)
        if owner is None:
            raise TypeError(f"export() got an unexpected keyword argument {key!r}")
        if key not in own:
            raise BadInput(f"{flag(key)} applies to --format {owner.name}, not {fmt.name}")
    return fmt.make_options({k: v for k, v in values.items() if k in own})
