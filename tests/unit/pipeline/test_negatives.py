"""Negative prompts: extra detector classes whose boxes suppress their owner's overlapping boxes."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from backend.class_options import ClassOptions
from backend.pipeline.negatives import ClassPlan, build_class_plan, suppress_negatives
from backend.pipeline.prompts import PromptPlan
from backend.pipeline.types import Detection, TextClass

CAR = TextClass("Car", ("car",), ClassOptions(negatives=("Toy car", "truck", "CAR.", "toy car"), threshold=0.4))
TRUCK = TextClass("Truck", ("truck",))
DOG = TextClass("Dog", ("dog",), ClassOptions(negatives=("toy car",)))


def plan_for(classes: Sequence[TextClass]) -> tuple[ClassPlan, list[tuple[TextClass, ...]]]:
    prepared: list[tuple[TextClass, ...]] = []

    def prepare(detector_classes: Sequence[TextClass]) -> PromptPlan:
        prepared.append(tuple(detector_classes))
        return None  # type: ignore[return-value]  # the plan is opaque here

    return build_class_plan(classes, prepare, default_box=0.3), prepared


def test_negatives_become_shared_extra_classes_or_point_at_an_existing_class() -> None:
    plan, prepared = plan_for([CAR, TRUCK, DOG])
    assert prepared == [(CAR, TRUCK, DOG, TextClass("negative: toy car", ("toy car",)))]
    # Car: "toy car" (extra class 3) and "truck" (class 1); "CAR." is its own phrase and ignored.
    assert plan.suppressors == (frozenset({3, 1}), frozenset(), frozenset({3}))
    assert plan.box_thresholds == (0.4, 0.3, 0.3, 0.3)
    assert plan.classes == (CAR, TRUCK, DOG)


def det(class_index: int, box: tuple[float, float, float, float], score: float = 0.5) -> Detection:
    return Detection(box_xyxy=box, score=score, class_index=class_index)


@pytest.mark.parametrize(
    ("negative_box", "suppressed"),
    [((0, 0, 10, 10), True), ((0, 0, 10, 6), True), ((0, 0, 10, 4), False), ((20, 20, 30, 30), False)],
    ids=["same box", "IoU 0.6", "IoU 0.4", "apart"],
)
def test_a_negative_box_suppresses_overlapping_boxes_of_its_owner_only(
    negative_box: tuple[float, float, float, float], suppressed: bool
) -> None:
    plan, _ = plan_for([CAR, TRUCK, DOG])
    car, truck, negative = det(0, (0, 0, 10, 10)), det(1, (0, 0, 10, 10)), det(3, negative_box)
    kept = suppress_negatives([car, negative], plan, iou=0.5)
    assert kept == ([] if suppressed else [car])
    # A negative naming another class: its detections suppress too, and are returned themselves.
    assert suppress_negatives([truck, car], plan, iou=0.5) == [truck]
    # Dog's negative does not touch Car boxes, and a Truck is suppressed by nothing.
    assert suppress_negatives([truck, det(2, (50, 50, 60, 60))], plan, iou=0.5) == [truck, det(2, (50, 50, 60, 60))]


def test_nothing_in_nothing_out() -> None:
    plan, _ = plan_for([CAR])
    assert suppress_negatives([], plan, iou=0.5) == []
