"""Seeded random pixels for tests: the same seed gives the same image on every machine."""

from __future__ import annotations

import numpy as np
from PIL import Image


def random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(height, width, 3) uint8 noise."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A width x height RGB PIL image of random_rgb noise (PIL's width-first order)."""
    return Image.fromarray(random_rgb(height, width, seed))


def boxes_for(height: int, width: int, count: int, seed: int) -> np.ndarray:
    """`count` random xyxy pixel boxes (count, 4) float32 inside a height x width image, at least 1 px each."""
    rng = np.random.default_rng(seed)
    corners = rng.uniform(0, 1, (count, 2, 2)) * [width, height]
    return np.concatenate([corners.min(axis=1), corners.max(axis=1) + 1], axis=1).astype(np.float32)
