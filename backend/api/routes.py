"""The routes: Label Studio's ML backend protocol, bulk work, metrics. Errors are raised and mapped in app.py."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any, TypeVar

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from backend.api.answers import (
    CancelAnswer,
    ErrorAnswer,
    HealthDown,
    HealthUp,
    PredictAnswer,
    PrelabelAnswer,
    ProgressAnswer,
    RetryAnswer,
    SetupAnswer,
    VersionsAnswer,
    WebhookAnswer,
)
from backend.api.deps import LimitersDep, MetricsDep, ServiceDep
from backend.api.edge import arrived_at
from backend.api.metrics import Metrics
from backend.api.schemas import PredictRequest, PrelabelRequest, SetupRequest, http_origin, project_key
from backend.api.webhook import Ignored, read_event
from backend.errors import PredictTimeoutError, QueueUnavailableError
from backend.queueing.bulk import Progress
from backend.queueing.client import PredictionQueue
from backend.queueing.messages import ReviewJob

log = logging.getLogger(__name__)

MODEL_CLASS = "GroundedSam"
# /health's whole answer is bounded (a hung Redis must not hold it).
HEALTH_TIMEOUT_S = 0.8
T = TypeVar("T")

_ANSWERS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorAnswer, "description": "Request not understood (labeling config, task data, context)"},
    413: {"model": ErrorAnswer, "description": "Request body or task count over the limits"},
    503: {
        "model": ErrorAnswer,
        "description": "Redis unreachable or full; or no live worker announced its models, or workers differ",
    },
}
_PREDICT_ANSWERS: dict[int | str, dict[str, Any]] = {
    **_ANSWERS,
    504: {"model": ErrorAnswer, "description": "Not answered within PREDICT_TIMEOUT"},
}


class PrometheusResponse(Response):
    """Prometheus' text exposition format."""

    media_type = CONTENT_TYPE_LATEST


protocol = APIRouter(tags=["Label Studio ML backend"])
bulk = APIRouter(tags=["bulk"], responses={503: _ANSWERS[503]})
monitoring = APIRouter(tags=["monitoring"])


@protocol.get("/", response_model=HealthUp, responses={503: {"model": HealthDown}})
@protocol.get("/health", response_model=HealthUp, responses={503: {"model": HealthDown}})
async def health(service: ServiceDep, limiters: LimitersDep) -> HealthUp | JSONResponse:
    """Label Studio allows 1 s: answer from Redis alone, never from the models, within HEALTH_TIMEOUT_S."""
    try:
        with anyio.fail_after(HEALTH_TIMEOUT_S):
            state = await anyio.to_thread.run_sync(service.health, limiter=limiters.health, abandon_on_cancel=True)
    except TimeoutError:
        return _down(f"Redis is unreachable: no answer within {HEALTH_TIMEOUT_S:g} s")
    except QueueUnavailableError as exc:
        return _down(str(exc))
    return HealthUp(status="UP", model_class=MODEL_CLASS, **state)


@protocol.post("/setup", responses=_ANSWERS)
async def setup(body: SetupRequest, service: ServiceDep, limiters: LimitersDep) -> SetupAnswer:
    origin = http_origin(body.hostname)  # RequestDataError: 400, nothing stored
    version = await _in_thread(limiters.setup, service.setup, project_key(body.project), body.schema_, origin)
    return SetupAnswer(model_version=version)


@protocol.post("/predict", response_model_exclude_unset=True, responses=_PREDICT_ANSWERS)
async def predict(
    request: Request, body: PredictRequest, service: ServiceDep, metrics: MetricsDep, limiters: LimitersDep
) -> PredictAnswer:
    deadline = arrived_at(request.scope) + service.settings.predict_timeout
    context = (body.params or {}).get("context")
    tasks = body.task_dicts()
    report = await _predict_in_thread(
        limiters.predict,
        deadline,
        service.predict,
        project_key(body.project),
        tasks,
        body.label_config,
        context,
        deadline,
    )
    metrics.predict_seconds.observe(time.monotonic() - arrived_at(request.scope))
    if report.run_id is not None:
        # Too large to answer in time: queued, pushed to Label Studio by workers. An empty list
        # makes Label Studio store nothing now (it logs "results ... at least one item").
        metrics.tasks.labels("queued").inc(len(tasks))
        return PredictAnswer(results=[], run_id=report.run_id)
    metrics.tasks.labels("ok").inc(len(report.results) - report.failed)
    metrics.tasks.labels("failed").inc(report.failed)
    return PredictAnswer(results=report.results)


@protocol.post("/webhook", openapi_extra={"requestBody": {"content": {"application/json": {"schema": {}}}}})
async def webhook(request: Request, service: ServiceDep, metrics: MetricsDep) -> WebhookAnswer:
    """Label Studio posts every project event here. Annotation events (and START_TRAINING) are queued as review
    jobs, which workers compare with the predictions; anything else, or malformed, is ignored with one log line
    and counted. Always 200 and fast: nothing here calls Label Studio, and a failing webhook teaches nothing.
    Exempt from BASIC_AUTH (Label Studio creates its webhook without credentials): it only queues ids, and the
    worker reads what they name from Label Studio itself. The body is parsed on a thread (it may be megabytes)."""
    found = await anyio.to_thread.run_sync(read_event, await request.body(), service.settings.review_options())
    if isinstance(found, Ignored):
        return _ignored(found, metrics)
    action = found[0].action
    try:
        job_ids = await anyio.to_thread.run_sync(_submit_reviews, service.queue, found)
    except QueueUnavailableError as exc:
        return _ignored(Ignored(action, "queue_unavailable", str(exc)), metrics)
    if not job_ids:
        return _ignored(Ignored(action, "already_queued", "a review of this task is queued already"), metrics)
    metrics.webhook_events.labels("queued").inc()
    waiting = len(found) - len(job_ids)
    reason = f"{len(job_ids)} review jobs queued, {waiting} tasks queued already" if len(found) > 1 else None
    return WebhookAnswer(status="queued", action=action, job_id=job_ids[0] if len(found) == 1 else None, reason=reason)


def _submit_reviews(queue: PredictionQueue, jobs: Sequence[ReviewJob]) -> list[str]:
    """Queue each job; the ids of those queued (a task's review waiting already is not queued again)."""
    return [job_id for job in jobs if (job_id := queue.submit_review(job)) is not None]


def _ignored(ignored: Ignored, metrics: Metrics) -> WebhookAnswer:
    levels = {"other_action": logging.INFO, "already_queued": logging.DEBUG, "queue_unavailable": logging.ERROR}
    level = levels.get(ignored.kind, logging.WARNING)
    log.log(level, "webhook event %s ignored: %s", ignored.action or "(no action)", ignored.reason)
    metrics.webhook_events.labels(ignored.kind).inc()
    return WebhookAnswer(status="ignored", action=ignored.action, reason=ignored.reason)


@protocol.get("/versions", responses={503: _ANSWERS[503]})
def versions(service: ServiceDep) -> VersionsAnswer:
    return VersionsAnswer(versions=service.versions())


@bulk.post("/prelabel", responses=_ANSWERS)
def prelabel(body: PrelabelRequest, service: ServiceDep) -> PrelabelAnswer:
    """Queue a project's tasks as bulk work (workers push predictions to Label Studio)."""
    tasks = [task.model_dump() for task in body.tasks]
    run = service.start_bulk(str(body.project), tasks, body.label_config, force=body.force, embeddings=body.embeddings)
    return PrelabelAnswer(run_id=run.run_id, tasks=len(tasks), model_version=run.model_version)


@bulk.get("/runs/{run_id}", response_model=ProgressAnswer, responses={404: {"model": ErrorAnswer}})
def run_progress(run_id: str, service: ServiceDep) -> ProgressAnswer | JSONResponse:
    progress = service.bulk.progress(run_id)
    if progress is None:
        return JSONResponse({"detail": f"no run {run_id!r} (unknown or expired)"}, status_code=404)
    return _progress_answer(progress)


@bulk.get("/jobs")
def project_jobs(project: int, service: ServiceDep) -> ProgressAnswer:
    """Task counts of a project's bulk work by state, with the reason of each failed chunk."""
    return _progress_answer(service.bulk.project_progress(str(project)))


@bulk.delete("/jobs")
def cancel_jobs(project: int, service: ServiceDep) -> CancelAnswer:
    """Cancel the project's queued bulk chunks (running ones finish)."""
    return CancelAnswer(canceled=service.bulk.cancel(str(project)))


@bulk.post("/jobs/retry")
def retry_jobs(project: int, service: ServiceDep) -> RetryAnswer:
    """Queue the project's failed bulk chunks again."""
    return RetryAnswer(requeued=service.bulk.retry_failed(str(project)))


@monitoring.get("/metrics", response_class=PrometheusResponse)
def prometheus_metrics(metrics: MetricsDep) -> PrometheusResponse:
    return PrometheusResponse(generate_latest(metrics.registry))


ROUTERS = (protocol, bulk, monitoring)


async def _in_thread(limiter: anyio.CapacityLimiter, func: Callable[..., T], *args: object) -> T:
    return await anyio.to_thread.run_sync(func, *args, limiter=limiter)


async def _predict_in_thread(
    limiter: anyio.CapacityLimiter, deadline: float, func: Callable[..., T], *args: object
) -> T:
    """Run `func` on a thread once one of the limiter's slots is free, giving up (504) at `deadline`.

    The slot is taken here, with the deadline, and the thread then runs outside any other limit.
    """
    try:
        with anyio.fail_after(max(0.0, deadline - time.monotonic())):
            await limiter.acquire()
    except TimeoutError:
        raise PredictTimeoutError(
            "no free slot for the request before PREDICT_TIMEOUT; nothing was queued, try again"
        ) from None
    try:
        return await anyio.to_thread.run_sync(func, *args, limiter=anyio.CapacityLimiter(math.inf))
    finally:
        limiter.release()


def _progress_answer(progress: Progress) -> ProgressAnswer:
    return ProgressAnswer(**asdict(progress), finished=progress.finished)


def _down(detail: str) -> JSONResponse:
    return JSONResponse({"status": "DOWN", "model_class": MODEL_CLASS, "detail": detail}, status_code=503)
