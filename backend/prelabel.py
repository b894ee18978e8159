"""Bulk job: a chunk of tasks in, their predictions pushed to Label Studio, at most once per task and version.

rq calls `prelabel_chunk` (bulk queue) with a JSON payload:

    {"project": "3", "tasks": [{"id": 7, "data": {...}}, ...], "label_config": "<View>...</View>",
     "model_version": "gsam-...", "force": false}

Tasks of a chunk share one prompt plan; their images are fetched concurrently. A task already holding a
prediction of this model version (in Label Studio, or marked done by another worker) is skipped unless
`force`, which replaces it. Failed tasks are listed in the job's meta and in the error that fails the job,
so rq's failed registry says which task failed and why; a retry recomputes only those.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from rq import get_current_job

from backend.errors import BackendError
from backend.jobs import Runtime, checked_config, current_runtime, fetch_image, predict_image
from backend.labelstudio.config import LabelConfig
from backend.lsclient import LabelStudioApi
from backend.queueing.bulk import META_FAILED
from backend.queueing.claims import TaskClaims
from backend.queueing.stats import WorkerStats

log = logging.getLogger(__name__)

FETCH_THREADS = 4


class StudioNotConfiguredError(BackendError):
    """Bulk work pushes to Label Studio, which needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY on the worker."""


class TasksFailedError(BackendError):
    """Some tasks of a chunk failed; the message names each task and its reason."""


@dataclass
class ChunkReport:
    pushed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)


def prelabel_chunk(payload: dict[str, Any]) -> dict[str, Any]:
    """Predict and push every task of the chunk; returns {"pushed": [...], "skipped": [...]}."""
    runtime = current_runtime()
    if runtime.studio is None:
        raise StudioNotConfiguredError("set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY for workers doing bulk work")
    job = get_current_job()
    config, version = checked_config(runtime, payload)
    claims = TaskClaims(job.connection, str(payload["project"]), version, busy_ttl=int(job.timeout or 600))
    stats = WorkerStats(job.connection)
    report = ChunkReport()
    todo = _claim(payload["tasks"], claims, runtime.studio, job.worker_name or job.id, bool(payload.get("force")),
                  report)
    images = _fetch_all(runtime, todo, config, payload, stats)
    for task, image in zip(todo, images, strict=True):
        _predict_and_push(runtime, runtime.studio, task, image, config, version, claims, stats, report)
    job.meta[META_FAILED] = sorted(report.failed)
    job.save_meta()
    if report.failed:
        raise TasksFailedError("; ".join(f"task {t}: {reason}" for t, reason in sorted(report.failed.items())))
    return {"pushed": report.pushed, "skipped": report.skipped}


def _claim(
    tasks: Sequence[dict[str, Any]], claims: TaskClaims, studio: LabelStudioApi, owner: str, force: bool,
    report: ChunkReport,
) -> list[dict[str, Any]]:
    """The tasks this worker should compute now; the rest are done already or being done elsewhere."""
    todo = []
    for task in tasks:
        tid = int(task["id"])
        if (not force and claims.is_done(tid)) or not claims.claim(tid, owner, force=force):
            report.skipped.append(tid)
        elif not force and studio.prediction_ids(tid, claims.model_version):
            claims.mark_done(tid)
            report.skipped.append(tid)
        else:
            todo.append(task)
    return todo


def _fetch_all(
    runtime: Runtime, tasks: Sequence[dict[str, Any]], config: LabelConfig, payload: dict[str, Any],
    stats: WorkerStats,
) -> list[Image.Image | BackendError]:
    """Images of `tasks`, fetched concurrently (network-bound); an error stands in for a failed fetch."""

    def fetch(task: dict[str, Any]) -> Image.Image | BackendError:
        try:
            with stats.stage("fetch"):
                return fetch_image(runtime, task, config, payload)
        except BackendError as exc:
            stats.failure(type(exc).__name__)
            return exc

    with ThreadPoolExecutor(FETCH_THREADS) as pool:
        return list(pool.map(fetch, tasks))


def _predict_and_push(
    runtime: Runtime, studio: LabelStudioApi, task: dict[str, Any], image: Image.Image | BackendError,
    config: LabelConfig, version: str, claims: TaskClaims, stats: WorkerStats, report: ChunkReport,
) -> None:
    tid = int(task["id"])
    started = time.perf_counter()
    try:
        if isinstance(image, BackendError):
            raise image
        with stats.stage("model"):
            prediction = predict_image(runtime, image, config, version)
        with stats.stage("push"):
            replaced = studio.prediction_ids(tid, version)  # non-empty only with force, or after a race
            studio.create_prediction(tid, prediction)
            for old in replaced:
                studio.delete_prediction(old)
    except BackendError as exc:
        log.warning("task %s failed: %s", tid, exc)
        stats.failure(type(exc).__name__)
        claims.release(tid)
        report.failed[tid] = str(exc)
        return
    claims.mark_done(tid)
    report.pushed.append(tid)
    stats.task_done(time.perf_counter() - started)
