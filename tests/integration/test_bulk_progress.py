"""Bulk progress counts tasks, not chunks: a task in several chunks (a double click, overlapping runs, a retry)
counts once, in its most advanced state. Real rq jobs on a real Redis-protocol server."""

from __future__ import annotations

import uuid

from redis import Redis
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from backend.queueing.bulk import META_FAILED, _count
from tests.integration.conftest import redis_url  # noqa: F401  (session fixture)


def chunk(redis: Redis, tasks: list[int], status: JobStatus, failed: list[int] | None = None) -> tuple[str, Job]:
    """A chunk job as the API queues it (its payload lists the tasks), left in `status`."""
    job_id = f"bulk-p-n{len(tasks)}-{uuid.uuid4().hex[:8]}"
    payload = {"project": "p", "tasks": [{"id": t, "data": {}} for t in tasks], "label_config": "", "model_version": ""}
    job = Job.create(
        "backend.prelabel.prelabel_chunk", args=(payload,), id=job_id, connection=redis, serializer=JSONSerializer
    )
    if failed is not None:
        job.meta[META_FAILED] = failed
    job.save()
    job.set_status(status)
    return job_id, Job.fetch(job_id, connection=redis, serializer=JSONSerializer)


def test_overlapping_chunks_count_each_task_once(redis_url: str) -> None:  # noqa: F811
    redis = Redis.from_url(redis_url)
    progress = _count(
        [
            chunk(redis, [1, 2, 3, 4], JobStatus.FINISHED),
            chunk(redis, [3, 4, 5, 6], JobStatus.QUEUED),  # the second click's chunk: 3 and 4 are done already
            chunk(redis, [6, 7], JobStatus.STARTED),
        ]
    )
    assert (progress.total, progress.done, progress.queued, progress.running, progress.failed) == (7, 4, 1, 2, 0)
    assert progress.failures == [] and not progress.finished


def test_failed_tasks_count_until_another_chunk_does_them(redis_url: str) -> None:  # noqa: F811
    redis = Redis.from_url(redis_url)
    failed_chunk = chunk(redis, [10, 11, 12], JobStatus.FAILED, failed=[11])
    canceled = chunk(redis, [13, 14], JobStatus.CANCELED)  # Ctrl-C before it ran: none of its tasks is done
    progress = _count([failed_chunk, canceled])
    assert (progress.total, progress.done, progress.failed) == (5, 2, 3)
    assert [line.split(":")[0] for line in progress.failures] == [failed_chunk[0], canceled[0]]

    retried = chunk(redis, [11, 13, 14], JobStatus.FINISHED)
    progress = _count([failed_chunk, canceled, retried])
    assert (progress.total, progress.done, progress.failed, progress.failures) == (5, 5, 0, [])
    assert progress.finished


def test_an_expired_chunk_counts_its_tasks_as_failed() -> None:
    progress = _count([("bulk-p-n3-deadbeef", None)])
    assert (progress.total, progress.failed) == (3, 3)
    assert progress.failures == ["bulk-p-n3-deadbeef: expired"]
