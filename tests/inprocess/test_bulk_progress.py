"""Bulk progress counts tasks, not chunks: a task in several chunks (a double click, overlapping runs, a retry)
counts once, in its most advanced state. The tasks come from each job's ChunkJob message, the count of an
expired chunk from the run's record (nothing is parsed out of a job id). Real rq jobs on a real
Redis-protocol server."""

from __future__ import annotations

import json
import uuid

from redis import Redis
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from backend.queueing.bulk import META_FAILED, RUN_KEY, BulkRuns, RecordedChunk, _count
from backend.queueing.client import JobLimits, PredictionQueue, chunk_job_id
from backend.queueing.messages import ChunkJob, QueuedTask

LIMITS = JobLimits(job_timeout=600, result_ttl=600, failure_ttl=600)


def a_chunk(tasks: list[int], project: str = "p") -> ChunkJob:
    """A chunk message of `tasks`, of a model version of its own (its job id is new to this Redis)."""
    queued = tuple(QueuedTask(task, {"image": f"http://images/{task}.png"}) for task in tasks)
    return ChunkJob(project, queued, label_config_ref="0" * 64, model_version=f"v-{uuid.uuid4().hex[:8]}")


def chunk(
    redis: Redis, tasks: list[int], status: JobStatus, failed: list[int] | None = None
) -> tuple[RecordedChunk, Job]:
    """A chunk job as the API queues it (its message lists the tasks), left in `status`."""
    message = a_chunk(tasks)
    job_id = chunk_job_id(message)
    job = Job.create(
        "backend.prelabel.prelabel_chunk",
        args=(message.to_json(),),
        id=job_id,
        connection=redis,
        serializer=JSONSerializer,
    )
    if failed is not None:
        job.meta[META_FAILED] = failed
    job.save()
    job.set_status(status)
    return RecordedChunk(job_id, len(tasks)), Job.fetch(job_id, connection=redis, serializer=JSONSerializer)


def test_overlapping_chunks_count_each_task_once(redis_url: str) -> None:
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


def test_failed_tasks_count_until_another_chunk_does_them(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    failed_chunk = chunk(redis, [10, 11, 12], JobStatus.FAILED, failed=[11])
    canceled = chunk(redis, [13, 14], JobStatus.CANCELED)  # Ctrl-C before it ran: none of its tasks is done
    progress = _count([failed_chunk, canceled])
    assert (progress.total, progress.done, progress.failed) == (5, 2, 3)
    assert [line.split(":")[0] for line in progress.failures] == [failed_chunk[0].job_id, canceled[0].job_id]

    retried = chunk(redis, [11, 13, 14], JobStatus.FINISHED)
    progress = _count([failed_chunk, canceled, retried])
    assert (progress.total, progress.done, progress.failed, progress.failures) == (5, 5, 0, [])
    assert progress.finished


def runs_on(redis_url: str) -> tuple[Redis, PredictionQueue, BulkRuns]:
    """A fresh bulk queue (no worker listens: what is queued stays queued) and its runs."""
    redis = Redis.from_url(redis_url)
    queue = PredictionQueue(redis, f"progress-{uuid.uuid4().hex[:8]}", LIMITS)
    return redis, queue, BulkRuns(redis, queue)


def test_an_expired_chunk_of_a_run_counts_its_recorded_tasks_as_failed(redis_url: str) -> None:
    """The run's record keeps each chunk's task count: a chunk whose job is gone counts all its tasks failed."""
    redis, queue, runs = runs_on(redis_url)
    kept, expired = a_chunk([1, 2]), a_chunk([3, 4, 5])
    run_id = runs.start("p", [kept, expired])
    Job.fetch(chunk_job_id(expired), connection=redis, serializer=JSONSerializer).delete()  # it expired

    progress = runs.progress(run_id)
    assert progress is not None
    assert (progress.total, progress.queued, progress.failed) == (5, 2, 3)
    assert progress.failures == [f"{chunk_job_id(expired)}: expired"]
    assert not any("-n" in job_id for job_id in queue.bulk.get_job_ids()), "a chunk id still carries its count"


def test_a_run_recorded_in_the_earlier_format_is_still_read(redis_url: str) -> None:
    """{"jobs": [ids]} (before counts were recorded): live chunks count the tasks their messages list, an
    expired one counts one task failed."""
    redis, queue, runs = runs_on(redis_url)
    live = a_chunk([1, 2, 3])
    queue.submit(chunk_job_id(live), live)
    gone = "bulk-p-n4-0123456789abcdef"  # an id of the earlier format, its job expired
    redis.set(RUN_KEY.format("earlier"), json.dumps({"project": "p", "jobs": [chunk_job_id(live), gone]}))

    progress = runs.progress("earlier")
    assert progress is not None
    assert (progress.total, progress.queued, progress.failed) == (4, 3, 1)
    assert progress.failures == [f"{gone}: expired"]


def test_project_progress_counts_the_chunks_redis_still_holds(redis_url: str) -> None:
    """No run record: the project's chunk jobs as listed by its queue; one deleted meanwhile counts nothing."""
    redis, _, runs = runs_on(redis_url)
    project = f"p{uuid.uuid4().hex[:6]}"
    first, deleted = a_chunk([1, 2], project), a_chunk([3], project)
    runs.start(project, [first, deleted])
    Job.fetch(chunk_job_id(deleted), connection=redis, serializer=JSONSerializer).delete()

    progress = runs.project_progress(project)
    assert (progress.total, progress.queued, progress.failed, progress.failures) == (2, 2, 0, [])
