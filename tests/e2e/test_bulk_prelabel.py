"""Whole-project pre-labelling against a real Label Studio, through the scaled-out deployment.

`serve` runs the API only (REDIS_URL set) and two separate `worker`s compute; `grounded-sam prelabel`
drives a 200-task project while one worker is SIGKILLed mid-chunk (and replaced) and the command itself is
interrupted with Ctrl-C. Rerunning it (and `retry` where chunks failed, as its summary says) must leave
exactly one valid prediction of the current model_version on every task: nothing lost, nothing twice.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from tests.e2e.backends import setup_model_version
from tests.e2e.bulk import ScaledBackend, bulk_images, finish, scaled_environment, url_project
from tests.e2e.flows import REPO, assert_predictions_valid, predictions_by_task
from tests.e2e.images import ImageServer
from tests.e2e.labelstudio import LabelStudio
from tests.integration.conftest import (
    Proc,
    Processes,
    redis_url,  # noqa: F401  (session fixture: embedded valkey or $REDIS_URL)
)

pytestmark = pytest.mark.e2e

TASKS = 200
CHUNK = 8
CONFIG = REPO / "label_config" / "brush_and_rectangle.xml"
# Reruns after the interruption: each queues what is left; one more round covers a `retry` of failed chunks.
MAX_RERUNS = 4
T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], running: Proc, timeout: float = 180.0) -> T:
    """Poll `probe` until it returns something truthy; fail if `running` (the prelabel command) ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        if running.popen.poll() is not None:
            pytest.fail(f"prelabel exited ({running.popen.returncode}) before {what}:\n{running.log()}")
        time.sleep(0.25)
    pytest.fail(f"timed out waiting for {what}:\n{running.log()}")


def said(proc: Proc) -> str:
    """What a command told the user, without its progress bar and HTTP log lines."""
    lines = proc.log().replace("\r", "\n").splitlines()
    return "\n".join(line for line in lines if line.strip() and "pre-labelling:" not in line and "httpx" not in line)


def prelabel_until_done(backend: ScaledBackend, project: int) -> list[str]:
    """Run `prelabel` until it exits 0; after an exit 1 (failed chunks) run `retry`, as the command advises."""
    transcript = []
    for _ in range(MAX_RERUNS):
        run = backend.command(["prelabel", "--project", str(project)])
        code = finish(run)
        transcript.append(f"prelabel -> {code}\n{said(run)}")
        if code == 0:
            return transcript
        assert code == 1 and f"grounded-sam retry --project {project}" in run.log(), (
            f"prelabel exited {code}, not with failed chunks to retry (exit 1 and a retry hint):\n{said(run)}\n"
            + "\n".join(transcript)
        )
        retry = backend.command(["retry", "--project", str(project)])
        assert finish(retry) == 0, retry.log()
        transcript.append(f"retry -> 0\n{said(retry)}")
    pytest.fail("prelabel never finished cleanly:\n" + "\n".join(transcript))


def test_prelabel_a_project_with_two_workers_a_killed_worker_and_an_interrupt(
    label_studio: LabelStudio, api_keys: dict[str, str], image_host: ImageServer, redis_url: str,  # noqa: F811
    tiny_detector_dir: Path, tiny_hf_sam_dir: Path, tmp_path: Path,
) -> None:
    images = bulk_images(image_host, f"bulk-{uuid.uuid4().hex[:6]}", TASKS)
    project = url_project(label_studio, f"bulk-{uuid.uuid4().hex[:6]}", CONFIG, image_host, images)
    env = scaled_environment(label_studio.url, api_keys["legacy"], tiny_detector_dir, tiny_hf_sam_dir, redis_url,
                             CHUNK)
    # Two workers (three, briefly) share the machine with Label Studio: one torch thread each, not one per core.
    env["OMP_NUM_THREADS"] = "1"
    processes = Processes(tmp_path)
    try:
        backend = ScaledBackend(processes, env)
        backend.start(workers=2)
        version = setup_model_version(backend.api, str(project.id), project.label_config)  # type: ignore[arg-type]

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
        assert "queued chunks canceled" in first.log(), first.log()
        stored = len(predictions_by_task(label_studio, project.id))
        assert 0 < stored < TASKS, f"after the interrupt {stored} of {TASKS} tasks have a prediction"

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
