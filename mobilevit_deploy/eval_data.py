"""Labelled images for `mvd eval`: the user's own set, read and checked before any export.

Classification takes one of two layouts:
  DIR/<class>/<image>   torchvision's ImageFolder: the sorted folder names are the label
                        indices. A model that carries class names (`--labels`, the
                        checkpoint's or its hub config's) matches folders to them by name
                        instead, so the folders may be a subset of its classes; a folder
                        that is not one of them is an error. Without names the folder
                        count must equal the head's: a sorted-order mapping onto a head of
                        another size would be a guess, and its accuracy meaningless.
  FILE.csv              rows of `path,label`: paths relative to the CSV's folder, labels
                        a class index or (for a model with names) a class name; a first
                        row that is neither a file nor a label is a header.
Segmentation takes DIR/images and DIR/masks (or DIR/annotations, mmseg's name): one
single-channel PNG of class indices per image, with the image's relative path and stem,
255 marking pixels to ignore (the mmseg / Cityscapes convention), and the image's size.

Classification images get the model's own transform (user_images.preprocess: resize,
centre crop). Segmentation images are resized whole to the model's input, no crop, as
EfficientViT's official evaluation does, so every mask pixel is scored; the masks keep
their size and the logits are resized to them (evaluate.py). Everything is decoded once
into uint8 at the model's size (an image at 256x256 is 192 KiB). A file that does not
decode is skipped with a warning naming it; every other fault is a BadInput naming the
file, raised before the first export.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import BadInput
from .registry import ModelSpec
from .user_images import SUFFIXES, _pil, preprocess

IGNORE_INDEX = 255
MASK_FOLDERS = ("masks", "annotations")
MASK_MODES = ("L", "P", "I", "I;16")  # single-channel PIL modes whose values are indices


@dataclass
class LabelledSet:
    """The decoded set: model-sized uint8 images and, per task, their labels."""

    images: np.ndarray  # uint8 (N, H, W, 3)
    names: list[str]  # each image's path relative to the data root, for messages
    layout: str  # "imagefolder", "csv" or "masks"
    labels: np.ndarray | None = None  # int64 (N,): classification
    masks: list[np.ndarray] = field(default_factory=list)  # (h, w) class indices: segmentation
    skipped: list[str] = field(default_factory=list)  # files that did not decode

    def __len__(self) -> int:
        return len(self.images)


def check_data_path(data: Path) -> None:
    """The quick check, before the model is even loaded."""
    if not data.exists():
        raise BadInput(f"--data {data}: no such file or directory")
    if data.is_file() and data.suffix.lower() != ".csv":
        raise BadInput(f"--data {data}: give a folder (one sub-folder per class) or a .csv")


def read_labelled_set(
    data: Path, spec: ModelSpec, warn: Callable[[str], None] = lambda _msg: None
) -> LabelledSet:
    """Read and check the whole set for the model `spec` describes."""
    check_data_path(data)
    if spec.output_kind == "segmentation":
        return _segmentation_set(data, spec, warn)
    if spec.output_kind != "classification":
        raise BadInput(f"eval scores a head's predictions; this {spec.name} has no head")
    if data.is_file():
        samples, layout, root = _csv_samples(data, spec), "csv", data.parent
    else:
        samples, layout, root = _folder_samples(data, spec), "imagefolder", data
    images, names, labels, skipped = [], [], [], []
    for path, label in samples:
        picture = _decode(path, root, skipped, warn, lambda im: preprocess(im, spec, spec.input_hw))
        if picture is not None:
            images.append(picture)
            names.append(_relative(path, root))
            labels.append(label)
    _check_any_left(images, data, skipped)
    return LabelledSet(np.stack(images), names, layout, np.asarray(labels, np.int64), [], skipped)


def _relative(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def _image_files(folder: Path) -> list[Path]:
    """Image files below `folder` at any depth, sorted (torchvision walks class folders)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)


def _decode(path: Path, root: Path, skipped: list[str], warn, convert) -> np.ndarray | None:
    """`convert(image)` of the file, or None after a warning naming it."""
    pil = _pil()
    try:
        with pil.open(path) as image:
            image.load()
            return convert(image)
    except (OSError, ValueError, pil.DecompressionBombError) as exc:
        name = _relative(path, root)
        skipped.append(name)
        warn(f"skipped {name}: not a readable image ({exc.__class__.__name__})")
        return None


def _check_any_left(images: list, data: Path, skipped: list[str]) -> None:
    if not images:
        raise BadInput(f"--data {data}: no readable images ({len(skipped)} files would not decode)")


def _class_index(spec: ModelSpec) -> dict[str, int] | None:
    return {n: i for i, n in enumerate(spec.class_names)} if spec.class_names else None


def _shown(names: Sequence[str], most: int = 6) -> str:
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


def _folder_samples(root: Path, spec: ModelSpec) -> list[tuple[Path, int]]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = {folder: _image_files(folder) for folder in folders}
    if not any(files.values()):
        raise BadInput(
            f"--data {root}: no images in class folders (the layout is DIR/<class>/<image>, "
            f"{len(folders)} sub-folders found)"
        )
    by_name = _class_index(spec)
    if by_name is not None:
        strangers = [f.name for f in folders if f.name not in by_name]
        if strangers:
            raise BadInput(
                f"--data {root}: folder {strangers[0]!r} is not one of the model's "
                f"{spec.num_classes} classes ({_shown(spec.class_names)})"
            )
        index = {f: by_name[f.name] for f in folders}
    elif len(folders) != spec.num_classes:
        raise BadInput(
            f"--data {root} has {len(folders)} class folders, but the model's head has "
            f"{spec.num_classes} classes; without class names (--labels) folders map to "
            "classes by sorted order, so there must be one per class"
        )
    else:
        index = {f: i for i, f in enumerate(folders)}
    return [(path, index[folder]) for folder in folders for path in files[folder]]


def _csv_samples(path: Path, spec: ModelSpec) -> list[tuple[Path, int]]:
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = [(n, row) for n, row in enumerate(csv.reader(handle), 1) if any(row)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise BadInput(f"--data {path}: not a readable CSV ({exc})") from None
    by_name = _class_index(spec)
    samples = []
    seen: dict[Path, tuple[int, str]] = {}  # image -> (line, label) where it was listed
    for n, row in rows:
        # Trailing empty cells (a spreadsheet's export) say nothing; a third value would
        # be a column this reader ignores (a weight, a split, a second label).
        cells = row[: max((i for i, cell in enumerate(row) if cell.strip()), default=-1) + 1]
        if len(cells) != 2:
            raise BadInput(
                f"{path} line {n}: expected 2 columns (path,label), got {len(cells)}: "
                f"{','.join(row)!r}"
            )
        file, label = path.parent / row[0].strip(), row[1].strip()
        index = _csv_label(label, spec, by_name)
        if n == rows[0][0] and index is None and not file.is_file():
            continue  # a header row
        if not file.is_file():
            raise BadInput(f"{path} line {n}: no such image {file}")
        if index is None:
            raise BadInput(_bad_label(path, n, label, spec, by_name))
        first = seen.setdefault(file.resolve(), (n, label))
        if _csv_label(first[1], spec, by_name) != index:
            raise BadInput(
                f"{path} line {n}: {row[0].strip()} is labelled {label!r}, but line "
                f"{first[0]} labels it {first[1]!r}; an image has one class"
            )
        samples.append((file, index))
    if not samples:
        raise BadInput(f"--data {path}: no images listed")
    return samples


def _csv_label(label: str, spec: ModelSpec, by_name: dict[str, int] | None) -> int | None:
    if label.lstrip("-").isdigit():
        index = int(label)
        return index if 0 <= index < spec.num_classes else None
    return by_name.get(label) if by_name else None


def _bad_label(path: Path, n: int, label: str, spec: ModelSpec, by_name) -> str:
    where = f"{path} line {n}: label {label!r}"
    if label.lstrip("-").isdigit():
        top = spec.num_classes - 1
        return f"{where} is out of range: the model has {spec.num_classes} classes (0-{top})"
    if by_name is None:
        return f"{where} is not a class index, and the model has no class names (give --labels)"
    return f"{where} is not one of the model's classes ({_shown(spec.class_names)})"


def _segmentation_set(root: Path, spec: ModelSpec, warn) -> LabelledSet:
    masks_dir = next((root / m for m in MASK_FOLDERS if (root / m).is_dir()), None)
    images_dir = root / "images"
    if not images_dir.is_dir() or masks_dir is None:
        raise BadInput(
            f"--data {root}: a segmenter is scored on DIR/images and DIR/masks "
            "(or DIR/annotations), one mask PNG per image with the same stem"
        )
    files = _image_files(images_dir)
    if not files:
        raise BadInput(f"--data {root}: no images in {images_dir}")
    masks = {
        image: masks_dir / image.relative_to(images_dir).with_suffix(".png") for image in files
    }
    missing = next((image for image, mask in masks.items() if not mask.is_file()), None)
    if missing is not None:
        raise BadInput(
            f"--data {root}: no mask for {_relative(missing, root)} "
            f"({_relative(masks[missing], root)} is missing)"
        )
    pil = _pil()
    resample = {"bilinear": pil.Resampling.BILINEAR}.get(
        spec.preprocessing.interpolation, pil.Resampling.BICUBIC
    )
    h, w = spec.input_hw

    def whole(image) -> tuple[np.ndarray, tuple[int, int]]:
        """The image resized whole to the model's input (no crop), and its own size."""
        return np.asarray(image.convert("RGB").resize((w, h), resample), np.uint8), image.size

    images, names, kept_masks, skipped = [], [], [], []
    for image, mask in masks.items():
        decoded = _decode(image, root, skipped, warn, whole)
        if decoded is not None:
            kept_masks.append(_read_mask(mask, decoded[1], spec))
            images.append(decoded[0])
            names.append(_relative(image, root))
    _check_any_left(images, root, skipped)
    return LabelledSet(np.stack(images), names, "masks", None, kept_masks, skipped)


def _read_mask(path: Path, image_size: tuple[int, int], spec: ModelSpec) -> np.ndarray:
    """The mask's class indices, checked: single-channel, the image's size, in range."""
    pil = _pil()
    try:
        with pil.open(path) as mask:
            mask.load()
            mode, size, values = mask.mode, mask.size, np.asarray(mask)
    except (OSError, ValueError) as exc:
        raise BadInput(f"mask {path}: not a readable image ({exc.__class__.__name__})") from None
    if mode not in MASK_MODES:
        raise BadInput(f"mask {path} is {mode}, not single-channel class indices (L or P PNG)")
    if size != image_size:
        raise BadInput(
            f"mask {path} is {size[0]}x{size[1]} (WxH), but its image is "
            f"{image_size[0]}x{image_size[1]}: a mask must have its image's size"
        )
    labelled = values[values != IGNORE_INDEX]
    if labelled.size and int(labelled.max()) >= spec.num_classes:
        raise BadInput(
            f"mask {path} has class {int(labelled.max())}, but the model has "
            f"{spec.num_classes} classes ({IGNORE_INDEX} = ignore)"
        )
    # uint8 holds every class and the ignore index of up to 255 classes: a Cityscapes
    # mask is 2 MiB so, 16 MiB as int64.
    return values.astype(np.uint8 if spec.num_classes <= IGNORE_INDEX else np.int16)
