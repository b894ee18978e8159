"""write_plot: a real PNG with one precision/recall chart per label, laid out in a grid of known size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.learning.plot import DPI, PANEL_SIZE, layout, write_plot
from backend.learning.reviews import ReviewedObject
from backend.learning.thresholds import label_reports

PANEL_W, PANEL_H = int(PANEL_SIZE[0] * DPI), int(PANEL_SIZE[1] * DPI)


def _reviews(label: str, kept: list[float], deleted: list[float], missed: int) -> list[ReviewedObject]:
    return [
        *(ReviewedObject(label, "kept", s) for s in kept),
        *(ReviewedObject(label, "deleted", s) for s in deleted),
        *(ReviewedObject(label, "missed", None) for _ in range(missed)),
    ]


REVIEWS = [
    *_reviews("cat", [0.9, 0.8, 0.5, 0.3], [0.7, 0.4, 0.2], 2),
    *_reviews("dog", [0.6], [0.9, 0.3], 0),
    *_reviews("bird", [], [], 3),  # nothing predicted: a chart that says so
    *_reviews("ant", [0.7, 0.2], [0.1], 1),
]


@pytest.mark.parametrize(("panels", "grid"), [(0, (1, 1)), (1, (1, 1)), (3, (3, 1)), (4, (3, 2)), (7, (3, 3))])
def test_layout_is_three_charts_a_row(panels: int, grid: tuple[int, int]) -> None:
    assert layout(panels) == grid


def test_one_chart_per_label_in_a_png_of_the_grid_size(tmp_path: Path) -> None:
    path = tmp_path / "report.png"
    reports = label_reports(REVIEWS, min_reviews=1)
    write_plot(reports, path)
    with Image.open(path) as image:
        assert (image.format, image.size) == ("PNG", (3 * PANEL_W, 2 * PANEL_H))
        pixels = np.asarray(image.convert("L"))
    cells = [
        pixels[r * PANEL_H : (r + 1) * PANEL_H, c * PANEL_W : (c + 1) * PANEL_W] for r in range(2) for c in range(3)
    ]
    assert [bool((cell < 200).any()) for cell in cells] == [True, True, True, True, False, False]


def test_no_reports_give_one_panel_saying_so(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    write_plot([], path)
    with Image.open(path) as image:
        assert image.size == (PANEL_W, PANEL_H)
