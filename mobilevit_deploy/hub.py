"""Local hub snapshot folders, as timm's hub models are laid out.

A folder holds `model.safetensors` or `pytorch_model.bin` beside a `config.json` that
timm's `save_for_hf` writes: `architecture`, `num_classes`, `label_names` at the top
level and a `pretrained_cfg` with `input_size`, `mean`, `std`, `crop_pct`,
`interpolation` (older configs are flat; `labels` was the old name of `label_names`).
Top-level keys win over `pretrained_cfg`'s, as in timm's own reader.
"""

from __future__ import annotations

import json
from pathlib import Path

from .configure import Carried
from .errors import BadInput
from .registry import ModelSpec, Preprocessing

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def is_hub_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _lookup(config: dict, *keys: str) -> object:
    cfg = config.get("pretrained_cfg") if isinstance(config.get("pretrained_cfg"), dict) else {}
    for key in keys:
        if config.get(key) is not None:
            return config[key]
        if cfg.get(key) is not None:
            return cfg[key]
    return None


def _label_names(value: object, where: Path) -> tuple[str, ...] | None:
    """A list of names, or timm's {index: name} mapping."""
    if value is None or value == [] or value == {}:
        return None
    if isinstance(value, dict):
        try:
            order = sorted(value, key=int)
        except (TypeError, ValueError):
            raise BadInput(f"{where}: label_names keys must be class indices") from None
        if [int(k) for k in order] != list(range(len(order))):
            raise BadInput(f"{where}: label_names must number the classes 0..N-1")
        value = [value[k] for k in order]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadInput(f"{where}: label_names must be a list of strings")
    return tuple(value)


def _input_size(value: object, where: Path) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, list) and len(value) == 3 and all(isinstance(v, int) for v in value):
        return (value[1], value[2])
    raise BadInput(f"{where}: input_size must be [channels, height, width], got {value!r}")


def _preprocessing(config: dict, spec: ModelSpec, where: Path) -> Preprocessing:
    base = spec.preprocessing
    mean, std = _lookup(config, "mean"), _lookup(config, "std")
    for name, value in (("mean", mean), ("std", std)):
        if value is not None and (not isinstance(value, list) or len(value) != 3):
            raise BadInput(f"{where}: {name} must be three numbers, got {value!r}")
    return Preprocessing(
        mean=tuple(mean) if mean else base.mean,
        std=tuple(std) if std else base.std,
        crop_pct=_lookup(config, "crop_pct") or base.crop_pct,
        interpolation=_lookup(config, "interpolation") or base.interpolation,
    )


def _architecture_matches(architecture: str, spec: ModelSpec) -> bool:
    """timm names these models as the zoo does; a pretrained tag follows a dot."""
    return architecture.split(".", 1)[0].lower().replace("-", "_") == spec.name


def read_hub_folder(path: Path, spec: ModelSpec) -> tuple[Path, Carried]:
    """The weights file of a hub folder and what its config says about the model."""
    where = path / "config.json"
    try:
        config = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInput(f"{where}: not a readable JSON config ({exc})") from None
    if not isinstance(config, dict):
        raise BadInput(f"{where}: not a JSON object")
    architecture = _lookup(config, "architecture")
    if isinstance(architecture, str) and not _architecture_matches(architecture, spec):
        raise BadInput(
            f"{where} is for {architecture}, not {spec.name}: give the model name "
            f"{architecture.split('.', 1)[0]} if the zoo has it (`mvd list`)"
        )
    weights = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), None)
    if weights is None:
        raise BadInput(f"{path}: no {' or '.join(WEIGHT_FILES)} beside config.json")
    num_classes = _lookup(config, "num_classes")
    if num_classes is not None and not isinstance(num_classes, int):
        raise BadInput(f"{where}: num_classes must be an integer, got {num_classes!r}")
    names = _label_names(_lookup(config, "label_names", "labels"), where)
    return weights, Carried(
        class_names=names,
        class_names_from=f"{where}'s label_names" if names else None,
        num_classes=num_classes,
        image_size=_input_size(_lookup(config, "input_size"), where),
        preprocessing=_preprocessing(config, spec, where),
    )
