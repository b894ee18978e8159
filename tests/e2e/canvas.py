"""Did Label Studio paint a predicted mask? Compare its image area with only that region shown, and with none.

The difference of the two screenshots is exactly what the region adds: where the mask is, it must pull
pixels towards the label's colour; where it is not, it must be (nearly) nothing.

Judged in blocks of BLOCK_PX screen pixels, not pixel by pixel: Label Studio scales the mask bitmap with
smoothing, so one-pixel holes (the tiny random SAM's masks are full of them) come out painted, and edges
blend. A block counts as "mask" when the mask covers most of it and as "outside" when it covers none of it.
"""

from __future__ import annotations

import warnings

import numpy as np

BLOCK_PX = 8
MIN_CONTRAST = 60.0  # the label colour must differ this much (RGB distance) from the image pixel to judge it
TINT_MIN = 0.15  # painted: the pixel moved at least this share of the way to the label colour
OUTSIDE_NOISE = 6.0  # largest mean per-channel change of an "outside" block
MIN_BLOCKS = 10  # fewer judged blocks than this say nothing either way
# Share of judged blocks that must agree: the image area also holds the zoom toolbar, drawn over the canvas.
AGREEMENT = 0.9
ZOOMS = np.round(np.arange(0.95, 1.15, 0.0025), 4)  # the zooms display_zoom tells apart


def image_area(stage: np.ndarray, image_width: int, image_height: int) -> np.ndarray:
    """The part of a stage screenshot that shows the image.

    Label Studio fits the image to the stage's width or height, whichever is reached first, and aligns it
    top-left: a portrait image leaves the right side of the stage empty.
    """
    height, width = stage.shape[:2]
    scale = min(width / image_width, height / image_height)
    return stage[: round(image_height * scale), : round(image_width * scale)]


def on_screen(picture: np.ndarray, width: int, height: int, zoom: float = 1.0) -> np.ndarray:
    """`picture` (image-sized: a bool mask, or HxWx3 pixels) as the width x height screen area of the image shows
    it: scaled to the area, then by `zoom` about the area's centre (nearest pixel; outside the picture: 0)."""
    picture_h, picture_w = picture.shape[:2]
    columns = np.floor(((np.arange(width) + 0.5 - width / 2) / zoom + width / 2) * picture_w / width).astype(int)
    rows = np.floor(((np.arange(height) + 0.5 - height / 2) / zoom + height / 2) * picture_h / height).astype(int)
    inside = (rows[:, None] >= 0) & (rows[:, None] < picture_h) & (columns >= 0) & (columns < picture_w)
    shown = picture[np.clip(rows, 0, picture_h - 1)][:, np.clip(columns, 0, picture_w - 1)]
    return np.where(inside if picture.ndim == 2 else inside[..., None], shown, 0)


def display_zoom(hidden: np.ndarray, picture: np.ndarray) -> float:
    """The zoom about its centre at which the image area `hidden` (RGB, no region shown) shows `picture` (the image
    file's RGB pixels, EXIF orientation applied). Label Studio shows some images slightly zoomed in (a 480x320 one
    by about 5 %, its edges cut off), and paints the masks with the same zoom."""
    height, width = hidden.shape[:2]
    picture, hidden = picture.astype(np.float64), hidden.astype(np.float64)
    errors = {zoom: np.abs(on_screen(picture, width, height, zoom) - hidden).mean() for zoom in ZOOMS}
    return float(min(errors, key=errors.__getitem__))


def blocks(values: np.ndarray) -> np.ndarray:
    """Mean of each BLOCK_PX x BLOCK_PX block (NaNs ignored; all-NaN blocks stay NaN)."""
    height, width = (values.shape[0] // BLOCK_PX) * BLOCK_PX, (values.shape[1] // BLOCK_PX) * BLOCK_PX
    tiles = values[:height, :width].reshape(height // BLOCK_PX, BLOCK_PX, width // BLOCK_PX, BLOCK_PX)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "Mean of empty slice" for all-NaN blocks
        return np.nanmean(tiles, axis=(1, 3))


def assert_region_painted(
    shown: np.ndarray, hidden: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], zoom: float = 1.0
) -> int:
    """Assert `mask` (bool, image-sized) is painted in `colour` where it is, and nothing is painted elsewhere.

    shown/hidden: RGB screenshots (HxWx3) of the image area (see image_area) with only this region shown / with none;
    zoom: the image's zoom in that area (display_zoom).
    Returns the number of mask blocks judged (0 when the mask is too small on screen to judge its colour).
    """
    height, width = shown.shape[:2]
    mask_h, mask_w = mask.shape
    assert abs(width / height - mask_w / mask_h) < 0.02, f"a {width}x{height} area shows no {mask_w}x{mask_h} image"
    delta = shown.astype(np.float64) - hidden.astype(np.float64)
    coverage = blocks(on_screen(mask, width, height, zoom).astype(np.float64))

    outside = coverage == 0
    if outside.sum() >= MIN_BLOCKS:
        changed = (blocks(np.abs(delta).mean(axis=2)) > OUTSIDE_NOISE)[outside].mean()
        assert changed < 1 - AGREEMENT, f"{changed:.1%} of the blocks outside the mask changed when it was shown"

    towards = np.asarray(colour, np.float64) - hidden.astype(np.float64)  # from the image to the label colour
    contrast = np.linalg.norm(towards, axis=2)
    share = np.where(contrast > MIN_CONTRAST, (delta * towards).sum(axis=2) / np.maximum(contrast, 1.0) ** 2, np.nan)
    tint = blocks(share)
    judged = (coverage >= 0.5) & ~np.isnan(tint)
    if judged.sum() < MIN_BLOCKS:
        return 0
    painted = (tint[judged] > TINT_MIN).mean()
    assert painted > AGREEMENT, f"only {painted:.1%} of {judged.sum()} mask blocks are painted towards {colour}"
    return int(judged.sum())
