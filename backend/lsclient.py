"""Label Studio REST calls the backend makes (through label-studio-sdk's client, which handles both token kinds).

Used by bulk jobs (check and push predictions), by the `prelabel` command (read a project's tasks) and by review
jobs (read a task's annotations and predictions, as plain JSON: StudioAnnotation, StudioPrediction, TaskReview).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import httpx
from label_studio_sdk.client import LabelStudio
from label_studio_sdk.core.api_error import ApiError

from backend.errors import LabelStudioApiError
from backend.json_values import json_int

TASK_PAGE_SIZE = 100


@dataclass(frozen=True, slots=True)
class ProjectTask:
    """A task as the prelabel command needs it: id, data, the model versions of its predictions, and how many
    annotations it has (submitted ones, Label Studio's total_annotations; skipped ones not counted)."""

    id: int
    data: dict[str, Any]
    prediction_versions: frozenset[str]
    annotations: int = 0


@dataclass(frozen=True, slots=True)
class StudioAnnotation:
    """One annotation as Label Studio holds it now: its id, `result` list (JSON) and whether it was cancelled
    (the task skipped); its project's id and when it was last updated (epoch seconds), None where not given;
    parent_prediction: the id of the prediction the reviewer started from, None where none."""

    id: int
    result: tuple[dict[str, Any], ...]
    cancelled: bool
    project: int | None = None
    updated_at: float | None = None
    parent_prediction: int | None = None


@dataclass(frozen=True, slots=True)
class StudioPrediction:
    """One prediction of a task: its id (None where Label Studio's task list leaves it out), model_version (None
    when it holds none) and `result` list."""

    id: int | None
    model_version: str | None
    result: tuple[dict[str, Any], ...]


@dataclass(frozen=True, slots=True)
class TaskReview:
    """A task's annotations and predictions, what a review compares."""

    task: int
    annotations: tuple[StudioAnnotation, ...]
    predictions: tuple[StudioPrediction, ...]


# Data Manager filter: tasks holding at least one annotation (Label Studio's total_annotations).
ANNOTATED = {
    "filters": {
        "conjunction": "and",
        "items": [{"filter": "filter:tasks:total_annotations", "operator": "greater", "type": "Number", "value": 0}],
    }
}


class LabelStudioApi:
    """A small facade over the SDK client: the calls this backend needs, with errors named."""

    def __init__(self, url: str, api_key: str, timeout: float) -> None:
        try:
            self._client = LabelStudio(base_url=url.rstrip("/"), api_key=api_key, timeout=timeout)
        except ApiError as exc:  # the SDK rejects an expired personal access token up front
            raise LabelStudioApiError(f"Label Studio API key refused: {exc.body}") from exc

    def label_config(self, project: int) -> str:
        return str(self._call(lambda: self._client.projects.get(project)).label_config)

    def set_label_config(self, project: int, xml: str) -> None:
        """Replace the project's labeling config (Settings → Labeling Interface; Label Studio validates it
        against the project's existing annotations and refuses, 400, a config they no longer fit)."""
        self._call(lambda: self._client.projects.update(project, label_config=xml))

    def tasks(self, project: int, query: Mapping[str, Any] | None = None) -> Iterator[ProjectTask]:
        """Every task of the project (optionally a Data Manager query: {"filters": ..., "ordering": ...})."""
        params: dict[str, Any] = {"project": project, "page_size": TASK_PAGE_SIZE, "fields": "all"}
        if query:
            params["query"] = json.dumps(query)
        for task in self._call(lambda: self._client.tasks.list(**params)):
            versions = frozenset(str(v) for p in (task.predictions or ()) if (v := _version(p)) is not None)
            yield ProjectTask(
                id=int(task.id),
                data=dict(task.data or {}),
                prediction_versions=versions,
                annotations=int(task.total_annotations or 0),
            )

    def task_review(self, task: int) -> TaskReview:
        """The task's annotations and predictions as Label Studio holds them now (two calls; never GET
        /api/tasks/{id}, which asks the ML backend for a prediction when the task has none)."""
        annotations = self._call(lambda: self._client.annotations.list(id=task))
        predictions = self._call(lambda: self._client.predictions.list(task=task))
        return TaskReview(
            task=task,
            annotations=tuple(_annotation(item) for item in annotations),
            predictions=tuple(_prediction(item) for item in predictions),
        )

    def annotated_tasks(self, project: int) -> Iterator[TaskReview]:
        """The project's tasks that hold annotations, each with its annotations and predictions, a page of
        TASK_PAGE_SIZE tasks per call."""
        params: dict[str, Any] = {
            "project": project,
            "page_size": TASK_PAGE_SIZE,
            "fields": "all",
            "query": json.dumps(ANNOTATED),
        }
        for task in self._call(lambda: self._client.tasks.list(**params)):
            if task.annotations:
                yield TaskReview(
                    task=int(task.id),
                    annotations=tuple(_annotation(item) for item in task.annotations),
                    predictions=tuple(_prediction(item) for item in (task.predictions or ())),
                )

    def annotation_exists(self, annotation: int) -> bool:
        """Whether Label Studio still holds annotation `annotation` (False when it answers 404)."""
        try:
            self._client.annotations.get(id=annotation)
        except ApiError as exc:
            if exc.status_code == 404:
                return False
            raise LabelStudioApiError(f"Label Studio answered {exc.status_code}: {exc.body}") from exc
        except httpx.HTTPError as exc:
            raise LabelStudioApiError(f"Label Studio unreachable: {exc}") from exc
        return True

    def prediction_ids(self, task: int, model_version: str) -> list[int]:
        """Ids of the task's predictions with this model version."""
        predictions = self._call(lambda: self._client.predictions.list(task=task))
        return [int(p.id) for p in predictions if str(p.model_version) == model_version]

    def create_prediction(self, task: int, prediction: Mapping[str, Any]) -> int:
        created = self._call(
            lambda: self._client.predictions.create(
                task=task,
                result=prediction["result"],
                score=prediction["score"],
                model_version=prediction["model_version"],
            )
        )
        return int(created.id)

    def delete_prediction(self, prediction: int) -> None:
        self._call(lambda: self._client.predictions.delete(prediction))

    @staticmethod
    def _call(request: Any) -> Any:
        try:
            return request()
        except ApiError as exc:
            raise LabelStudioApiError(f"Label Studio answered {exc.status_code}: {exc.body}") from exc
        except httpx.HTTPError as exc:
            raise LabelStudioApiError(f"Label Studio unreachable: {exc}") from exc


def _plain(item: Any) -> dict[str, Any]:
    """An annotation or prediction as the SDK returns it (a dict inside task lists, a model object otherwise) as
    a JSON dict."""
    return dict(item) if isinstance(item, dict) else dict(item.model_dump(mode="json"))


def _annotation(item: Any) -> StudioAnnotation:
    data = _plain(item)
    return StudioAnnotation(
        id=int(data["id"]),
        result=tuple(data.get("result") or ()),
        cancelled=bool(data.get("was_cancelled")),
        project=json_int(data.get("project")),
        updated_at=_epoch(data.get("updated_at")),
        parent_prediction=json_int(data.get("parent_prediction")),
    )


def _epoch(value: object) -> float | None:
    """An ISO 8601 time as Label Studio writes it ("2026-12-01T23:04:05.123456Z") in epoch seconds, or None."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def _prediction(item: Any) -> StudioPrediction:
    data = _plain(item)
    version = data.get("model_version")
    pid = data.get("id")
    return StudioPrediction(
        id=None if pid is None else int(pid),
        model_version=None if version is None else str(version),
        result=tuple(data.get("result") or ()),
    )


def _version(prediction: Any) -> str | None:
    """model_version of a prediction as the SDK returns it inside a task (a dict or a model object)."""
    if isinstance(prediction, dict):
        return prediction.get("model_version")
    return getattr(prediction, "model_version", None)
