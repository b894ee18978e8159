"""After SAM: one label per object (the documented rule), per-class minimum area and instance caps."""

from __future__ import annotations

import numpy as np

from backend.class_options import ClassOptions
from backend.pipeline.postprocess import apply_filters, cap_per_class, deduplicate, drop_small, mask_iou
from backend.pipeline.types import Detection, Instance, PostprocessOptions, TextClass

H = W = 20


def rect(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def inst(class_index: int, score: float, mask: np.ndarray, mask_score: float = 0.9) -> Instance:
    detection = Detection(box_xyxy=(0.0, 0.0, float(W), float(H)), score=score, class_index=class_index)
    return Instance(detection=detection, mask=mask, mask_score=mask_score)


def classes(*options: ClassOptions) -> list[TextClass]:
    return [TextClass(f"c{i}", (f"c{i}",), option) for i, option in enumerate(options)]


def labels(instances: list[Instance]) -> list[tuple[int, float]]:
    return [(i.detection.class_index, i.detection.score) for i in instances]


def test_mask_iou() -> None:
    assert mask_iou(rect(0, 0, 10, 10), rect(5, 0, 15, 10)) == 50 / 150
    assert mask_iou(rect(0, 0, 5, 5), rect(10, 10, 15, 15)) == 0.0
    assert mask_iou(np.zeros((H, W), bool), np.zeros((H, W), bool)) == 0.0


def test_the_higher_score_keeps_an_object_two_labels_found() -> None:
    kept = deduplicate([inst(0, 0.4, rect(0, 0, 10, 10)), inst(1, 0.6, rect(0, 0, 10, 9))], iou=0.5, margin=0.02)
    assert labels(kept) == [(1, 0.6)]


def test_a_near_tie_goes_to_the_better_mask_and_an_exact_tie_to_the_first_kept() -> None:
    a, b = rect(0, 0, 10, 10), rect(0, 0, 10, 9)
    near = deduplicate([inst(0, 0.60, a, 0.80), inst(1, 0.59, b, 0.95)], iou=0.5, margin=0.02)
    assert labels(near) == [(1, 0.59)]
    beyond = deduplicate([inst(0, 0.60, a, 0.80), inst(1, 0.55, b, 0.95)], iou=0.5, margin=0.02)
    assert labels(beyond) == [(0, 0.60)]
    tie = deduplicate([inst(0, 0.6, a, 0.9), inst(1, 0.6, b, 0.9)], iou=0.5, margin=0.02)
    assert labels(tie) == [(0, 0.6)]


def test_little_overlap_same_label_and_dedup_off_keep_everything() -> None:
    apart = [inst(0, 0.6, rect(0, 0, 10, 10)), inst(1, 0.5, rect(6, 0, 16, 10))]  # IoU 0.25
    assert len(deduplicate(apart, iou=0.5, margin=0.02)) == 2
    same = [inst(0, 0.6, rect(0, 0, 10, 10)), inst(0, 0.5, rect(0, 0, 10, 10))]
    assert len(deduplicate(same, iou=0.5, margin=0.02)) == 2
    overlapping = [inst(0, 0.6, rect(0, 0, 10, 10)), inst(1, 0.5, rect(0, 0, 10, 10))]
    assert len(deduplicate(overlapping, iou=1.0, margin=0.02)) == 2


def test_dropped_objects_never_come_back_and_order_is_by_score() -> None:
    # x loses a near tie to a (worse mask); c then wins a near tie against a and replaces it. x does not
    # overlap c, yet stays dropped.
    a = inst(0, 0.70, rect(0, 0, 10, 10), 0.5)
    x = inst(1, 0.695, rect(0, 0, 10, 6), 0.4)  # IoU 0.6 with a
    c = inst(2, 0.69, rect(0, 3, 10, 10), 0.8)  # IoU 0.7 with a, 0.3 with x
    d = inst(1, 0.30, rect(12, 12, 20, 20))
    assert labels(deduplicate([d, x, a, c], iou=0.5, margin=0.02)) == [(2, 0.69), (1, 0.30)]


def test_min_area_per_class_with_default() -> None:
    found = [inst(0, 0.9, rect(0, 0, 3, 3)), inst(1, 0.8, rect(0, 0, 3, 3)), inst(1, 0.7, rect(0, 0, 5, 5))]
    kept = drop_small(found, classes(ClassOptions(), ClassOptions(min_area=20)), default_min_area=5)
    assert labels(kept) == [(0, 0.9), (1, 0.7)]


def test_max_instances_per_class_keeps_the_first_ones() -> None:
    found = [inst(0, 0.9, rect(0, 0, 2, 2)), inst(1, 0.8, rect(0, 0, 2, 2)), inst(0, 0.7, rect(0, 0, 2, 2))]
    assert labels(cap_per_class(found, classes(ClassOptions(), ClassOptions()), default_max=1)) == [(0, 0.9), (1, 0.8)]
    per_class = classes(ClassOptions(max_instances=2), ClassOptions(max_instances=1))
    assert len(cap_per_class(found, per_class, default_max=None)) == 3


def test_finish_drops_small_masks_before_they_can_win_a_conflict() -> None:
    small = inst(0, 0.9, rect(0, 0, 2, 2))
    large = inst(1, 0.5, rect(0, 0, 3, 3))
    options = PostprocessOptions(dedup_iou=0.3, min_area=5)
    assert labels(apply_filters([small, large], classes(ClassOptions(), ClassOptions()), options)) == [(1, 0.5)]
