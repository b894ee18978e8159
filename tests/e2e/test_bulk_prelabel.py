"""Whole-project pre-labelling against a real Label Studio, through the scaled-out deployment.

`serve` runs the API only (REDIS_URL set) and two separate `worker`s compute; `grounded-sam prelabel`
drives a 200-task project while one worker is SIGKILLed mid-chunk (and replaced) and the command itself is
interrupted with Ctrl-C. Rerunning it (and `retry` where chunks failed, as its summary says) must leave
exactly one valid prediction of the current model_version on every task: nothing lost, nothing twice.

The images of the last GATED_CHUNKS chunks are held by the image server until the interrupt has landed,
so whatever the machine's speed, work is still queued when Ctrl-C comes.
"""

from __future__ import annotations

import signal
import uuid
from pathlib import Path

from tests.e2e.backends import setup_model_version
from tests.e2e.bulk import (
    ScaledBackend,
    bulk_images,
    canceled_chunks,
    finish,
    prelabel_until_done,
    said,
    scaled_environment,
    url_project,
    wait_for,
)
from tests.e2e.flows import REPO, Project, assert_predictions_valid, predictions_by_task
from tests.e2e.labelstudio import LabelStudio
from tests.support.images import ImageServer
from tests.support.processes import Processes

TASKS = 200
CHUNK = 8
CONFIG = REPO / "label_config" / "brush_and_rectangle.xml"
# Held chunks can be taken by at most 3 workers before the interrupt (the killed one, the survivor and its
# replacement), so with 4 at least one is still queued when Ctrl-C comes.
GATED_CHUNKS = 4
# A held image must wait for its gate, not fail: the workers' read timeout and fetch deadline outlast every wait.
HELD_READ_TIMEOUT_S = 1200


def last_chunks_images(ls: LabelStudio, project: Project, chunks: int) -> set[str]:
    """Image names of the tasks `prelabel` puts in its last `chunks` chunks (it queues them in Label Studio's
    task order, CHUNK at a time)."""
    order = [int(task["id"]) for task in ls.tasks(project.id)]
    assert len(order) == TASKS and TASKS % CHUNK == 0, (len(order), TASKS, CHUNK)
    return {project.images[task].path.name for task in order[-chunks * CHUNK :]}


def test_prelabel_a_project_with_two_workers_a_killed_worker_and_an_interrupt(
    label_studio: LabelStudio,
    api_keys: dict[str, str],
    image_host: ImageServer,
    redis_url: str,
    tiny_detector_dir: Path,
    tiny_hf_sam_dir: Path,
    tmp_path: Path,
) -> None:
    images = bulk_images(image_host, f"bulk-{uuid.uuid4().hex[:6]}", TASKS)
    project = url_project(label_studio, f"bulk-{uuid.uuid4().hex[:6]}", CONFIG, image_host, images)
    held = last_chunks_images(label_studio, project, GATED_CHUNKS)
    env = scaled_environment(label_studio.url, api_keys["legacy"], tiny_detector_dir, tiny_hf_sam_dir, redis_url, CHUNK)
    # Two workers (three, briefly) share the machine with Label Studio: one torch thread each, not one per core.
    env.update(
        OMP_NUM_THREADS="1", IMAGE_READ_TIMEOUT=str(HELD_READ_TIMEOUT_S), IMAGE_FETCH_DEADLINE=str(HELD_READ_TIMEOUT_S)
    )
    processes = Processes(tmp_path)
    try:
        backend = ScaledBackend(processes, env)
        backend.start(workers=2)
        version = setup_model_version(backend.api, str(project.id), project.label_config)  # type: ignore[arg-type]

        with image_host.holding(lambda name, _client: name in held) as gate:
            first = backend.command(["prelabel", "--project", str(project.id)])
            wait_for("two chunks were done", lambda: backend.jobs(project.id)["done"] >= 2 * CHUNK, first)

            # A worker dies mid-chunk (OOM killer, lost machine); a replacement comes up.
            victim = backend.workers[0]
            killed_job = wait_for("the first worker was busy", lambda: backend.busy_job(victim), first)
            victim.popen.send_signal(signal.SIGKILL)
            victim.popen.wait()
            killed_tasks = backend.job_tasks(killed_job)
            backend.add_worker()

            # Ctrl-C: queued chunks are canceled, running ones finish, the command exits 130.
            wait_for(f"{TASKS // 3} tasks were done", lambda: backend.jobs(project.id)["done"] >= TASKS // 3, first)
            first.popen.send_signal(signal.SIGINT)
            assert finish(first) == 130, first.log()
            assert canceled_chunks(first) >= 1, f"nothing was queued any more when Ctrl-C came:\n{said(first)}"
            stored = len(predictions_by_task(label_studio, project.id))
            assert 0 < stored <= TASKS - len(held), f"after the interrupt {stored} of {TASKS} tasks have a prediction"
            gate.open()  # held chunks still running finish now

        transcript = prelabel_until_done(backend, project.id)

        predictions = predictions_by_task(label_studio, project.id)  # fails on a second prediction of a task
        missing = sorted(set(project.images) - set(predictions))
        assert not missing, (
            f"{len(predictions)} of {TASKS} tasks have a prediction after prelabel exited 0. Without one: {missing}; "
            f"their claims in Redis: {backend.claims(project.id, version, missing)}; the killed worker was running "
            f"{killed_job} (tasks {killed_tasks}). Commands:\nprelabel -> 130\n{said(first)}\n" + "\n".join(transcript)
        )
        assert_predictions_valid(label_studio, project, version)

        # Nothing left: a third run queues nothing and stores nothing.
        again = backend.command(["prelabel", "--project", str(project.id)])
        assert finish(again) == 0, again.log()
        assert f"{TASKS} already have {version}, 0 to pre-label" in again.log(), again.log()
        assert len(label_studio.predictions(project.id)) == TASKS
    finally:
        processes.stop_all()
