"""Bulk pre-labelling runs on the queue: submit chunks, count progress per task, cancel, retry failures.

A run is a list of chunk job ids kept in Redis. Progress is read from the jobs themselves, so two runs
that share chunks (deterministic ids) both see them finish, and a restarted run sees earlier work.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from redis import Redis
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry

from backend.queueing.client import PredictionQueue, failure_reason, requeue_failed
from backend.queueing.payloads import refresh_config, refresh_configs

RUN_KEY = "grounded-sam:run:{}"
RUN_TTL_S = 7 * 24 * 3600
# Chunk job ids carry their task count: bulk-<project>-n<count>-<digest>.
_COUNT = re.compile(r"-n(\d+)-")
# Meta keys a chunk job writes before it ends (see backend.jobs.prelabel_chunk).
META_FAILED = "failed_tasks"


@dataclass(frozen=True, slots=True)
class ChunkSpec:
    """One chunk to queue: its deterministic id and the JSON payload for `prelabel_chunk`."""

    job_id: str
    payload: dict[str, object]


@dataclass(slots=True)
class Progress:
    """Task counts of a run (or a project) by state; `failures` holds one line per failed chunk."""

    total: int = 0
    queued: int = 0
    running: int = 0
    done: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.queued == 0 and self.running == 0


def task_count(job_id: str) -> int:
    match = _COUNT.search(job_id)
    return int(match.group(1)) if match else 1


class BulkRuns:
    """Runs of chunk jobs on the bulk queue."""

    def __init__(self, redis: Redis, queue: PredictionQueue, config_ttl_s: int | None = None) -> None:
        self._redis = redis
        self._queue = queue
        self._config_ttl_s = config_ttl_s

    def start(self, project: str, chunks: Sequence[ChunkSpec]) -> str:
        """Queue every chunk (re-attaching to existing ones) and record the run; returns its id."""
        for chunk in chunks:
            self._queue.submit(chunk.job_id, chunk.payload, bulk=True)
        run_id = uuid.uuid4().hex[:12]
        record = {"project": project, "jobs": [chunk.job_id for chunk in chunks]}
        self._redis.set(RUN_KEY.format(run_id), json.dumps(record), ex=RUN_TTL_S)
        return run_id

    def progress(self, run_id: str) -> Progress | None:
        """Task counts of the run, or None for an unknown (or expired) run."""
        raw = self._redis.get(RUN_KEY.format(run_id))
        if raw is None:
            return None
        job_ids = json.loads(raw)["jobs"]
        self._queue.sweep_abandoned()
        jobs = self._queue.fetch_jobs(job_ids)
        self._refresh_waiting_configs(jobs)
        return _count(zip(job_ids, jobs, strict=True))

    def project_progress(self, project: str) -> Progress:
        """Task counts of every bulk job of `project` still known to Redis."""
        job_ids = self._project_job_ids(project)
        return _count(zip(job_ids, self._queue.fetch_jobs(job_ids), strict=True))

    def cancel(self, project: str) -> int:
        """Cancel the project's queued (not yet running) chunks; returns how many. Running ones finish."""
        queue = self._queue.bulk
        prefix = _prefix(project)
        canceled = 0
        for job in self._queue.fetch_jobs([i for i in queue.get_job_ids() if i.startswith(prefix)]):
            if job is not None and job.get_status() == JobStatus.QUEUED:
                job.cancel()
                canceled += 1
        return canceled

    def retry_failed(self, project: str) -> int:
        """Queue the project's failed chunks again; tasks already pushed are skipped when they rerun."""
        registry = FailedJobRegistry(queue=self._queue.bulk)
        job_ids = [i for i in registry.get_job_ids() if i.startswith(_prefix(project))]
        requeued = 0
        for job in self._queue.fetch_jobs(job_ids):
            if job is None:
                continue
            if self._config_ttl_s is not None:  # the requeued chunks wait again: their config must outlive them
                refresh_config(self._redis, job.args[0], self._config_ttl_s)
            requeued += requeue_failed(job)  # a poison chunk (it took down workers) stays failed
        return requeued

    def _refresh_waiting_configs(self, jobs: Iterable[Job | None]) -> None:
        """Extend the life of the configs of the run's chunks still to run: a long run's tail waits longer than
        the config's TTL from the request that stored it."""
        if self._config_ttl_s is None:
            return
        waiting = (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED, JobStatus.STARTED)
        payloads = [job.args[0] for job in jobs if job is not None and job.get_status(refresh=False) in waiting]
        refresh_configs(self._redis, payloads, self._config_ttl_s)

    def _project_job_ids(self, project: str) -> list[str]:
        queue = self._queue.bulk
        registries = (queue.started_job_registry, queue.finished_job_registry, queue.failed_job_registry)
        ids = set(queue.get_job_ids())
        for registry in registries:
            ids.update(registry.get_job_ids())
        prefix = _prefix(project)
        return sorted(i for i in ids if i.startswith(prefix))


def _prefix(project: str) -> str:
    return f"bulk-{''.join(ch for ch in project if ch.isalnum()) or 'none'}-"


# A task in several chunks (overlapping runs, a retry) counts once, in the most advanced of its states.
_RANK = {"failed": 0, "queued": 1, "running": 2, "done": 3}


def _count(jobs: Iterable[tuple[str, Job | None]]) -> Progress:
    """Task counts over chunk jobs, each task once; `failures` names the failed chunks of still-failed tasks."""
    states: dict[object, str] = {}
    failed_chunks: list[tuple[str, Job | None, list[object]]] = []
    for job_id, job in jobs:
        chunk_states = _task_states(job_id, job)
        for task, state in chunk_states:
            if _RANK[state] > _RANK.get(states.get(task, ""), -1):
                states[task] = state
        failed = [task for task, state in chunk_states if state == "failed"]
        if failed:
            failed_chunks.append((job_id, job, failed))
    progress = Progress(total=len(states))
    for state in states.values():
        setattr(progress, state, getattr(progress, state) + 1)
    for job_id, job, tasks in failed_chunks:
        if any(states[task] == "failed" for task in tasks):
            progress.failures.append(f"{job_id}: {failure_reason(job) if job is not None else 'expired'}")
    return progress


def _task_states(job_id: str, job: Job | None) -> list[tuple[object, str]]:
    """(task, state) for each task of a chunk job; an expired job's tasks are unknown, so they count apart."""
    if job is None:
        return [((job_id, index), "failed") for index in range(task_count(job_id))]
    tasks = [int(task["id"]) for task in job.args[0]["tasks"]]
    status = job.get_status(refresh=False)
    if status in (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED, JobStatus.CREATED):
        return [(task, "queued") for task in tasks]
    if status == JobStatus.STARTED:
        return [(task, "running") for task in tasks]
    if status == JobStatus.FINISHED:
        return [(task, "done") for task in tasks]
    # Failed, stopped or canceled: a chunk that ran lists its failed tasks; otherwise none of them was done.
    failed = set(job.meta[META_FAILED]) if job.meta.get(META_FAILED) else set(tasks)
    return [(task, "failed" if task in failed else "done") for task in tasks]
