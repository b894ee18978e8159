"""The messages that cross from the API to the workers: one per job kind, typed, versioned, JSON on the wire.

The API builds a `PredictJob` (interactive queue, one task) or a `ChunkJob` (bulk queue, BULK_CHUNK_SIZE tasks)
and queues `to_json()`; the worker's job function reads it back with `from_json`, which refuses a message of
another schema (a worker older or newer than the API that queued it) or a malformed one with
JobMessageError, a reason rq records on the failed job.

The labeling config travels by reference (its sha256; the text is stored once in Redis, see
backend.queueing.configs). Messages queued before the schema field existed have schema 1's shape and are
read as schema 1; those older still carry the config text inline (`label_config`), which workers still read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from backend.errors import JobMessageError

SCHEMA = 1
SCHEMA_KEY = "schema"


@dataclass(frozen=True, slots=True)
class QueuedTask:
    """A task as queued: Label Studio's integer id and its data (JSON; the image reference is read from it)."""

    id: int
    data: Any

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "data": self.data}

    @classmethod
    def from_json(cls, raw: object) -> QueuedTask:
        if not isinstance(raw, Mapping) or isinstance(raw.get("id"), bool) or not isinstance(raw.get("id"), int):
            raise JobMessageError(f"a queued task needs an integer id, got {_short(raw)}")
        return cls(id=raw["id"], data=raw.get("data"))


@dataclass(frozen=True, slots=True)
class PredictJob:
    """One task to predict now (interactive queue); the worker returns its Label Studio prediction.

    context: Label Studio's interactive context (clicks, a box, typed text) as sent, or None for a plain
    prediction. label_studio_host: the origin Label Studio writes into absolute task URLs (from /setup).
    label_config: the config text itself, only in messages queued before references existed.
    """

    task: QueuedTask
    label_config_ref: str
    model_version: str
    context: object = None
    label_studio_host: str | None = None
    label_config: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            SCHEMA_KEY: SCHEMA,
            "task": self.task.to_json(),
            "label_config_ref": self.label_config_ref,
            "model_version": self.model_version,
            "context": self.context,
            "label_studio_host": self.label_studio_host,
        }

    @classmethod
    def from_json(cls, raw: object) -> PredictJob:
        """Raises JobMessageError for another schema or a malformed message."""
        message = _checked(raw, "interactive job")
        return cls(
            task=QueuedTask.from_json(message.get("task")),
            label_config_ref=_optional_text(message, "label_config_ref", "interactive job") or "",
            model_version=_required_text(message, "model_version", "interactive job"),
            context=message.get("context"),
            label_studio_host=_optional_text(message, "label_studio_host", "interactive job"),
            label_config=_optional_text(message, "label_config", "interactive job"),
        )


@dataclass(frozen=True, slots=True)
class ChunkJob:
    """A chunk of one project's tasks to predict and push to Label Studio (bulk queue).

    force: replace predictions of this model_version the tasks already hold (otherwise they are skipped).
    """

    project: str
    tasks: tuple[QueuedTask, ...]
    label_config_ref: str
    model_version: str
    force: bool = False
    label_studio_host: str | None = None
    label_config: str | None = None

    @property
    def task_ids(self) -> list[int]:
        return [task.id for task in self.tasks]

    def to_json(self) -> dict[str, Any]:
        return {
            SCHEMA_KEY: SCHEMA,
            "project": self.project,
            "tasks": [task.to_json() for task in self.tasks],
            "label_config_ref": self.label_config_ref,
            "model_version": self.model_version,
            "force": self.force,
            "label_studio_host": self.label_studio_host,
        }

    @classmethod
    def from_json(cls, raw: object) -> ChunkJob:
        """Raises JobMessageError for another schema or a malformed message."""
        message = _checked(raw, "bulk chunk")
        tasks = message.get("tasks")
        if not isinstance(tasks, Sequence) or isinstance(tasks, str):
            raise JobMessageError(f"a bulk chunk needs a list of tasks, got {_short(tasks)}")
        return cls(
            project=_required_text(message, "project", "bulk chunk"),
            tasks=tuple(QueuedTask.from_json(task) for task in tasks),
            label_config_ref=_optional_text(message, "label_config_ref", "bulk chunk") or "",
            model_version=_required_text(message, "model_version", "bulk chunk"),
            force=bool(message.get("force", False)),
            label_studio_host=_optional_text(message, "label_studio_host", "bulk chunk"),
            label_config=_optional_text(message, "label_config", "bulk chunk"),
        )


def _checked(raw: object, kind: str) -> Mapping[str, Any]:
    """`raw` as a mapping of schema SCHEMA (absent: schema 1, queued before the field existed)."""
    if not isinstance(raw, Mapping):
        raise JobMessageError(f"a {kind} message is a JSON object, got {_short(raw)}")
    schema = raw.get(SCHEMA_KEY, 1)
    if schema != SCHEMA:
        raise JobMessageError(
            f"this {kind} was queued with message schema {schema!r}, this worker reads schema {SCHEMA}: "
            "run the API and the workers from the same release, then request the predictions again"
        )
    if not raw.get("label_config_ref") and not isinstance(raw.get("label_config"), str):
        raise JobMessageError(f"a {kind} message names no labeling config (label_config_ref)")
    return raw


def _required_text(message: Mapping[str, Any], key: str, kind: str) -> str:
    value = message.get(key)
    if not isinstance(value, str):
        raise JobMessageError(f"a {kind} message needs {key} as a string, got {_short(value)}")
    return value


def _optional_text(message: Mapping[str, Any], key: str, kind: str) -> str | None:
    return None if message.get(key) is None else _required_text(message, key, kind)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
