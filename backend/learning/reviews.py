"""Compare a reviewed annotation with the prediction it started from: what was kept, relabelled, deleted, missed.

Objects: a prediction's regions are grouped into objects by the ids build_prediction writes ("<i>-brush",
"<i>-rect", "<i>-poly-<part>": one object, counted once, its label from the most precise kind, its score the
regions' best threshold score, regions.THRESHOLD_KEY). An annotation's regions are grouped the same way; then
regions of different kinds with one label that overlap by keep_iou or more (a reviewer's own brush and box of one
object) are merged into one object.

IoU of two objects: on the most precise kind they share (brush, polygon, rectangle: exact box IoU); else, when one
is rectangle-only, of its box and the other's box (around its mask); else of their most precise masks rasterised
on one canvas (shapes.py). Matching, one-to-one, only pairs with IoU ≥ keep_iou: first a prediction object with
the annotation object holding its regions' ids (Label Studio keeps a region's id when the reviewer keeps or edits
it); then greedy, same-label pairs before relabelling ones, each highest IoU first, then result order. A matched
prediction is "kept" (same label) or "relabelled" (new_label: the reviewer's); an unmatched one "deleted"; an
unmatched annotation object of a served label "missed". The image tag (Choices/Taxonomy) is not compared: it
names the labels of the objects, which are (comparing it too would count each object twice).

Work bounds (ReviewFormatError past them, before any mask is compared): regions.py's per-result bounds, at most
MAX_OBJECTS objects a side, and at most MAX_COMPARED_PIXELS canvas pixels over the mask comparisons.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import numpy.typing as npt

from backend.errors import ReviewFormatError
from backend.labelstudio.config import LabelConfig
from backend.learning.regions import Region, image_size, read_regions
from backend.learning.shapes import CANVAS_SIDE, KINDS, Canvas, Kind, Shape, box_iou, iou, merged

Outcome = Literal["kept", "relabelled", "deleted", "missed"]
OUTCOMES: tuple[Outcome, ...] = get_args(Outcome)
MAX_OBJECTS = 300  # objects per side
MAX_COMPARED_PIXELS = 400_000_000  # canvas pixels of all the mask pairs one review may compare (~1 s)


@dataclass(frozen=True, slots=True)
class ReviewedObject:
    """One predicted object as reviewed, or one object the reviewer added ("missed").

    label: the predicted label; for "missed", the reviewer's. score: the prediction's score in [0, 1]; None for
    "missed". new_label: for "relabelled", the label the reviewer gave; else None.
    """

    label: str
    outcome: Outcome
    score: float | None
    new_label: str | None = None

    def to_json(self) -> dict[str, object]:
        return {"label": self.label, "outcome": self.outcome, "score": self.score, "new_label": self.new_label}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> ReviewedObject:
        """The object `to_json` wrote. Raises ValueError for missing or ill-typed fields or inconsistent ones."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a reviewed object must be a JSON object, got {type(data).__name__}")
        label, outcome, score, new_label = (data.get(key) for key in ("label", "outcome", "score", "new_label"))
        if not isinstance(label, str) or not label:
            raise ValueError(f"a reviewed object's label must be a non-empty string, got {label!r}")
        if outcome not in OUTCOMES:
            raise ValueError(f"a reviewed object's outcome must be one of {', '.join(OUTCOMES)}, got {outcome!r}")
        number = score if isinstance(score, int | float) and not isinstance(score, bool) else None
        in_range = number is not None and 0.0 <= number <= 1.0
        if not (score is None if outcome == "missed" else in_range):
            raise ValueError(f"a {outcome} object's score must be a number in [0, 1] (None when missed), got {score!r}")
        if not isinstance(new_label, str | None) or (outcome == "relabelled") != bool(new_label):
            raise ValueError(f"new_label must be a non-empty string exactly when relabelled, got {new_label!r}")
        return cls(label, outcome, None if number is None else float(number), new_label)


@dataclass(frozen=True, slots=True)
class _Object:
    """An object of one side: its label, its score (predictions), its shape per kind, the backend object indexes
    of its regions' ids."""

    label: str
    score: float | None
    shapes: Mapping[Kind, Shape]
    indexes: frozenset[int] = frozenset()


def compare_review(
    predicted: Sequence[Mapping[str, Any]],
    annotated: Sequence[Mapping[str, Any]],
    config: LabelConfig,
    keep_iou: float,
) -> tuple[ReviewedObject, ...]:
    """The reviewed objects of a prediction's `result` against an annotation's `result` (see the module's doc):
    prediction objects in result order, then missed objects.

    Raises ReviewFormatError for a malformed item on a served control or too much work (see the module's doc) and
    ValueError for keep_iou outside (0, 1].
    """
    if not 0.0 < keep_iou <= 1.0:
        raise ValueError(f"keep_iou must be in (0, 1], got {keep_iou!r}")
    size = image_size(predicted, config) or image_size(annotated, config)
    canvas = Canvas.for_image(*size) if size else Canvas(CANVAS_SIDE, CANVAS_SIDE)
    served = {spec.value for spec in config.labels}
    guesses = _objects(read_regions(predicted, config, canvas, scored=True), canvas)
    given = [region for region in read_regions(annotated, config, canvas, scored=False) if region.label in served]
    answers = _objects(given, canvas)
    _check_work(guesses, answers)
    answers = _merge_kinds(answers, canvas, keep_iou)
    matches = _match(guesses, answers, canvas, keep_iou)
    reviewed = [_reviewed(guess, answers[matches[i]] if i in matches else None) for i, guess in enumerate(guesses)]
    matched = set(matches.values())
    reviewed += [ReviewedObject(a.label, "missed", None) for j, a in enumerate(answers) if j not in matched]
    return tuple(reviewed)


def _check_work(guesses: Sequence[_Object], answers: Sequence[_Object]) -> None:
    """ReviewFormatError past MAX_OBJECTS a side or MAX_COMPARED_PIXELS: the mask pixels of every pair that may be
    compared by masks (both with a mask, boxes overlapping), prediction x annotation and same-label annotations."""
    for side, objects in (("prediction", guesses), ("annotation", answers)):
        if len(objects) > MAX_OBJECTS:
            raise ReviewFormatError(f"the {side} has {len(objects)} objects, more than {MAX_OBJECTS}")
    labels = np.array([a.label for a in answers], dtype=object)
    same_label = np.triu(labels[:, None] == labels[None, :], k=1) if len(answers) else np.zeros((0, 0), bool)
    pixels = _mask_pair_pixels(guesses, answers).sum() + (_mask_pair_pixels(answers, answers) * same_label).sum()
    if pixels > MAX_COMPARED_PIXELS:
        raise ReviewFormatError(
            f"comparing this review's masks would touch {pixels} pixels, more than {MAX_COMPARED_PIXELS}"
        )


def _mask_pair_pixels(a: Sequence[_Object], b: Sequence[_Object]) -> npt.NDArray[np.int64]:
    """(len(a), len(b)) canvas pixels of the two finest masks of each pair compared by masks, else 0."""
    boxes_a, sizes_a = _mask_boxes(a)
    boxes_b, sizes_b = _mask_boxes(b)
    overlap = (boxes_a[:, None, 0] <= boxes_b[None, :, 2]) & (boxes_b[None, :, 0] <= boxes_a[:, None, 2])
    overlap &= (boxes_a[:, None, 1] <= boxes_b[None, :, 3]) & (boxes_b[None, :, 1] <= boxes_a[:, None, 3])
    both = (sizes_a[:, None] > 0) & (sizes_b[None, :] > 0)
    return np.where(overlap & both, sizes_a[:, None] + sizes_b[None, :], 0)


def _mask_boxes(objects: Sequence[_Object]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """Per object: (N, 4) box in fractions of its finest mask and (N,) that mask's canvas pixels (0: no mask)."""
    boxes, sizes = np.zeros((len(objects), 4)), np.zeros(len(objects), dtype=np.int64)
    for index, obj in enumerate(objects):
        mask = next((obj.shapes[kind] for kind in KINDS if kind in obj.shapes and kind != "rectangle"), None)
        if mask is not None and mask.raster is not None:
            boxes[index], sizes[index] = mask.box, max(1, mask.raster.pixels.size)
    return boxes, sizes


def _reviewed(guess: _Object, answer: _Object | None) -> ReviewedObject:
    if answer is None:
        return ReviewedObject(guess.label, "deleted", guess.score)
    if answer.label == guess.label:
        return ReviewedObject(guess.label, "kept", guess.score)
    return ReviewedObject(guess.label, "relabelled", guess.score, answer.label)


def _objects(regions: Sequence[Region], canvas: Canvas) -> list[_Object]:
    """Regions grouped by `group`, in order of first appearance; a kind's several regions merged."""
    groups: dict[str, list[Region]] = {}
    for region in regions:
        groups.setdefault(region.group, []).append(region)
    objects = []
    for members in groups.values():
        first = min(members, key=lambda r: KINDS.index(r.shape.kind))
        scores = [r.score for r in members if r.score is not None]
        shapes = {
            kind: merged([r.shape for r in members if r.shape.kind == kind], canvas)
            for kind in KINDS
            if any(r.shape.kind == kind for r in members)
        }
        indexes = frozenset(r.object_index for r in members if r.object_index is not None)
        objects.append(_Object(first.label, max(scores) if scores else None, shapes, indexes))
    return objects


def _merge_kinds(objects: list[_Object], canvas: Canvas, keep_iou: float) -> list[_Object]:
    """Objects of one label and disjoint kinds overlapping by keep_iou or more merged (highest IoU first)."""
    pairs = [
        (overlap, i, j)
        for i, a in enumerate(objects)
        for j, b in enumerate(objects[i + 1 :], start=i + 1)
        if a.label == b.label and not set(a.shapes) & set(b.shapes)
        if (overlap := _object_iou(a, b, canvas)) >= keep_iou
    ]
    roots = list(range(len(objects)))
    kinds = [set(obj.shapes) for obj in objects]
    for _, i, j in sorted(pairs, key=lambda p: (-p[0], p[1], p[2])):
        low, high = sorted((roots[i], roots[j]))
        if low != high and not kinds[low] & kinds[high]:
            kinds[low] |= kinds[high]
            roots = [low if root == high else root for root in roots]
    result = []
    for index, obj in enumerate(objects):
        if roots[index] == index:
            members = [objects[k] for k in range(len(objects)) if roots[k] == index]
            shapes = {k: v for m in members for k, v in m.shapes.items()}
            result.append(_Object(obj.label, obj.score, shapes, frozenset().union(*(m.indexes for m in members))))
    return result


def _match(guesses: Sequence[_Object], answers: Sequence[_Object], canvas: Canvas, keep_iou: float) -> dict[int, int]:
    """One-to-one matching (see the module's doc): guess → answer index."""
    overlaps = {
        (i, j): overlap
        for i, guess in enumerate(guesses)
        for j, answer in enumerate(answers)
        if (overlap := _object_iou(guess, answer, canvas)) >= keep_iou
    }
    same_object = [(i, j) for i, j in overlaps if guesses[i].indexes & answers[j].indexes]
    greedy = sorted(overlaps, key=lambda p: (guesses[p[0]].label != answers[p[1]].label, -overlaps[p], p))
    matches: dict[int, int] = {}
    taken: set[int] = set()
    for i, j in [*same_object, *greedy]:
        if i not in matches and j not in taken:
            matches[i] = j
            taken.add(j)
    return matches


def _object_iou(a: _Object, b: _Object, canvas: Canvas) -> float:
    shared = [kind for kind in KINDS if kind in a.shapes and kind in b.shapes]
    if shared:
        return iou(a.shapes[shared[0]], b.shapes[shared[0]], canvas)
    if set(a.shapes) == {"rectangle"} or set(b.shapes) == {"rectangle"}:
        return box_iou(_finest(a).box, _finest(b).box)  # a box against a mask: their boxes
    return iou(_finest(a), _finest(b), canvas)


def _finest(obj: _Object) -> Shape:
    return next(obj.shapes[kind] for kind in KINDS if kind in obj.shapes)
