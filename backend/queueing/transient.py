"""Retries of bulk chunks that failed only transiently: later, with a doubling back-off, a bounded number of times.

A chunk whose failed tasks all failed transiently (its TasksFailedError is `retryable`: an image fetch timed out,
a connection failed, an HTTP 5xx, 408 or 429) is run again later, for the tasks its last run failed only
(backend.prelabel reads them from the job's meta; with `force` too). The policy travels with the job, in its meta,
from when it is queued (`TransientRetry.meta`): TRANSIENT_RETRIES reruns, the first TRANSIENT_RETRY_DELAY seconds
after the failure, each next one after twice the wait before it (at most MAX_INTERVAL_S). A failure that would
repeat fails the job at once, and so does the failure of its last retry, with that failure's reason.

The wait is rq's own: the job is put in its queue's ScheduledJobRegistry, status "scheduled" (as rq's Retry with
an interval does), and moved back to the queue when due. Workers run without rq's scheduler (it forks a process
from a worker that holds CUDA and threads), so each worker's sweeper thread does that move (`enqueue_due`); of
concurrent sweeps exactly one moves a given job.

These retries are counted apart from the crash retry (rq's Retry, `retries_left`, spent when a worker dies
mid-job; backend.queueing.client.CRASH_RETRIES): a chunk that failed transiently is still queued again once after
a worker death, and one that took down two workers is failed as poison whatever transient retries it has left.

Interactive jobs get none: a /predict (someone in the editor, or Label Studio's batch request) waits on them, at
most PREDICT_TIMEOUT, and a rerun TRANSIENT_RETRY_DELAY later would hold that request for it, often to its deadline
and an answer of "pending"; the failure is answered at once instead (that task gets an empty prediction, and Label
Studio asks again when the user does). They are queued without transient retries in their meta (client._enqueue).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from redis.exceptions import WatchError
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import ScheduledJobRegistry
from rq.utils import current_timestamp, now

log = logging.getLogger(__name__)

# Job meta keys: the waits before each retry (seconds, one per retry), and how many of them were spent.
META_INTERVALS = "transient_retry_intervals"
META_SPENT = "transient_retries"
# No wait between two retries is longer than this, however many retries double it.
MAX_INTERVAL_S = 3600
# A sweep's compare-and-act on one due entry is tried again this often when a concurrent write touched it.
_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class TransientRetry:
    """How often a chunk that failed only transiently is run again (`retries`, 0: never), and the wait before
    the first rerun (`delay_s`, seconds), doubled before each next one and at most MAX_INTERVAL_S."""

    retries: int = 0
    delay_s: int = 30

    def intervals(self) -> list[int]:
        """The wait before each retry, in seconds."""
        return [min(self.delay_s * 2**n, MAX_INTERVAL_S) for n in range(self.retries)]

    def meta(self) -> dict[str, Any]:
        """The job meta a chunk queued under this policy starts with (none when it has no retries)."""
        return {META_INTERVALS: self.intervals(), META_SPENT: 0} if self.retries > 0 else {}


def next_interval(job: Job) -> int | None:
    """Seconds to wait before `job`'s next transient retry, or None when it has none left (or none at all).

    Reads the meta again from Redis: the job function wrote its own keys there (the failed tasks) meanwhile.
    """
    meta = job.get_meta(refresh=True)
    intervals = meta.get(META_INTERVALS) or []
    spent = int(meta.get(META_SPENT) or 0)
    return int(intervals[spent]) if spent < len(intervals) else None


def schedule_retry(job: Job, queue: Queue, interval_s: int, pipeline: Any) -> None:
    """Spend one of `job`'s transient retries and schedule it on `queue` in `interval_s` seconds, on `pipeline`
    (rq's Job.retry with an interval, without touching the crash retry, `retries_left`)."""
    job.meta[META_SPENT] = spent(job) + 1
    queue.schedule_job(job, now() + timedelta(seconds=interval_s), pipeline=pipeline)
    total = len(job.meta.get(META_INTERVALS) or [])
    log.warning("job %s failed transiently: transient retry %d of %d in %d s", job.id, spent(job), total, interval_s)


def spent(job: Job) -> int:
    """How many transient retries `job` has had (from its meta as loaded)."""
    return int(job.meta.get(META_SPENT) or 0)


def restore_retries(job: Job) -> None:
    """Give `job` its transient retries back (a failed chunk queued again on request); saved with the job."""
    if META_INTERVALS in job.meta:
        job.meta[META_SPENT] = 0


def enqueue_due(queues: Sequence[Queue]) -> int:
    """Move the jobs of these queues whose scheduled time has come back to their queue; returns how many.

    rq's scheduler (RQScheduler.enqueue_scheduled_jobs) does this under a lock only one scheduler holds; here
    every worker sweeps, so each entry is moved in one transaction that WATCHes the registry and the job: it
    queues the job and removes the entry together, only while the entry is still there and due. A job no longer
    "scheduled" (canceled, deleted) has its entry removed and is not queued. Raises RedisError.
    """
    moved = 0
    for queue in queues:
        registry = queue.scheduled_job_registry
        for job_id in registry.get_jobs_to_schedule(current_timestamp()):
            moved += _enqueue_if_due(registry, queue, job_id)
    return moved


def _enqueue_if_due(registry: ScheduledJobRegistry, queue: Queue, job_id: str) -> bool:
    """Queue the job of one due scheduled entry and remove the entry, atomically; False when another sweep did it
    first, the entry is not due, the job is gone or no longer scheduled, or the write kept conflicting."""
    with queue.connection.pipeline() as pipeline:
        for _ in range(_ATTEMPTS):
            try:
                pipeline.watch(registry.key, Job.key_for(job_id))
                due = pipeline.zscore(registry.key, job_id)
                if due is None or due > current_timestamp():
                    return False
                job = _scheduled_job(queue, job_id)
                pipeline.multi()
                if job is not None:
                    queue._enqueue_job(job, pipeline=pipeline, at_front=job.should_enqueue_at_front())
                pipeline.zrem(registry.key, job_id)
                pipeline.execute()
            except WatchError:
                continue
            if job is not None:
                log.info("job %s: transient retry %d queued", job_id, spent(job))
            return job is not None
    return False


def _scheduled_job(queue: Queue, job_id: str) -> Job | None:
    try:
        job = Job.fetch(job_id, connection=queue.connection, serializer=queue.serializer)
    except NoSuchJobError:
        return None
    return job if job.get_status(refresh=False) == JobStatus.SCHEDULED else None
