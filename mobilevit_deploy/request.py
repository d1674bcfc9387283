"""One typed request: the model and file options every command shares.

export, verify, bench, eval, report and reparam all take the same options (the model:
weights, size, head, labels, features; the files: precisions, the int8 target and
calibration, each format's own options; where files run: the device). The CLI builds
one `Request` from them (cli_options.shared_options) and the library takes it whole,
so a command cannot forget an option another one has, and every number is checked
here, once, before any work. Nothing here imports torch: `mvd --help` stays instant.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import limits
from .errors import BadInput
from .exporters.formats import FORMATS, check_options, flag, option_owner

# The int8 search's target in dB: 0 accepts any file, and no int8 file reaches 80 dB
# (an 8-bit value holds about 48 dB; the float modules cannot lift the rest past fp16's).
INT8_TARGET_RANGE = (0.0, 80.0)
CALIBRATION_COUNT_RANGE = (1, 10_000)
# bf16 is no file's precision: OpenVINO computes the fp32 file in it (bench only).
PRECISIONS = ("fp32", "fp16", "int8", "bf16")

ImageSize = int | tuple[int, int] | str | None
Features = bool | tuple[int, ...] | None


def parse_image_size(value: ImageSize) -> tuple[int, int] | None:
    """None, 224, (1024, 2048) or "1024x2048" -> (height, width) or None, within the
    bounds of limits.py."""
    if value is None:
        return None
    if isinstance(value, tuple):
        hw = value
    elif isinstance(value, int):
        hw = (value, value)
    else:
        parts = value.lower().replace(" ", "").split("x")
        if not (len(parts) in (1, 2) and all(p.isdigit() for p in parts)):
            raise BadInput(f"image size {value!r} is not N or HxW (e.g. 224 or 1024x2048)")
        hw = (int(parts[0]), int(parts[-1]))
    limits.check_image_hw(hw)
    return hw


def parse_list(text: str | Sequence[str] | None, what: str, choices: Sequence[str]) -> tuple:
    """'a,b' -> ('a', 'b'): each known, each once (the same format twice would do the
    same work twice)."""
    if text is None:
        return ()
    parts = text.split(",") if isinstance(text, str) else list(text)
    items = [p.strip() for p in parts if p.strip()]
    for item in items:
        if item not in choices:
            raise BadInput(f"unknown {what} {item!r}; choose from {', '.join(choices)}")
    repeated = sorted({i for i in items if items.count(i) > 1})
    if repeated:
        raise BadInput(f"{what} {', '.join(repeated)} given twice")
    return tuple(items)


def parse_features(features: bool, stages: str | None) -> Features:
    """--features alone: every stage; with --stages, the stages named."""
    if stages is None:
        return True if features else None
    if not features:
        raise BadInput("--stages picks the feature maps of --features; add --features")
    try:
        picked = tuple(int(part) for part in stages.split(",") if part.strip())
    except ValueError:
        raise BadInput(f"--stages takes comma-separated stage indices, not {stages!r}") from None
    if not picked:
        raise BadInput("--stages names no stage")
    return picked


def parse_calibration(value: int | str | Path) -> int | Path:
    """A count of natural-looking images, or a folder of the user's own."""
    if isinstance(value, int) or str(value).strip().lstrip("-").isdigit():
        count = int(value)
        limits.check_count("--calibration-images", count, *CALIBRATION_COUNT_RANGE)
        return count
    folder = Path(value)
    if not folder.is_dir():
        raise BadInput(f"--calibration-images {value}: not a directory (nor a number of images)")
    return folder


@dataclass(frozen=True)
class Request:
    """What the user asked of the model and its files. Defaults mean "what the file,
    the checkpoint or the zoo says"."""

    # The model. `model_name` names the zoo model of a file made by another tool.
    model_name: str | None = None
    weights: str | Path | None = None
    pretrained: bool | str = False
    image_size: tuple[int, int] | None = None
    num_classes: int | None = None
    labels: Path | tuple[str, ...] | None = None
    features: Features = None
    # The files: precisions (empty: each format's own), the int8 search, format options.
    precisions: tuple[str, ...] = ()
    int8_target: float | None = None
    calibration_images: int | Path = 32
    format_options: Mapping[str, Any] = field(default_factory=dict)
    # Where files run: None here, else a device command (docs/arm.md).
    device: str | None = None

    @classmethod
    def of(cls, request: Request | None = None, **options: Any) -> Request:
        """`request` with `options` laid over it, checked. An option that is neither a
        field nor a format's option is a TypeError (a caller's typo), as for any
        function; a format's option goes into `format_options`."""
        names = {f.name for f in dataclasses.fields(cls)}
        fields, format_options = {}, {}
        for key, value in options.items():
            if key in names:
                fields[key] = value
            elif option_owner(key) is not None:
                format_options[key] = value
            else:
                raise TypeError(f"unexpected keyword argument {key!r}")
        base = request or cls()
        if format_options:
            fields["format_options"] = {**base.format_options, **format_options}
        return dataclasses.replace(base, **fields).checked()

    def checked(self) -> Request:
        """The request with its values parsed, or the BadInput a user should see."""
        if self.weights is not None and self.pretrained:
            raise BadInput("give either --weights or --pretrained, not both")
        if self.weights is not None and str(self.weights).strip() == "":
            raise BadInput("--weights is empty")
        if self.num_classes is not None:
            limits.check_num_classes(self.num_classes)
        target = self.int8_target
        if target is not None:
            limits.check_real("--int8-target", target, *INT8_TARGET_RANGE)
        if self.labels is not None and not isinstance(self.labels, (str, Path)):
            labels = tuple(self.labels)
        else:
            labels = self.labels
        return dataclasses.replace(
            self,
            image_size=parse_image_size(self.image_size),
            precisions=parse_list(self.precisions, "precision", PRECISIONS),
            calibration_images=parse_calibration(self.calibration_images),
            labels=labels,
        )

    @property
    def model_options(self) -> dict[str, Any]:
        """The keywords of api.load_model."""
        return {
            "pretrained": self.pretrained,
            "image_size": self.image_size,
            "num_classes": self.num_classes,
            "labels": self.labels,
            "features": self.features,
        }

    @property
    def configures_model(self) -> bool:
        """Whether it asks to build the model otherwise than a checkpoint says."""
        return self.num_classes is not None or self.features not in (None, False)

    def options_for(self, format_name: str) -> Any:
        """The format's typed options: those given for it, the rest its defaults."""
        return check_options(FORMATS[format_name], dict(self.format_options))

    def for_loaded_model(self, format_name: str, precision: str) -> Request:
        """The request one export of an already loaded model takes: the model options
        were applied by loading it, and only that format's options and, at int8, the
        int8 target apply."""
        own = {k: v for k, v in self.format_options.items() if option_owner(k).name == format_name}
        return dataclasses.replace(
            self,
            weights=None,
            pretrained=False,
            image_size=None,
            num_classes=None,
            labels=None,
            features=None,
            precisions=(),
            int8_target=self.int8_target if precision == "int8" else None,
            format_options=own,
        )

    def check_formats(self, formats: Sequence[str]) -> None:
        """The format options, before any work: an option of a format not asked for would
        do nothing, and the user should hear so (each format's precisions are
        formats.check_format's)."""
        for key in self.format_options:
            owner = option_owner(key)
            if owner is not None and owner.name not in formats:
                raise BadInput(
                    f"{flag(key)} applies to --format {owner.name}, not {', '.join(formats)}"
                )
