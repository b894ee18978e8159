"""Label Studio's webhook events read as review jobs, without calling Label Studio (the webhook answers fast).

Label Studio posts every project event to <backend>/webhook (it creates that webhook when the backend is
connected; `send_for_all_actions`), each `{"action": ..., <payload>, "project": {...}}`:
  ANNOTATION_CREATED, ANNOTATION_UPDATED  "annotation": {"id", "task", "project", "result", ...}, "task": {"id", ...}
  ANNOTATIONS_CREATED                     "annotation" (or "annotations"): a list of them (a bulk creation)
  ANNOTATIONS_DELETED                     "annotations": [{"id"}, ...] (one per deleted annotation)
  START_TRAINING                          "project": {"id", "label_config", ...} only (the "Start training" action)
ANNOTATIONS_CREATED becomes one ANNOTATION_CREATED job per task (a job reviews every annotation of its task).
Any other action, and a review action without the ids it needs, is ignored with its reason: never an error,
since Label Studio logs a failing webhook and learns nothing from it either way.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from backend.json_values import json_int
from backend.queueing.messages import (
    ANNOTATION_CREATED,
    ANNOTATIONS_CREATED,
    ANNOTATIONS_DELETED,
    REVIEW_ACTIONS,
    START_TRAINING,
    ReviewJob,
    ReviewOptions,
)

# Why an event is ignored, as a /metrics label (a fixed set: never text from the request). already_queued: a
# review of each task it names is waiting in the queue already (it will read the task's latest state).
IgnoredKind = Literal["not_json", "other_action", "malformed", "queue_unavailable", "already_queued"]


@dataclass(frozen=True, slots=True)
class Ignored:
    """An event not queued: its action (as sent, shortened; "" when none), the kind of reason and the reason."""

    action: str
    kind: IgnoredKind
    reason: str


def read_event(body: bytes, options: ReviewOptions) -> tuple[ReviewJob, ...] | Ignored:
    """The review jobs of one webhook body (one, or one per task for ANNOTATIONS_CREATED), or why it is ignored.
    Parses the body: run it off the event loop (a body may be megabytes)."""
    try:
        event = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        return Ignored("", "not_json", "the body is not JSON")
    if not isinstance(event, Mapping):
        return Ignored("", "not_json", "the body is not a JSON object")
    action = event.get("action")
    if not isinstance(action, str) or not action:
        return Ignored("", "malformed", "the event names no action")
    if action not in (*REVIEW_ACTIONS, ANNOTATIONS_CREATED):
        return Ignored(_short(action), "other_action", "not an annotation event (nothing to learn from)")
    project = _project(event)
    if project is None:
        return Ignored(action, "malformed", "the event names no integer project id")
    if action == START_TRAINING:
        return (ReviewJob(project, None, None, action, options),)
    if action == ANNOTATIONS_DELETED:
        return _deleted(event, project, options)
    if action == ANNOTATIONS_CREATED:
        return _created(event, project, options)
    return _annotated(event, action, project, options)


def _annotated(
    event: Mapping[str, object], action: str, project: int, options: ReviewOptions
) -> tuple[ReviewJob, ...] | Ignored:
    annotation = _mapping(event.get("annotation"))
    annotation_id = json_int(annotation.get("id"))
    if annotation_id is None:
        return Ignored(action, "malformed", "the event has no annotation with an integer id")
    task = json_int(annotation.get("task"))
    if task is None:
        task = json_int(_mapping(event.get("task")).get("id"))
    if task is None:
        return Ignored(action, "malformed", "the event names no integer task id")
    return (ReviewJob(project, task, annotation_id, action, options),)


def _created(event: Mapping[str, object], project: int, options: ReviewOptions) -> tuple[ReviewJob, ...] | Ignored:
    """One ANNOTATION_CREATED job per task of a bulk creation, naming the task's first listed annotation."""
    listed = event.get("annotation")
    listed = listed if isinstance(listed, list) else event.get("annotations")
    items = [_mapping(item) for item in listed] if isinstance(listed, list) else []
    pairs = [(json_int(item.get("task")), json_int(item.get("id"))) for item in items]
    if not pairs or any(task is None or annotation is None for task, annotation in pairs):
        return Ignored(
            ANNOTATIONS_CREATED, "malformed", "the event lists no annotations, each with integer id and task"
        )
    first: dict[int, int] = {}
    for task, annotation in pairs:
        if task is not None and annotation is not None:
            first.setdefault(task, annotation)
    return tuple(
        ReviewJob(project, task, annotation, ANNOTATION_CREATED, options) for task, annotation in first.items()
    )


def _deleted(event: Mapping[str, object], project: int, options: ReviewOptions) -> tuple[ReviewJob, ...] | Ignored:
    listed = event.get("annotations")
    ids = [json_int(_mapping(item).get("id")) for item in listed] if isinstance(listed, list) else []
    if not ids or any(value is None for value in ids):
        return Ignored(ANNOTATIONS_DELETED, "malformed", "the event lists no annotations, each with an integer id")
    deleted = tuple(value for value in ids if value is not None)
    return (ReviewJob(project, None, None, ANNOTATIONS_DELETED, options, deleted),)


def _project(event: Mapping[str, object]) -> int | None:
    """The project id: the event's project object, else the annotation's or the task's project field."""
    for found in (
        _mapping(event.get("project")).get("id"),
        _mapping(event.get("annotation")).get("project"),
        _mapping(event.get("task")).get("project"),
    ):
        if (project := json_int(found)) is not None:
            return project
    return None


def _mapping(value: object) -> Mapping[str, object]:
    return value if isinstance(value, Mapping) else {}


def _short(text: str) -> str:
    return text if len(text) <= 60 else text[:57] + "..."
