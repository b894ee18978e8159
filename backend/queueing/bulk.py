"""Bulk pre-labelling runs on the queue: submit chunks, count progress per task, cancel, retry failures.

A run is recorded in Redis as its chunks' job ids, each with its task count. Progress is read from the jobs
themselves (the tasks each job's ChunkJob message lists), so two runs that share chunks (deterministic ids)
both see them finish, and a restarted run sees earlier work; the recorded count stands in for the tasks of a
chunk whose job expired (they count as failed) or whose message this version cannot read. Runs recorded by
earlier versions list job ids only (`{"jobs": [...]}`); they are still read, a count of 1 per chunk standing in.

A project's progress (GET /jobs: no run record) covers the chunk jobs Redis still holds, as listed by its bulk
queue and registries; rq drops an expired job from its registries, so its tasks are no longer counted.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from redis import Redis
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry

from backend.errors import JobMessageError
from backend.queueing.client import PredictionQueue, chunk_job_id, chunk_prefix, failure_reason, requeue_failed
from backend.queueing.configs import refresh_config, refresh_configs
from backend.queueing.messages import ChunkJob

RUN_KEY = "grounded-sam:run:{}"
RUN_TTL_S = 7 * 24 * 3600
# Meta keys a chunk job writes before it ends (see backend.prelabel.prelabel_chunk).
META_FAILED = "failed_tasks"


@dataclass(frozen=True, slots=True)
class RecordedChunk:
    """One chunk of a run as its record keeps it: the job id and how many tasks the chunk holds."""

    job_id: str
    tasks: int


@dataclass(frozen=True, slots=True)
class RunRecord:
    """What Redis keeps of a run (RUN_KEY, RUN_TTL_S): its project and chunks."""

    project: str
    chunks: tuple[RecordedChunk, ...]

    def to_json(self) -> str:
        chunks = [{"id": chunk.job_id, "tasks": chunk.tasks} for chunk in self.chunks]
        return json.dumps({"project": self.project, "chunks": chunks})

    @classmethod
    def from_json(cls, raw: str | bytes) -> RunRecord:
        """Also reads the earlier format, {"project": ..., "jobs": [ids]} (a count of 1 per chunk)."""
        record = json.loads(raw)
        if "chunks" in record:
            chunks = (RecordedChunk(str(c["id"]), int(c["tasks"])) for c in record["chunks"])
        else:
            chunks = (RecordedChunk(str(job_id), 1) for job_id in record["jobs"])
        return cls(str(record.get("project", "")), tuple(chunks))


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


class BulkRuns:
    """Runs of chunk jobs on the bulk queue."""

    def __init__(self, redis: Redis, queue: PredictionQueue, config_ttl_s: int | None = None) -> None:
        self._redis = redis
        self._queue = queue
        self._config_ttl_s = config_ttl_s

    def start(self, project: str, chunks: Sequence[ChunkJob]) -> str:
        """Queue every chunk (re-attaching to existing ones) and record the run; returns its id."""
        recorded = tuple(RecordedChunk(chunk_job_id(chunk), len(chunk.tasks)) for chunk in chunks)
        for chunk, entry in zip(chunks, recorded, strict=True):
            self._queue.submit(entry.job_id, chunk)
        run_id = uuid.uuid4().hex[:12]
        self._redis.set(RUN_KEY.format(run_id), RunRecord(project, recorded).to_json(), ex=RUN_TTL_S)
        return run_id

    def progress(self, run_id: str) -> Progress | None:
        """Task counts of the run, or None for an unknown (or expired) run."""
        raw = self._redis.get(RUN_KEY.format(run_id))
        if raw is None:
            return None
        chunks = RunRecord.from_json(raw).chunks
        self._queue.sweep_abandoned()
        jobs = self._queue.fetch_jobs([chunk.job_id for chunk in chunks])
        self._refresh_waiting_configs(jobs)
        return _count(zip(chunks, jobs, strict=True))

    def project_progress(self, project: str) -> Progress:
        """Task counts of every bulk job of `project` still known to Redis (an expired one counts nothing)."""
        job_ids = self._project_job_ids(project)
        jobs = self._queue.fetch_jobs(job_ids)
        return _count((RecordedChunk(job.id, 1), job) for job in jobs if job is not None)

    def cancel(self, project: str) -> int:
        """Cancel the project's queued (not yet running) chunks, those waiting for a transient retry too; returns
        how many. Running ones finish."""
        queue = self._queue.bulk
        prefix = chunk_prefix(project)
        canceled = 0
        waiting = [*queue.get_job_ids(), *queue.scheduled_job_registry.get_job_ids()]
        for job in self._queue.fetch_jobs([i for i in waiting if i.startswith(prefix)]):
            if job is not None and job.get_status() in (JobStatus.QUEUED, JobStatus.SCHEDULED):
                job.cancel()
                canceled += 1
        return canceled

    def retry_failed(self, project: str) -> int:
        """Queue the project's failed chunks again; tasks already pushed are skipped when they rerun."""
        registry = FailedJobRegistry(queue=self._queue.bulk)
        job_ids = [i for i in registry.get_job_ids() if i.startswith(chunk_prefix(project))]
        requeued = 0
        for job in self._queue.fetch_jobs(job_ids):
            if job is None:
                continue
            message = chunk_message(job)
            if self._config_ttl_s is not None and message is not None:  # it waits again: its config must outlive it
                refresh_config(self._redis, message.label_config_ref, self._config_ttl_s)
            requeued += requeue_failed(job)  # a poison chunk (it took down workers) stays failed
        return requeued

    def _refresh_waiting_configs(self, jobs: Iterable[Job | None]) -> None:
        """Extend the life of the configs of the run's chunks still to run: a long run's tail waits longer than
        the config's TTL from the request that stored it."""
        if self._config_ttl_s is None:
            return
        waiting = (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED, JobStatus.STARTED)
        messages = (chunk_message(job) for job in jobs if job is not None and job.get_status(refresh=False) in waiting)
        refresh_configs(self._redis, (m.label_config_ref for m in messages if m is not None), self._config_ttl_s)

    def _project_job_ids(self, project: str) -> list[str]:
        queue = self._queue.bulk
        registries = (
            queue.scheduled_job_registry,  # waiting for a transient retry
            queue.started_job_registry,
            queue.finished_job_registry,
            queue.failed_job_registry,
        )
        ids = set(queue.get_job_ids())
        for registry in registries:
            ids.update(registry.get_job_ids())
        prefix = chunk_prefix(project)
        return sorted(i for i in ids if i.startswith(prefix))


def chunk_message(job: Job) -> ChunkJob | None:
    """The ChunkJob a bulk job was queued with, or None when this version cannot read it (another schema)."""
    try:
        return ChunkJob.from_json(job.args[0] if job.args else None)
    except JobMessageError:
        return None


# A task in several chunks (overlapping runs, a retry) counts once, in the most advanced of its states.
_RANK = {"failed": 0, "queued": 1, "running": 2, "done": 3}


def _count(jobs: Iterable[tuple[RecordedChunk, Job | None]]) -> Progress:
    """Task counts over chunk jobs, each task once; `failures` names the failed chunks of still-failed tasks."""
    states: dict[object, str] = {}
    failed_chunks: list[tuple[str, Job | None, list[object]]] = []
    for chunk, job in jobs:
        chunk_states = _task_states(chunk, job)
        for task, state in chunk_states:
            if _RANK[state] > _RANK.get(states.get(task, ""), -1):
                states[task] = state
        failed = [task for task, state in chunk_states if state == "failed"]
        if failed:
            failed_chunks.append((chunk.job_id, job, failed))
    progress = Progress(total=len(states))
    for state in states.values():
        setattr(progress, state, getattr(progress, state) + 1)
    for job_id, job, tasks in failed_chunks:
        if any(states[task] == "failed" for task in tasks):
            progress.failures.append(f"{job_id}: {failure_reason(job) if job is not None else 'expired'}")
    return progress


def _task_states(chunk: RecordedChunk, job: Job | None) -> list[tuple[object, str]]:
    """(task, state) for each task of a chunk job. The tasks are those its message lists; those of an expired
    job (failed) or of a message this version cannot read are unknown: the recorded count of them counts apart."""
    message = chunk_message(job) if job is not None else None
    tasks: list[object] = (
        list(message.task_ids) if message is not None else [(chunk.job_id, index) for index in range(chunk.tasks)]
    )
    if job is None:
        return [(task, "failed") for task in tasks]
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
