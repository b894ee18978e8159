"""Label Studio REST calls the backend makes (through label-studio-sdk's client, which handles both token kinds).

Used by bulk jobs (check and push predictions) and by the `prelabel` command (read a project's tasks).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from label_studio_sdk.client import LabelStudio
from label_studio_sdk.core.api_error import ApiError

from backend.errors import LabelStudioApiError

TASK_PAGE_SIZE = 100


@dataclass(frozen=True, slots=True)
class ProjectTask:
    """A task as the prelabel command needs it: id, data, and the model versions of its predictions."""

    id: int
    data: dict[str, Any]
    prediction_versions: frozenset[str]


class LabelStudioApi:
    """A small facade over the SDK client: the five calls this backend needs, with errors named."""

    def __init__(self, url: str, api_key: str, timeout: float) -> None:
        try:
            self._client = LabelStudio(base_url=url.rstrip("/"), api_key=api_key, timeout=timeout)
        except ApiError as exc:  # the SDK rejects an expired personal access token up front
            raise LabelStudioApiError(f"Label Studio API key refused: {exc.body}") from exc

    def label_config(self, project: int) -> str:
        return str(self._call(lambda: self._client.projects.get(project)).label_config)

    def tasks(self, project: int, query: Mapping[str, Any] | None = None) -> Iterator[ProjectTask]:
        """Every task of the project (optionally a Data Manager query: {"filters": ..., "ordering": ...})."""
        params: dict[str, Any] = {"project": project, "page_size": TASK_PAGE_SIZE, "fields": "all"}
        if query:
            params["query"] = json.dumps(query)
        for task in self._call(lambda: self._client.tasks.list(**params)):
            versions = frozenset(str(v) for p in (task.predictions or ()) if (v := _version(p)) is not None)
            yield ProjectTask(id=int(task.id), data=dict(task.data or {}), prediction_versions=versions)

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


def _version(prediction: Any) -> str | None:
    """model_version of a prediction as the SDK returns it inside a task (a dict or a model object)."""
    if isinstance(prediction, dict):
        return prediction.get("model_version")
    return getattr(prediction, "model_version", None)
