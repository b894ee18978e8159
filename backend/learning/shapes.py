"""Region geometry for comparing reviews: boxes, polygons and brush masks on one reduced canvas.

Frames: a region's box is in fractions of the image (x1, y1, x2, y2 in [0, 1]); a `Raster` is in pixels of the
`Canvas`, the image scaled down so its longest side is at most CANVAS_SIDE (never up). IoU does not change when
both regions are scaled alike along each axis, so boxes are compared exactly and masks at the canvas's scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw

Kind = Literal["brush", "polygon", "rectangle"]
# Most precise first: two regions sharing kinds are compared on the first one they share.
KINDS: tuple[Kind, ...] = ("brush", "polygon", "rectangle")
CANVAS_SIDE = 1024
Box = tuple[float, float, float, float]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True, slots=True)
class Canvas:
    """The reduced image regions are rasterised on: `width` x `height` pixels."""

    width: int
    height: int

    @classmethod
    def for_image(cls, width: int, height: int) -> Canvas:
        """The canvas of a `width` x `height` image: the same size, or scaled down to CANVAS_SIDE."""
        scale = min(1.0, CANVAS_SIDE / max(width, height))
        return cls(max(1, round(width * scale)), max(1, round(height * scale)))


@dataclass(frozen=True, slots=True)
class Raster:
    """A mask on the canvas: `pixels` (h, w) bool, its top-left corner at canvas pixel (x0, y0)."""

    x0: int
    y0: int
    pixels: BoolArray

    @property
    def area(self) -> int:
        return int(self.pixels.sum())


@dataclass(frozen=True, slots=True)
class Shape:
    """One region's geometry: `box` in fractions of the image (around its pixels for masks); `raster` on the
    canvas, None for a rectangle (rasterised only when compared with a mask)."""

    kind: Kind
    box: Box
    raster: Raster | None = None


def rectangle_shape(x: float, y: float, width: float, height: float) -> Shape:
    """A rectangle given in percent of the image (x, y: its top-left corner), clamped to the image."""
    x1, y1 = _clamp(x / 100), _clamp(y / 100)
    x2, y2 = _clamp((x + width) / 100), _clamp((y + height) / 100)
    return Shape("rectangle", (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)))


def polygon_shape(parts: Sequence[Sequence[tuple[float, float]]], canvas: Canvas) -> Shape:
    """The union of polygons whose points are in percent of the image, filled on the canvas (PIL ImageDraw)."""
    rasters = [_polygon_raster(points, canvas) for points in parts]
    return mask_shape("polygon", _union(rasters, canvas), canvas)


def brush_shape(mask: BoolArray, canvas: Canvas) -> Shape:
    """A brush mask (H, W) of the image at its declared size, resampled (nearest) to the canvas."""
    height, width = mask.shape
    if (height, width) != (canvas.height, canvas.width):
        rows = ((np.arange(canvas.height) + 0.5) * height / canvas.height).astype(np.intp)
        cols = ((np.arange(canvas.width) + 0.5) * width / canvas.width).astype(np.intp)
        mask = mask[np.ix_(rows, cols)]
    return mask_shape("brush", _cropped(Raster(0, 0, mask)), canvas)


def mask_shape(kind: Kind, raster: Raster, canvas: Canvas) -> Shape:
    """A shape of `raster`, its box the canvas pixels it covers (in fractions)."""
    h, w = raster.pixels.shape
    box = (raster.x0 / canvas.width, raster.y0 / canvas.height, (raster.x0 + w) / canvas.width)
    return Shape(kind, (*box, (raster.y0 + h) / canvas.height), raster)


def merged(shapes: Sequence[Shape], canvas: Canvas) -> Shape:
    """One shape of several of one kind (a polygon's parts): boxes' union for rectangles, else the masks'."""
    if len(shapes) == 1:
        return shapes[0]
    if shapes[0].kind == "rectangle":  # one object's rectangles: the box around them
        boxes = np.array([shape.box for shape in shapes])
        x1, y1 = boxes[:, :2].min(axis=0)
        x2, y2 = boxes[:, 2:].max(axis=0)
        return Shape("rectangle", (float(x1), float(y1), float(x2), float(y2)))
    return mask_shape(shapes[0].kind, _union([raster_of(shape, canvas) for shape in shapes], canvas), canvas)


def iou(a: Shape, b: Shape, canvas: Canvas) -> float:
    """Intersection over union: exact for two rectangles, else of their masks on the canvas (0 when disjoint)."""
    if not _boxes_overlap(a.box, b.box):
        return 0.0
    if a.kind == b.kind == "rectangle":
        return box_iou(a.box, b.box)
    return _raster_iou(raster_of(a, canvas), raster_of(b, canvas))


def raster_of(shape: Shape, canvas: Canvas) -> Raster:
    """The shape's mask on the canvas (a rectangle: the canvas pixels whose centres it holds)."""
    if shape.raster is not None:
        return shape.raster
    x1, y1, x2, y2 = shape.box
    c1, c2 = round(x1 * canvas.width), round(x2 * canvas.width)
    r1, r2 = round(y1 * canvas.height), round(y2 * canvas.height)
    return Raster(c1, r1, np.ones((r2 - r1, c2 - c1), dtype=bool))


def _clamp(fraction: float) -> float:
    return min(1.0, max(0.0, fraction))


def _polygon_raster(points: Sequence[tuple[float, float]], canvas: Canvas) -> Raster:
    xy = np.clip(np.array(points, dtype=float) / 100, 0.0, 1.0) * (canvas.width, canvas.height)
    x0 = min(canvas.width - 1, math.floor(xy[:, 0].min()))
    y0 = min(canvas.height - 1, math.floor(xy[:, 1].min()))
    x1 = min(canvas.width, math.ceil(xy[:, 0].max()) + 1)
    y1 = min(canvas.height, math.ceil(xy[:, 1].max()) + 1)
    image = Image.new("1", (max(1, x1 - x0), max(1, y1 - y0)))
    ImageDraw.Draw(image).polygon([(float(x - x0), float(y - y0)) for x, y in xy], fill=1, outline=1)
    return Raster(x0, y0, np.array(image, dtype=bool))


def _union(rasters: Sequence[Raster], canvas: Canvas) -> Raster:
    x0 = min(r.x0 for r in rasters)
    y0 = min(r.y0 for r in rasters)
    x1 = max(r.x0 + r.pixels.shape[1] for r in rasters)
    y1 = max(r.y0 + r.pixels.shape[0] for r in rasters)
    pixels = np.zeros((y1 - y0, x1 - x0), dtype=bool)
    for r in rasters:
        h, w = r.pixels.shape
        pixels[r.y0 - y0 : r.y0 - y0 + h, r.x0 - x0 : r.x0 - x0 + w] |= r.pixels
    return _cropped(Raster(x0, y0, pixels))


def _cropped(raster: Raster) -> Raster:
    """The raster cut to the box around its pixels (an empty one: 0 x 0 at its corner)."""
    rows, cols = np.flatnonzero(raster.pixels.any(axis=1)), np.flatnonzero(raster.pixels.any(axis=0))
    if rows.size == 0:
        return Raster(raster.x0, raster.y0, np.zeros((0, 0), dtype=bool))
    pixels = raster.pixels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    return Raster(raster.x0 + int(cols[0]), raster.y0 + int(rows[0]), pixels)


def _boxes_overlap(a: Box, b: Box) -> bool:
    return a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]


def box_iou(a: Box, b: Box) -> float:
    """Exact IoU of two boxes (x1, y1, x2, y2) in one frame; 0 when their union is empty."""
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _raster_iou(a: Raster, b: Raster) -> float:
    x0, y0 = max(a.x0, b.x0), max(a.y0, b.y0)
    x1 = min(a.x0 + a.pixels.shape[1], b.x0 + b.pixels.shape[1])
    y1 = min(a.y0 + a.pixels.shape[0], b.y0 + b.pixels.shape[0])
    inter = 0
    if x1 > x0 and y1 > y0:
        inside_a = a.pixels[y0 - a.y0 : y1 - a.y0, x0 - a.x0 : x1 - a.x0]
        inside_b = b.pixels[y0 - b.y0 : y1 - b.y0, x0 - b.x0 : x1 - b.x0]
        inter = int((inside_a & inside_b).sum())
    union = a.area + b.area - inter
    return inter / union if union > 0 else 0.0
