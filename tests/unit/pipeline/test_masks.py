"""Mask cleanup on synthetic masks: holes filled up to a size, islands dropped below a size, smoothing."""

from __future__ import annotations

import cv2
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


def _whole_image(mask: np.ndarray, options: PostprocessOptions) -> np.ndarray:
    """The three steps on the whole image: what `clean_mask`'s window must reproduce."""
    filled = fill_holes(mask, options.fill_holes)
    return smooth(remove_islands(filled, options.min_island), options.smoothing)


def _blobs_at(shape: tuple[int, int], box: tuple[int, int, int, int], fill: float, seed: int) -> np.ndarray:
    """Random smooth blobs (with holes and islands) covering about `fill` of `box` (top, left, height, width)."""
    top, left, height, width = box
    noise = cv2.GaussianBlur(np.random.default_rng(seed).random((height, width)).astype(np.float32), (0, 0), 2.0)
    mask = np.zeros(shape, bool)
    mask[top : top + height, left : left + width] = noise < np.quantile(noise, fill)
    return mask


def _window_cases() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    shape = (121, 163)
    placed = []
    for seed in range(24):
        height, width = int(rng.integers(1, 60)), int(rng.integers(1, 80))
        top, left = int(rng.integers(0, shape[0] - height + 1)), int(rng.integers(0, shape[1] - width + 1))
        if seed % 2:  # every other box touches an image edge: top, left, bottom, right in turn
            top, left = [(0, left), (top, 0), (shape[0] - height, left), (top, shape[1] - width)][seed // 2 % 4]
        placed.append(_blobs_at(shape, (top, left, height, width), float(rng.uniform(0.3, 0.9)), seed))
    ring = square(size=60, top=9, left=11, side=31)
    ring[12:37, 14:39] = False  # a 625 px hole
    ring[9, 20] = False  # a notch in the top row: background on the window's edge, not a hole
    corners = np.zeros((40, 40), bool)
    corners[[0, 0, 39, 39], [0, 39, 0, 39]] = True
    # Equal 4 px islands, all below min_island, so one is kept by OpenCV's label order: the first two are
    # labelled in the opposite order when the window starts on the mask's first row (21, odd).
    ties = np.zeros((64, 64), bool)
    for top, left in [(21, 50), (22, 10), (33, 9), (35, 30)]:
        ties[top : top + 2, left : left + 2] = True
    full_but_one = np.ones((30, 30), bool)
    full_but_one[15, 15] = False
    return [*placed, ring, corners, ties, full_but_one, np.zeros((30, 30), bool), np.ones((30, 30), bool)]


@pytest.mark.parametrize("mask", _window_cases(), ids=lambda m: f"{m.shape[0]}x{m.shape[1]}-{int(m.sum())}")
@pytest.mark.parametrize(
    "options",
    [
        PostprocessOptions(fill_holes=100, min_island=100, smoothing=0.0),
        PostprocessOptions(fill_holes=30, min_island=5, smoothing=0.7),
        PostprocessOptions(fill_holes=1000, min_island=40, smoothing=1.5),
        PostprocessOptions(fill_holes=0, min_island=0, smoothing=3.3),
    ],
    ids=lambda o: f"holes{o.fill_holes}-islands{o.min_island}-sigma{o.smoothing}",
)
def test_clean_mask_on_the_window_equals_the_whole_image(mask: np.ndarray, options: PostprocessOptions) -> None:
    np.testing.assert_array_equal(clean_mask(mask, options), _whole_image(mask, options))


def test_clean_mask_takes_a_non_contiguous_view() -> None:
    mask = _blobs_at((90, 70), (5, 20, 40, 45), 0.6, seed=9)
    options = PostprocessOptions(fill_holes=50, min_island=20, smoothing=1.0)
    np.testing.assert_array_equal(clean_mask(mask.T, options), _whole_image(mask.T, options))
