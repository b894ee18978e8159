"""Sweeps of the started registry running at once (every waiting /predict, every worker, rq's own maintenance and
registry counts) act on an abandoned job exactly once: it is queued again once, or failed once, never both.

rq's StartedJobRegistry.cleanup read the expired entries and requeued each job in a later transaction, so
concurrent sweeps of one expired entry each queued the job (an interactive job ran twice, a poison job's extra
queue entry ran after it was failed). Real Redis (valkey), real rq registries, threads released together.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable

import pytest
from redis import Redis
from rq import Queue, Retry
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry, clean_registries
from rq.serializers import JSONSerializer

from backend.queueing.client import sweep_abandoned

TRIALS = 40
SWEEPERS = 6


def abandoned_job(redis: Redis, retries: int) -> tuple[Queue, Job]:
    """A job as a worker that died mid-run leaves it: "started", its started-registry entry long expired."""
    queue = Queue(f"sweeps-{uuid.uuid4().hex[:8]}", connection=redis, serializer=JSONSerializer)
    job = queue.enqueue("builtins.print", "never run", retry=Retry(max=max(retries, 1)))
    if retries == 0:
        job.retries_left = 0
        job.save()
    queue.remove(job)
    job.set_status(JobStatus.STARTED)
    redis.zadd(queue.started_job_registry.key, {f"{job.id}:{uuid.uuid4().hex}": 1})
    return queue, job


def sweeps(queue: Queue) -> list[Callable[[], object]]:
    """Every way a sweep starts: ours, rq's worker maintenance, and rq's registry counts and listings."""
    registry = StartedJobRegistry(queue=queue)
    return [
        lambda: sweep_abandoned([queue]),
        lambda: clean_registries(queue),
        lambda: registry.count,
        lambda: registry.get_job_ids(),
        lambda: queue.started_job_registry.cleanup(),
        lambda: sweep_abandoned([queue]),
    ]


def sweep_together(queue: Queue) -> None:
    ways = sweeps(queue)
    barrier = threading.Barrier(SWEEPERS)
    errors: list[BaseException] = []

    def sweep(index: int) -> None:
        barrier.wait()
        try:
            ways[index % len(ways)]()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=sweep, args=(i,)) for i in range(SWEEPERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors


@pytest.mark.parametrize("retries", [1, 0], ids=["requeued-once", "poison-failed-once"])
def test_concurrent_sweeps_act_on_an_abandoned_job_exactly_once(redis_url: str, retries: int) -> None:
    redis = Redis.from_url(redis_url)
    doubled = []
    for trial in range(TRIALS):
        queue, job = abandoned_job(redis, retries)
        sweep_together(queue)
        queued = queue.get_job_ids().count(job.id)
        failed = job.id in queue.failed_job_registry
        assert redis.zcard(queue.started_job_registry.key) == 0
        job.refresh()
        if retries:
            if (queued, failed, job.get_status()) != (1, False, JobStatus.QUEUED):
                doubled.append((trial, queued, failed))
        elif (queued, failed, job.get_status()) != (0, True, JobStatus.FAILED):
            doubled.append((trial, queued, failed))
        assert job.retries_left == 0
    assert not doubled, f"(trial, times queued, failed) where the job was not handled exactly once: {doubled}"
