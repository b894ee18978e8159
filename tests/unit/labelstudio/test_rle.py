"""Brush RLE: every mask decodes, through label_studio_sdk's decoder, to exactly HxWx4 bytes matching it, and
our encoder gives exactly the ints of label_studio_sdk's mask2rle."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle, mask2rle

from backend.labelstudio.rle import mask_to_rle, rle_to_mask

RNG = np.random.default_rng(0)


def _masks() -> list[np.ndarray]:
    masks = [RNG.random((h, w)) < p for h, w, p in [(1, 1, 0.5), (3, 5, 0.5), (37, 53, 0.3), (480, 641, 0.02)]]
    blob = np.zeros((101, 77), dtype=bool)
    blob[10:60, 5:70] = True
    checker = (np.indices((9, 13)).sum(axis=0) % 2).astype(bool)
    return [*masks, np.zeros((7, 11), bool), np.ones((7, 11), bool), blob, checker, np.ones((1, 1), bool)]


@pytest.mark.parametrize("mask", _masks(), ids=lambda m: f"{m.shape[0]}x{m.shape[1]}-{int(m.sum())}")
def test_rle_decodes_with_the_sdk_to_the_mask(mask: np.ndarray) -> None:
    height, width = mask.shape
    rle = mask_to_rle(mask)
    assert all(isinstance(v, int) and 0 <= v <= 255 for v in rle)
    flat = decode_rle(rle)
    assert flat.size == height * width * 4
    rgba = flat.reshape(height, width, 4)
    np.testing.assert_array_equal(rgba[:, :, 3], mask.astype(np.uint8) * 255)
    np.testing.assert_array_equal(rle_to_mask(rle, height, width), mask)


def _blobs(height: int, width: int, fill: float, sigma: float, seed: int) -> np.ndarray:
    """Random smooth blobs covering about `fill` of an HxW mask (holes and islands included)."""
    noise = np.random.default_rng(seed).random((height, width)).astype(np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), sigma)
    return smooth < np.quantile(smooth, fill)


def _row_with_run(pixels: int) -> np.ndarray:
    """A 1xN mask with one painted run of `pixels` between unpainted pixels (a run of 4*pixels bytes)."""
    mask = np.zeros((1, pixels + 3), bool)
    mask[0, 1 : 1 + pixels] = True
    return mask


def _sdk_cases() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    blobs = [
        _blobs(int(h), int(w), fill, sigma, seed)
        for seed, (h, w, fill, sigma) in enumerate(
            zip(
                rng.integers(1, 160, 24),
                rng.integers(1, 200, 24),
                rng.uniform(0, 1, 24),
                rng.uniform(0.5, 6, 24),
                strict=True,
            )
        )
    ]
    noise = [
        rng.random((int(h), int(w))) < p for h, w, p in zip(*rng.integers(1, 90, (2, 12)), rng.random(12), strict=True)
    ]
    # Byte runs around the length fields' limits (8, 16, 256, 2**16 bytes) and past 2**16 (cut into blocks).
    runs = [_row_with_run(pixels) for pixels in (1, 2, 3, 4, 5, 63, 64, 65, 16383, 16384, 16385, 16386, 32768, 32769)]
    checker = (np.indices((33, 47)).sum(axis=0) % 2).astype(bool)
    shapes = [(1, 1), (1, 17), (17, 1), (1, 70_001), (70_001, 1), (255, 257), (1080, 1920)]
    flat = [np.zeros(shape, bool) for shape in shapes] + [np.ones(shape, bool) for shape in shapes]
    return [*blobs, *noise, *runs, checker, ~checker, np.tile([True, False], (5, 9)), *flat]


@pytest.mark.parametrize("mask", _sdk_cases(), ids=lambda m: f"{m.shape[0]}x{m.shape[1]}-{int(m.sum())}")
def test_encoder_gives_the_sdk_mask2rle_ints(mask: np.ndarray) -> None:
    rle = mask_to_rle(mask)
    assert rle == mask2rle(mask.astype(np.uint8) * 255)
    assert all(type(value) is int for value in rle)
    np.testing.assert_array_equal(rle_to_mask(rle, *mask.shape), mask)


def test_mask_to_rle_refuses_more_bytes_than_the_count_field_holds() -> None:
    huge = np.broadcast_to(np.zeros(1, bool), (32768, 32768))  # 2**32 RGBA bytes, no memory behind it
    with pytest.raises(ValueError, match="too large"):
        mask_to_rle(huge)


def test_non_contiguous_mask_encodes_its_logical_layout() -> None:
    mask = RNG.random((20, 30)) < 0.5
    np.testing.assert_array_equal(rle_to_mask(mask_to_rle(mask.T), 30, 20), mask.T)


@pytest.mark.parametrize(
    "bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 1), bool), np.zeros((0, 4), bool), np.zeros(4, bool)]
)
def test_mask_to_rle_refuses_non_bool_or_non_2d(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="mask must be"):
        mask_to_rle(bad)


def test_rle_to_mask_refuses_the_wrong_size() -> None:
    rle = mask_to_rle(np.ones((4, 6), bool))
    with pytest.raises(ValueError, match="not 6x5x4"):
        rle_to_mask(rle, 6, 5)
