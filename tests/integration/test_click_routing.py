"""Clicks go to the worker that holds their image's embedding: real `serve` (API only, external Redis) and real
`worker` processes with tiny models. A route is written by hand (backend.queueing.routing.remember_route, as a
job writes it once its embedding is cached); which worker ran a click is its rq job's worker_name.

A worker is kept busy by a job that blocks until the test sets a Redis key (`hold`): a "long bulk chunk" is such
a job under a bulk- id on the bulk queue, a long click one under a pred- id on the interactive queue.
"""

from __future__ import annotations

import contextlib
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image
from redis import Redis
from rq import Queue, Worker, get_current_job
from rq.job import Job, JobStatus
from rq.registry import FinishedJobRegistry
from rq.serializers import JSONSerializer

from backend.queueing import routing
from backend.queueing.client import queue_names
from tests.support.images import serve_images
from tests.support.paths import REPO
from tests.support.processes import Proc, Processes, tiny_backend_env

CONFIG = (REPO / "label_config" / "interactive.xml").read_text()
HOLD = "tests.integration.test_click_routing.hold"
ECHO = "tests.integration.test_click_routing.echo"
WAIT_S = 300.0  # a bound on waiting for a state, never reached on any machine that works (even a loaded one)


def hold(release_key: str) -> str:
    """A job that runs until `release_key` is set (at most WAIT_S): keeps its worker busy for as long as a test
    needs."""
    redis = get_current_job().connection
    deadline = time.monotonic() + WAIT_S
    while not redis.exists(release_key) and time.monotonic() < deadline:
        time.sleep(0.05)
    return "released"


def echo(value: str) -> str:
    return value


def until(what: str, probe: Callable[[], bool], timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


@dataclass
class Backend:
    """The API, its workers by rq worker name, the Redis and an image every click is on."""

    api: Proc
    workers: dict[str, Proc]
    redis: Redis
    prefix: str
    image: str
    env: dict[str, str]

    @property
    def interactive(self) -> Queue:
        return Queue(queue_names(self.prefix)[0], connection=self.redis, serializer=JSONSerializer)

    def route(self, worker_name: str) -> None:
        routing.remember_route(self.redis, self.prefix, self.image, worker_name, 600)

    def click(self, x: float) -> Job:
        """One smart click on the image (each `x` its own job); the finished job that answered it."""
        before = set(self.finished())
        context = {"result": [_keypoint(x, 30)]}
        body = {
            "tasks": [{"id": 11, "data": {"image": self.image}}],
            "label_config": CONFIG,
            "project": "5.1",
            "params": {"context": context},
        }
        response = httpx.post(f"{self.api.url}/predict", json=body, timeout=WAIT_S)
        assert response.status_code == 200, response.text
        assert response.json()["results"][0]["result"], "a click gets its mask"
        new = set(self.finished()) - before
        assert len(new) == 1, FinishedJobRegistry(self.interactive.name, connection=self.redis).get_job_ids()
        [job_id] = new
        return Job.fetch(job_id, connection=self.redis, serializer=JSONSerializer)

    def finished(self) -> list[str]:
        """The finished jobs of clicks on task 11 of project 5 (client.prediction_job_id; "5.1" names project 5)."""
        ids = FinishedJobRegistry(self.interactive.name, connection=self.redis).get_job_ids()
        return [job_id for job_id in ids if job_id.startswith("pred-5-11-")]

    def busy_with(self, queue: Queue, job_id: str) -> tuple[str, str]:
        """Queue a `hold` job of id `job_id` on `queue`; once a worker runs it, (that worker's name, its release
        key)."""
        release = f"{self.prefix}:release:{job_id}"
        queue.enqueue_call(HOLD, args=(release,), job_id=job_id, timeout=600)
        job = Job.fetch(job_id, connection=self.redis, serializer=JSONSerializer)
        until(f"a worker runs {job_id}", lambda: job.get_status(refresh=True) == JobStatus.STARTED)
        job.refresh()
        assert job.worker_name is not None
        return job.worker_name, release


def _keypoint(x: float, y: float) -> dict[str, object]:
    return {
        "original_width": 80,
        "original_height": 60,
        "image_rotation": 0,
        "is_positive": True,
        "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": ["Person"]},
        "from_name": "click",
        "to_name": "image",
        "type": "keypointlabels",
        "origin": "manual",
    }


def ready(api: Proc, workers: int) -> None:
    """Until /health counts `workers` workers that announced their models (loading them may take long here)."""

    def counted() -> bool:
        assert api.popen.poll() is None, api.log()
        with contextlib.suppress(httpx.HTTPError, ValueError):
            body = httpx.get(f"{api.url}/health", timeout=5).json()
            return sum(int(group["workers"]) for group in body.get("fingerprints", [])) >= workers
        return False

    until(f"{workers} workers are ready", counted)


def worker_names(redis: Redis, prefix: str, procs: list[Proc]) -> dict[str, Proc]:
    """The live rq workers of these processes, by name."""
    by_pid = {proc.popen.pid: proc for proc in procs}
    interactive = Queue(queue_names(prefix)[0], connection=redis, serializer=JSONSerializer)
    return {w.name: by_pid[w.pid] for w in Worker.all(queue=interactive) if w.pid in by_pid}


@pytest.fixture(scope="module")
def backend(
    tiny_detector_dir: Path, tiny_hf_sam_dir: Path, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Backend]:
    """API and two workers, one queue name for the module (the tests run in order: the last ones stop workers)."""
    env = {**tiny_backend_env(tiny_detector_dir, tiny_hf_sam_dir), "REDIS_URL": redis_url, "PREDICT_TIMEOUT": "240"}
    processes = Processes(tmp_path_factory.mktemp("click-routing"))
    redis = Redis.from_url(redis_url)
    try:
        with serve_images(tmp_path_factory.mktemp("images"), slow_s=0) as images:
            image = images.add("street.png", Image.new("RGB", (80, 60), (120, 120, 120)))
            api = processes.serve(env, wait_workers=0)
            procs = [processes.start(["worker"], env) for _ in range(2)]
            ready(api, 2)
            workers = worker_names(redis, env["QUEUE_NAME"], procs)
            assert len(workers) == 2, workers
            yield Backend(api, workers, redis, env["QUEUE_NAME"], image, env)
    finally:
        processes.stop_all()
        redis.close()


def test_a_click_runs_on_the_worker_its_image_is_routed_to(backend: Backend) -> None:
    for n, name in enumerate(sorted(backend.workers) * 2):
        backend.route(name)
        job = backend.click(10 + n)
        assert job.worker_name == name
        assert routing.routed_worker(job.meta) == name
        assert job.origin == backend.interactive.name  # rq's registries are the shared queue's


def test_a_route_to_an_unknown_worker_is_not_taken(backend: Backend) -> None:
    backend.route("a-worker-that-never-was")
    job = backend.click(20)
    assert job.worker_name in backend.workers
    assert routing.routed_worker(job.meta) is None  # queued on the shared queue at once


def test_a_route_to_a_worker_running_a_bulk_chunk_is_not_taken(backend: Backend) -> None:
    bulk = Queue(queue_names(backend.prefix)[1], connection=backend.redis, serializer=JSONSerializer)
    busy, release = backend.busy_with(bulk, f"bulk-routing-{uuid.uuid4().hex[:8]}")
    try:
        backend.route(busy)
        job = backend.click(21)
        assert job.worker_name != busy
        assert routing.routed_worker(job.meta) is None  # never queued behind the chunk
    finally:
        backend.redis.set(release, 1)


def test_a_click_waiting_for_its_busy_worker_is_moved_to_the_shared_queue_and_answered(backend: Backend) -> None:
    """Routed to a worker that is busy with another (long) click: after CLICK_ROUTE_WAIT the waiting request
    moves it, and the other worker answers."""
    busy, release = backend.busy_with(backend.interactive, f"pred-hold-{uuid.uuid4().hex[:8]}")
    try:
        backend.route(busy)
        job = backend.click(22)
        assert routing.routed_worker(job.meta) == busy  # it did go to the busy worker's own queue first
        assert job.worker_name != busy
    finally:
        backend.redis.set(release, 1)


def test_a_worker_that_stops_moves_its_own_queue_to_the_shared_queue(backend: Backend) -> None:
    """Jobs waiting in a worker's own queue when it stops (SIGTERM: it finishes its job, then exits) are moved to
    the shared interactive queue, where the other worker runs them."""
    stopping, release = backend.busy_with(backend.interactive, f"pred-hold-{uuid.uuid4().hex[:8]}")
    [other] = [name for name in backend.workers if name != stopping]
    waiting = [f"pred-echo-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    for job_id in waiting:
        job = backend.interactive.create_job(ECHO, args=(job_id,), job_id=job_id, timeout=60)
        assert routing.enqueue_routed(backend.redis, backend.prefix, backend.interactive, job, stopping)
    proc = backend.workers.pop(stopping)
    proc.popen.send_signal(signal.SIGTERM)
    backend.redis.set(release, 1)
    assert proc.popen.wait(WAIT_S) == 0, proc.log()
    assert "2 job(s) of its own queue moved to the shared queue" in proc.log()

    for job_id in waiting:
        job = Job.fetch(job_id, connection=backend.redis, serializer=JSONSerializer)
        until(f"{job_id} finishes", lambda job=job: job.get_status(refresh=True) == JobStatus.FINISHED)
        job.refresh()
        assert job.worker_name == other
        assert job.return_value() == job_id


def test_a_click_routed_to_a_killed_worker_is_moved_and_answered(backend: Backend, tmp_path: Path) -> None:
    """A worker killed (SIGKILL) leaves its rq record for a while: its clicks still go to its own queue, and the
    waiting request moves each after CLICK_ROUTE_WAIT."""
    processes = Processes(tmp_path)
    try:
        started = processes.start(["worker"], backend.env)
        ready(backend.api, len(backend.workers) + 1)
        [(killed, _)] = worker_names(backend.redis, backend.prefix, [started]).items()
        started.popen.send_signal(signal.SIGKILL)
        started.popen.wait(WAIT_S)
        backend.route(killed)
        job = backend.click(23)
        assert routing.routed_worker(job.meta) == killed
        assert job.worker_name in backend.workers
    finally:
        processes.stop_all()
