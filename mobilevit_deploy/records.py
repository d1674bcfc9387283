"""What an exported file says about itself: mvd's embedded record, and the facts of any file.

A file is checked as it ships, so nothing here reads the sidecar JSON: an app bundle
carries the file alone. `read_record` is the record mvd embedded (None for a file another
tool made); `file_facts` is what every file says whoever made it (its input and outputs,
the layout and image size they imply, and the precision its weights are stored in), from
which a foreign file is checked against the model the user names. Each format's reader
and facts live beside its runner and are found through the format table
(exporters/formats.py), so this module imports no converter, runtime or torch until a
file is read.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import BackendUnavailable, BadInput, one_line
from .exporters.formats import FORMATS, Format, check_format

# The keys without which a record is not mvd's: every record since the first has them.
RECORD_KEYS = ("model", "format")

# The channel count of an RGB input, the dimension that tells NCHW from NHWC.
RGB_CHANNELS = 3


def format_of(path: Path | str) -> str:
    """The format a file is, by its suffix (a `.mlpackage` is a directory; a trailing
    slash is a shell's completion of one)."""
    text = str(path)
    path = Path(text.rstrip("/") or text)
    fmt = next((f for f in FORMATS.values() if path.suffix.lower() == f.suffix), None)
    if fmt is None:
        known = ", ".join(f.suffix for f in FORMATS.values())
        raise BadInput(f"{path}: not an exported model file (the suffix must be one of {known})")
    if not path.exists():
        raise BadInput(f"{path}: no such file")
    if fmt.package != path.is_dir():
        kind = "directory" if fmt.package else "file"
        raise BadInput(f"{path}: a {fmt.suffix} must be a {kind}")
    return fmt.name


def _row(path: Path | str) -> tuple[Format, Path]:
    name = format_of(path)
    return check_format(name), Path(str(path).rstrip("/") or str(path))


def _read(fmt: Format, which: str, path: Path) -> dict:
    """The format's reader or facts on `path`; a file its library cannot parse is bad
    input, named, in one line."""
    function = fmt.load(which)
    try:
        return function(path)
    except (BadInput, BackendUnavailable):
        raise
    except Exception as exc:  # each library raises its own types for a damaged file
        reason = one_line(str(exc)) or type(exc).__name__
        raise BadInput(f"{path}: not a readable {fmt.name} file ({reason})") from exc


def read_record(path: Path | str) -> dict | None:
    """mvd's record embedded in the file, or None for a file that carries none."""
    fmt, path = _row(path)
    record = _read(fmt, "reader", path)
    if not record or not all(key in record for key in RECORD_KEYS):
        return None
    return record


def file_facts(path: Path | str) -> dict:
    """What the file says about itself, record or not (docs/records.md lists the keys):
    its input's name, shape, dtype and kind, the layout, image size and batch the shape
    implies, its outputs, and the precision its weights are stored in with the evidence."""
    fmt, path = _row(path)
    raw = _read(fmt, "facts", path)
    shape = raw["input_shape"]
    layout = layout_of(shape)
    return {
        "format": fmt.name,
        "input_name": raw["input_name"],
        "input_shape": shape,
        "input_dtype": raw["input_dtype"],
        "input_type": raw.get("input_type", "tensor"),
        "layout": layout,
        "image_size": image_size_of(shape, layout),
        "batch": shape[0] if shape else None,
        "output_names": [o["name"] for o in raw["outputs"]],
        "outputs": raw["outputs"],
        "precision": raw["precision"],
        "precision_evidence": raw["precision_evidence"],
        "details": raw.get("details", {}),
    }


def layout_of(shape: list) -> str:
    """NCHW when dimension 1 is the 3 colour channels, NHWC when the last one is, else
    unknown (a rank other than 4, or no dimension of 3 where a layout puts channels)."""
    if len(shape) != 4:
        return "unknown"
    if shape[1] == RGB_CHANNELS:
        return "NCHW"
    if shape[-1] == RGB_CHANNELS:
        return "NHWC"
    return "unknown"


def image_size_of(shape: list, layout: str) -> tuple[int, int] | None:
    """(height, width) where the layout is known and both are fixed numbers."""
    if layout == "unknown":
        return None
    h, w = shape[2:4] if layout == "NCHW" else shape[1:3]
    return (h, w) if isinstance(h, int) and isinstance(w, int) else None


def decoded(entries: dict[str, str]) -> dict:
    """A record written as text entries (ONNX metadata_props, CoreML user-defined
    metadata): a value that is not JSON was written as the string itself."""
    out = {}
    for key, text in entries.items():
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            out[key] = text
    return out


def single_input(path: Path, names: list) -> None:
    """A file with several inputs is not an image model mvd can check."""
    if len(names) != 1:
        listed = ", ".join(str(n) for n in names) or "none"
        raise BadInput(f"{path}: has {len(names)} inputs ({listed}); mvd checks one image input")
