"""After SAM: per-class minimum area, one label per object, per-class instance caps. Pure numpy/OpenCV.

One object, one label (`deduplicate`): two instances of different classes are the same object when the
IoU of their masks exceeds `dedup_iou`. Instances are visited by detection score, best first (ties: input
order); each is kept unless it is the same object as an instance kept before it. Then it loses, unless
it wins every such conflict: a later instance wins only a near tie, when its detection score is at most
`dedup_score_margin` below the kept one's and SAM's predicted IoU of its mask is strictly higher; the
kept instances it beats are dropped. Dropped instances never come back. Instances of the same class are
never compared here (the detector's NMS already merged them).

Masks are PackedMasks (bool arrays are packed on the way in): an IoU unpacks only the two crops' overlap.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from fractions import Fraction
from typing import overload

import numpy as np

from backend.packed_mask import Mask, PackedMask, packed
from backend.pipeline.types import Instance, PostprocessOptions, TextClass


def drop_small(instances: Sequence[Instance], classes: Sequence[TextClass], default_min_area: int) -> list[Instance]:
    """Instances whose mask has at least its class's min_area pixels (`default_min_area` when unset)."""
    return [
        instance
        for instance in instances
        if packed(instance.mask).area >= _option(classes, instance, "min_area", default_min_area)
    ]


def cap_per_class(
    instances: Sequence[Instance], classes: Sequence[TextClass], default_max: int | None
) -> list[Instance]:
    """The first max_instances instances of each class in the given order (`default_max`; None: all)."""
    seen: Counter[int] = Counter()
    kept = []
    for instance in instances:
        limit = _option(classes, instance, "max_instances", default_max)
        seen[instance.detection.class_index] += 1
        if limit is None or seen[instance.detection.class_index] <= limit:
            kept.append(instance)
    return kept


def deduplicate(instances: Sequence[Instance], iou: float, margin: float) -> list[Instance]:
    """One class per object, by the rule in this module's docstring; kept instances by detection score."""
    order = sorted(range(len(instances)), key=lambda i: -instances[i].detection.score)
    rank = {index: position for position, index in enumerate(order)}
    masks = [packed(instance.mask) for instance in instances]
    kept: list[int] = []
    for candidate in order:
        rivals = [
            k
            for k in kept
            if instances[k].detection.class_index != instances[candidate].detection.class_index
            and _may_exceed(masks[k], masks[candidate], iou)
            and mask_iou(masks[k], masks[candidate]) > iou
        ]
        if all(_wins_near_tie(instances[candidate], instances[k], margin) for k in rivals):
            kept = [k for k in kept if k not in rivals] + [candidate]
    return [instances[k] for k in sorted(kept, key=rank.__getitem__)]


def apply_filters(
    instances: Sequence[Instance], classes: Sequence[TextClass], options: PostprocessOptions
) -> list[Instance]:
    """`drop_small`, then `deduplicate`, then `cap_per_class`, with the defaults of `options`."""
    large = drop_small(instances, classes, options.min_area)
    unique = deduplicate(large, options.dedup_iou, options.dedup_score_margin)
    return cap_per_class(unique, classes, options.max_instances)


def mask_iou(a: Mask, b: Mask) -> float:
    """IoU of two masks of one image (bool (H, W) or PackedMask); 0.0 when both are empty. Only the overlap
    of their bounding boxes is unpacked."""
    a, b = packed(a), packed(b)
    inter = 0
    if a.box is not None and b.box is not None:
        x0, y0 = max(a.box[0], b.box[0]), max(a.box[1], b.box[1])
        x1, y1 = min(a.box[2], b.box[2]), min(a.box[3], b.box[3])
        if x0 < x1 and y0 < y1:
            inter = int(np.count_nonzero(a.window(y0, x0, y1, x1) & b.window(y0, x0, y1, x1)))
    union = a.area + b.area - inter
    return inter / union if union else 0.0


def _may_exceed(a: PackedMask, b: PackedMask, iou: float) -> bool:
    """False when the IoU of `a` and `b` cannot exceed `iou`, since it is at most the smaller area over the
    larger (compared exactly: a shortcut that changes no result)."""
    return min(a.area, b.area) > Fraction(iou) * max(a.area, b.area)


def _wins_near_tie(candidate: Instance, kept: Instance, margin: float) -> bool:
    near = candidate.detection.score >= kept.detection.score - margin
    return near and candidate.mask_score > kept.mask_score


@overload
def _option(classes: Sequence[TextClass], instance: Instance, name: str, default: int) -> int: ...
@overload
def _option(classes: Sequence[TextClass], instance: Instance, name: str, default: int | None) -> int | None: ...
def _option(classes: Sequence[TextClass], instance: Instance, name: str, default: int | None) -> int | None:
    value: int | None = getattr(classes[instance.detection.class_index].options, name)
    return default if value is None else value
