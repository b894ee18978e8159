"""Build Label Studio prediction JSON: the single place result regions are made.

Frames: inputs are in pixels of the image as displayed (EXIF orientation applied), which is also what
`original_width`/`original_height` describe; rectangles and polygons go out in percent of that image (0..100).

Scores, for review and active learning: every region carries its object's score; the prediction's
(task's) score is the LOWEST region score (0.0 with no regions). A task is as doubtful as its most
doubtful region, so Label Studio's "sort by prediction score" ascending brings first the tasks with at
least one uncertain region; a mean would hide one doubtful region among many confident ones. An object's
regions also carry THRESHOLD_KEY when the object has a threshold score: the score a per-label `threshold`
cuts (Grounding DINO's box score; SAM 3's score), which active learning learns thresholds on.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from backend.labelstudio.config import ControlRef, LabelConfig, LabelSpec
from backend.labelstudio.image_tags import ImageTagControl
from backend.labelstudio.polygons import mask_to_polygons
from backend.labelstudio.rle import mask_to_rle
from backend.packed_mask import Mask, packed

Box = tuple[float, float, float, float]
# The extra key of an object's regions holding its threshold score (Label Studio keeps it, see the e2e test).
THRESHOLD_KEY = "threshold_score"


@dataclass(frozen=True, slots=True)
class PredictedObject:
    """One object found in an image.

    label: exact Label value from the config. score: confidence in [0, 1] (the pipeline's review score).
    box_xyxy: (x1, y1, x2, y2) in pixels of the displayed image. mask: bool HxW of that image (or its
    PackedMask, which is what the pipeline gives), or None. threshold_score: the score in [0, 1] the label's
    `threshold` was applied to (kept when strictly above it); None where no threshold applies (interactive).
    """

    label: str
    score: float
    box_xyxy: Box
    mask: Mask | None = field(default=None, repr=False, compare=False)
    threshold_score: float | None = None


@dataclass(frozen=True, slots=True)
class OutputOptions:
    """How regions are drawn from objects.

    rectangle_source: "detector" draws the object's box; "mask" the box around its mask's pixels (the
        object's box when it has no mask or an empty one).
    polygon_tolerance: most distance in pixels between a polygon and its mask's outline.
    """

    rectangle_source: Literal["detector", "mask"] = "detector"
    polygon_tolerance: float = 1.0


def build_prediction(
    objects: Sequence[PredictedObject],
    config: LabelConfig,
    width: int,
    height: int,
    model_version: str,
    options: OutputOptions = OutputOptions(),
    id_prefix: str = "",
) -> dict[str, Any]:
    """One Label Studio prediction for an image of `width`x`height` pixels.

    Per object, on each control its label is on: a brushlabels region (RLE of its mask) with id
    "<i>-brush", a rectanglelabels region "<i>-rect", and one polygonlabels region per separate part
    of its mask "<i>-poly-<part>" (largest part first; see polygons.py). Then, when the config has an
    image tag, one region "image-tag" naming the present labels (see `_image_tag_region`). Every id starts with
    `id_prefix`: interactive answers need ids of their own, since the editor replaces an accepted region that
    has the id of a suggestion accepted next (`interactive_id_prefix`).

    Raises ValueError for a label not in `config`, a score or threshold_score outside [0, 1], a brush or polygon label
    without a mask, or a mask not of shape (height, width): Label Studio would store such regions
    without complaint.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    specs = {spec.value: spec for spec in config.labels}
    size = {"original_width": int(width), "original_height": int(height), "image_rotation": 0}
    regions: list[dict[str, Any]] = []
    for index, obj in enumerate(objects):
        spec = _spec_for(obj, specs)
        for region_id, control, kind, value in _object_values(index, obj, spec, config, (width, height), options):
            regions.append(_region(id_prefix + region_id, control, kind, value, obj.score) | size | _threshold(obj))
    tag_region = None if config.image_tag is None else _image_tag_region(config.image_tag, objects)
    if tag_region is not None:
        regions.append(tag_region | {"id": id_prefix + tag_region["id"]})
    score = min((region["score"] for region in regions), default=0.0)
    return {"result": regions, "score": score, "model_version": model_version}


def interactive_id_prefix(context: object, image_ref: str) -> str:
    """A region id prefix of one interactive answer: a digest of what was asked on which image ("<8 hex>-"), so
    the regions of different answers accepted in one annotation never share an id."""
    asked = json.dumps([image_ref, context], sort_keys=True, default=str)
    return hashlib.sha256(asked.encode()).hexdigest()[:8] + "-"


def empty_prediction(model_version: str) -> dict[str, Any]:
    """A prediction with no regions (nothing found, or the task failed), score 0.0."""
    return {"result": [], "score": 0.0, "model_version": model_version}


def mask_box(mask: Mask) -> Box | None:
    """The xyxy pixel box around a bool HxW mask's (or a PackedMask's) pixels (edges included), or None when
    it is empty."""
    box = packed(mask).box
    return None if box is None else (float(box[0]), float(box[1]), float(box[2]), float(box[3]))


def _object_values(
    index: int,
    obj: PredictedObject,
    spec: LabelSpec,
    config: LabelConfig,
    size: tuple[int, int],
    options: OutputOptions,
) -> list[tuple[str, ControlRef, str, dict[str, Any]]]:
    """(region id, control, type, value) of every region of one object."""
    width, height = size
    values: list[tuple[str, ControlRef, str, dict[str, Any]]] = []
    if config.brush is not None and "brush" in spec.controls:
        rle = mask_to_rle(_checked_mask(obj, config.brush, width, height))
        values.append((f"{index}-brush", config.brush, "brushlabels", {"format": "rle", "rle": rle}))
    if config.rectangle is not None and "rectangle" in spec.controls:
        box = mask_box(obj.mask) if options.rectangle_source == "mask" and obj.mask is not None else None
        values.append((f"{index}-rect", config.rectangle, "rectanglelabels", _rectangle(box or obj.box_xyxy, size)))
    if config.polygon is not None and "polygon" in spec.controls:
        parts = mask_to_polygons(_checked_mask(obj, config.polygon, width, height), options.polygon_tolerance)
        for part, points in enumerate(parts):
            values.append((f"{index}-poly-{part}", config.polygon, "polygonlabels", {"points": points, "closed": True}))
    for _, _, kind, value in values:
        value[kind] = [obj.label]
    return values


def _spec_for(obj: PredictedObject, specs: dict[str, LabelSpec]) -> LabelSpec:
    if obj.label not in specs:
        raise ValueError(f"label {obj.label!r} is not in the labeling config ({', '.join(map(repr, specs))})")
    if not 0.0 <= obj.score <= 1.0:  # also rejects NaN
        raise ValueError(f"score must be in [0, 1], got {obj.score!r} for {obj.label!r}")
    if obj.threshold_score is not None and not 0.0 <= obj.threshold_score <= 1.0:
        raise ValueError(f"threshold_score must be in [0, 1], got {obj.threshold_score!r} for {obj.label!r}")
    return specs[obj.label]


def _threshold(obj: PredictedObject) -> dict[str, float]:
    return {} if obj.threshold_score is None else {THRESHOLD_KEY: float(obj.threshold_score)}


def _checked_mask(obj: PredictedObject, control: ControlRef, width: int, height: int) -> Mask:
    if obj.mask is None:
        raise ValueError(f"label {obj.label!r} is on the control {control.from_name!r} but has no mask")
    if obj.mask.shape != (height, width):
        raise ValueError(f"mask shape {obj.mask.shape} is not the image's (height, width) = {(height, width)}")
    return obj.mask


def _rectangle(box_xyxy: Box, size: tuple[int, int]) -> dict[str, Any]:
    """The box in percent of the image, clamped to it (x, y: top-left corner)."""
    width, height = size
    x1, y1, x2, y2 = box_xyxy
    left, right = _percent(min(x1, x2), width), _percent(max(x1, x2), width)
    top, bottom = _percent(min(y1, y2), height), _percent(max(y1, y2), height)
    return {"x": left, "y": top, "width": right - left, "height": bottom - top, "rotation": 0}


def _percent(pixels: float, size: int) -> float:
    """`pixels` along an edge of `size` pixels → percent of it, clamped to [0, 100]."""
    if not math.isfinite(pixels):
        raise ValueError(f"box coordinate must be finite, got {pixels!r}")
    return min(100.0, max(0.0, float(pixels) / size * 100.0))


def _image_tag_region(tag: ImageTagControl, objects: Sequence[PredictedObject]) -> dict[str, Any] | None:
    """The Choices/Taxonomy region naming the labels present among `objects`; None when none has a choice.

    A label is present with the best score of its objects. Choices: the present labels' choices in
    config order; a single-choice Choices gets only the best-scoring label's. Taxonomy: the present
    labels' paths. The region's score is the lowest presence score it names.
    """
    best: dict[str, float] = {}
    for obj in objects:
        best[obj.label] = max(best.get(obj.label, 0.0), obj.score)
    chosen = [(label, path) for label, path in tag.paths if label in best]
    if not chosen:
        return None
    if tag.single:
        chosen = [max(chosen, key=lambda pair: best[pair[0]])]
    value = [list(path) for _, path in chosen] if tag.kind == "taxonomy" else [label for label, _ in chosen]
    score = min(best[label] for label, _ in chosen)
    return _region("image-tag", ControlRef(tag.from_name, tag.to_name), tag.kind, {tag.kind: value}, score)


def _region(region_id: str, control: ControlRef, kind: str, value: dict[str, Any], score: float) -> dict[str, Any]:
    return {
        "id": region_id,
        "from_name": control.from_name,
        "to_name": control.to_name,
        "type": kind,
        "value": value,
        "score": float(score),
        "readonly": False,
    }
