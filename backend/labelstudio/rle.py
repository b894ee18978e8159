"""Brush masks ↔ Label Studio RLE, through label_studio_sdk's encoder and decoder.

Label Studio's brush RLE encodes an RGBA image of the original size, row-major (HxWx4 bytes);
the mask is its alpha plane.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from label_studio_sdk.converter.brush import decode_rle, mask2rle


def mask_to_rle(mask: npt.NDArray[np.bool_]) -> list[int]:
    """RLE of a bool HxW mask (pixels of the image as displayed). Raises ValueError for other shapes or dtypes."""
    if mask.dtype != np.bool_:
        raise ValueError(f"mask must be a bool array, got dtype {mask.dtype}")
    if mask.ndim != 2 or 0 in mask.shape:
        raise ValueError(f"mask must be a non-empty HxW array, got shape {mask.shape}")
    # mask2rle repeats each value into the 4 RGBA channels; 255 = fully painted.
    return mask2rle(mask.astype(np.uint8) * 255)


def rle_to_mask(rle: Sequence[int], height: int, width: int) -> npt.NDArray[np.bool_]:
    """Bool HxW mask (alpha > 0) of a Label Studio RLE. Raises ValueError when it does not encode HxWx4 bytes."""
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    flat = decode_rle(rle)
    if flat.size != height * width * 4:
        raise ValueError(f"RLE decodes to {flat.size} bytes, not {height}x{width}x4 = {height * width * 4}")
    return flat.reshape(height, width, 4)[:, :, 3] > 0
