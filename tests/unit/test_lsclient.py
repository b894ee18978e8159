"""LabelStudioApi's review reads as plain data, through the real SDK client over an httpx mock transport that
answers as Label Studio's REST API does (only the transport is a double)."""

from __future__ import annotations

import json
import re

import httpx
import pytest
from label_studio_sdk.client import LabelStudio

from backend.errors import LabelStudioApiError
from backend.lsclient import ANNOTATED, LabelStudioApi, StudioAnnotation, StudioPrediction, TaskReview

REGION = {"id": "0-rect", "type": "rectanglelabels", "from_name": "box", "to_name": "image", "value": {}}
ANNOTATION = {
    "id": 71,
    "task": 12,
    "project": 3,
    "result": [REGION],
    "was_cancelled": False,
    "lead_time": 4.2,
    "updated_at": "2026-12-01T23:00:00.500000Z",
}
UPDATED_AT = 1796166000.5  # ANNOTATION's updated_at in epoch seconds
SKIPPED = {"id": 72, "task": 12, "project": 3, "result": [], "was_cancelled": True}
PREDICTION = {"id": 5, "task": 12, "model_version": "gsam-abc", "score": 0.8, "result": [REGION]}


def _answer(request: httpx.Request) -> httpx.Response:
    path, params = request.url.path, request.url.params
    if re.fullmatch(r"/api/annotations/71/?", path):
        return httpx.Response(200, json=ANNOTATION)
    if re.fullmatch(r"/api/tasks/12/annotations/?", path):
        return httpx.Response(200, json=[ANNOTATION, SKIPPED])
    if path.rstrip("/") == "/api/predictions" and params.get("task") == "12":
        return httpx.Response(200, json=[PREDICTION, {**PREDICTION, "id": 6, "model_version": None}])
    if path.rstrip("/") == "/api/tasks" and params.get("project") == "3":
        assert json.loads(params["query"]) == ANNOTATED and params["fields"] == "all"
        tasks = [
            {"id": 12, "data": {}, "annotations": [ANNOTATION], "predictions": [PREDICTION]},
            {"id": 13, "data": {}, "annotations": [], "predictions": []},  # listed although not annotated
        ]
        page = int(params.get("page", "1"))
        body = {"tasks": tasks if page == 1 else [], "total": 2, "total_annotations": 1, "total_predictions": 1}
        return httpx.Response(200, json=body)
    return httpx.Response(404, json={"detail": "Not found."})


@pytest.fixture()
def api() -> LabelStudioApi:
    api = LabelStudioApi("http://studio.test", "legacy-token", 5.0)
    transport = httpx.Client(transport=httpx.MockTransport(_answer))
    api._client = LabelStudio(base_url="http://studio.test", api_key="legacy-token", httpx_client=transport)
    return api


def test_a_task_review_holds_its_annotations_and_predictions_as_json(api: LabelStudioApi) -> None:
    assert api.task_review(12) == TaskReview(
        task=12,
        annotations=(StudioAnnotation(71, (REGION,), False, 3, UPDATED_AT), StudioAnnotation(72, (), True, 3)),
        predictions=(StudioPrediction(5, "gsam-abc", (REGION,)), StudioPrediction(6, None, (REGION,))),
    )


def test_annotated_tasks_come_with_their_annotations_and_predictions(api: LabelStudioApi) -> None:
    assert list(api.annotated_tasks(3)) == [
        TaskReview(
            12, (StudioAnnotation(71, (REGION,), False, 3, UPDATED_AT),), (StudioPrediction(5, "gsam-abc", (REGION,)),)
        )
    ]


def test_a_refused_read_is_a_label_studio_api_error(api: LabelStudioApi) -> None:
    with pytest.raises(LabelStudioApiError, match="404"):
        api.task_review(99)


def test_an_annotation_exists_until_label_studio_answers_404_for_it(api: LabelStudioApi) -> None:
    assert api.annotation_exists(71)
    assert not api.annotation_exists(99)
