"""The bulk path's other promises, against a real Label Studio: large "Retrieve predictions" requests go
asynchronous, someone in the editor goes ahead of bulk work, failures are counted with their reason and
`retry` recovers them, /metrics tells what happened, and two `prelabel` runs at once duplicate nothing.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis import Redis

from backend.queueing.stats import PREFIX as STATS_PREFIX
from tests.e2e.backends import setup_model_version
from tests.e2e.bulk import ScaledBackend, bulk_images, finish, scaled_environment, url_project
from tests.e2e.flows import REPO, Project, assert_predictions_valid, predictions_by_task
from tests.e2e.labelstudio import LabelStudio
from tests.support.images import ImageServer
from tests.support.processes import Processes

CONFIG = REPO / "label_config" / "brush_and_rectangle.xml"
CHUNK = 4


@pytest.fixture()
def scaled(
    label_studio: LabelStudio,
    api_keys: dict[str, str],
    redis_url: str,
    tiny_detector_dir: Path,
    tiny_hf_sam_dir: Path,
    tmp_path: Path,
) -> Iterator[Callable[..., ScaledBackend]]:
    """Start an API on the shared Redis plus `workers` worker processes, with extra settings; all stopped after."""
    processes = Processes(tmp_path)

    def start(workers: int, **settings: str) -> ScaledBackend:
        env = scaled_environment(
            label_studio.url, api_keys["legacy"], tiny_detector_dir, tiny_hf_sam_dir, redis_url, CHUNK
        )
        env.update(OMP_NUM_THREADS="1", **settings)
        backend = ScaledBackend(processes, env)
        backend.start(workers=workers)
        return backend

    yield start
    processes.stop_all()


def new_project(ls: LabelStudio, image_host: ImageServer, tasks: int) -> Project:
    name = f"bulk-{uuid.uuid4().hex[:6]}"
    return url_project(ls, name, CONFIG, image_host, bulk_images(image_host, name, tasks))


def poll(what: str, probe: Callable[[], Any], timeout: float = 180.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := probe():
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}")


def metric(text: str, line_start: str) -> float:
    """The value of the first /metrics sample whose line starts with `line_start`."""
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    pytest.fail(f"no sample starting with {line_start!r} in /metrics:\n{text}")


def test_large_retrieve_goes_async_and_a_second_click_duplicates_nothing(
    label_studio: LabelStudio, image_host: ImageServer, scaled: Callable[..., ScaledBackend], redis_url: str
) -> None:
    """24 tasks x PRIOR_TASK_SECONDS exceeds SYNC_BUDGET: Label Studio gets an empty answer at once, the
    workers push all 24 predictions; clicking again while they work adds nothing."""
    project = new_project(label_studio, image_host, 24)
    backend = scaled(1, SYNC_BUDGET="5", PRIOR_TASK_SECONDS="2")
    # The measured seconds per task, which earlier tests' workers left in this shared Redis, would replace the
    # prior (tiny models on a quiet machine: 24 x 0.15 s fits the budget); this test's worker has run nothing yet.
    with Redis.from_url(redis_url) as redis:
        redis.delete(f"{STATS_PREFIX}:task-seconds")
    ml = label_studio.connect_ml(project.id, backend.url)
    version = str(label_studio.ml_backend(int(ml["id"]))["model_version"])

    for _ in range(2):  # a double click
        answer = label_studio.retrieve_predictions(project.id)
        assert answer.status_code == 200, answer.text
    assert len(label_studio.predictions(project.id)) < 24, "the request was answered synchronously"

    poll("24 pushed predictions", lambda: len(label_studio.predictions(project.id)) >= 24)
    poll("the bulk work to finish", lambda: backend.jobs(project.id)["finished"])
    assert_predictions_valid(label_studio, project, version)
    assert len(label_studio.predictions(project.id)) == 24
    progress = backend.jobs(project.id)  # both clicks' chunks; a task in both counts once
    assert (progress["total"], progress["done"], progress["failed"]) == (24, 24, 0), progress


def test_editor_request_goes_ahead_of_bulk_work_and_failures_are_counted_and_retried(
    label_studio: LabelStudio, image_host: ImageServer, scaled: Callable[..., ScaledBackend], tmp_path: Path
) -> None:
    """One worker, 48 tasks in 12 chunks, one image missing (404). A single-task /predict sent while chunks are
    queued is answered before the bulk queue drains; the run ends with that task failed and its reason in
    `status` and /metrics; once the image is back, `retry` gives it its prediction."""
    project = new_project(label_studio, image_host, 48)
    backend = scaled(1)
    version = setup_model_version(backend.api, str(project.id), project.label_config)  # type: ignore[arg-type]
    broken_task, broken_image = next(iter(project.images.items()))
    hidden = broken_image.path.with_suffix(".hidden")
    broken_image.path.rename(hidden)

    run = backend.command(["prelabel", "--project", str(project.id)])
    poll("the first chunk to finish", lambda: backend.jobs(project.id)["done"] >= CHUNK)
    other_task, other_image = list(project.images.items())[-1]
    editor = httpx.post(
        f"{backend.url}/predict",
        timeout=120,
        json={
            "tasks": [{"id": other_task, "data": {"image": image_host.url_for(other_image.path.name)}}],
            "label_config": project.label_config,
            "project": f"{project.id}.0",
        },
    )
    assert editor.status_code == 200, editor.text
    assert editor.json()["results"][0]["model_version"] == version
    queued_after_editor = backend.jobs(project.id)["queued"]
    assert queued_after_editor > 0, "the editor's request waited for the whole bulk queue"

    assert finish(run) == 1, run.log()
    assert f"grounded-sam retry --project {project.id}" in run.log()
    progress = backend.jobs(project.id)
    assert (progress["done"], progress["failed"]) == (47, 1), progress
    [failure] = progress["failures"]
    assert f"task {broken_task}" in failure and "404" in failure, failure

    metrics = httpx.get(f"{backend.url}/metrics", timeout=10).text
    assert metric(metrics, 'grounded_sam_task_failures_total{reason="ImageFetchError"}') >= 1
    assert metric(metrics, "grounded_sam_images_processed_total") >= 47
    assert metric(metrics, 'grounded_sam_worker_stage_seconds_count{stage="model"}') >= 47
    assert metric(metrics, 'grounded_sam_worker_stage_seconds_count{stage="push"}') >= 47
    bulk_queue = f"{backend.env['QUEUE_NAME']}-bulk"
    assert metric(metrics, f'grounded_sam_jobs{{queue="{bulk_queue}",state="failed"}}') == 1
    assert metric(metrics, f'grounded_sam_jobs{{queue="{bulk_queue}",state="queued"}}') == 0

    hidden.rename(broken_image.path)
    retry = backend.command(["retry", "--project", str(project.id)])
    assert finish(retry) == 0 and "1 failed chunks queued again" in retry.log(), retry.log()
    poll("the retried chunk", lambda: backend.jobs(project.id)["failed"] == 0 and backend.jobs(project.id)["finished"])
    assert_predictions_valid(label_studio, project, version)
    assert len(label_studio.predictions(project.id)) == 48


def test_two_prelabel_runs_at_once_and_a_forced_rerun_keep_one_prediction_per_task(
    label_studio: LabelStudio, image_host: ImageServer, scaled: Callable[..., ScaledBackend]
) -> None:
    project = new_project(label_studio, image_host, 32)
    backend = scaled(2)
    version = setup_model_version(backend.api, str(project.id), project.label_config)  # type: ignore[arg-type]
    runs = [backend.command(["prelabel", "--project", str(project.id)]) for _ in range(2)]
    assert [finish(run) for run in runs] == [0, 0], "\n".join(run.log() for run in runs)
    assert len(predictions_by_task(label_studio, project.id)) == 32  # fails on a second prediction of a task
    assert len(label_studio.predictions(project.id)) == 32
    assert_predictions_valid(label_studio, project, version)

    # --force with a Data Manager filter recomputes just those tasks and replaces their predictions.
    chosen = sorted(project.images)[:8]
    query = {
        "filters": {
            "conjunction": "and",
            "items": [
                {"filter": "filter:tasks:id", "operator": "less_or_equal", "type": "Number", "value": chosen[-1]}
            ],
        }
    }
    before = {p["task"]: p["id"] for p in label_studio.predictions(project.id)}
    forced = backend.command(["prelabel", "--project", str(project.id), "--force", "--filter", json.dumps(query)])
    assert finish(forced) == 0, forced.log()
    assert "project" in forced.log() and "8 tasks, 0 already have" in forced.log(), forced.log()
    after = {p["task"]: p["id"] for p in label_studio.predictions(project.id)}
    assert len(after) == 32 and len(label_studio.predictions(project.id)) == 32
    replaced = sorted(task for task in after if after[task] != before[task])
    assert replaced == chosen, f"--force --filter replaced the predictions of {replaced}, not of {chosen}"
    assert_predictions_valid(label_studio, project, version)
