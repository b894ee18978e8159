"""Brush RLE: every mask decodes, through label_studio_sdk's decoder, to exactly HxWx4 bytes matching it."""

from __future__ import annotations

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle

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
