"""User-given images (`--images DIR`), preprocessed exactly as the model expects.

The model's own evaluation transform (timm's): resize so the crop covers `crop_pct` of
the shorter side with the spec's interpolation, centre-crop to the input size. Odd
sizes, grayscale, palette and RGBA files are converted to RGB; a file that is not a
readable image is skipped with a warning that names it, never a crash.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .errors import BadInput
from .registry import ModelSpec

SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise BadInput("--images needs Pillow: pip install pillow") from None
    return Image


def preprocess(image, spec: ModelSpec, size: tuple[int, int]) -> np.ndarray:
    """A PIL image -> uint8 (H, W, 3), resized and centre-cropped like timm's eval."""
    pil = _pil()
    filters = {"bicubic": pil.Resampling.BICUBIC, "bilinear": pil.Resampling.BILINEAR}
    resample = filters.get(spec.preprocessing.interpolation, pil.Resampling.BICUBIC)
    rgb = image.convert("RGBA").convert("RGB") if image.mode in ("P", "LA") else image
    rgb = rgb.convert("RGB")
    h, w = size
    crop = spec.preprocessing.crop_pct
    if h == w:  # shorter side to size / crop_pct, aspect kept (timm's Resize(int))
        short = math.floor(h / crop)
        scale = short / min(rgb.size)
        new = (max(w, round(rgb.size[0] * scale)), max(h, round(rgb.size[1] * scale)))
    else:
        new = (max(w, math.floor(w / crop)), max(h, math.floor(h / crop)))
    rgb = rgb.resize(new, resample)
    left, top = (new[0] - w) // 2, (new[1] - h) // 2
    return np.asarray(rgb.crop((left, top, left + w, top + h)), dtype=np.uint8)


def load_images(
    directory: Path,
    spec: ModelSpec,
    size: tuple[int, int],
    limit: int | None = None,
    warn: Callable[[str], None] = lambda _msg: None,
    flag: str = "--images",
) -> np.ndarray:
    """uint8 (N, H, W, 3) from the image files in `directory` (sorted, first `limit`);
    errors name the option it came from (`flag`)."""
    pil = _pil()
    if not directory.is_dir():
        raise BadInput(f"{flag} {directory}: not a directory")
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in SUFFIXES)
    images = []
    for path in files:
        if limit is not None and len(images) >= limit:
            break
        try:
            with pil.open(path) as image:
                image.load()
                images.append(preprocess(image, spec, size))
        except (OSError, ValueError, pil.DecompressionBombError) as exc:
            warn(f"skipped {path.name}: not a readable image ({exc.__class__.__name__})")
    if not images:
        raise BadInput(f"{flag} {directory}: no readable image files ({len(files)} tried)")
    return np.stack(images)
