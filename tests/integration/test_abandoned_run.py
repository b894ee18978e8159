"""A worker whose run of a job was abandoned (no heartbeat: cut off or stalled) and requeued meanwhile comes
back: it must not write its outcome over the job's current run (FAILED over another worker's FINISHED).

Worker A (a process) takes the job; SIGSTOP freezes it, as a network partition would (no beats, no Redis);
the job's started-registry entry expires, a sweep queues the job again and worker B (in this process) runs it
to FINISHED; then A resumes and its stale run ends, raising or returning.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable

import pytest
from redis import Redis
from rq import Queue, Retry, get_current_job
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from backend.queueing.client import sweep_abandoned
from backend.queueing.worker import HeartbeatWorker
from tests.support.paths import REPO

HEARTBEAT_S = 0.5
WAIT_S = 60.0


def stale_or_fresh(counter: str, resume: str, stale_raises: bool) -> str:
    """The job: its first run waits for `resume` and then fails or returns "stale"; a later run returns "fresh"."""
    redis = get_current_job().connection
    if redis.incr(counter) > 1:
        return "fresh"
    while not redis.exists(resume):
        time.sleep(0.05)
    if stale_raises:
        raise ConnectionError("the stale run met a Redis error")
    return "stale"


def until(what: str, probe: Callable[[], bool], timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


def start_worker(redis_url: str, queue: str) -> subprocess.Popen[str]:
    """A HeartbeatWorker process that takes one job from `queue` and exits once it is empty (burst)."""
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import logging
            from redis import Redis
            from rq import Queue
            from rq.serializers import JSONSerializer
            from backend.queueing.worker import HeartbeatWorker
            logging.basicConfig(level=logging.INFO)
            redis = Redis.from_url({redis_url!r})
            queue = Queue({queue!r}, connection=redis, serializer=JSONSerializer)
            worker = HeartbeatWorker([queue], connection=redis, serializer=JSONSerializer, heartbeat_s={HEARTBEAT_S})
            worker.work(burst=True, with_scheduler=False)
        """),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def frozen_mid_job(redis_url: str, stale_raises: bool) -> tuple[Redis, Queue, Job, subprocess.Popen[str], str]:
    """Worker A running the job, then frozen (SIGSTOP); the job's resume key is returned last."""
    redis = Redis.from_url(redis_url)
    name = f"abandoned-{uuid.uuid4().hex[:8]}"
    queue = Queue(name, connection=redis, serializer=JSONSerializer)
    counter, resume = f"{name}:runs", f"{name}:resume"
    job = queue.enqueue(
        "tests.integration.test_abandoned_run.stale_or_fresh",
        counter,
        resume,
        stale_raises,
        job_id=f"{name}-job",
        retry=Retry(max=1),
        job_timeout=600,
    )
    worker_a = start_worker(redis_url, name)

    def running() -> bool:
        assert worker_a.poll() is None, f"worker A exited:\n{worker_a.communicate()[0]}"
        return redis.get(counter) == b"1"

    until("worker A runs the job", running)
    worker_a.send_signal(signal.SIGSTOP)  # cut off: no heartbeat, no Redis
    return redis, queue, job, worker_a, resume


def resumed(worker_a: subprocess.Popen[str], redis: Redis, resume: str) -> str:
    """Let worker A go on (SIGCONT): its run ends and it exits; its output."""
    redis.set(resume, 1)
    worker_a.send_signal(signal.SIGCONT)
    output, _ = worker_a.communicate(timeout=WAIT_S)
    assert worker_a.returncode == 0, output
    return output


@pytest.mark.parametrize("stale_raises", [True, False], ids=["stale-run-fails", "stale-run-returns"])
def test_a_run_abandoned_and_redone_elsewhere_does_not_overwrite_the_jobs_outcome(
    redis_url: str,
    stale_raises: bool,
) -> None:
    redis, queue, job, worker_a, resume = frozen_mid_job(redis_url, stale_raises)
    try:

        def requeued() -> bool:
            sweep_abandoned([queue])
            return job.get_status(refresh=True) == JobStatus.QUEUED

        until("the abandoned run is swept and the job queued again", requeued)
        worker_b = HeartbeatWorker([queue], connection=redis, serializer=JSONSerializer, heartbeat_s=HEARTBEAT_S)
        assert worker_b.work(burst=True, with_scheduler=False)
        assert job.get_status(refresh=True) == JobStatus.FINISHED

        output = resumed(worker_a, redis, resume)  # A comes back and its stale run ends

        assert job.get_status(refresh=True) == JobStatus.FINISHED, f"the stale run overwrote the status:\n{output}"
        assert job.id not in queue.failed_job_registry, output
        result = Job.fetch(job.id, connection=redis, serializer=JSONSerializer).latest_result()
        assert result is not None and result.return_value == "fresh", f"the stale run's outcome was kept:\n{output}"
        assert "this run was abandoned" in output, output
    finally:
        worker_a.kill()
        worker_a.wait()


def test_a_late_run_nobody_swept_keeps_its_outcome(redis_url: str) -> None:
    """Beats missed past the heartbeat TTL, but no sweep queued the job again: the run is still the job's."""
    redis, queue, job, worker_a, resume = frozen_mid_job(redis_url, stale_raises=False)
    try:
        registry = queue.started_job_registry
        until("the frozen run's entry expires", lambda: bool(registry.get_expired_job_ids()))
        output = resumed(worker_a, redis, resume)
        assert job.get_status(refresh=True) == JobStatus.FINISHED, output
        result = Job.fetch(job.id, connection=redis, serializer=JSONSerializer).latest_result()
        assert result is not None and result.return_value == "stale", output
        assert "this run was abandoned" not in output, output
    finally:
        worker_a.kill()
        worker_a.wait()
