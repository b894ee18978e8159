"""Masks → polygons: percent coordinates inside 0..100, one polygon per part, holes filled, tolerance."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from backend.labelstudio.polygons import mask_to_polygons

W, H = 64, 48


def blank() -> np.ndarray:
    return np.zeros((H, W), dtype=bool)


def rasterise(polygon: list[list[float]]) -> np.ndarray:
    """Pixels inside a percent polygon (for comparing it with its mask)."""
    canvas = Image.new("1", (W, H))
    points = [(x / 100 * W - 0.5, y / 100 * H - 0.5) for x, y in polygon]
    ImageDraw.Draw(canvas).polygon(points, fill=1, outline=1)
    return np.array(canvas, dtype=bool)


def test_a_rectangle_gives_its_four_corners_in_percent() -> None:
    mask = blank()
    mask[8:24, 16:48] = True
    (polygon,) = mask_to_polygons(mask, tolerance=1.0)
    corners = sorted(map(tuple, np.round(np.array(polygon) / 100 * [W, H] - 0.5).astype(int).tolist()))
    assert corners == [(16, 8), (16, 23), (47, 8), (47, 23)]


def test_a_multi_part_mask_gives_one_polygon_per_part_largest_first() -> None:
    mask = blank()
    mask[2:10, 2:10] = True
    mask[20:40, 30:60] = True
    mask[44:47, 0:3] = True
    polygons = mask_to_polygons(mask, tolerance=1.0)
    assert len(polygons) == 3
    areas = [rasterise(polygon).sum() for polygon in polygons]
    assert areas == sorted(areas, reverse=True)


def test_points_stay_inside_0_100_for_masks_touching_the_edges() -> None:
    rng = np.random.default_rng(0)
    full = np.ones((H, W), dtype=bool)
    for mask in [full, rng.random((H, W)) > 0.5]:
        for polygon in mask_to_polygons(mask, tolerance=1.5):
            points = np.array(polygon)
            assert len(points) >= 3 and ((points > 0) & (points < 100)).all()


def test_holes_are_filled_in() -> None:
    mask = blank()
    mask[4:44, 4:60] = True
    mask[20:30, 20:40] = False
    (polygon,) = mask_to_polygons(mask, tolerance=0.0)
    assert rasterise(polygon)[25, 30]


def test_a_circle_is_followed_within_the_tolerance_and_coarser_tolerance_means_fewer_points() -> None:
    yy, xx = np.mgrid[:H, :W]
    mask = (xx - 32) ** 2 + (yy - 24) ** 2 <= 18**2
    fine, coarse = mask_to_polygons(mask, 0.5)[0], mask_to_polygons(mask, 3.0)[0]
    assert len(coarse) < len(fine)
    overlap = rasterise(fine) & mask
    assert overlap.sum() / (rasterise(fine) | mask).sum() > 0.9


def test_thin_lines_and_empty_masks_give_no_polygon() -> None:
    line = blank()
    line[10, 5:40] = True
    assert mask_to_polygons(line, 1.0) == []
    assert mask_to_polygons(blank(), 1.0) == []


@pytest.mark.parametrize(("mask", "tolerance"), [(np.zeros((0, 4), bool), 1.0), (np.zeros((4, 4), bool), -1.0)])
def test_bad_input_is_refused(mask: np.ndarray, tolerance: float) -> None:
    with pytest.raises(ValueError):
        mask_to_polygons(mask, tolerance)
