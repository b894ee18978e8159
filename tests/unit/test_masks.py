"""Mask cleanup on synthetic masks: holes filled up to a size, islands dropped below a size, smoothing."""

from __future__ import annotations

import numpy as np
import pytest

from backend.pipeline.masks import clean_mask, fill_holes, remove_islands, smooth
from backend.pipeline.types import PostprocessOptions


def square(size: int = 40, top: int = 5, left: int = 5, side: int = 30) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[top : top + side, left : left + side] = True
    return mask


def test_holes_up_to_the_size_are_filled_and_larger_ones_kept() -> None:
    mask = square()
    mask[10:12, 10:12] = False  # 4 px hole
    mask[20:26, 20:26] = False  # 36 px hole
    filled = fill_holes(mask, max_area=10)
    assert filled[10:12, 10:12].all() and not filled[20:26, 20:26].any()
    assert fill_holes(mask, max_area=36).all(where=square())


def test_background_touching_the_border_is_not_a_hole() -> None:
    mask = np.ones((10, 10), dtype=bool)
    mask[0:2, 4:6] = False  # a notch open to the image edge
    np.testing.assert_array_equal(fill_holes(mask, max_area=100), mask)


def test_islands_below_the_size_are_dropped_but_the_largest_part_stays() -> None:
    mask = square()
    mask[0:2, 38:40] = True  # 4 px island
    mask[36:40, 0:4] = True  # 16 px island
    cleaned = remove_islands(mask, min_area=10)
    assert not cleaned[0:2, 38:40].any() and cleaned[36:40, 0:4].all()
    np.testing.assert_array_equal(cleaned[5:35, 5:35], square()[5:35, 5:35])
    tiny = np.zeros((10, 10), dtype=bool)
    tiny[4:6, 4:6] = True
    np.testing.assert_array_equal(remove_islands(tiny, min_area=100), tiny)  # only part: kept


def test_diagonal_neighbours_are_one_part() -> None:
    mask = np.zeros((10, 10), dtype=bool)
    mask[2, 2] = mask[3, 3] = mask[4, 4] = True
    mask[8, 8] = True
    assert remove_islands(mask, min_area=2).sum() == 3


def test_smoothing_removes_a_spur_and_keeps_the_body() -> None:
    mask = square()
    mask[19, 35:39] = True  # one-pixel spur
    smoothed = smooth(mask, sigma=1.5)
    assert not smoothed[19, 36:39].any()
    assert smoothed[10:30, 10:30].all()
    np.testing.assert_array_equal(smooth(mask, 0.0), mask)


@pytest.mark.parametrize("empty", [np.zeros((8, 8), bool), np.ones((8, 8), bool)])
def test_empty_and_full_masks_survive_every_step(empty: np.ndarray) -> None:
    options = PostprocessOptions(fill_holes=10, min_island=10, smoothing=1.0)
    np.testing.assert_array_equal(clean_mask(empty, options), empty)


def test_clean_mask_applies_all_steps_and_leaves_its_input_alone() -> None:
    mask = square()
    mask[10:12, 10:12] = False
    mask[0:2, 38:40] = True
    before = mask.copy()
    cleaned = clean_mask(mask, PostprocessOptions(fill_holes=10, min_island=10, smoothing=0.0))
    np.testing.assert_array_equal(cleaned, square())
    np.testing.assert_array_equal(mask, before)
    off = PostprocessOptions(fill_holes=0, min_island=0, smoothing=0.0)
    np.testing.assert_array_equal(clean_mask(mask, off), mask)
