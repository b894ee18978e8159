"""PackedMask: a mask kept as its bit-packed bounding-box crop gives back the same mask, window by window, run by
run; RLE, polygons, rectangles and IoU computed from it equal those of the full bool mask."""

from __future__ import annotations

import numpy as np
import pytest
from label_studio_sdk.converter.brush import mask2rle

from backend.labelstudio.polygons import mask_to_polygons
from backend.labelstudio.results import mask_box
from backend.labelstudio.rle import mask_to_rle
from backend.packed_mask import PackedMask, stacked


def cases() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    masks = []
    for shape in [(1, 1), (1, 9), (9, 1), (17, 23), (40, 64)]:
        masks += [np.zeros(shape, bool), np.ones(shape, bool), rng.random(shape) < 0.5]
    edges = np.zeros((6, 10), bool)
    edges[1, 7:] = edges[2, :3] = True  # a run wrapping from the right edge to the next row's first column
    edges[2:5, 9] = edges[5, 0] = True  # a column on the right edge, a pixel in the last row's first column
    last = np.zeros((5, 5), bool)
    last[4, 4] = True
    full_rows = np.zeros((8, 13), bool)
    full_rows[2:5] = True
    blob = np.zeros((30, 50), bool)
    blob[3:20, 11:38] = rng.random((17, 27)) < 0.7
    return [*masks, edges, last, full_rows, blob]


@pytest.mark.parametrize("mask", cases(), ids=lambda m: f"{m.shape[0]}x{m.shape[1]}-{int(m.sum())}")
def test_a_packed_mask_gives_back_the_mask_its_box_and_its_runs(mask: np.ndarray) -> None:
    packed = PackedMask.of(mask)

    np.testing.assert_array_equal(packed.to_array(), mask)
    assert packed.shape == mask.shape and packed.area == int(mask.sum())
    assert packed.nbytes <= (mask.size + 7) // 8 + mask.shape[0]  # at most one padding byte per row
    assert mask_box(packed) == mask_box(mask)
    flat = np.concatenate([[False], mask.ravel(), [False]])
    starts, ends = packed.runs()
    np.testing.assert_array_equal(starts, np.flatnonzero(~flat[:-1] & flat[1:]))
    np.testing.assert_array_equal(ends, np.flatnonzero(flat[:-1] & ~flat[1:]))


@pytest.mark.parametrize("mask", cases(), ids=lambda m: f"{m.shape[0]}x{m.shape[1]}-{int(m.sum())}")
def test_rle_and_polygons_from_the_packed_mask_are_the_full_masks(mask: np.ndarray) -> None:
    packed = PackedMask.of(mask)

    assert mask_to_rle(packed) == mask2rle((mask * 255).astype(np.uint8))
    assert mask_to_polygons(packed, 1.0) == mask_to_polygons(mask, 1.0)
    assert mask_to_polygons(packed, 0.0) == mask_to_polygons(mask, 0.0)


def test_any_window_of_a_packed_mask_is_that_window_of_the_mask() -> None:
    rng = np.random.default_rng(1)
    mask = np.zeros((40, 70), bool)
    mask[5:33, 9:61] = rng.random((28, 52)) < 0.6
    packed = PackedMask.of(mask)
    for _ in range(200):
        top, left = int(rng.integers(0, 40)), int(rng.integers(0, 70))
        bottom, right = int(rng.integers(top, 41)), int(rng.integers(left, 71))
        np.testing.assert_array_equal(packed.window(top, left, bottom, right), mask[top:bottom, left:right])


def test_a_window_placed_in_an_image_is_trimmed_and_clipped_back() -> None:
    window = np.zeros((6, 9), bool)
    window[2:4, 3:8] = True
    packed = PackedMask.from_window(window, 10, 20, (30, 40))
    expected = np.zeros((30, 40), bool)
    expected[10:16, 20:29] = window

    assert (packed.top, packed.left, packed.rows, packed.cols) == (12, 23, 2, 5)
    np.testing.assert_array_equal(packed.to_array(), expected)
    np.testing.assert_array_equal(packed.clipped(13, 26).to_array(), expected[:13, :26])
    assert packed.clipped(12, 40).area == 0 and packed.clipped(12, 40).shape == (12, 40)
    assert packed.clipped(30, 40) == packed and packed != PackedMask.empty((30, 40))
    np.testing.assert_array_equal(stacked([packed, packed], (30, 40)), np.stack([expected, expected]))
    assert stacked([], (30, 40)).shape == (0, 30, 40)
