"""Label Studio's webhook events read as review jobs, or ignored with their reason (backend.api.webhook)."""

from __future__ import annotations

import json
import re

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from redis import Redis

from backend.api.app import create_app
from backend.api.webhook import Ignored, read_event
from backend.errors import JobMessageError
from backend.queueing.messages import ReviewJob, ReviewOptions
from backend.settings import Settings

OPTIONS = ReviewOptions("prefix", 0.5, 100, 1000)


def _read(event: object) -> tuple[ReviewJob, ...] | Ignored:
    return read_event(json.dumps(event).encode(), OPTIONS)


def _annotation_event(action: str = "ANNOTATION_CREATED") -> dict[str, object]:
    """What Label Studio 1.2x sends: the serialized annotation, its task and the project (fields trimmed)."""
    return {
        "action": action,
        "annotation": {"id": 71, "task": 12, "project": 3, "result": [], "was_cancelled": False},
        "task": {"id": 12, "project": 3, "data": {"image": "/data/upload/3/a.png"}},
        "project": {"id": 3, "label_config": "<View/>"},
    }


@pytest.mark.parametrize("action", ["ANNOTATION_CREATED", "ANNOTATION_UPDATED"])
def test_an_annotation_event_names_its_project_task_and_annotation(action: str) -> None:
    assert _read(_annotation_event(action)) == (ReviewJob(3, 12, 71, action, OPTIONS),)


def test_the_task_and_project_are_read_from_the_nested_objects_when_the_annotation_lacks_them() -> None:
    event = {"action": "ANNOTATION_UPDATED", "annotation": {"id": 5}, "task": {"id": 9, "project": 4}}
    assert _read(event) == (ReviewJob(4, 9, 5, "ANNOTATION_UPDATED", OPTIONS),)


def test_deleted_annotations_are_listed_by_id() -> None:
    event = {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 1}, {"id": 2}], "project": {"id": 3}}
    assert _read(event) == (ReviewJob(3, None, None, "ANNOTATIONS_DELETED", OPTIONS, (1, 2)),)


def test_start_training_names_only_the_project() -> None:
    event = {"action": "START_TRAINING", "project": {"id": 3, "label_config": "<View/>"}}
    assert _read(event) == (ReviewJob(3, None, None, "START_TRAINING", OPTIONS),)


def test_a_bulk_creation_is_one_created_job_per_task() -> None:
    """Label Studio sends ANNOTATIONS_CREATED for annotations created in bulk (an import), "annotation" a list."""
    listed = [{"id": 71, "task": 12}, {"id": 72, "task": 13}, {"id": 73, "task": 12}]
    event = {"action": "ANNOTATIONS_CREATED", "annotation": listed, "project": {"id": 3}}
    assert _read(event) == (
        ReviewJob(3, 12, 71, "ANNOTATION_CREATED", OPTIONS),
        ReviewJob(3, 13, 72, "ANNOTATION_CREATED", OPTIONS),
    )
    assert _read({**event, "annotation": None, "annotations": listed[:1]}) == (
        ReviewJob(3, 12, 71, "ANNOTATION_CREATED", OPTIONS),
    )


def test_another_action_is_ignored_as_nothing_to_learn_from() -> None:
    ignored = _read({"action": "TASKS_CREATED", "tasks": [{"id": 1}], "project": {"id": 3}})
    assert isinstance(ignored, Ignored)
    assert (ignored.action, ignored.kind) == ("TASKS_CREATED", "other_action")


def test_a_long_unknown_action_is_shortened_in_the_answer() -> None:
    ignored = _read({"action": "X" * 500})
    assert isinstance(ignored, Ignored) and len(ignored.action) == 60


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        (b"not json", "not_json"),
        (b"\xff\xfe", "not_json"),
        (b"[" * 100_000 + b"]" * 100_000, "not_json"),
        (b"[1, 2]", "not_json"),
        (b'"ANNOTATION_CREATED"', "not_json"),
        (b"{}", "malformed"),
        (b'{"action": 7}', "malformed"),
    ],
)
def test_a_body_that_is_no_event_is_ignored(body: bytes, kind: str) -> None:
    ignored = read_event(body, OPTIONS)
    assert isinstance(ignored, Ignored) and ignored.kind == kind


@pytest.mark.parametrize(
    "event",
    [
        {"action": "ANNOTATION_CREATED", "project": {"id": 3}},  # no annotation
        {"action": "ANNOTATION_CREATED", "annotation": {"id": "71", "task": 12}, "project": {"id": 3}},  # id a string
        {"action": "ANNOTATION_CREATED", "annotation": {"id": 71}, "project": {"id": 3}},  # no task
        {"action": "ANNOTATION_CREATED", "annotation": {"id": 71, "task": 12}},  # no project
        {"action": "ANNOTATION_UPDATED", "annotation": {"id": True, "task": 12}, "project": {"id": 3}},  # a bool
        {"action": "ANNOTATION_UPDATED", "annotation": [71], "project": {"id": 3}},
        {"action": "ANNOTATIONS_DELETED", "annotations": [], "project": {"id": 3}},
        {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 1}, {}], "project": {"id": 3}},
        {"action": "ANNOTATIONS_DELETED", "annotations": {"id": 1}, "project": {"id": 3}},
        {"action": "START_TRAINING", "project": {"id": None}},
        {"action": "START_TRAINING", "project": 3},
        {"action": "ANNOTATIONS_CREATED", "annotation": [], "project": {"id": 3}},
        {"action": "ANNOTATIONS_CREATED", "annotation": [{"id": 1, "task": 2}, {"id": 3}], "project": {"id": 3}},
    ],
)
def test_a_review_event_without_the_ids_it_needs_is_ignored_as_malformed(event: dict[str, object]) -> None:
    ignored = _read(event)
    assert isinstance(ignored, Ignored)
    assert ignored.kind == "malformed" and ignored.action == event["action"] and ignored.reason


def test_the_queued_message_reads_back_as_sent() -> None:
    for event in (
        _annotation_event(),
        {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 1}], "project": {"id": 3}},
        {"action": "START_TRAINING", "project": {"id": 3}},
    ):
        jobs = _read(event)
        assert isinstance(jobs, tuple) and len(jobs) == 1
        assert ReviewJob.from_json(json.loads(json.dumps(jobs[0].to_json()))) == jobs[0]


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"schema": 2}, "schema 2"),
        ({"action": "TASKS_CREATED"}, "needs one of"),
        ({"project": "3"}, "project as an integer"),
        ({"task": 1.5}, "task as an integer"),
        ({"deleted": [1, "2"]}, "list of ids"),
        ({"options": {"prefix": "p", "keep_iou": 2, "max_annotations": 5, "max_total": 9}}, "keep_iou in (0, 1]"),
        ({"options": {"prefix": "p", "keep_iou": 0, "max_annotations": 5, "max_total": 9}}, "keep_iou in (0, 1]"),
        ({"options": {"prefix": "p", "keep_iou": 0.5, "max_annotations": 0, "max_total": 9}}, ">= 1"),
        ({"options": {"prefix": "p", "keep_iou": 0.5, "max_annotations": 5}}, "max_total as an integer"),
    ],
)
def test_a_review_message_of_another_schema_or_malformed_is_refused(change: dict[str, object], complaint: str) -> None:
    message = ReviewJob(3, 12, 71, "ANNOTATION_CREATED", OPTIONS).to_json() | change
    with pytest.raises(JobMessageError, match=re.escape(complaint)):
        ReviewJob.from_json(message)


def test_an_event_that_cannot_be_queued_is_ignored_with_200_and_counted() -> None:
    """Redis unreachable: the webhook still answers 200 (Label Studio learns nothing from a failing webhook)."""
    client = TestClient(create_app(Settings(), Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)))
    answer = client.post("/webhook", json=_annotation_event())
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "ignored" and "Redis is unreachable" in answer.json()["reason"]
    metrics = client.get("/metrics").text
    assert 'grounded_sam_webhook_events_total{outcome="queue_unavailable"} 1.0' in metrics


def test_a_keep_iou_of_zero_is_refused_by_the_settings() -> None:
    """compare_review needs keep_iou > 0: a zero would fail every review job, so it never gets that far."""
    with pytest.raises(ValidationError, match="review_keep_iou"):
        Settings(review_keep_iou=0)


def test_the_webhook_is_open_under_basic_auth_while_the_other_routes_are_not() -> None:
    """Label Studio creates its webhook without credentials: with BASIC_AUTH set, /webhook still takes events."""
    redis = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    client = TestClient(create_app(Settings(basic_auth_user="user", basic_auth_pass="secret"), redis))
    answer = client.post("/webhook", json={"action": "TASKS_CREATED", "project": {"id": 3}})
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "ignored"
    assert client.get("/versions").status_code == 401
    assert client.get("/versions", auth=("user", "secret")).status_code != 401
