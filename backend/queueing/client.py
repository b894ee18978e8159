"""API side of the queue: enqueue prediction jobs by name, wait for their outcomes. Never imports torch."""

from __future__ import annotations

import hashlib
import logging
import math
import socket
import time
import traceback
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from redis import Redis
from redis import exceptions as redis_errors
from redis.exceptions import OutOfMemoryError, RedisError, WatchError
from rq import Queue, Retry, Worker
from rq.exceptions import AbandonedJobError, DuplicateJobError, NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.utils import current_timestamp, now

from backend.errors import QueueUnavailableError, RedisFullError
from backend.queueing import routing
from backend.queueing.messages import ChunkJob, PredictJob, ReviewJob
from backend.queueing.transient import TransientRetry, restore_retries
from backend.redis_replies import text

log = logging.getLogger(__name__)

# Enqueued by dotted name so the API process never imports the model code.
PREDICT_JOB = "backend.jobs.predict_task"
PRELABEL_JOB = "backend.prelabel.prelabel_chunk"
REVIEW_JOB = "backend.review_job.review_event"
# A review job of one task compares that task's annotations: its own timeout (at most JOB_TIMEOUT), so one
# pathological annotation cannot hold a worker that interactive requests wait on for long. START_TRAINING, which
# rescans the project, and ANNOTATIONS_DELETED run under JOB_TIMEOUT.
REVIEW_JOB_TIMEOUT_S = 120
# A task's "review pending" marker lives at most this long (a job lost before it started frees it then).
REVIEW_PENDING_TTL_S = 3600
# How often a waiting request sweeps the started-job registry for jobs whose worker died.
ABANDONED_SWEEP_S = 1.0
# A job whose worker died is queued again this many times (rq's Retry, which every registry cleanup honours,
# the API's, the workers' and rq's own); one more death fails it as a poison task, never retried again.
# An exception raised by the job itself is its answer and does not spend this (HeartbeatWorker.handle_job_failure):
# it fails the job, or, a bulk chunk's transient failure, schedules it again (backend.queueing.transient).
CRASH_RETRIES = 1
_ABANDONED = "AbandonedJobError"
# A sweep's compare-and-act on one expired entry is tried again this often when a concurrent write (a heartbeat,
# another job starting) touched the registry or the job meanwhile; what is left, the next sweep takes.
_SWEEP_ATTEMPTS = 5
_RETRYABLE_STATUSES = {JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED}


def queue_error(exc: RedisError, doing: str) -> QueueUnavailableError:
    """The error to raise for `exc` met while `doing`: RedisFullError when Redis is out of memory
    (maxmemory with noeviction refuses writes), else QueueUnavailableError."""
    if isinstance(exc, OutOfMemoryError):
        return RedisFullError(
            f"Redis is full (it reached its maxmemory), so {doing} failed: free memory, raise maxmemory or let "
            f"finished jobs expire (RESULT_TTL, FAILURE_TTL); Redis said: {exc}"
        )
    state = "unreachable" if isinstance(exc, (redis_errors.ConnectionError, redis_errors.TimeoutError)) else "failing"
    return QueueUnavailableError(f"Redis is {state}, so {doing} failed: {exc}")


@dataclass(frozen=True, slots=True)
class JobLimits:
    """rq lifetimes, in seconds, and how bulk chunks that failed only transiently are retried
    (backend.queueing.transient; interactive jobs never are)."""

    job_timeout: int
    result_ttl: int
    failure_ttl: int
    transient: TransientRetry = field(default_factory=TransientRetry)


@dataclass(frozen=True, slots=True)
class JobOutcome:
    """What became of one job: its prediction (finished), its error (failed), or neither (still pending)."""

    job_id: str
    state: Literal["finished", "failed", "pending"]
    prediction: dict[str, Any] | None = None
    error: str | None = None


def queue_names(prefix: str) -> tuple[str, str]:
    """(interactive, bulk) queue names; workers listen in this order, so interactive work goes first."""
    return f"{prefix}-interactive", f"{prefix}-bulk"


def review_pending_key(prefix: str, project: int, task: int) -> str:
    """The marker of a review job of `task` waiting in the queue (PredictionQueue.submit_review)."""
    return f"{prefix}:reviews:pending:{project}:{task}"


def review_queue_name(prefix: str) -> str:
    """The queue of review jobs (Label Studio's annotation events), which workers take after the other two."""
    return f"{prefix}-reviews"


def worker_queue_names(prefix: str) -> tuple[str, str, str]:
    """Every queue a worker listens on, in the order it takes work: interactive, bulk, reviews."""
    return (*queue_names(prefix), review_queue_name(prefix))


def chunk_job_id(chunk: ChunkJob) -> str:
    """Deterministic id of a bulk chunk, bulk-<project>-<digest>: the same tasks of a project for the same model
    version (and force) map to one job, so two prelabel runs over the same tasks (or a double click) re-attach
    instead of queueing twice. The project prefix lists a project's chunks (cancel, retry); nothing else is
    read back from the id (a run records each chunk's task count, see backend.queueing.bulk)."""
    key = f"{chunk.model_version}\n{chunk.force}\n{','.join(map(str, sorted(chunk.task_ids)))}"
    key += "\nembeddings" if chunk.embeddings else ""  # another job: it also fills the on-disk embedding cache
    return f"{chunk_prefix(chunk.project)}{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def chunk_prefix(project: str) -> str:
    """The start of every chunk job id of `project` (ids queued by earlier versions too)."""
    return f"bulk-{_safe(project)}-"


def _safe(text: str) -> str:
    return "".join(ch for ch in text if ch.isalnum()) or "none"


def prediction_job_id(project: str, task: Mapping[str, Any], image_ref: str, model_version: str) -> str:
    """Deterministic job id: the same task, image and model version map to the same job.

    A retried or double-clicked request re-attaches to the running or finished job instead of
    computing the prediction twice. rq ids allow only letters, digits, '_' and '-'.
    """
    task_key = str(task.get("id")) if task.get("id") is not None else "anon"
    digest = hashlib.sha256(f"{project}\n{task_key}\n{image_ref}\n{model_version}".encode()).hexdigest()[:16]
    return f"pred-{_safe(project)}-{_safe(task_key)}-{digest}"


class PredictionQueue:
    """Enqueue job messages on the interactive, bulk or reviews queue and collect results, over one Redis.

    An interactive job may be routed to the own queue of the worker that holds its image's embedding
    (backend.queueing.routing); `route_wait`: seconds it may wait there before a waiting request moves it to the
    shared interactive queue (CLICK_ROUTE_WAIT).
    """

    def __init__(
        self, redis: Redis, prefix: str, limits: JobLimits, route_wait: float = routing.DEFAULT_ROUTE_WAIT_S
    ) -> None:
        self._redis = redis
        self._limits = limits
        self.prefix = prefix
        self.route_wait = route_wait
        interactive, bulk = queue_names(prefix)
        self.interactive = Queue(interactive, connection=redis, serializer=JSONSerializer)
        self.bulk = Queue(bulk, connection=redis, serializer=JSONSerializer)
        self.reviews = Queue(review_queue_name(prefix), connection=redis, serializer=JSONSerializer)

    @property
    def queues(self) -> tuple[Queue, Queue, Queue]:
        return self.interactive, self.bulk, self.reviews

    def submit(self, job_id: str, message: PredictJob | ChunkJob, route: str | None = None) -> None:
        """Queue one job, or re-attach to the job of that id; a failed or canceled one is queued again.

        A PredictJob goes to the interactive queue and runs `predict_task`, which returns the prediction; a
        ChunkJob goes to the bulk queue and runs `prelabel_chunk`, which pushes predictions to Label Studio itself.
        `route`: a worker name (`route_for`): a new PredictJob goes to that worker's own queue instead (a chunk is
        never routed; a job queued again after failing goes to the shared queue).
        """
        queue, func = (self.bulk, PRELABEL_JOB) if isinstance(message, ChunkJob) else (self.interactive, PREDICT_JOB)
        payload = message.to_json()
        routed = route if queue is self.interactive else None
        try:
            try:
                self._enqueue(queue, func, job_id, payload, route=routed)
            except DuplicateJobError:
                self._requeue_if_failed(queue, func, job_id, payload)
        except RedisError as exc:
            raise queue_error(exc, "queueing the job") from exc

    def submit_review(self, message: ReviewJob) -> str | None:
        """Queue one review job (reviews queue, `review_event`) under a fresh id and return it; None, queueing
        nothing, when a review of the message's task is waiting already: the job reads the task's latest state
        from Label Studio, so one waiting job per task serves every event (the queue is bounded by the tasks).
        The task's marker (`review_pending_key`) is set here and deleted by the job as it starts."""
        job_id = f"review-{message.project}-{uuid.uuid4().hex[:16]}"
        marker = None if message.task is None else review_pending_key(self.prefix, message.project, message.task)
        try:
            if marker is not None and not self._redis.set(marker, job_id, nx=True, ex=REVIEW_PENDING_TTL_S):
                return None
            try:
                timeout = None if marker is None else min(REVIEW_JOB_TIMEOUT_S, self._limits.job_timeout)
                self._enqueue(self.reviews, REVIEW_JOB, job_id, message.to_json(), timeout=timeout)
            except RedisError:
                if marker is not None:
                    self._redis.delete(marker)  # allowed even when Redis is full: the next event tries again
                raise
        except RedisError as exc:
            raise queue_error(exc, "queueing the review job") from exc
        return job_id

    def route_for(self, image_ref: str) -> str | None:
        """The worker whose own queue should take an interactive job of `image_ref` (routing.choose_worker), or
        None for the shared queue."""
        try:
            return routing.choose_worker(self._redis, self.prefix, self.interactive.name, image_ref)
        except RedisError as exc:
            raise queue_error(exc, "reading the image's route") from exc

    def wait(self, job_ids: Sequence[str], timeout: float) -> list[JobOutcome]:
        """Poll until every job finished or failed, or `timeout` seconds passed; outcomes in input order.

        While waiting it sweeps for jobs whose worker stopped heart-beating (`sweep_abandoned`): such a job is
        queued again once, and fails as a poison task when its second worker dies too, so a worker that dies
        mid-job costs a rerun or turns into a visible failure instead of a silent wait. A job still waiting in a
        worker's own queue after `route_wait` seconds, or whose worker is gone, is moved to the front of the
        shared interactive queue (`_rescue_if_stuck`).
        """
        outcomes: dict[str, JobOutcome] = {}
        settled: set[str] = set()  # routed jobs that need no rescue (any more)
        deadline = time.monotonic() + timeout
        next_sweep = time.monotonic() + ABANDONED_SWEEP_S
        delay = 0.02
        try:
            while True:
                for job_id in job_ids:
                    if job_id not in outcomes:
                        outcome = self._outcome(job_id, settled)
                        if outcome.state != "pending":
                            outcomes[job_id] = outcome
                now = time.monotonic()
                if len(outcomes) == len(set(job_ids)) or now >= deadline:
                    break
                if now >= next_sweep:
                    self.sweep_abandoned()
                    next_sweep = now + ABANDONED_SWEEP_S
                time.sleep(min(delay, max(0.0, deadline - now)))
                delay = min(delay * 2, 0.2)
        except RedisError as exc:
            raise queue_error(exc, "waiting for the jobs") from exc
        return [outcomes.get(job_id, JobOutcome(job_id, "pending")) for job_id in job_ids]

    def sweep_abandoned(self) -> None:
        """Queue again, or fail as poison, the jobs whose worker's heartbeat expired (see `sweep_abandoned`)."""
        sweep_abandoned(self.queues)

    def depth(self) -> dict[str, int]:
        """Jobs waiting, per queue name."""
        return {queue.name: queue.count for queue in self.queues}

    def worker_count(self) -> int:
        """Workers registered on the interactive queue (every worker listens on all three)."""
        return Worker.count(connection=self._redis, queue=self.interactive)

    def fetch_jobs(self, job_ids: Sequence[str]) -> list[Job | None]:
        """The jobs of these ids (None where expired or deleted)."""
        return Job.fetch_many(job_ids, connection=self._redis, serializer=JSONSerializer)

    def _enqueue(
        self,
        queue: Queue,
        func: str,
        job_id: str,
        payload: dict[str, Any],
        timeout: int | None = None,
        route: str | None = None,
    ) -> None:
        """Queue `func(payload)`: `payload` is the message's JSON, the one argument the job function gets;
        `timeout` (seconds) defaults to JOB_TIMEOUT; `route`: the worker whose own queue takes it (its origin stays
        `queue`). DuplicateJobError when a job of that id exists."""
        options: dict[str, Any] = {
            "args": (payload,),
            "job_id": job_id,
            "timeout": self._limits.job_timeout if timeout is None else timeout,
            "result_ttl": self._limits.result_ttl,
            "failure_ttl": self._limits.failure_ttl,
            "retry": Retry(max=CRASH_RETRIES, enqueue_at_front=True),
            "meta": self._limits.transient.meta() if queue is self.bulk else {},
        }
        if route is None:
            queue.enqueue_call(func, unique=True, **options)
        else:
            routing.enqueue_routed(self._redis, self.prefix, queue, queue.create_job(func, **options), route)

    def _requeue_if_failed(self, queue: Queue, func: str, job_id: str, payload: dict[str, Any]) -> None:
        try:
            job = Job.fetch(job_id, connection=self._redis, serializer=JSONSerializer)
        except NoSuchJobError:  # expired between the two calls
            self._enqueue(queue, func, job_id, payload)
            return
        status = job.get_status()
        if status == JobStatus.FAILED:
            requeue_failed(job)
        elif status in _RETRYABLE_STATUSES:  # stopped or canceled: never ran to the end, safe to replace
            job.delete()
            self._enqueue(queue, func, job_id, payload)

    def _outcome(self, job_id: str, settled: set[str]) -> JobOutcome:
        """The job's outcome so far; a queued routed job not in `settled` may be rescued (then settled)."""
        try:
            job = Job.fetch(job_id, connection=self._redis, serializer=JSONSerializer)
        except NoSuchJobError:
            return JobOutcome(job_id, "failed", error="job vanished from Redis (expired or deleted)")
        status = job.get_status(refresh=False)
        if status == JobStatus.FINISHED:
            return JobOutcome(job_id, "finished", prediction=job.return_value())
        if status in _RETRYABLE_STATUSES:
            return JobOutcome(job_id, "failed", error=failure_reason(job))
        if status == JobStatus.QUEUED and job_id not in settled and self._rescue_if_stuck(job):
            settled.add(job_id)
        return JobOutcome(job_id, "pending")

    def _rescue_if_stuck(self, job: Job) -> bool:
        """Move a queued job out of its worker's own queue once it waited `route_wait` seconds there or its worker
        is gone (routing.rescue: only while it is still there). True when it needs no more looking at: not
        routed, moved now, or no longer in that queue."""
        worker = routing.routed_worker(job.meta)
        if worker is None:
            return True
        waited = (now() - job.enqueued_at).total_seconds() if job.enqueued_at is not None else math.inf
        shared = self.interactive.name
        if waited < self.route_wait:
            view = routing.worker_view(self._redis, self.prefix, shared, worker)
            if view.live and view.joined:
                return False
        routing.rescue(self._redis, self.prefix, shared, job.id, worker)
        return True


def job_counts(queue: Queue) -> dict[str, int]:
    """Jobs of `queue` by state (queued, scheduled: waiting for a transient retry, started, finished, failed,
    canceled)."""
    return {
        "queued": queue.count,
        "scheduled": queue.scheduled_job_registry.count,
        "started": queue.started_job_registry.count,
        "finished": queue.finished_job_registry.count,
        "failed": queue.failed_job_registry.count,
        "canceled": queue.canceled_job_registry.count,
    }


def sweep_abandoned(queues: Sequence[Queue]) -> None:
    """Jobs whose worker's heartbeat expired: queued again while they have crash retries, else failed.

    StartedJobRegistry.cleanup does both, from the job's Retry; rq also runs it on its own (registry counts,
    job id listings, worker maintenance), which is why the retry lives in the job and not here, and why the
    cleanup itself is replaced by `cleanup_started` (exactly one of concurrent sweeps acts on an entry).
    """
    for queue in queues:
        StartedJobRegistry(queue=queue).cleanup()


def cleanup_started(
    registry: StartedJobRegistry, timestamp: float | None = None, exception_handlers: list[Any] | None = None
) -> None:
    """rq's StartedJobRegistry.cleanup made safe to run concurrently: each expired entry is abandoned by exactly
    one sweep.

    rq's own reads the expired entries, then queues each job again (or fails it) and removes the entries in a
    later transaction, so sweeps running together (every waiting request, every worker, rq's maintenance) each
    queued the same job: it ran twice, and a poison job's extra queue entry ran after it was failed. Here each
    entry is handled in one transaction that WATCHes the registry and the job: it queues (or fails) the job and
    removes the entry together, only while the entry is still there and still expired (a late heartbeat that
    renewed it means the run is alive: it is left alone). Installed as StartedJobRegistry.cleanup below.
    """
    score = timestamp if timestamp is not None else current_timestamp()
    for entry in registry.connection.zrangebyscore(registry.key, 0, score):
        _abandon(registry, text(entry), score, exception_handlers or [])


def _abandon(registry: StartedJobRegistry, entry: str, score: float, exception_handlers: list[Any]) -> bool:
    """Queue again (or fail) the job of one expired started-registry entry and remove the entry, atomically;
    False when another sweep did it first, a heartbeat renewed it, or the write kept conflicting."""
    job_id = registry.parse_job_id(entry)
    with registry.connection.pipeline() as pipeline:
        for _ in range(_SWEEP_ATTEMPTS):
            try:
                pipeline.watch(registry.key, registry.job_class.key_for(job_id))
                expiry = pipeline.zscore(registry.key, entry)
                if expiry is None or expiry > score:
                    return False
                job = _fetch_or_none(registry, job_id)
                pipeline.multi()
                if job is not None:
                    _requeue_or_fail(registry, job, pipeline)
                pipeline.zrem(registry.key, entry)
                pipeline.execute()
            except WatchError:
                continue
            if job is not None:
                _after_abandoned(registry, job, exception_handlers)
            return True
    return False


def _fetch_or_none(registry: StartedJobRegistry, job_id: str) -> Job | None:
    try:
        return registry.job_class.fetch(job_id, connection=registry.connection, serializer=registry.serializer)
    except NoSuchJobError:
        return None


def _requeue_or_fail(registry: StartedJobRegistry, job: Job, pipeline: Any) -> None:
    """rq's own handling of an abandoned job, queued on `pipeline`: retried while it has retries, else failed."""
    if job.retries_left and job.retries_left > 0:
        job.retry(registry.get_queue(), pipeline)
        return
    reason = f"Moved to {FailedJobRegistry.__name__}, due to {AbandonedJobError.__name__}, at {now()}"
    job.set_status(JobStatus.FAILED, pipeline=pipeline)
    job._handle_failure(reason, pipeline, worker_name="")


def _after_abandoned(registry: StartedJobRegistry, job: Job, exception_handlers: list[Any]) -> None:
    """What rq's cleanup does besides the requeue: failure callback, exception handlers, dependents."""
    error = AbandonedJobError()
    job.execute_failure_callback(registry.death_penalty_class, AbandonedJobError, error, traceback.extract_stack())
    for handler in exception_handlers:
        if handler(job, AbandonedJobError, error, traceback.extract_stack()) is False:
            break
    if job.get_status(refresh=False) == JobStatus.FAILED:
        log.warning("job %s: its worker died (no heartbeat) and it has no crash retry left; failed", job.id)
        registry.get_queue().enqueue_dependents(job, refresh_job_status=False)


# Every StartedJobRegistry in the API and worker processes (both import this module), rq's own included.
StartedJobRegistry.cleanup = cleanup_started  # type: ignore[method-assign, assignment]


def requeue_failed(job: Job) -> bool:
    """Queue a failed job again, with a fresh crash retry and its transient retries back; a poison task stays
    failed (False): running it again would take down another worker."""
    if killed_workers(job):
        return False
    job.retries_left = CRASH_RETRIES
    restore_retries(job)
    # rq's own requeue: deleting a job abandoned by a dead worker fails (its execution is gone).
    job.requeue()
    return True


# Gives a job the crash retry back (HINCRBY) only while the job is there: a finished job may have expired already.
_SPARE = """
if redis.call('hexists', KEYS[1], 'retries_left') == 1 then return redis.call('hincrby', KEYS[1], 'retries_left', 1) end
return false
"""


def spare_crash_retry(redis: Redis, pid: int) -> str | None:
    """Before a deliberate kill of the worker process `pid` on this host (a stop that outlived its grace): give
    its current job back the crash retry the kill is about to spend, so a stop never counts as a worker the job
    took down (a chunk that outlived two shutdowns was failed as poison). Returns that job's id, or None when
    the worker runs none. Raises RedisError."""
    host = socket.gethostname()
    for worker in Worker.all(connection=redis, serializer=JSONSerializer):
        if worker.pid == pid and worker.hostname == host:
            job_id = worker.get_current_job_id()
            if job_id is not None:
                redis.eval(_SPARE, 1, Job.key_for(job_id))
            return job_id
    return None


def killed_workers(job: Job) -> int:
    """How many workers died running this failed job (0 when it failed otherwise or did not fail)."""
    result = job.latest_result()
    if result is None or _ABANDONED not in (result.exc_string or ""):
        return 0
    return CRASH_RETRIES + 1 if job.retries_left == 0 else 1


def failure_reason(job: Job) -> str:
    """The last line of the job's recorded exception (the whole traceback stays in rq's record), or why a
    job whose workers died is not retried."""
    killed = killed_workers(job)
    if killed:
        return f"took down {killed} worker{'s' if killed > 1 else ''}; not retried"
    result = job.latest_result()
    text = (result.exc_string if result is not None else None) or "job failed without a recorded reason"
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else text
