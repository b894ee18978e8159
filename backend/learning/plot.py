"""The report's plot: one precision/recall-vs-threshold chart per label, the suggested threshold marked.

matplotlib's object API with the Agg canvas (no pyplot, no display, no global state). Layout: PANEL_COLUMNS
charts a row, each PANEL_SIZE inches at DPI, so the PNG is columns*PANEL_SIZE[0]*DPI x rows*PANEL_SIZE[1]*DPI.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from backend.learning.thresholds import LabelReport, curve

PANEL_COLUMNS = 3
PANEL_SIZE = (4.0, 3.0)  # inches
DPI = 100


def layout(panels: int) -> tuple[int, int]:
    """(columns, rows) of the grid holding `panels` charts (one panel at least)."""
    columns = max(1, min(PANEL_COLUMNS, panels))
    return columns, max(1, math.ceil(panels / columns))


def write_plot(reports: Sequence[LabelReport], path: Path) -> None:
    """A PNG at `path`: one chart per report, in order (a single "no reviews" panel when there are none)."""
    columns, rows = layout(len(reports))
    figure = Figure(figsize=(columns * PANEL_SIZE[0], rows * PANEL_SIZE[1]), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.subplots(rows, columns, squeeze=False)
    for index, axes in enumerate(grid.flat):
        if index < len(reports):
            _chart(axes, reports[index])
        elif reports:
            axes.set_axis_off()
        else:
            axes.text(0.5, 0.5, "no reviewed predictions", ha="center", va="center")
            axes.set_axis_off()
    figure.savefig(path, format="png", dpi=DPI)


def _chart(axes: Axes, report: LabelReport) -> None:
    axes.set_title(f"{report.label}: {report.reviewed} reviewed, {report.missed} missed\n{report.why}", fontsize=8)
    axes.set_xlim(0.0, 1.0)
    axes.set_ylim(0.0, 1.05)
    axes.set_xlabel("score threshold", fontsize=8)
    thresholds, precision, recall = curve(report, report.missed)
    if thresholds.size == 0:
        axes.text(0.5, 0.5, "no reviewed predictions", ha="center", va="center", fontsize=8)
        return
    # A value at threshold t_i holds for every t in (t_i-1, t_i]; below the lowest score it is the lowest's.
    x = np.concatenate([[0.0], thresholds])
    axes.step(x, np.concatenate([precision[:1], precision]), where="pre", label="precision")
    axes.step(x, np.concatenate([recall[:1], recall]), where="pre", label="recall")
    if report.suggested_threshold is not None:
        label = f"suggested {report.suggested_threshold:.2f}"
        axes.axvline(report.suggested_threshold, color="black", linestyle="--", label=label)
    axes.legend(fontsize=7, loc="lower left")
