"""Read what the labeling config points at out of a Label Studio task."""

from __future__ import annotations

from collections.abc import Mapping

from backend.errors import TaskDataError
from backend.labelstudio.config import LabelConfig


def image_ref(task: Mapping[str, object], config: LabelConfig) -> str:
    """The task's image reference: `task["data"][config.image_key]`, surrounding whitespace removed.

    A URL, a Label Studio path (/data/upload/...) or a cloud URI, as Label Studio stored it.
    Raises TaskDataError when the task has no data object, lacks the key, or the value is not a non-empty string.
    """
    tid = task_id(task)
    where = "task" if tid is None else f"task {tid}"
    data = task.get("data")
    if not isinstance(data, Mapping):
        raise TaskDataError(f"{where} has no data object")
    key = config.image_key
    if key not in data:
        keys = ", ".join(sorted(map(str, data))) or "none"
        raise TaskDataError(
            f'{where}: data has no "{key}" (the labeling config reads <Image value="${key}">); keys: {keys}'
        )
    value = data[key]
    if not isinstance(value, str) or not value.strip():
        raise TaskDataError(f'{where}: data["{key}"] must be a non-empty image URL, got {value!r:.80}')
    return value.strip()


def task_id(task: Mapping[str, object]) -> int | None:
    """The task's Label Studio id, or None when it has none (e.g. a task built by hand)."""
    value = task.get("id")
    # bool is an int subclass; True is no task id.
    return value if isinstance(value, int) and not isinstance(value, bool) else None
