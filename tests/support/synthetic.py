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
