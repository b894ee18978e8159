"""Build Label Studio prediction JSON: the single place result regions are made.

Frames: inputs are in pixels of the image as displayed (EXIF orientation applied), which is also what
`original_width`/`original_height` describe; rectangles go out in percent of that image (0..100).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from backend.labelstudio.config import ControlRef, LabelConfig, LabelSpec
from backend.labelstudio.rle import mask_to_rle


@dataclass(frozen=True, slots=True)
class PredictedObject:
    """One object found in an image.

    label: exact Label value from the config. score: confidence in [0, 1].
    box_xyxy: (x1, y1, x2, y2) in pixels of the displayed image. mask: bool HxW of that image, or None.
    """

    label: str
    score: float
    box_xyxy: tuple[float, float, float, float]
    mask: npt.NDArray[np.bool_] | None = field(default=None, repr=False, compare=False)


def build_prediction(
    objects: Sequence[PredictedObject], config: LabelConfig, width: int, height: int, model_version: str
) -> dict[str, Any]:
    """One Label Studio prediction for an image of `width`x`height` pixels.

    Per object: a brushlabels region (RLE of its mask) when its label is on the brush control, and a
    rectanglelabels region when it is on the rectangle control. Region ids are "<object index>-brush" /
    "<object index>-rect". Task score = arithmetic mean of the region scores (0.0 with no regions), so
    active-learning sorts see the average confidence of what the annotator will review.

    Raises ValueError for a label not in `config`, a score outside [0, 1], a brush label without a mask,
    or a mask not of shape (height, width): Label Studio would store such regions without complaint.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    specs = {spec.value: spec for spec in config.labels}
    size = {"original_width": int(width), "original_height": int(height)}
    regions: list[dict[str, Any]] = []
    for index, obj in enumerate(objects):
        spec = _spec_for(obj, specs)
        if config.brush is not None and "brush" in spec.controls:
            value = _brush_value(obj, config.brush, width, height)
            regions.append(_region(f"{index}-brush", config.brush, "brushlabels", value, score=obj.score, size=size))
        if config.rectangle is not None and "rectangle" in spec.controls:
            value = _rectangle_value(obj, width, height)
            regions.append(
                _region(f"{index}-rect", config.rectangle, "rectanglelabels", value, score=obj.score, size=size)
            )
    score = sum(region["score"] for region in regions) / len(regions) if regions else 0.0
    return {"result": regions, "score": score, "model_version": model_version}


def empty_prediction(model_version: str) -> dict[str, Any]:
    """A prediction with no regions (nothing found, or the task failed), score 0.0."""
    return {"result": [], "score": 0.0, "model_version": model_version}


def _spec_for(obj: PredictedObject, specs: dict[str, LabelSpec]) -> LabelSpec:
    if obj.label not in specs:
        raise ValueError(f"label {obj.label!r} is not in the labeling config ({', '.join(map(repr, specs))})")
    if not 0.0 <= obj.score <= 1.0:  # also rejects NaN
        raise ValueError(f"score must be in [0, 1], got {obj.score!r} for {obj.label!r}")
    return specs[obj.label]


def _brush_value(obj: PredictedObject, control: ControlRef, width: int, height: int) -> dict[str, Any]:
    if obj.mask is None:
        raise ValueError(f"label {obj.label!r} is on the brush control {control.from_name!r} but has no mask")
    if obj.mask.shape != (height, width):
        raise ValueError(f"mask shape {obj.mask.shape} is not the image's (height, width) = {(height, width)}")
    return {"format": "rle", "rle": mask_to_rle(obj.mask), "brushlabels": [obj.label]}


def _rectangle_value(obj: PredictedObject, width: int, height: int) -> dict[str, Any]:
    """The box in percent of the image, clamped to it (x, y: top-left corner)."""
    x1, y1, x2, y2 = obj.box_xyxy
    left, right = _percent(min(x1, x2), width), _percent(max(x1, x2), width)
    top, bottom = _percent(min(y1, y2), height), _percent(max(y1, y2), height)
    return {
        "x": left,
        "y": top,
        "width": right - left,
        "height": bottom - top,
        "rotation": 0,
        "rectanglelabels": [obj.label],
    }


def _percent(pixels: float, size: int) -> float:
    """`pixels` along an edge of `size` pixels → percent of it, clamped to [0, 100]."""
    if not math.isfinite(pixels):
        raise ValueError(f"box coordinate must be finite, got {pixels!r}")
    return min(100.0, max(0.0, float(pixels) / size * 100.0))


def _region(
    region_id: str, control: ControlRef, kind: str, value: dict[str, Any], *, score: float, size: dict[str, int]
) -> dict[str, Any]:
    return {
        "id": region_id,
        "from_name": control.from_name,
        "to_name": control.to_name,
        "type": kind,
        **size,
        "image_rotation": 0,
        "value": value,
        "score": float(score),
        "readonly": False,
    }
