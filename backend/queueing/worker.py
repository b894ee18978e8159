"""The worker process: an rq SimpleWorker that keeps its models loaded and heart-beats while busy.

rq's default Worker forks a work horse per job, and CUDA does not survive fork; SpawnWorker would reload
the weights per job. SimpleWorker runs jobs in-process but sends no heartbeat during a job, so a worker
killed mid-job would leave its job "started" until the job timeout. The heartbeat thread here keeps the
started-registry entry alive only while the process lives: once it dies the entry expires within
3 beats and the next registry sweep moves the job to the failed registry (AbandonedJobError).
"""

from __future__ import annotations

import logging
import threading

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue, SimpleWorker
from rq.job import Job
from rq.serializers import JSONSerializer

from backend.queueing.client import queue_names

log = logging.getLogger(__name__)

MISSED_BEATS_BEFORE_ABANDONED = 3


class HeartbeatWorker(SimpleWorker):
    """SimpleWorker whose running job heart-beats every `heartbeat_s` seconds from a side thread."""

    def __init__(self, *args: object, heartbeat_s: float = 5.0, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.heartbeat_s = heartbeat_s

    def get_heartbeat_ttl(self, job: Job) -> int:
        return int(self.heartbeat_s * MISSED_BEATS_BEFORE_ABANDONED) + 1

    def execute_job(self, job: Job, queue: Queue) -> None:
        done = threading.Event()
        beater = threading.Thread(target=self._beat_until, args=(job, done), daemon=True, name="rq-heartbeat")
        beater.start()
        try:
            super().execute_job(job, queue)
        finally:
            done.set()
            beater.join()

    def _beat_until(self, job: Job, done: threading.Event) -> None:
        while not done.wait(self.heartbeat_s):
            try:
                self.maintain_heartbeats(job)
            except RedisError as exc:  # a missed beat is survivable; the next one may get through
                log.warning("heartbeat for job %s failed: %s", job.id, exc)


def run_worker(redis: Redis, queue_prefix: str, heartbeat_s: float, *, burst: bool = False) -> bool:
    """Process jobs until stopped (SIGINT/SIGTERM: finish the current job, then exit).

    Listens on the interactive queue first, then the bulk one: rq takes from the first non-empty queue,
    so someone waiting in the editor goes ahead of bulk pre-labelling on the same workers.
    The caller has installed the job runtime (models loaded) before this is called.
    Returns rq's `work()` result (True when at least one job was processed).
    """
    queues = [Queue(name, connection=redis, serializer=JSONSerializer) for name in queue_names(queue_prefix)]
    worker = HeartbeatWorker(queues, connection=redis, serializer=JSONSerializer, heartbeat_s=heartbeat_s)
    log.info("worker %s listening on %s", worker.name, ", ".join(q.name for q in queues))
    return worker.work(burst=burst, with_scheduler=False, logging_level=logging.getLevelName(log.getEffectiveLevel()))
