"""Bulk chunks that failed only transiently run again later, with a doubling wait and a cap; nothing else does.

Real parts: the embedded valkey, rq jobs queued by PredictionQueue (as the API queues them), the real bulk job
(backend.prelabel.prelabel_chunk) on a PredictionFlow over the tiny random models and the real image fetcher,
run by the real worker (run_worker, burst) and the worker's own sweeper (`_sweep_until`); an image server whose
images answer an HTTP error status a set number of times first, counting requests. Only Label Studio is a double
(an in-memory prediction store). Tests check the scheduled waits (30 s, 60 s, ...), then move a retry's time to now
instead of waiting it out, and wait on the job's state, never on speed or the clock.
"""

from __future__ import annotations

import http.server
import io
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from backend import jobs
from backend.flow import PredictionFlow
from backend.labelstudio.config import parse_label_config
from backend.queueing.bulk import BulkRuns
from backend.queueing.client import (
    CRASH_RETRIES,
    JobLimits,
    PredictionQueue,
    chunk_job_id,
    failure_reason,
    killed_workers,
    prediction_job_id,
    requeue_failed,
    sweep_abandoned,
)
from backend.queueing.configs import store_config
from backend.queueing.fleet import Announcement
from backend.queueing.messages import ChunkJob, PredictJob, QueuedTask
from backend.queueing.stats import WorkerStats
from backend.queueing.transient import MAX_INTERVAL_S, META_INTERVALS, META_SPENT, TransientRetry, enqueue_due
from backend.queueing.worker import _sweep_until, run_worker
from backend.settings import Settings
from tests.support.images import draw_scene
from tests.support.processes import tiny_backend_env
from tests.support.serving import serving
from tests.support.workers import settings_of

XML = (
    '<View><Image name="image" value="$image"/>'
    '<BrushLabels name="tag" toName="image"><Label value="cat"/></BrushLabels></View>'
)
HEARTBEAT_S = 0.5  # as tests/support/processes.py: its TTL (2 s) outlives a beat on a loaded machine
# Bounds on waits for a state: far beyond what any machine needs; reaching one is a failure, not a timing.
STATE_DEADLINE_S = 120.0


@dataclass
class FlakyImages:
    """GET /<name>: a PNG, after `failures[name]` answers of `status[name]` (503 unless set); every request counted.
    A name without an entry in `ok` answers 404."""

    png: bytes
    ok: set[str] = field(default_factory=set)
    failures: dict[str, int] = field(default_factory=dict)
    status: dict[str, int] = field(default_factory=dict)
    requests: Counter[str] = field(default_factory=Counter)
    url: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, name: str, failures: int = 0, status: int = 503) -> None:
        """Serve the image as `name`, after `failures` answers of `status`."""
        self.ok.add(name)
        self.failures[name] = failures
        self.status[name] = status

    def answer(self, name: str) -> int:
        """The status for this request of `name` (200: the image), counting it."""
        with self.lock:
            self.requests[name] += 1
            if self.requests[name] <= self.failures.get(name, 0):
                return self.status.get(name, 503)
        return 200 if name in self.ok else 404


class _FlakyHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        images: FlakyImages = self.server.images  # type: ignore[attr-defined]
        status = images.answer(self.path.rsplit("/", 1)[-1])
        body = images.png if status == 200 else b"try later"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def flaky_images() -> Iterator[FlakyImages]:
    buffer = io.BytesIO()
    draw_scene(64, 48, (120, 170, 90)).save(buffer, format="PNG")
    images = FlakyImages(buffer.getvalue())
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FlakyHandler)
    httpd.images = images  # type: ignore[attr-defined]
    httpd.daemon_threads = True
    with serving(httpd) as url:
        images.url = url
        yield images


@dataclass
class MemoryStudio:
    """Label Studio as a chunk sees it (backend.prelabel.PredictionStore): predictions created, per task."""

    created: list[int] = field(default_factory=list)

    def prediction_ids(self, task: int, model_version: str) -> list[int]:
        return []

    def create_prediction(self, task: int, prediction: dict[str, Any]) -> object:
        self.created.append(task)
        return {"id": len(self.created)}

    def delete_prediction(self, prediction: int) -> None:
        raise AssertionError("nothing is replaced here")


@pytest.fixture(scope="module")
def settings(tiny_detector_dir: Path, tiny_hf_sam_dir: Path) -> Settings:
    return settings_of(tiny_backend_env(tiny_detector_dir, tiny_hf_sam_dir))


@pytest.fixture(scope="module")
def flow(settings: Settings) -> Iterator[PredictionFlow]:
    """The worker's flow over the tiny models and the real image fetcher (loopback allowed)."""
    flow = PredictionFlow.load(settings)
    yield flow
    if flow.fetcher is not None:
        flow.fetcher.close()


@dataclass
class Backend:
    """A queue as the API holds it, the installed flow's Label Studio double, and a worker to run with."""

    redis: Redis
    settings: Settings
    queue: PredictionQueue
    studio: MemoryStudio
    images: FlakyImages
    project: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    @property
    def queues(self) -> list[Queue]:
        return list(self.queue.queues)

    def chunk(self, *names: str) -> ChunkJob:
        """A chunk of one task per image name (ids 1, 2, ...), queued; its job id is chunk_job_id(chunk)."""
        ref = store_config(self.redis, XML, 3600)
        version = jobs.current_flow().model_version(parse_label_config(XML))
        tasks = tuple(QueuedTask(i, {"image": f"{self.images.url}/{name}"}) for i, name in enumerate(names, 1))
        message = ChunkJob(self.project, tasks, ref, version)
        BulkRuns(self.redis, self.queue).start(self.project, [message])
        return message

    def work(self) -> None:
        """Run what is queued now (a burst worker), as `grounded-sam worker` runs it."""
        announcement = Announcement(self.settings.model_fingerprint(), "cpu", "test")
        run_worker(self.redis, self.settings.queue_name, HEARTBEAT_S, announcement, burst=True)

    def job(self, job_id: str) -> Job:
        return Job.fetch(job_id, connection=self.redis, serializer=JSONSerializer)

    def progress(self) -> tuple[int, int, int, int]:
        """(total, queued, done, failed) tasks of the project."""
        p = BulkRuns(self.redis, self.queue).project_progress(self.project)
        return p.total, p.queued, p.done, p.failed


def with_retries(retries: int, delay_s: int = 30) -> JobLimits:
    return JobLimits(job_timeout=120, result_ttl=600, failure_ttl=600, transient=TransientRetry(retries, delay_s))


@pytest.fixture()
def backend(redis_url: str, settings: Settings, flow: PredictionFlow) -> Iterator[Backend]:
    redis = Redis.from_url(redis_url)
    studio = MemoryStudio()
    flow.studio = studio  # type: ignore[assignment]
    prefix = f"transient-{uuid.uuid4().hex[:8]}"
    settings = settings.model_copy(update={"queue_name": prefix})
    jobs.install(flow, WorkerStats(redis))
    try:
        with flaky_images() as images:
            yield Backend(redis, settings, PredictionQueue(redis, prefix, with_retries(3)), studio, images)
    finally:
        jobs.uninstall()


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + STATE_DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"still not {what} after {STATE_DEADLINE_S} s"
        time.sleep(0.05)


def due_now(backend: Backend, job: Job) -> None:
    """Move the time `job` is scheduled to run again to now (an expired wait, without waiting it out)."""
    assert backend.redis.zadd(backend.queue.bulk.scheduled_job_registry.key, {job.id: 1}, xx=True, ch=True) == 1


def queued_again_by_the_sweeper(backend: Backend, job: Job) -> None:
    """Make `job`'s retry due, and wait until the worker's sweeper thread (as run_worker starts it) queues it."""
    due_now(backend, job)
    stop = threading.Event()
    thread = threading.Thread(target=_sweep_until, args=(backend.queues, HEARTBEAT_S, stop), daemon=True)
    thread.start()
    try:
        wait_for(lambda: job.get_status() == JobStatus.QUEUED, "queued again by the sweeper")
    finally:
        stop.set()
        thread.join()


def scheduled_after_failure(backend: Backend, job: Job) -> float:
    """Seconds between the job's failed run's end and the time it is scheduled to run again."""
    registry = backend.queue.bulk.scheduled_job_registry
    assert job.id in registry.get_job_ids(), f"{job.id} is not scheduled"
    job.refresh()
    assert job.ended_at is not None
    return registry.get_scheduled_time(job).timestamp() - job.ended_at.timestamp()


def test_a_chunk_that_failed_transiently_runs_again_later_for_its_failed_tasks_only(backend: Backend) -> None:
    backend.images.add("good.png")
    backend.images.add("flaky.png", failures=1)  # one 503, then the image
    job_id = chunk_job_id(backend.chunk("good.png", "flaky.png"))

    backend.work()
    job = backend.job(job_id)
    assert job.get_status() == JobStatus.SCHEDULED, failure_reason(job)
    assert backend.studio.created == [1], "the task whose image came pushed at once"
    assert job.meta[META_SPENT] == 1 and job.meta[META_INTERVALS] == [30, 60, 120]
    assert scheduled_after_failure(backend, job) >= 30 - 1, "scheduled sooner than its first wait (whole seconds)"
    assert job.retries_left == CRASH_RETRIES, "the transient retry spent the crash retry"
    assert backend.progress() == (2, 2, 0, 0), "a chunk waiting for its retry counts its tasks queued"

    queued_again_by_the_sweeper(backend, job)
    backend.work()

    assert job.get_status() == JobStatus.FINISHED, failure_reason(job)
    assert job.return_value() == {"pushed": [2], "skipped": [], "lost": []}  # the rerun took only the failed task
    assert sorted(backend.studio.created) == [1, 2], "each task pushed once"
    assert backend.images.requests == {"good.png": 1, "flaky.png": 2}, "the pushed task was computed again"
    assert backend.progress() == (2, 0, 2, 0)


def test_waits_double_until_the_retries_are_spent_then_the_chunk_fails_with_its_last_reason(
    backend: Backend,
) -> None:
    backend.queue = PredictionQueue(backend.redis, backend.settings.queue_name, with_retries(2))
    backend.images.add("down.png", failures=100)
    job_id = chunk_job_id(backend.chunk("down.png"))

    waits = []
    backend.work()
    job = backend.job(job_id)
    while job.get_status() == JobStatus.SCHEDULED:
        waits.append(scheduled_after_failure(backend, job))
        queued_again_by_the_sweeper(backend, job)
        backend.work()

    job.refresh()
    assert job.get_status() == JobStatus.FAILED
    assert backend.images.requests["down.png"] == 3, "a first run and two retries"
    assert len(waits) == 2 and waits[0] >= 30 - 1 and waits[1] >= 60 - 1, f"waits of 30 s then 60 s, got {waits}"
    assert job.meta[META_SPENT] == 2 and job.meta[META_INTERVALS] == [30, 60]
    assert "HTTP 503" in failure_reason(job) and killed_workers(job) == 0, "a fetch failure, not a poison task"
    assert job.id not in backend.queue.bulk.scheduled_job_registry.get_job_ids()
    assert backend.progress() == (1, 0, 0, 1)

    assert requeue_failed(job), "a failed chunk can be queued again by hand"
    job.refresh()
    assert job.meta[META_SPENT] == 0 and job.retries_left == CRASH_RETRIES, "queued by hand with fresh retries"


@pytest.mark.parametrize(("status", "reason"), [(404, "HTTP 404"), (400, "HTTP 400")])
def test_a_failure_that_would_repeat_fails_the_chunk_at_once(backend: Backend, status: int, reason: str) -> None:
    backend.images.add("good.png")
    backend.images.add("broken.png", failures=100, status=status)
    job_id = chunk_job_id(backend.chunk("good.png", "broken.png"))

    backend.work()

    job = backend.job(job_id)
    assert job.get_status() == JobStatus.FAILED
    assert reason in failure_reason(job) and job.retries_left == 0
    assert not job.meta[META_SPENT] and job.id not in backend.queue.bulk.scheduled_job_registry.get_job_ids()
    assert backend.images.requests["broken.png"] == 1 and backend.studio.created == [1]


def test_a_chunk_mixing_transient_and_lasting_failures_fails_at_once(backend: Backend) -> None:
    backend.images.add("flaky.png", failures=1)
    job_id = chunk_job_id(backend.chunk("flaky.png", "missing.png"))

    backend.work()

    job = backend.job(job_id)
    assert job.get_status() == JobStatus.FAILED and "HTTP 404" in failure_reason(job)
    assert not job.meta[META_SPENT]


def test_interactive_jobs_are_not_retried(backend: Backend) -> None:
    backend.images.add("flaky.png", failures=1)
    ref = store_config(backend.redis, XML, 3600)
    version = jobs.current_flow().model_version(parse_label_config(XML))
    task = QueuedTask(7, {"image": f"{backend.images.url}/flaky.png"})
    job_id = prediction_job_id(backend.project, task.to_json(), "flaky.png", version)
    backend.queue.submit(job_id, PredictJob(task, ref, version))

    backend.work()

    [outcome] = backend.queue.wait([job_id], timeout=STATE_DEADLINE_S)
    assert outcome.state == "failed" and "HTTP 503" in (outcome.error or "")
    job = backend.job(job_id)
    assert META_SPENT not in job.meta and job.id not in backend.queue.interactive.scheduled_job_registry.get_job_ids()
    assert backend.images.requests["flaky.png"] == 1


def scheduled_chunk(backend: Backend) -> Job:
    """A chunk of one task that failed transiently and waits for its retry."""
    backend.images.add("flaky.png", failures=1)
    job_id = chunk_job_id(backend.chunk("flaky.png"))
    backend.work()
    job = backend.job(job_id)
    assert job.get_status() == JobStatus.SCHEDULED, failure_reason(job)
    return job


def test_canceling_a_project_cancels_its_chunks_waiting_for_a_retry(backend: Backend) -> None:
    job = scheduled_chunk(backend)

    assert BulkRuns(backend.redis, backend.queue).cancel(backend.project) == 1

    assert job.get_status() == JobStatus.CANCELED
    backend.redis.zadd(backend.queue.bulk.scheduled_job_registry.key, {job.id: 1})  # a stale entry, due
    assert enqueue_due(backend.queues) == 0 and backend.queue.bulk.count == 0, "a canceled chunk was queued again"
    assert job.id not in backend.queue.bulk.scheduled_job_registry.get_job_ids()
    assert backend.images.requests["flaky.png"] == 1


def worker_died_running(backend: Backend, job: Job) -> None:
    """Leave `job` as a worker that died running it does: "started", its started-registry entry expired."""
    backend.queue.bulk.remove(job)
    job.set_status(JobStatus.STARTED)
    backend.redis.zadd(backend.queue.bulk.started_job_registry.key, {f"{job.id}:{uuid.uuid4().hex}": 1})


def test_crash_retry_and_poison_detection_are_counted_apart_from_transient_retries(backend: Backend) -> None:
    job = scheduled_chunk(backend)
    queued_again_by_the_sweeper(backend, job)

    worker_died_running(backend, job)
    sweep_abandoned(backend.queues)
    job.refresh()
    assert job.get_status() == JobStatus.QUEUED, "a chunk that failed transiently lost its crash retry"
    assert job.retries_left == 0 and job.meta[META_SPENT] == 1

    worker_died_running(backend, job)
    sweep_abandoned(backend.queues)
    job.refresh()
    assert job.get_status() == JobStatus.FAILED, "transient retries left kept a poison chunk alive"
    assert failure_reason(job) == f"took down {CRASH_RETRIES + 1} workers; not retried"
    assert job.id not in backend.queue.bulk.scheduled_job_registry.get_job_ids()


def test_concurrent_sweeps_queue_a_due_retry_once(backend: Backend) -> None:
    job = scheduled_chunk(backend)
    due_now(backend, job)

    start = threading.Barrier(4)
    moved: list[int] = []

    def sweep() -> None:
        start.wait()
        moved.append(enqueue_due(backend.queues))

    threads = [threading.Thread(target=sweep) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sum(moved) == 1 and backend.queue.bulk.get_job_ids() == [job.id]
    assert job.get_status() == JobStatus.QUEUED


def test_waits_double_from_the_first_delay_up_to_an_hour() -> None:
    assert TransientRetry(3, 30).intervals() == [30, 60, 120]
    assert TransientRetry(10, 600).intervals()[-4:] == [MAX_INTERVAL_S] * 4 and MAX_INTERVAL_S == 3600
    assert TransientRetry(0, 30).meta() == {}, "no retries: nothing in the job's meta, as for interactive jobs"
