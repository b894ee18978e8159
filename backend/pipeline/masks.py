"""Mask cleanup before review: fill small holes, drop small islands, smooth outlines. Pure numpy/OpenCV.

Every function takes and returns a bool (H, W) mask and leaves its input untouched. Connectivity: mask
parts are 8-connected, holes 4-connected (the usual pairing, so a diagonal gap never counts as both).

`clean_mask` runs the steps on a window around the mask's pixels (`_window`): the result is the whole
image's, pixel for pixel (tests/unit/pipeline/test_masks.py compares them), at a fraction of the cost for an object
covering a small part of the image, since connected components and blurs cost per pixel of their input.
It takes the pipeline's PackedMask (and gives one back): only that window is ever unpacked.
"""

from __future__ import annotations

import math
from typing import overload

import cv2
import numpy as np
import numpy.typing as npt

from backend.packed_mask import Mask, PackedMask, packed
from backend.pipeline.types import PostprocessOptions


@overload
def clean_mask(mask: PackedMask, options: PostprocessOptions) -> PackedMask: ...
@overload
def clean_mask(mask: npt.NDArray[np.bool_], options: PostprocessOptions) -> npt.NDArray[np.bool_]: ...
def clean_mask(mask: Mask, options: PostprocessOptions) -> Mask:
    """`fill_holes`, then `remove_islands`, then `smooth`, with the sizes of `options`, of a PackedMask
    (returns a PackedMask) or a bool (H, W) mask (returns a bool (H, W) mask)."""
    cleaned = clean_packed(packed(mask), options)
    return cleaned if isinstance(mask, PackedMask) else cleaned.to_array()


def clean_packed(mask: PackedMask, options: PostprocessOptions) -> PackedMask:
    """`clean_mask` of a PackedMask: the steps run on the unpacked window only."""
    window = _window(mask, _blur_reach(options.smoothing))
    if window is None:  # an empty mask stays empty through every step
        return mask
    top, left, bottom, right = window
    part = fill_holes(mask.window(top, left, bottom, right), options.fill_holes)
    part = smooth(remove_islands(part, options.min_island), options.smoothing)
    return PackedMask.from_window(part, top, left, mask.shape)


def fill_holes(mask: npt.NDArray[np.bool_], max_area: int) -> npt.NDArray[np.bool_]:
    """Fill every hole (background part not touching the image border) of at most `max_area` pixels."""
    if max_area <= 0 or mask.all():
        return mask.copy()
    labels, stats = _components(~mask, connectivity=4)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    small = stats[:, cv2.CC_STAT_AREA] <= max_area
    small[border] = False
    small[0] = False  # label 0 is the mask itself
    return mask | small[labels]


def remove_islands(mask: npt.NDArray[np.bool_], min_area: int) -> npt.NDArray[np.bool_]:
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


def smooth(mask: npt.NDArray[np.bool_], sigma: float) -> npt.NDArray[np.bool_]:
    """Gaussian-blur the mask with `sigma` pixels and keep what is at least half covered (0: unchanged)."""
    if sigma <= 0:
        return mask.copy()
    blurred = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REPLICATE)
    return blurred >= 0.5


def _window(mask: PackedMask, margin: int) -> tuple[int, int, int, int] | None:
    """Rows and columns (top, left, bottom, right; bottom and right exclusive) of the image on which the
    cleanup steps give the whole image's result for `mask`: its pixels' bounding box, `margin` pixels wider
    on each side, clipped to the image; None when it is empty.

    Why that is enough: background outside the bounding box reaches the image border, so a background part
    touching the window's edge is not a hole in the whole image either, and one that does not lies wholly
    inside; mask parts all lie inside; a blur reaching `margin` pixels sees only background beyond the window.
    The top-left corner is moved to even coordinates because OpenCV labels components by scanning 2x2
    blocks: on the same block grid, parts get their labels in the same order (the tie-break of
    `remove_islands` between equal largest parts).
    """
    if mask.box is None:
        return None
    x0, y0, x1, y1 = mask.box
    top, left = max(y0 - margin, 0) // 2 * 2, max(x0 - margin, 0) // 2 * 2
    return top, left, min(y1 + margin, mask.height), min(x1 + margin, mask.width)


def _blur_reach(sigma: float) -> int:
    """Pixels beyond which `smooth`'s blur sees nothing (0 when off): OpenCV's float Gaussian kernel for
    sigma is round(8 sigma + 1) | 1 wide, so it reaches at most ceil(4 sigma) + 1 pixels either side."""
    return math.ceil(4 * sigma) + 1 if sigma > 0 else 0


def _components(mask: npt.NDArray[np.bool_], connectivity: int) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32]]:
    """Connected parts of a bool mask: int32 label image (0: outside the mask) and cv2 stats per label."""
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=connectivity)
    return np.asarray(labels, np.int32), np.asarray(stats, np.int32)
