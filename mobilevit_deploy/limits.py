"""Bounds on the numbers a user gives, checked before anything is built or run.

A size or a count far beyond any real model does not fail where it is given: it reaches
torch's allocator (a 100000x100000 input asks for 120 GB) or a converter minutes later.
Each check here refuses such a value in one line that names the flag and the range it
takes. No torch import: the CLI checks a request before loading anything heavy.
"""

from __future__ import annotations

import math

from .errors import BadInput

# Twice the longest side in the zoo (Cityscapes' 1024x2048 for the segmenters) and
# above any phone camera model's input. A 4096x4096 image is 16.8 M pixels; a stride-2
# stem of 64 channels then holds 1 GiB of fp32 activations, which a laptop still runs.
MAX_IMAGE_SIDE = 4096

# The largest heads these families are trained with are ImageNet-21k's 21,841 classes;
# 100,000 leaves room for bigger fine-tuned label sets while a head of that size on a
# 1024-wide backbone is still 400 MB of fp32 weights, not an allocation failure.
MAX_NUM_CLASSES = 100_000


def _range(low: float, high: float | None) -> str:
    return f"from {low:g} to {high:g}" if high is not None else f"at least {low:g}"


def check_count(name: str, value: int, low: int, high: int | None) -> int:
    """`value` if it is an integer in [low, high] (no upper bound when `high` is None);
    else a BadInput naming `name` (the flag) and the range."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadInput(f"{name} must be a whole number ({_range(low, high)}), got {value!r}")
    if value < low or (high is not None and value > high):
        raise BadInput(f"{name} must be {_range(low, high)}, got {value}")
    return value


def check_real(name: str, value: float, low: float, high: float | None) -> float:
    """`value` if it is a finite number in [low, high]; nan and inf are refused by name
    (a comparison with nan is always false, so it would pass a plain range check)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadInput(f"{name} must be a number ({_range(low, high)}), got {value!r}")
    if not math.isfinite(value):
        raise BadInput(f"{name} must be a finite number ({_range(low, high)}), got {value}")
    if value < low or (high is not None and value > high):
        raise BadInput(f"{name} must be {_range(low, high)}, got {value:g}")
    return value


def check_image_hw(hw: tuple[int, int], flag: str = "--image-size") -> tuple[int, int]:
    """(height, width) if both sides are 1..MAX_IMAGE_SIDE pixels. The network's own
    constraint (a multiple of its stride) is api.check_image_size's."""
    h, w = hw
    if not all(isinstance(s, int) and 1 <= s <= MAX_IMAGE_SIDE for s in (h, w)):
        raise BadInput(
            f"{flag} {h}x{w}: height and width must be from 1 to {MAX_IMAGE_SIDE} pixels"
        )
    return hw


def check_num_classes(n: int, flag: str = "--num-classes") -> int:
    """A head size from 0 (headless: pooled features) to MAX_NUM_CLASSES."""
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_NUM_CLASSES:
        raise BadInput(f"{flag} must be from 0 (headless) to {MAX_NUM_CLASSES}, got {n!r}")
    return n
