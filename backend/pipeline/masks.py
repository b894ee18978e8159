"""Mask cleanup before review: fill small holes, drop small islands, smooth outlines. Pure numpy/OpenCV.

Every function takes and returns a bool (H, W) mask and leaves its input untouched. Connectivity: mask
parts are 8-connected, holes 4-connected (the usual pairing, so a diagonal gap never counts as both).
"""

from __future__ import annotations

import cv2
import numpy as np

from backend.pipeline.types import PostprocessOptions


def clean_mask(mask: np.ndarray, options: PostprocessOptions) -> np.ndarray:
    """`fill_holes`, then `remove_islands`, then `smooth`, with the sizes of `options`."""
    return smooth(remove_islands(fill_holes(mask, options.fill_holes), options.min_island), options.smoothing)


def fill_holes(mask: np.ndarray, max_area: int) -> np.ndarray:
    """Fill every hole (background part not touching the image border) of at most `max_area` pixels."""
    if max_area <= 0 or mask.all():
        return mask.copy()
    labels, stats = _components(~mask, connectivity=4)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    small = stats[:, cv2.CC_STAT_AREA] <= max_area
    small[border] = False
    small[0] = False  # label 0 is the mask itself
    return mask | small[labels]


def remove_islands(mask: np.ndarray, min_area: int) -> np.ndarray:
    """Drop every part of the mask smaller than `min_area` pixels except the largest, which always stays.

    A small object therefore keeps its one part; whether it is kept at all is the min_area filter's call.
    """
    if min_area <= 0 or not mask.any():
        return mask.copy()
    labels, stats = _components(mask, connectivity=8)
    areas = stats[:, cv2.CC_STAT_AREA]
    keep = areas >= min_area
    keep[0] = False  # background
    keep[1 + int(np.argmax(areas[1:]))] = True
    return keep[labels]


def smooth(mask: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-blur the mask with `sigma` pixels and keep what is at least half covered (0: unchanged)."""
    if sigma <= 0:
        return mask.copy()
    blurred = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REPLICATE)
    return blurred >= 0.5


def _components(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, np.ndarray]:
    """Connected parts of a bool mask: int32 label image (0: outside the mask) and cv2 stats per label."""
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=connectivity)
    return labels, stats
