"""Worker-side interactive job: one Label Studio task in, one Label Studio prediction out.

The worker installs its PredictionFlow (backend.flow: models loaded once) and its WorkerStats before it takes
jobs; rq calls `predict_task` (interactive queue; backend.prelabel has the bulk job) by its dotted name with a
JSON message, backend.queueing.messages.PredictJob (the labeling config by reference).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

from redis.exceptions import RedisError
from rq import get_current_job
from rq.job import Job

from backend.errors import BackendError, ModelVersionMismatchError
from backend.flow import PredictionFlow
from backend.labelstudio.config import LabelConfig, parse_label_config
from backend.queueing.configs import config_ttl, payload_config
from backend.queueing.messages import ChunkJob, PredictJob
from backend.queueing.routing import remember_route
from backend.queueing.stats import WorkerStats

log = logging.getLogger(__name__)

_installed: tuple[PredictionFlow, WorkerStats] | None = None


@dataclass(frozen=True, slots=True)
class ClickRoutes:
    """How this worker tells the API which images' embeddings it holds: the queue prefix (QUEUE_NAME) and how
    long a route lives after its last use (CLICK_ROUTE_TTL, seconds)."""

    prefix: str
    ttl_s: float


def install(flow: PredictionFlow, stats: WorkerStats, routes: ClickRoutes | None = None) -> None:
    """Register the worker's flow and statistics (in Redis; also the flow's timer) once, before it takes jobs.
    routes: where the flow's kept embeddings are announced, so clicks on those images come to this worker."""
    global _installed
    if _installed is not None:
        raise RuntimeError("a prediction flow is already installed in this process")
    if routes is not None:
        flow.on_kept = partial(_remember, routes)
    _installed = (flow, stats)


def _remember(routes: ClickRoutes, image_ref: str) -> None:
    """Route later clicks on `image_ref` to the worker running the current job (a hint: a failure is logged)."""
    job = get_current_job()
    if job is None or not job.worker_name:
        return
    try:
        remember_route(job.connection, routes.prefix, image_ref, job.worker_name, routes.ttl_s)
    except RedisError as exc:
        log.debug("could not record the route of an image to worker %s: %s", job.worker_name, exc)


def uninstall() -> None:
    """Forget the installed flow (tests that install several in one process)."""
    global _installed
    _installed = None


def current_flow() -> PredictionFlow:
    """The installed flow; jobs fail clearly in a process that never loaded models."""
    return _current()[0]


def current_stats() -> WorkerStats:
    """The installed worker statistics."""
    return _current()[1]


def _current() -> tuple[PredictionFlow, WorkerStats]:
    if _installed is None:
        raise RuntimeError("no prediction flow installed: start workers with the `worker` command")
    return _installed


def current_job() -> Job:
    """The rq job this thread runs; the job functions run only as rq jobs."""
    job = get_current_job()
    if job is None:
        raise RuntimeError("not running as an rq job")
    return job


def predict_task(payload: dict[str, Any]) -> dict[str, Any]:
    """Run one task through fetch → Grounding DINO → SAM → Label Studio result (or SAM alone for a click or box).

    Raises (so rq records the job as failed, with the traceback) on any error: JobMessageError for a message
    of another schema; the API turns a failed job into an empty prediction for that task only.
    """
    message = PredictJob.from_json(payload)
    flow, stats = _current()
    config, version = checked_config(flow, message)
    started = time.perf_counter()
    try:
        prediction = flow.answer(message.task, config, version, message.context, message.label_studio_host)
    except BackendError as exc:  # the worker logs the job's failure, once (HeartbeatWorker.handle_exception)
        stats.failure(type(exc).__name__)
        raise
    finally:
        record_cache(flow, stats)
    stats.task_done(time.perf_counter() - started)
    return prediction


def record_cache(flow: PredictionFlow, stats: WorkerStats) -> None:
    """Publish this worker's embedding cache figures (for /metrics) after a job used the cache; a Redis failure
    here is logged, never the job's outcome."""
    try:
        stats.cache_figures(current_job().worker_name or "worker", dataclasses.asdict(flow.cache.figures()))
    except RedisError as exc:
        log.warning("could not publish the embedding cache figures: %s", exc)


def checked_config(flow: PredictionFlow, message: PredictJob | ChunkJob) -> tuple[LabelConfig, str]:
    """The message's parsed config (read from Redis by reference) and model version, after checking that
    `flow` computes that version (ModelVersionMismatchError otherwise)."""
    job = current_job()
    # Every read extends the stored config's life as the API's store did, so the jobs queued behind find it.
    ttl_s = config_ttl(int(job.timeout or 0), job.result_ttl or 0, job.failure_ttl or 0)
    config = parse_label_config(payload_config(job.connection, message, ttl_s))
    expected = flow.model_version(config)
    if message.model_version != expected:
        raise ModelVersionMismatchError(
            f"job asks for model_version {message.model_version} but this worker computes {expected}: the job was "
            "queued for the fingerprint other workers announced, and this worker runs other model settings"
        )
    return config, expected
