"""image_ref and task_id: reading a Label Studio task's data."""

from __future__ import annotations

import pytest

from backend.errors import TaskDataError
from backend.labelstudio.config import parse_label_config
from backend.labelstudio.tasks import image_ref, task_id

CONFIG = parse_label_config(
    '<View><Image name="i" value="$photo"/><BrushLabels name="b" toName="i"><Label value="a"/></BrushLabels></View>'
)


def test_image_ref_reads_the_configs_key() -> None:
    task = {"id": 3, "data": {"photo": " /data/upload/1/abc-x.png\n", "other": 1}}
    assert image_ref(task, CONFIG) == "/data/upload/1/abc-x.png"


@pytest.mark.parametrize(
    ("task", "reason"),
    [
        ({"id": 3}, "task 3 has no data object"),
        ({"data": "x"}, "task has no data object"),
        ({"id": 3, "data": {"image": "/x.png"}}, 'data has no "photo"'),
        ({"data": {"photo": None}}, "non-empty image URL"),
        ({"data": {"photo": "  "}}, "non-empty image URL"),
        ({"data": {"photo": ["/a.png"]}}, "non-empty image URL"),
    ],
)
def test_unusable_task_data_raises_task_data_error(task: dict, reason: str) -> None:
    with pytest.raises(TaskDataError) as info:
        image_ref(task, CONFIG)
    assert reason in str(info.value)


def test_missing_key_error_names_the_keys_present() -> None:
    with pytest.raises(TaskDataError, match="keys: image, url"):
        image_ref({"data": {"url": "a", "image": "b"}}, CONFIG)


@pytest.mark.parametrize(("task", "expected"), [({"id": 7}, 7), ({}, None), ({"id": "7"}, None), ({"id": True}, None)])
def test_task_id(task: dict, expected: int | None) -> None:
    assert task_id(task) == expected
