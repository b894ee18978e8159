"""What a user does in Label Studio, as steps: make a project with images, connect the backend, check what is stored."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np

from tests.e2e.labelstudio import LabelStudio
from tests.support.images import TestImage, image_set, write_image
from tests.support.paths import REPO
from tests.validation import assert_valid_prediction

EXAMPLE_CONFIGS = sorted((REPO / "label_config").glob("*.xml"))


@dataclass
class Project:
    """A Label Studio project and, for each of its tasks, the image it shows."""

    id: int
    label_config: str
    images: dict[int, TestImage]  # task id -> image (size as displayed)


def task_image_value(task: dict[str, Any]) -> str:
    """The image reference of a task whose data has exactly one field (uploads, Local Files, URLs)."""
    data = task["data"]
    assert len(data) == 1, f"expected one data field, got {data}"
    return unquote(str(next(iter(data.values()))))


def match_tasks(tasks: list[dict[str, Any]], images: list[TestImage]) -> dict[int, TestImage]:
    """Pair each task with the image file its data names (uploads get a random 8-hex prefix)."""
    by_task: dict[int, TestImage] = {}
    for task in tasks:
        value = task_image_value(task)
        matches = [image for image in images if value.endswith(("/" + image.path.name, "-" + image.path.name))]
        assert len(matches) == 1, f"task {task['id']} ({value}) matches {matches}"
        by_task[int(task["id"])] = matches[0]
    return by_task


def create_project_with_images(ls: LabelStudio, title: str, config_path: Path, scratch: Path) -> Project:
    """A project over `config_path` with images the three ways users bring them.

    - uploaded through the import API (four shapes, one an EXIF-rotated JPEG);
    - a Local Files storage, synced (tasks hold absolute {LABEL_STUDIO_HOST}/data/local-files/?d= URLs);
    - a JSON task naming a Local Files image as /data/local-files/?d=... (relative, as people write it).
    """
    label_config = config_path.read_text()
    project = ls.create_project(title, label_config)
    uploads = image_set(scratch / f"{title}-upload", "up")
    assert ls.import_uploads(project, [image.path for image in uploads]) == len(uploads)

    synced = image_set(ls.documents / title / "synced", "local", ("portrait", "wide"))
    ls.add_local_storage(project, ls.documents / title / "synced", sync=True)
    # Label Studio serves /data/local-files/ only under a storage of the project: one, not synced, for this file.
    referenced = write_image(ls.documents / title / "referenced", "json-exif6.jpg", 160, 100, exif_rotated=True)
    ls.add_local_storage(project, referenced.path.parent, sync=False)
    assert ls.import_tasks(project, [{"data": {"image": ls.local_file_url(referenced.path)}}]) == 1

    images = [*uploads, *synced, referenced]
    tasks = ls.tasks(project)
    assert len(tasks) == len(images), tasks
    return Project(project, label_config, match_tasks(tasks, images))


def predictions_by_task(ls: LabelStudio, project: int) -> dict[int, dict[str, Any]]:
    """Stored predictions keyed by task; fails if any task holds more than one."""
    stored = ls.predictions(project)
    by_task: dict[int, dict[str, Any]] = {}
    for prediction in stored:
        task = int(prediction["task"])
        assert task not in by_task, f"task {task} has more than one prediction: {stored}"
        by_task[task] = prediction
    return by_task


def assert_predictions_valid(
    ls: LabelStudio, project: Project, model_version: str, *, empty: frozenset[int] = frozenset()
) -> dict[int, list[np.ndarray]]:
    """Every task has exactly one stored prediction, valid for its image and config, of `model_version`.

    Tasks in `empty` (their image could not be read) must hold an empty prediction; every other one at
    least one region (the tiny models with low thresholds always detect something). Returns the decoded
    masks per task.
    """
    stored = predictions_by_task(ls, project.id)
    assert set(stored) == set(project.images) | set(empty), (sorted(stored), sorted(project.images), sorted(empty))
    masks: dict[int, list[np.ndarray]] = {}
    for task, prediction in stored.items():
        assert prediction["model_version"] == model_version, (task, prediction["model_version"], model_version)
        if task in empty:
            assert prediction["result"] == [], (task, prediction["result"])
            continue
        image = project.images[task]
        assert prediction["result"], f"task {task} ({image.path.name}) got no regions"
        masks[task] = assert_valid_prediction(prediction, project.label_config, image.width, image.height)
        assert all(mask.shape == (image.height, image.width) for mask in masks[task])
    return masks
