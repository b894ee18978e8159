"""Read Label Studio result items (a prediction's or an annotation's `result`) on the served controls.

Only items whose from_name/to_name is the config's brush, rectangle or polygon control count; others (the image
tag among them) are skipped unread. A counted item that is malformed raises ReviewFormatError saying what is
wrong. Frames as in backend/labelstudio/results.py: rectangles and polygons in percent of the image, brushes an
RLE of the image at value.original_width x original_height. A rotated rectangle counts as its unrotated box
(x, y, width, height). A prediction's region is scored by its THRESHOLD_KEY (the score a per-label `threshold`
cuts), not its "score".
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from backend.errors import ReviewFormatError
from backend.labelstudio.config import ControlRef, LabelConfig
from backend.labelstudio.results import THRESHOLD_KEY
from backend.labelstudio.rle import rle_to_mask
from backend.learning.shapes import Canvas, Kind, Shape, brush_shape, polygon_shape, rectangle_shape

# Bounds on the work one review may ask for (each side: the prediction, the annotation).
MAX_REGIONS = 1000  # result items per prediction or annotation (objects: reviews.MAX_OBJECTS)
MAX_RLE_PIXELS = 100_000_000  # declared brush size (IMAGE_MAX_PIXELS' default): decoding allocates 4 bytes each
MAX_RLE_VALUES = 2_000_000  # ints in one RLE (the SDK's decoder expands each to 8 characters first)
MAX_RESULT_RLE_VALUES = 4_000_000  # ints in all the RLEs of one result
MAX_RASTER_PIXELS = 32_000_000  # canvas pixels of all the masks read from one result (kept in memory)
MAX_POLYGON_POINTS = 100_000
_TYPES: dict[Kind, str] = {"brush": "brushlabels", "rectangle": "rectanglelabels", "polygon": "polygonlabels"}
# Region ids build_prediction writes: "<object>-brush", "<object>-rect", "<object>-poly-<part>".
_BACKEND_ID = re.compile(r"(\d+)-(?:brush|rect|poly-\d+)")


@dataclass(frozen=True, slots=True)
class Region:
    """One region on a served region control.

    group: regions of one object share it ("object <i>" for ids build_prediction writes, else unique).
    score: the item's THRESHOLD_KEY when read as a prediction, else None.
    object_index: <i> of an id build_prediction writes ("<i>-brush", ...; kept by Label Studio when a reviewer
    keeps or edits that region), else None.
    """

    group: str
    label: str
    score: float | None
    shape: Shape
    object_index: int | None = None


def image_size(items: Sequence[Mapping[str, Any]], config: LabelConfig) -> tuple[int, int] | None:
    """(width, height) of the image: the first served region's original_width/original_height, None without."""
    return next((size for item in _served(items, config) if (size := _size(item)) is not None), None)


def read_regions(
    items: Sequence[Mapping[str, Any]], config: LabelConfig, canvas: Canvas, *, scored: bool
) -> list[Region]:
    """The regions of `items` on the config's brush, rectangle and polygon controls, in item order.

    Raises ReviewFormatError past MAX_RESULT_RLE_VALUES RLE ints or MAX_RASTER_PIXELS mask pixels in all.
    """
    controls = {ref: kind for kind, ref in _region_controls(config)}
    served = _served(items, config)
    rle_values = sum(len(rle) for item in served if isinstance(rle := _raw_rle(item), list))
    if rle_values > MAX_RESULT_RLE_VALUES:
        raise ReviewFormatError(f"a result's brushes hold {rle_values} RLE values, more than {MAX_RESULT_RLE_VALUES}")
    regions, pixels = [], 0
    for position, item in enumerate(served):
        kind = controls.get(ControlRef(item["from_name"], item["to_name"]))
        if kind is not None:
            region = _region(item, kind, position, canvas, scored)
            pixels += 0 if region.shape.raster is None else region.shape.raster.pixels.size
            if pixels > MAX_RASTER_PIXELS:
                raise ReviewFormatError(f"a result's masks cover more than {MAX_RASTER_PIXELS} canvas pixels in all")
            regions.append(region)
    return regions


def _raw_rle(item: Mapping[str, Any]) -> object:
    value = item.get("value")
    return value.get("rle") if isinstance(value, Mapping) else None


def _served(items: Sequence[Mapping[str, Any]], config: LabelConfig) -> list[Mapping[str, Any]]:
    if not isinstance(items, Sequence) or isinstance(items, str | bytes):
        raise ReviewFormatError(f"a result must be a list of items, got {type(items).__name__}")
    if len(items) > MAX_REGIONS:
        raise ReviewFormatError(f"a result has {len(items)} items, more than {MAX_REGIONS}")
    refs = [ref for _, ref in _region_controls(config)]
    served = []
    for item in items:
        if not isinstance(item, Mapping):
            raise ReviewFormatError(f"a result item must be an object, got {type(item).__name__}")
        if any(_on(item, ref) for ref in refs):
            served.append(item)
    return served


def _region_controls(config: LabelConfig) -> list[tuple[Kind, ControlRef]]:
    refs: list[tuple[Kind, ControlRef | None]] = [
        ("brush", config.brush),
        ("rectangle", config.rectangle),
        ("polygon", config.polygon),
    ]
    return [(kind, ref) for kind, ref in refs if ref is not None]


def _on(item: Mapping[str, Any], ref: ControlRef) -> bool:
    return item.get("from_name") == ref.from_name and item.get("to_name") == ref.to_name


def _region(item: Mapping[str, Any], kind: Kind, position: int, canvas: Canvas, scored: bool) -> Region:
    labels = _value(item, _TYPES[kind])
    if not labels or not all(isinstance(label, str) for label in labels):
        raise ReviewFormatError(f"result item {_name(item)}: value.{_TYPES[kind]} must be a non-empty list of labels")
    item_id = item.get("id")
    match = _BACKEND_ID.fullmatch(item_id) if isinstance(item_id, str) else None
    index = int(match.group(1)) if match else None
    group = f"object {index}" if match else f"item {position}"
    return Region(group, labels[0], _score(item) if scored else None, _shape(item, kind, canvas), index)


def _shape(item: Mapping[str, Any], kind: Kind, canvas: Canvas) -> Shape:
    value = item["value"]
    if kind == "rectangle":
        x, y, width, height = (_number(item, value, key) for key in ("x", "y", "width", "height"))
        if width < 0 or height < 0:
            raise ReviewFormatError(f"result item {_name(item)}: rectangle width and height must not be negative")
        return rectangle_shape(x, y, width, height)
    if kind == "polygon":
        return polygon_shape([_points(item, value.get("points"))], canvas)
    return brush_shape(_brush_mask(item, value), canvas)


def _points(item: Mapping[str, Any], points: object) -> list[tuple[float, float]]:
    if not isinstance(points, list) or not 3 <= len(points) <= MAX_POLYGON_POINTS:
        raise ReviewFormatError(f"result item {_name(item)}: value.points must list 3 to {MAX_POLYGON_POINTS} points")
    pairs = [p for p in points if isinstance(p, list | tuple) and len(p) == 2 and None not in map(_finite, p)]
    if len(pairs) != len(points):
        raise ReviewFormatError(f"result item {_name(item)}: each point must be two finite numbers [x, y]")
    return [(float(x), float(y)) for x, y in pairs]


def _brush_mask(item: Mapping[str, Any], value: Mapping[str, Any]) -> Any:
    size = _size(item)
    if size is None:
        raise ReviewFormatError(f"result item {_name(item)}: a brush needs positive original_width/original_height")
    width, height = size
    if width * height > MAX_RLE_PIXELS:
        raise ReviewFormatError(
            f"result item {_name(item)}: brush of {width}x{height} pixels, more than {MAX_RLE_PIXELS} (not decoded)"
        )
    rle = value.get("rle")
    if value.get("format", "rle") != "rle" or not isinstance(rle, list) or not 4 <= len(rle) <= MAX_RLE_VALUES:
        raise ReviewFormatError(f"result item {_name(item)}: value.rle must be a list of 4 to {MAX_RLE_VALUES} ints")
    if not all(_is_int(v) and 0 <= v <= 255 for v in rle):
        raise ReviewFormatError(f"result item {_name(item)}: value.rle must hold bytes (ints 0..255)")
    declared = int.from_bytes(bytes(rle[:4]), "big")
    if declared != width * height * 4:
        raise ReviewFormatError(
            f"result item {_name(item)}: the RLE declares {declared} bytes, not {width}x{height}x4 (not decoded)"
        )
    try:
        return rle_to_mask(rle, height, width)
    # A truncated stream: int('', 2) or writing past the end; a word size over 8 bits: a word over 255.
    except (ValueError, IndexError, OverflowError) as exc:
        raise ReviewFormatError(f"result item {_name(item)}: the brush RLE does not decode: {exc}") from exc


def _value(item: Mapping[str, Any], key: str) -> list[Any]:
    value = item.get("value")
    if not isinstance(value, Mapping) or not isinstance(value.get(key), list):
        raise ReviewFormatError(f"result item {_name(item)}: value.{key} must be a list")
    listed: list[Any] = value[key]
    return listed


def _score(item: Mapping[str, Any]) -> float:
    """The item's THRESHOLD_KEY; no fallback to "score" (another scale: predictions written before it existed can
    carry the same model_version)."""
    score = _finite(item.get(THRESHOLD_KEY))
    if score is None or not 0.0 <= score <= 1.0:
        raise ReviewFormatError(
            f"prediction item {_name(item)}: {THRESHOLD_KEY} must be a number in [0, 1], "
            f"got {item.get(THRESHOLD_KEY)!r}"
        )
    return score


def _number(item: Mapping[str, Any], value: Mapping[str, Any], key: str) -> float:
    number = _finite(value.get(key))
    if number is None:
        got = value.get(key)
        raise ReviewFormatError(f"result item {_name(item)}: value.{key} must be a finite number, got {got!r}")
    return number


def _name(item: Mapping[str, Any]) -> str:
    return f"{item.get('id')!r} on {item.get('from_name')!r}"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _size(item: Mapping[str, Any]) -> tuple[int, int] | None:
    """The item's (original_width, original_height) when both are positive ints."""
    width, height = item.get("original_width"), item.get("original_height")
    if _is_int(width) and _is_int(height) and isinstance(width, int) and isinstance(height, int):
        return (width, height) if width > 0 and height > 0 else None
    return None


def _finite(value: object) -> float | None:
    """`value` as a float when it is a finite number (not a bool), else None."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None
