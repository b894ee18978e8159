"""Masks → Label Studio polygons (OpenCV contours, simplified with Douglas-Peucker)."""

from __future__ import annotations

import cv2
import numpy as np

from backend.packed_mask import Mask, packed

Polygon = list[list[float]]  # [[x, y], ...] in percent of the image (0..100), at least 3 points


def mask_to_polygons(mask: Mask, tolerance: float) -> list[Polygon]:
    """One polygon per separate part (8-connected) of a bool HxW mask or a PackedMask, largest part first.

    Each polygon is the part's outer outline, simplified so that no outline pixel lies more than
    `tolerance` pixels from it (cv2.approxPolyDP epsilon; 0 keeps every corner). Points are the centres
    of outline pixels, ((x + 0.5) / W * 100, (y + 0.5) / H * 100), so they lie strictly inside 0..100.
    Holes are not represented (a Label Studio polygon has none): the outline is filled in; the brush
    region keeps them. Parts whose simplified outline has fewer than 3 points (lines one or two pixels
    thin) give no polygon. Contours are traced on the mask's crop (with a 1-pixel empty border), offset
    into the image: the same contours, in the same order, as on the whole image.
    """
    if len(mask.shape) != 2 or 0 in mask.shape:
        raise ValueError(f"mask must be a non-empty HxW array, got shape {mask.shape}")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}")
    mask = packed(mask)
    if mask.area == 0:
        return []
    height, width = mask.shape
    crop = np.pad(mask.crop(), 1).view(np.uint8)
    offset = (mask.left - 1, mask.top - 1)
    contours, _ = cv2.findContours(crop, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE, offset=offset)
    scale = np.array([100.0 / width, 100.0 / height])
    polygons = []
    for contour in sorted(contours, key=cv2.contourArea, reverse=True):
        points = cv2.approxPolyDP(contour, tolerance, closed=True).reshape(-1, 2)
        if len(points) >= 3:
            polygons.append(((points + 0.5) * scale).tolist())
    return polygons
