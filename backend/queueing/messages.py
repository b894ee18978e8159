"""The messages that cross from the API to the workers: one per job kind, typed, versioned, JSON on the wire.

The API builds a `PredictJob` (interactive queue, one task), a `ChunkJob` (bulk queue, BULK_CHUNK_SIZE tasks)
or a `ReviewJob` (reviews queue: one Label Studio annotation event to learn from) and queues `to_json()`; the
worker's job function reads it back with `from_json`, which refuses a message of another schema (a worker older
or newer than the API that queued it) or a malformed one with JobMessageError, a reason rq records on the failed
job.

The labeling config travels by reference (its sha256; the text is stored once in Redis, see
backend.queueing.configs). Messages queued before the schema field existed have schema 1's shape and are
read as schema 1; those older still carry the config text inline (`label_config`), which workers still read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from backend.errors import JobMessageError
from backend.json_values import json_int

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
        task = json_int(raw.get("id")) if isinstance(raw, Mapping) else None
        if task is None or not isinstance(raw, Mapping):
            raise JobMessageError(f"a queued task needs an integer id, got {_short(raw)}")
        return cls(id=task, data=raw.get("data"))


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
    embeddings: also write every task's SAM embedding to the workers' on-disk cache (skipped tasks' too).
    """

    project: str
    tasks: tuple[QueuedTask, ...]
    label_config_ref: str
    model_version: str
    force: bool = False
    label_studio_host: str | None = None
    label_config: str | None = None
    embeddings: bool = False

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
            "embeddings": self.embeddings,
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
            embeddings=bool(message.get("embeddings", False)),
        )


# The Label Studio events a ReviewJob comes from (backend.api.webhook reads them off the webhook). Label Studio
# sends ANNOTATIONS_CREATED for a bulk creation (an import): the webhook queues one ANNOTATION_CREATED per task.
ANNOTATION_CREATED = "ANNOTATION_CREATED"
ANNOTATION_UPDATED = "ANNOTATION_UPDATED"
ANNOTATIONS_CREATED = "ANNOTATIONS_CREATED"
ANNOTATIONS_DELETED = "ANNOTATIONS_DELETED"
START_TRAINING = "START_TRAINING"
REVIEW_ACTIONS = (ANNOTATION_CREATED, ANNOTATION_UPDATED, ANNOTATIONS_DELETED, START_TRAINING)


@dataclass(frozen=True, slots=True)
class ReviewOptions:
    """How a review job compares and records (the API's settings, so every worker records alike): the Redis key
    prefix of the review records (QUEUE_NAME), REVIEW_KEEP_IOU, REVIEW_MAX_ANNOTATIONS and REVIEW_MAX_TOTAL."""

    prefix: str
    keep_iou: float
    max_annotations: int
    max_total: int

    def to_json(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "keep_iou": self.keep_iou,
            "max_annotations": self.max_annotations,
            "max_total": self.max_total,
        }

    @classmethod
    def from_json(cls, raw: object) -> ReviewOptions:
        if not isinstance(raw, Mapping):
            raise JobMessageError(f"a review job's options are a JSON object, got {_short(raw)}")
        keep_iou = raw.get("keep_iou")
        if not isinstance(keep_iou, (int, float)) or isinstance(keep_iou, bool) or not 0 < keep_iou <= 1:
            raise JobMessageError(f"a review job needs keep_iou in (0, 1], got {_short(keep_iou)}")
        limits = [_int(raw, key) for key in ("max_annotations", "max_total")]
        if min(limits) < 1:
            raise JobMessageError(f"a review job needs max_annotations and max_total >= 1, got {limits}")
        return cls(_required_text(raw, "prefix", "review job"), float(keep_iou), limits[0], limits[1])


@dataclass(frozen=True, slots=True)
class ReviewJob:
    """One Label Studio event to learn from (reviews queue): the worker re-reads what Label Studio holds now.

    action: one of REVIEW_ACTIONS. ANNOTATION_CREATED / _UPDATED name the `task` and its `annotation`;
    ANNOTATIONS_DELETED lists the `deleted` annotation ids (no task); START_TRAINING names only the project (every
    annotated task of it is rescanned).
    """

    project: int
    task: int | None
    annotation: int | None
    action: str
    options: ReviewOptions
    deleted: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            SCHEMA_KEY: SCHEMA,
            "project": self.project,
            "task": self.task,
            "annotation": self.annotation,
            "action": self.action,
            "options": self.options.to_json(),
            "deleted": list(self.deleted),
        }

    @classmethod
    def from_json(cls, raw: object) -> ReviewJob:
        """Raises JobMessageError for another schema or a malformed message."""
        if not isinstance(raw, Mapping):
            raise JobMessageError(f"a review job message is a JSON object, got {_short(raw)}")
        if raw.get(SCHEMA_KEY) != SCHEMA:
            raise JobMessageError(
                f"this review job was queued with message schema {raw.get(SCHEMA_KEY)!r}, this worker reads schema "
                f"{SCHEMA}: run the API and the workers from the same release"
            )
        action, deleted = raw.get("action"), raw.get("deleted", [])
        if not isinstance(action, str) or action not in REVIEW_ACTIONS:
            raise JobMessageError(f"a review job needs one of {', '.join(REVIEW_ACTIONS)}, got {_short(action)}")
        if not isinstance(deleted, list) or not all(json_int(value) is not None for value in deleted):
            raise JobMessageError(f"a review job's deleted annotations are a list of ids, got {_short(deleted)}")
        return cls(
            project=_int(raw, "project"),
            task=None if raw.get("task") is None else _int(raw, "task"),
            annotation=None if raw.get("annotation") is None else _int(raw, "annotation"),
            action=action,
            options=ReviewOptions.from_json(raw.get("options")),
            deleted=tuple(deleted),
        )


def _int(message: Mapping[str, Any], key: str) -> int:
    value = json_int(message.get(key))
    if value is None:
        raise JobMessageError(f"a review job needs {key} as an integer, got {_short(message.get(key))}")
    return value


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
