"""review_job._review_task compares an annotation with the prediction it started from (its parent_prediction)
when Label Studio names one: of the current model_version, that one rather than the latest; of another, none."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from backend.labelstudio.config import parse_label_config
from backend.labelstudio.results import PredictedObject, build_prediction
from backend.learning.reviews import ReviewedObject
from backend.lsclient import StudioAnnotation, StudioPrediction, TaskReview
from backend.review_job import _review_task

XML = (
    '<View><Image name="img" value="$image"/><RectangleLabels name="box" toName="img">'
    '<Label value="cat"/><Label value="dog"/></RectangleLabels></View>'
)
CONFIG = parse_label_config(XML)
W, H = 80, 60


class _Store:
    """Keeps what _review_task records (the double isolates the choice of prediction from Redis)."""

    def __init__(self) -> None:
        self.records: dict[int, tuple[ReviewedObject, ...]] = {}

    def record(self, project: int, version: str, annotation: int, objects: Any, updated_at: Any) -> bool:
        self.records[annotation] = tuple(objects)
        return True

    def forget(self, project: int, annotation: int) -> None:
        self.records.pop(annotation, None)


def _prediction(prediction_id: int, version: str, label: str, score: float) -> StudioPrediction:
    obj = PredictedObject(label, score, (2.0, 2.0, 30.0, 30.0), np.ones((H, W), bool), threshold_score=score)
    return StudioPrediction(prediction_id, version, tuple(build_prediction([obj], CONFIG, W, H, version)["result"]))


def _review(parent: int | None) -> tuple[dict[int, tuple[ReviewedObject, ...]], Counter[str]]:
    started_from = _prediction(5, "v1", "cat", 0.4)
    later = _prediction(6, "v1", "dog", 0.9)
    older = _prediction(4, "v0", "cat", 0.3)
    kept = [dict(region) for region in started_from.result]
    annotation = StudioAnnotation(71, tuple(kept), False, 3, None, parent)
    store, tally = _Store(), Counter[str]()
    review = TaskReview(12, (annotation,), (older, started_from, later))
    _review_task(3, review, CONFIG, "v1", 0.5, store, tally)  # type: ignore[arg-type]
    return store.records, tally


def test_the_parent_prediction_of_the_current_version_is_compared() -> None:
    records, tally = _review(parent=5)
    assert records == {71: (ReviewedObject("cat", "kept", 0.4),)} and tally == {"recorded": 1}


def test_without_a_parent_the_latest_prediction_of_the_version_is_compared() -> None:
    records, _ = _review(parent=None)
    assert records == {71: (ReviewedObject("dog", "relabelled", 0.9, "cat"),)}


def test_a_parent_of_another_version_is_counted_not_compared() -> None:
    records, tally = _review(parent=4)
    assert records == {} and tally == {"other_version": 1}
