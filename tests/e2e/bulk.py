"""Whole-project pre-labelling as a user runs it at scale: `serve` (API only) on a Redis, separate `worker`s,
the `prelabel` command, and a project of many small images on the loopback image host.

Shared by tests/e2e/test_bulk_prelabel.py, tests/e2e/test_network_partition.py and bench/bulk_workers.py.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
from redis import Redis
from rq import Queue, Worker
from rq.job import Job
from rq.serializers import JSONSerializer

from backend.queueing.claims import TaskClaims
from backend.queueing.client import queue_names
from tests.e2e.backends import backend_environment
from tests.e2e.flows import Project, match_tasks
from tests.e2e.labelstudio import LabelStudio
from tests.support.images import ImageServer, TestImage, write_image
from tests.support.processes import Proc, Processes, wait_healthy

WAIT_S = 300.0
# Reruns after an interruption or a lost worker: each queues what is left; one more covers a `retry`.
MAX_RERUNS = 4
_CANCELED = re.compile(r"stopped: (\d+) queued chunks canceled")
T = TypeVar("T")


def bulk_images(image_host: ImageServer, prefix: str, count: int) -> list[TestImage]:
    """`count` small images in the image host's folder, sizes varying a little (64..118 x 48..96), PNG and JPEG."""
    images = []
    for index in range(count):
        width, height = 64 + (index % 7) * 9, 48 + (index % 5) * 12
        suffix = ".jpg" if index % 3 == 0 else ".png"
        background = (40 + index % 200, 170, 90 + (index * 7) % 150)
        images.append(write_image(image_host.root, f"{prefix}-{index:04d}{suffix}", width, height, background))
    return images


def url_project(
    ls: LabelStudio, title: str, config_path: Path, image_host: ImageServer, images: list[TestImage]
) -> Project:
    """A project whose tasks name `images` as absolute http URLs on the image host (one import call)."""
    label_config = config_path.read_text()
    project = ls.create_project(title, label_config)
    tasks = [{"data": {"image": image_host.url_for(image.path.name)}} for image in images]
    assert ls.import_tasks(project, tasks) == len(images)
    stored = ls.tasks(project)
    assert len(stored) == len(images)
    return Project(project, label_config, match_tasks(stored, images))


def scaled_environment(
    label_studio_url: str, api_key: str, detector: Path, sam: Path, redis_url: str, chunk_size: int
) -> dict[str, str]:
    """Environment shared by `serve` (API only, since REDIS_URL is set), the workers and `prelabel`."""
    env = backend_environment(label_studio_url, api_key, detector, sam)
    env.update(REDIS_URL=redis_url, BULK_CHUNK_SIZE=str(chunk_size))
    return env


@dataclass
class ScaledBackend:
    """One API and its workers on a shared Redis, each a real process whose log stays in `processes`' folder."""

    processes: Processes
    env: dict[str, str]
    api: Proc | None = None
    workers: list[Proc] = field(default_factory=list)
    _redis: Redis | None = field(default=None, repr=False)

    def start(self, workers: int) -> None:
        self.api = self.processes.serve(self.env, wait_workers=0)
        for _ in range(workers):
            self.add_worker()

    def add_worker(self) -> Proc:
        """A new `worker` process; returns once the API counts it (models loaded, listening)."""
        return self.join(self.processes.start(["worker"], self.env))

    def join(self, worker: Proc) -> Proc:
        """Count `worker` (started by the caller, anywhere) as one of this backend's; returns once it is
        registered in Redis (models loaded, listening)."""
        self.workers.append(worker)
        deadline = time.monotonic() + WAIT_S
        # By pid: a SIGKILLed worker stays in rq's worker count until its registration expires.
        while not self.registered(worker):
            if worker.popen.poll() is not None:
                raise AssertionError(f"worker exited with {worker.popen.returncode}:\n{worker.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"worker not registered within {WAIT_S:.0f} s:\n{worker.log()}")
            time.sleep(0.2)
        return worker

    def worker_count(self) -> int:
        """Workers as /health counts them."""
        assert self.api is not None
        return int(wait_healthy(self.api, 0)["workers"])

    def registered(self, worker: Proc) -> bool:
        return self.record(worker) is not None

    def record(self, worker: Proc) -> Worker | None:
        """rq's record of `worker` in Redis (matched by pid: rq names workers itself), None if not registered."""
        return next((record for record in self._worker_records() if record.pid == worker.popen.pid), None)

    @property
    def url(self) -> str:
        assert self.api is not None
        return self.api.url

    def jobs(self, project: int) -> dict[str, Any]:
        """GET /jobs?project=ID: the project's bulk task counts."""
        response = httpx.get(f"{self.url}/jobs", params={"project": project}, timeout=10)
        response.raise_for_status()
        return dict(response.json())

    def redis(self) -> Redis:
        if self._redis is None:
            self._redis = Redis.from_url(self.env["REDIS_URL"])
        return self._redis

    def busy_job(self, worker: Proc) -> str | None:
        """The id of the job `worker` is running now (rq's own record of the worker)."""
        record = self.record(worker)
        return record.get_current_job_id() if record is not None else None

    def _worker_records(self) -> list[Worker]:
        redis = self.redis()
        interactive, _ = queue_names(self.env["QUEUE_NAME"])
        return list(Worker.all(connection=redis, queue=Queue(interactive, connection=redis)))

    def job_tasks(self, job_id: str) -> list[int]:
        """Task ids of a bulk chunk job (from its payload)."""
        job = Job.fetch(job_id, connection=self.redis(), serializer=JSONSerializer)
        return [int(task["id"]) for task in job.args[0]["tasks"]]

    def claims(self, project: int, version: str, tasks: list[int]) -> dict[int, str]:
        """For diagnostics: each task's claim in Redis (owner worker or "done") and its time to live."""
        claims = TaskClaims(self.redis(), str(project), version)
        return {task: f"{claims.holder(task)} (ttl {self.redis().ttl(claims.key(task))} s)" for task in tasks}

    def command(self, args: list[str]) -> Proc:
        """A bulk CLI command (`prelabel`, `status`, `retry`) against this API, started in the background."""
        return self.processes.start([*args, "--backend", self.url], self.env)


def finish(proc: Proc, timeout: float = WAIT_S) -> int:
    """Wait for a command; its exit code (the test fails with its log if it hangs)."""
    try:
        return proc.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.stop(signal.SIGKILL)
        raise AssertionError(f"command did not finish within {timeout:.0f} s:\n{proc.log()}") from None


def wait_for(what: str, probe: Callable[[], T | None], running: Proc, timeout: float = 180.0) -> T:
    """Poll `probe` until it returns something truthy; fail if `running` (e.g. the prelabel command) ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        if running.popen.poll() is not None:
            raise AssertionError(
                f"{running.log_path.stem} exited ({running.popen.returncode}) before {what}:\n{running.log()}"
            )
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}:\n{running.log()}")


def said(proc: Proc) -> str:
    """What a command told the user, without its progress bar and HTTP log lines."""
    lines = proc.log().replace("\r", "\n").splitlines()
    return "\n".join(line for line in lines if line.strip() and "pre-labelling:" not in line and "httpx" not in line)


def canceled_chunks(proc: Proc) -> int:
    """How many queued chunks an interrupted `prelabel` says it canceled (fails if it did not say)."""
    match = _CANCELED.search(proc.log())
    assert match, f"the interrupted prelabel did not report canceled chunks:\n{said(proc)}"
    return int(match.group(1))


def prelabel_until_done(backend: ScaledBackend, project: int) -> list[str]:
    """Run `prelabel` until it exits 0; after an exit 1 (failed chunks) run `retry`, as the command advises.

    Returns the transcript of the commands (exit codes and what they said), for failure messages.
    """
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
    raise AssertionError("prelabel never finished cleanly:\n" + "\n".join(transcript))
