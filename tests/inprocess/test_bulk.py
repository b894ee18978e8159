"""/prelabel → chunks on the bulk queue → a burst worker in this process pushes predictions → /runs and /jobs
count them. Label Studio is an in-memory double in the worker (the API needs none for /prelabel)."""

from __future__ import annotations

from typing import Any

from PIL import Image

from tests.support.inprocess import InProcessBackend
from tests.support.paths import REPO
from tests.validation import assert_valid_prediction

CONFIG = (REPO / "label_config" / "brush_and_rectangle.xml").read_text()


def _tasks(backend: InProcessBackend, count: int, missing: tuple[int, ...] = ()) -> list[dict[str, Any]]:
    """Tasks 1..count, each with its own 40 x 30 image; the ids in `missing` point at no image."""
    tasks = []
    for tid in range(1, count + 1):
        name = f"{backend.project}-{tid}.png"
        url = f"{backend.images.url}/{name}" if tid in missing else backend.images.add(name, Image.new("RGB", (40, 30)))
        tasks.append({"id": tid, "data": {"image": url}})
    return tasks


def _prelabel(backend: InProcessBackend, tasks: list[dict[str, Any]], force: bool = False) -> dict[str, Any]:
    body = {"project": backend.project, "label_config": CONFIG, "tasks": tasks, "force": force}
    answer = backend.client.post("/prelabel", json=body)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def _run(backend: InProcessBackend, run_id: str) -> dict[str, Any]:
    answer = backend.client.get(f"/runs/{run_id}")
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def _counts(progress: dict[str, Any]) -> tuple[int, int, int, int, bool]:
    return progress["total"], progress["queued"], progress["done"], progress["failed"], progress["finished"]


def test_prelabel_queues_chunks_that_a_worker_pushes_and_progress_counts(backend: InProcessBackend) -> None:
    backend.announce()
    queued = _prelabel(backend, _tasks(backend, 5))
    assert queued["tasks"] == 5
    assert _counts(_run(backend, queued["run_id"])) == (5, 5, 0, 0, False)
    assert backend.queued() == 3  # BULK_CHUNK_SIZE=2: chunks of 2, 2 and 1 tasks

    assert backend.work()

    assert _counts(_run(backend, queued["run_id"])) == (5, 0, 5, 0, True)
    assert sorted(backend.studio.created) == [1, 2, 3, 4, 5]
    for tid in range(1, 6):
        [prediction] = backend.studio.of_task(tid)
        assert prediction["model_version"] == queued["model_version"]
        assert_valid_prediction(prediction, CONFIG, 40, 30)
    project = backend.client.get("/jobs", params={"project": backend.project}).json()
    assert _counts(project) == (5, 0, 5, 0, True)


def test_prelabel_again_skips_what_is_done_and_force_replaces_it(backend: InProcessBackend) -> None:
    backend.announce()
    tasks = _tasks(backend, 3)
    _prelabel(backend, tasks)
    backend.work()
    seen = len(backend.pipeline.images)

    again = _prelabel(backend, tasks)
    backend.work()
    assert _run(backend, again["run_id"])["finished"]
    assert len(backend.pipeline.images) == seen  # nothing computed again
    assert sorted(backend.studio.created) == [1, 2, 3]  # one push per task (pushed from several threads)

    forced = _prelabel(backend, tasks, force=True)
    backend.work()
    assert _counts(_run(backend, forced["run_id"])) == (3, 0, 3, 0, True)
    assert len(backend.pipeline.images) == seen + 3
    assert all(len(backend.studio.of_task(tid)) == 1 for tid in (1, 2, 3))  # replaced, not added
    assert len(backend.studio.created) == 6


def test_a_task_whose_image_is_missing_fails_alone_and_its_chunk_says_why(backend: InProcessBackend) -> None:
    backend.announce()
    queued = _prelabel(backend, _tasks(backend, 4, missing=(3,)))

    backend.work()

    progress = _run(backend, queued["run_id"])
    assert _counts(progress) == (4, 0, 3, 1, True)
    [failure] = progress["failures"]
    assert "task 3" in failure and "404" in failure, failure
    assert sorted(backend.studio.created) == [1, 2, 4]


def test_prelabel_without_a_live_worker_queues_nothing(backend: InProcessBackend) -> None:
    body = {"project": backend.project, "label_config": CONFIG, "tasks": _tasks(backend, 2)}
    answer = backend.client.post("/prelabel", json=body)
    assert answer.status_code == 503 and "no worker has announced" in answer.json()["detail"], answer.text
    assert backend.queued() == 0
