"""Natural-looking test images, made on the fly so tests and CI need no data files.

Random normals alone are a poor probe: real images are smooth with edges, and a
network's activations on them have the statistics its BatchNorms were calibrated
for. These images have both: smooth colour gradients, a few filled shapes with hard
edges, soft shading and mild sensor noise. Deterministic for a given seed.
"""

from __future__ import annotations

import numpy as np

from .registry import ModelSpec


def natural_images(count: int, size: int | tuple[int, int], seed: int = 0) -> np.ndarray:
    """`count` RGB images as uint8 (N, H, W, 3)."""
    h, w = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy, xx = yy / max(h - 1, 1), xx / max(w - 1, 1)
    out = np.empty((count, h, w, 3), dtype=np.uint8)
    for i in range(count):
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        angle = rng.uniform(0, 2 * np.pi)
        t = np.clip(0.5 + (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)), 0, 1)
        img = (1 - t)[..., None] * c0 + t[..., None] * c1
        for _ in range(rng.integers(3, 8)):
            colour = rng.uniform(0, 255, 3)
            cy, cx = rng.uniform(0, 1, 2)
            if rng.random() < 0.5:
                r = rng.uniform(0.05, 0.3)
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
            else:
                hh, ww = rng.uniform(0.05, 0.4, 2)
                mask = (abs(yy - cy) < hh / 2) & (abs(xx - cx) < ww / 2)
            img[mask] = colour
        light = 0.75 + 0.25 * np.sin(3 * xx + rng.uniform(0, 6)) * np.cos(2 * yy)
        img = img * light[..., None] + rng.normal(0, 4, img.shape)
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def to_model_input(images: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """uint8 (N, H, W, 3) -> normalised float32 NCHW with the spec's mean and std."""
    pre = spec.preprocessing
    x = images.astype(np.float32) / 255.0
    x = (x - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def random_normal_inputs(count: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, *size), dtype=np.float32)
