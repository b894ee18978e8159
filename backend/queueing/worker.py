"""The worker process: an rq SimpleWorker that keeps its models loaded and heart-beats while busy.

rq's default Worker forks a work horse per job, and CUDA does not survive fork; SpawnWorker would reload
the weights per job. SimpleWorker runs jobs in-process but sends no heartbeat during a job, so a worker
killed mid-job would leave its job "started" until the job timeout. The heartbeat thread here keeps the
started-registry entry alive only while the process lives: once it dies the entry expires within
3 beats and the next registry sweep (this worker's sweeper thread, a waiting API request, rq's own
maintenance) queues the job again, once; a second death fails it as a poison task (client.CRASH_RETRIES).
A worker that was only cut off (or stalled) that long and comes back finds its run swept: it drops the run's
outcome instead of writing it over the job's new run (FAILED over another worker's FINISHED).

Failures are logged once per job: a BackendError (bad image, task data, settings) as one line with its
reason, anything else as one traceback; rq's own exception logging is replaced, not added to.

A job that raised fails, without spending its crash retry, unless it is a bulk chunk whose error is `retryable`
(every failed task failed transiently) and it has transient retries left: then it is scheduled to run again
after a doubling wait (backend.queueing.transient), and the sweeper thread queues it when that wait is over
(workers run without rq's scheduler, which would fork a process from this one).

Each worker listens on its own queue first (backend.queueing.routing: clicks routed to the worker that holds their
image's embedding), then interactive, bulk, reviews. A routed job's origin is the shared interactive queue, so it
runs, and is retried or swept, as any interactive job. A worker that stops moves what is left in its own queue to
the front of the shared interactive queue; its sweeper thread does so for the own queues of workers that died.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import uuid
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from redis import Redis
from redis.client import Pipeline
from redis.exceptions import RedisError
from rq import Queue, SimpleWorker, worker_registration
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.utils import current_timestamp

from backend.errors import BackendError
from backend.queueing import routing
from backend.queueing.client import queue_names, sweep_abandoned, worker_queue_names
from backend.queueing.fleet import Announcement, announcement_fields
from backend.queueing.transient import enqueue_due, next_interval, schedule_retry

log = logging.getLogger(__name__)

MISSED_BEATS_BEFORE_ABANDONED = 3
# rq waits 1 s, 2 s, 4 s ... between reconnection attempts when Redis is gone; a restarted embedded Redis
# is back within seconds, so the worker does not wait a minute to notice.
MAX_RECONNECT_WAIT_S = 5.0
# rq's worker record (and the announcement in it) outlives a worker killed without unregistering by this plus a
# minute; rq's default (420 s) kept a dead worker's fingerprint, and /setup's refusal when it differs, 8 minutes.
# An idle worker then wakes every 45 s to heart-beat: nothing to speak of.
WORKER_TTL_S = 60

# Compare-and-act on rq's records (KEYS: the started registry, the job's hash; ARGV: this execution's entry,
# this worker's name, now, the heartbeat TTL): this run still owns the job while its entry in the started
# registry is there (a sweep that abandons a run removes its entry in the same transaction as it queues the job
# again) and the job is "started" by this worker; if so the entry is renewed in the same step, so rq's writing
# of the outcome that follows has a full heartbeat TTL before any sweep can abandon it.
_STILL_RUNNING_IT = """
if not redis.call('zscore', KEYS[1], ARGV[1]) then return 0 end
local job = redis.call('hmget', KEYS[2], 'status', 'worker_name')
if job[1] ~= 'started' or job[2] ~= ARGV[2] then return 0 end
redis.call('zadd', KEYS[1], 'XX', tonumber(ARGV[3]) + tonumber(ARGV[4]), ARGV[1])
return 1
"""


class HeartbeatWorker(SimpleWorker):
    """SimpleWorker whose running job heart-beats every `heartbeat_s` seconds from a side thread."""

    max_connection_wait_time = MAX_RECONNECT_WAIT_S

    def __init__(
        self,
        *args: object,
        heartbeat_s: float = 5.0,
        announcement: Announcement | None = None,
        on_registered: Callable[[], None] | None = None,
        route_prefix: str | None = None,
        **kwargs: object,
    ) -> None:
        """`announcement`: what this worker runs, written into rq's worker hash with its birth (fleet.py);
        None announces nothing (the API then takes no model_version from this worker). `on_registered`: called
        once its birth is registered (the worker is ready: its "loading" record goes). `route_prefix`: the queue
        prefix whose routed clicks this worker takes on its own queue (routing.own_queue_name, which its queues
        must include): it joins the own-queue set once registered and releases its own queue as it stops."""
        # The job description is the whole payload (labeling config included): the job id is enough.
        kwargs.setdefault("worker_ttl", WORKER_TTL_S)
        super().__init__(*args, log_job_description=False, **kwargs)  # type: ignore[arg-type, misc]
        self.heartbeat_s = heartbeat_s
        self.announcement = announcement
        self._on_registered = on_registered
        self.route_prefix = route_prefix
        self._still_running_it = self.connection.register_script(_STILL_RUNNING_IT)
        # The job whose failure handle_exception saw last was transient (rq passes only the failure's text on to
        # handle_job_failure, which it calls right after, in the same thread); None when it was not.
        self._transient_failure: str | None = None

    def serialize(self) -> dict[str, object]:
        """rq's worker hash (written at birth, and again when a heartbeat finds it lost) plus the announcement."""
        return {**super().serialize(), **announcement_fields(self.announcement)}

    def register_birth(self) -> None:
        super().register_birth()  # type: ignore[no-untyped-call]
        if self.route_prefix is not None:  # after the birth: a sweeper takes a member without a record for dead
            self.connection.sadd(routing.own_queues_key(self.route_prefix), self.name)
        if self._on_registered is not None:
            self._on_registered()

    def teardown(self) -> None:
        """Before rq registers the death: no more routed clicks, and those waiting in the own queue go to the
        shared interactive queue (if Redis cannot be reached now, the sweepers of other workers move them once
        this worker's record shows it dead, and a waiting request once they waited CLICK_ROUTE_WAIT)."""
        if self.route_prefix is not None:
            try:
                routing.release(self.connection, self.route_prefix, queue_names(self.route_prefix)[0], self.name)
            except RedisError as exc:
                log.warning("worker %s could not release its own queue: %s", self.name, exc)
        super().teardown()  # type: ignore[no-untyped-call]

    def heartbeat(self, timeout: int | None = None, pipeline: Pipeline | None = None) -> None:
        """rq's heartbeat; an idle worker whose record was lost meanwhile (Redis restarted without it, flushed, or
        unreachable longer than the record's TTL) writes it again and rejoins its queues' worker sets. rq's own
        heartbeat would leave a bare hash that the API does not count, and refuse /setup for want of workers."""
        if pipeline is None and not self.connection.hexists(self.key, "birth"):
            self._register_again()
        super().heartbeat(timeout, pipeline)

    def _register_again(self) -> None:
        log.warning(
            "worker %s: its record in Redis was gone (Redis restarted or flushed); registering again", self.name
        )
        with self.connection.pipeline() as pipe:
            pipe.hset(self.key, mapping=self.serialize())  # type: ignore[arg-type]
            worker_registration.register(self, pipe)
            pipe.expire(self.key, self.worker_ttl + 60)
            if self.route_prefix is not None:
                pipe.sadd(routing.own_queues_key(self.route_prefix), self.name)
            pipe.execute()

    def get_heartbeat_ttl(self, job: Job) -> int:
        # rq keeps whole seconds: rounded up, plus one, so a sub-second heartbeat never gets a TTL under 2 s.
        return math.ceil(self.heartbeat_s * MISSED_BEATS_BEFORE_ABANDONED) + 1

    def execute_job(self, job: Job, queue: Queue) -> None:
        if queue.name != job.origin:  # routed: popped from this worker's own queue, it belongs to its origin
            queue = Queue(job.origin, connection=self.connection, serializer=self.serializer)
        done = threading.Event()
        beater = threading.Thread(target=self._beat_until, args=(job, done), daemon=True, name="rq-heartbeat")
        beater.start()
        try:
            super().execute_job(job, queue)
        finally:
            done.set()
            beater.join()

    def handle_exception(self, job: Job, *exc_info: object) -> None:
        """One log record per failed job: a known failure without traceback, an unexpected one with it."""
        exc = exc_info[1]
        self._transient_failure = job.id if isinstance(exc, BackendError) and exc.retryable else None
        if isinstance(exc, BackendError):
            log.warning("job %s failed: %s: %s", job.id, type(exc).__name__, exc)
        else:
            log.error("job %s failed unexpectedly", job.id, exc_info=exc_info)  # type: ignore[arg-type]
        for handler in self._exc_handlers:  # rq's handler chain (none is installed by this backend)
            if handler(job, *exc_info) is False:
                break

    def handle_job_failure(
        self, job: Job, queue: Queue, started_job_registry: object = None, exc_string: str = ""
    ) -> None:
        """A job that raised has its answer: its crash retry is not spent on an exception that would repeat.

        A transient failure of a job with transient retries left (only bulk chunks have any) schedules it again
        instead (`_retry_later`); any other failure, or the one after its last retry, fails it.
        """
        transient, self._transient_failure = self._transient_failure == job.id, None
        if self._abandoned_meanwhile(job):
            return
        if transient and self._retry_later(job, queue):
            return
        job.retries_left = 0
        super().handle_job_failure(job, queue, started_job_registry=started_job_registry, exc_string=exc_string)

    def _retry_later(self, job: Job, queue: Queue) -> bool:
        """Schedule `job` for its next transient retry, as rq's handle_job_failure does a retry with an interval
        (its execution cleaned up, no failure recorded); False when it has none left."""
        interval = next_interval(job)
        if interval is None:
            return False
        with self.connection.pipeline() as pipeline:
            self.cleanup_execution(job, pipeline=pipeline)
            schedule_retry(job, queue, interval, pipeline)
            self.increment_failed_job_count(pipeline)
            pipeline.execute()
        return True

    def handle_job_success(self, job: Job, queue: Queue, started_job_registry: object) -> None:
        if not self._abandoned_meanwhile(job):
            super().handle_job_success(job, queue, started_job_registry)  # type: ignore[arg-type]

    def _abandoned_meanwhile(self, job: Job) -> bool:
        """Whether this run of `job` was swept as abandoned while it ran (this worker was cut off from Redis, or
        stalled, past its heartbeat TTL), so the job was queued again and maybe finished by another worker.

        Then this run's outcome is dropped and only its own records are cleaned up: it must not write FAILED
        (or its result) over what the job's current run wrote. When Redis cannot say, rq goes on as usual.
        """
        if self.execution is None:
            return False
        keys = [job.started_job_registry.key, job.key]
        args = [self.execution.composite_key, self.name, current_timestamp(), self.get_heartbeat_ttl(job)]
        try:
            if self._still_running_it(keys=keys, args=args):
                return False
        except RedisError:
            return False
        log.warning(
            "job %s: this run was abandoned (no heartbeat) and the job queued again; its outcome is dropped", job.id
        )
        with suppress(RedisError), self.connection.pipeline() as pipeline:
            self.cleanup_execution(job, pipeline=pipeline)
            pipeline.execute()
        return True

    def _beat_until(self, job: Job, done: threading.Event) -> None:
        while not done.wait(self.heartbeat_s):
            try:
                self.maintain_heartbeats(job)
            except RedisError as exc:  # a missed beat is survivable; the next one may get through
                log.warning("heartbeat for job %s failed: %s", job.id, exc)


def run_worker(
    redis: Redis,
    queue_prefix: str,
    heartbeat_s: float,
    announcement: Announcement,
    *,
    burst: bool = False,
    alive_file: Path | None = None,
    on_registered: Callable[[], None] | None = None,
) -> bool:
    """Process jobs until stopped (SIGINT/SIGTERM: finish the current job, then exit).

    Listens on its own queue first (clicks routed to it, backend.queueing.routing), then the interactive queue,
    the bulk one, the reviews one (Label Studio's annotation events): rq takes from the first non-empty queue, so
    someone waiting in the editor goes ahead of bulk pre-labelling on the same workers, and learning from reviews
    waits for both. Its name is unique to the process (its own queue is named after it).
    A side thread sweeps for jobs abandoned by dead workers every `heartbeat_s`, so they are queued again
    within seconds even when no request is waiting on them (bulk chunks), and queues the transient retries that
    are due (rq's scheduler stays off, with_scheduler=False: it would fork a process from this one). A burst
    worker leaves the retries not yet due for the next worker. After each sweep that reached Redis it touches
    `alive_file` (when given; removed when the worker stops), which `grounded-sam health --worker` checks.
    The caller has installed the job runtime (models loaded) before this is called, and `announcement` says
    what it loaded: the API reads it to answer with the model_version this worker computes; `on_registered` runs
    once rq has registered the worker (ready).
    Returns rq's `work()` result (True when at least one job was processed).
    """
    name = uuid.uuid4().hex
    names = [routing.own_queue_name(queue_prefix, name), *worker_queue_names(queue_prefix)]
    queues = [Queue(queue, connection=redis, serializer=JSONSerializer) for queue in names]
    worker = HeartbeatWorker(
        queues,
        connection=redis,
        serializer=JSONSerializer,
        name=name,
        heartbeat_s=heartbeat_s,
        announcement=announcement,
        on_registered=on_registered,
        route_prefix=queue_prefix,
    )
    stop = threading.Event()
    sweeper = threading.Thread(
        target=_sweep_until,
        args=(queues[1:], heartbeat_s, stop, alive_file, queue_prefix),
        daemon=True,
        name="rq-sweeper",
    )
    sweeper.start()
    log.info("worker %s listening on %s", worker.name, ", ".join(q.name for q in queues))
    try:
        level = logging.getLevelName(log.getEffectiveLevel())
        return worker.work(burst=burst, with_scheduler=False, logging_level=level)
    finally:
        stop.set()
        if alive_file is not None:
            sweeper.join(timeout=5.0)  # its last touch must not come after the removal
            with suppress(OSError):
                alive_file.unlink()


def alive_file_stale_after(heartbeat_s: float) -> float:
    """Seconds after its last touch that a worker's alive file counts as stale: 3 missed sweeps, plus one."""
    return heartbeat_s * MISSED_BEATS_BEFORE_ABANDONED + 1


def _sweep_until(
    queues: list[Queue],
    every_s: float,
    stop: threading.Event,
    alive_file: Path | None = None,
    route_prefix: str | None = None,
) -> None:
    """At once and then every `every_s`: queue again the jobs abandoned by dead workers and the transient retries
    now due, and (with `route_prefix`) move the own queues of dead workers to the shared interactive queue; after
    each sweep that reached Redis, touch `alive_file` (when given)."""
    warned = False
    while True:
        try:
            sweep_abandoned(queues)
            enqueue_due(queues)
            if route_prefix is not None:
                routing.release_if_dead(queues[0].connection, route_prefix, queue_names(route_prefix)[0])
        except RedisError as exc:  # Redis restarting: the worker loop reports it; try again next time
            log.debug("abandoned-job sweep failed: %s", exc)
        else:
            if alive_file is not None and not stop.is_set():
                try:
                    alive_file.touch()
                except OSError as exc:  # once: `health --worker` keeps saying it
                    if not warned:
                        log.warning("cannot touch WORKER_HEARTBEAT_FILE %s: %s", alive_file, exc)
                    warned = True
        if stop.wait(every_s):
            return


def forget_worker(redis: Redis, pid: int) -> None:
    """Unregister the rq worker that ran as process `pid` on this host (it was killed and could not).

    Without this a killed worker counts in /health for rq's worker TTL (up to 2 minutes) after a new one replaced it.
    """
    from rq import Worker

    host = socket.gethostname()
    for worker in Worker.all(connection=redis, serializer=JSONSerializer):
        if worker.pid == pid and worker.hostname == host:
            worker.register_death()
