"""The model a file was made from, rebuilt to check the file against.

An mvd file's embedded record says what it is: the zoo model, the input size and
layout, the head, the class names, the feature stages, the precision, the int8 target
and the checkpoint's SHA-256 (exporters/metadata.py). With `--weights` the reference is
built from that checkpoint, and a checkpoint whose hash differs from the record's is
refused by name: checking a file against other weights proves nothing. A file exported
without weights is built again the way it was made (the seeded initialisation). A file
made by another tool has no record: the user names the model (`--model`) and its
weights, and the file's own shapes give the rest; the report says which facts were
given and which were read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from . import api
from .errors import BadInput
from .records import file_facts, format_of, read_record
from .request import Request
from .weights import file_sha256

# What the record says of a model exported without weights (exporters/metadata.py).
NO_WEIGHTS = "random initialisation (no weights)"


@dataclass(frozen=True)
class FileToCheck:
    """One file: its format, its record (None for another tool's file) and what the
    file itself says (input shape, layout, outputs)."""

    path: Path
    format: str
    record: dict | None
    facts: dict

    @property
    def precision(self) -> str:
        if self.record is not None:
            return self.record["precision"]
        return self.facts.get("precision") or "fp32"

    @property
    def label(self) -> str:
        return f"{self.path.name} ({self.format} {self.precision})"


@dataclass
class Rebuilt:
    """The unfused model the files are checked against, and where each fact about it
    came from ("read from the record of X", "given: --model", ...)."""

    model: nn.Module
    facts: dict[str, str] = field(default_factory=dict)


def open_files(paths: list[Path]) -> list[FileToCheck]:
    """Each path's format, record and facts; BadInput for a missing or unknown file."""
    files = []
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise BadInput(f"{path}: no such file")
        fmt = format_of(path)
        files.append(FileToCheck(path, fmt, read_record(path), file_facts(path)))
    return files


def record_image_size(record: dict) -> tuple[int, int]:
    shape = record["input_shape"]
    return tuple(shape[1:3]) if record.get("input_layout") == "NHWC" else tuple(shape[2:4])


def _record_features(record: dict) -> tuple[int, ...] | None:
    if record.get("features") is not None:
        return tuple(record["features"])
    stages = [o["stage"] for o in record.get("outputs", []) if "stage" in o]
    return tuple(stages) or None


def _what_the_record_says(record: dict) -> dict:
    """The load_model options that build the model the record describes."""
    features = _record_features(record)
    return {
        "image_size": record_image_size(record),
        "num_classes": None if features else record["num_classes"],
        "labels": tuple(record["class_labels"]) if record.get("class_labels") else None,
        "features": features,
    }


def _same_model(files: list[FileToCheck]) -> dict:
    """The one model the recorded files describe; files of different models or
    checkpoints are checked one model at a time."""
    keys = ("model", "weights_sha256", "num_classes", "output_names")
    described = {tuple(str(f.record.get(k)) for k in keys) for f in files}
    sizes = {record_image_size(f.record) for f in files}
    if len(described) > 1 or len(sizes) > 1:
        names = ", ".join(str(f.path) for f in files)
        raise BadInput(
            f"{names} are files of different models, sizes or checkpoints; verify them "
            "one model at a time"
        )
    return files[0].record


def rebuild(files: list[FileToCheck], request: Request) -> Rebuilt:
    """The unfused model behind `files` (all mvd files, or all foreign ones)."""
    recorded = [f for f in files if f.record is not None]
    if recorded and len(recorded) != len(files):
        raise BadInput("give mvd files and files of other tools in separate runs")
    if not recorded:
        return _rebuild_foreign(files, request)
    record = _same_model(recorded)
    if request.model_name is not None and request.model_name != record["model"]:
        raise BadInput(
            f"--model {request.model_name}: {files[0].path} records model {record['model']}"
        )
    source = f"read from the record of {files[0].path.name}"
    options = _what_the_record_says(record)
    given = {k: getattr(request, k) for k in ("image_size", "num_classes", "features")}
    for key, value in given.items():
        if value is not None and value != options[key]:
            raise BadInput(
                f"--{key.replace('_', '-')} {value}: {files[0].path} records {options[key]}"
            )
    weights = _weights_for(record, request, files[0].path)
    if weights is not None and Path(weights).is_file():  # before loading a wrong head
        _check_hash(record.get("weights_sha256"), file_sha256(Path(weights)), files[0].path)
    model = api.load_model(record["model"], weights, pretrained=request.pretrained, **options)
    _check_checkpoint(model, record, files[0].path)
    facts = {key: source for key in ("model", "image size", "head", "class names", "layout")}
    facts["weights"] = (
        "given: --weights"
        if weights is not None or request.pretrained
        else "the record's seeded initialisation (exported without weights)"
    )
    return Rebuilt(model, facts)


def _weights_for(record: dict, request: Request, path: Path) -> str | Path | None:
    """The checkpoint to build from: the one given, or none where the file was made
    without one; a file made from a checkpoint needs it."""
    if request.weights is not None or request.pretrained:
        return request.weights
    if record.get("weights_sha256") is None and record.get("weights") == NO_WEIGHTS:
        return None
    sha = record.get("weights_sha256")
    held = f" (SHA-256 {sha[:12]}...)" if sha else ""
    raise BadInput(
        f"{path} was exported from {record.get('weights')}{held}; give that checkpoint "
        "with --weights to rebuild its reference"
    )


def _check_checkpoint(model: nn.Module, record: dict, path: Path) -> None:
    """Refuse a checkpoint other than the one the file was made from."""
    provenance = model.mvd_provenance
    got = provenance.sha256 if provenance is not None else None
    _check_hash(record.get("weights_sha256"), got, path)


def _check_hash(expected: str | None, got: str | None, path: Path) -> None:
    if expected is not None and got is not None and got != expected:
        raise BadInput(
            f"{path} was made from a checkpoint with SHA-256 {expected}, the one given has "
            f"{got}: check the file against the weights it was exported from"
        )


def _rebuild_foreign(files: list[FileToCheck], request: Request) -> Rebuilt:
    """A file without mvd's record: the model is named, the size read from the file."""
    first = files[0]
    if request.model_name is None:
        raise BadInput(
            f"{first.path} carries no mvd record; name its model with --model NAME (and "
            "its checkpoint with --weights) to check it"
        )
    sizes = {tuple(f.facts["image_size"]) for f in files if f.facts.get("image_size")}
    if len(sizes) > 1:
        raise BadInput(f"the files take different input sizes ({sorted(sizes)})")
    facts = {"model": "given: --model"}
    size = request.image_size
    if size is None and sizes:
        size = sizes.pop()
        facts["image size"] = f"read from the input shape of {first.path.name}"
    else:
        facts["image size"] = "given: --image-size" if size else "the zoo's default"
    options = {**request.model_options, "image_size": size}
    model = api.load_model(request.model_name, request.weights, **options)
    facts["head"] = "read from the checkpoint" if request.weights else "the zoo's default"
    facts["weights"] = "given: --weights" if request.weights else "the seeded initialisation"
    facts["layout"] = ", ".join(
        f"{f.path.name}: {f.facts.get('layout', 'unknown')} (read from its input shape)"
        for f in files
    )
    return Rebuilt(model, facts)
