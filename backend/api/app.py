"""The FastAPI app: Label Studio's ML backend routes, basic auth, error mapping, metrics."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any, TypeVar

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis import Redis
from redis.exceptions import OutOfMemoryError, RedisError

from backend.api.edge import BasicAuth, BodyLimit, CountRequests, StampArrival, arrived_at
from backend.api.metrics import Metrics
from backend.api.schemas import PredictRequest, PrelabelRequest, SetupRequest, http_origin, project_key
from backend.api.service import PredictionService, PredictTimeoutError
from backend.errors import LabelConfigError, QueueUnavailableError, RequestDataError, RequestTooLargeError
from backend.labelstudio.interactive import InteractiveContextError
from backend.queueing.bulk import Progress
from backend.queueing.connection import api_connection
from backend.settings import Settings

log = logging.getLogger(__name__)

MODEL_CLASS = "GroundedSam"
T = TypeVar("T")

# Threads waiting on /predict jobs are capped apart from everything else, so that waiting predictions never
# starve /health and /setup (Label Studio gives them 1 s and 3 s), which have their own small capacity.
PREDICT_WAITERS = 128
CONTROL_THREADS = 8
# /health's whole answer is bounded (a hung Redis must not hold it), and so is each probe call to Redis.
HEALTH_TIMEOUT_S = 0.8
PROBE_CONNECT_TIMEOUT_S = 0.3
PROBE_SOCKET_TIMEOUT_S = 0.5


def probe_connection(url: str) -> Redis:
    """The connection of /health and /setup: sub-second timeouts, no retries."""
    return Redis.from_url(
        url,
        socket_connect_timeout=PROBE_CONNECT_TIMEOUT_S,
        socket_timeout=PROBE_SOCKET_TIMEOUT_S,
        retry_on_timeout=False,
    )


def create_app(settings: Settings, redis: Redis | None = None) -> FastAPI:
    """Build the app; `redis` defaults to a fast-failing connection to settings.redis_url."""
    if redis is None:
        if not settings.redis_url:
            raise ValueError("REDIS_URL is required to serve the API (the `serve` command sets it in embedded mode)")
        redis = api_connection(settings.redis_url)
    probe = probe_connection(settings.redis_url) if settings.redis_url else redis
    service = PredictionService(settings, redis, probe)
    metrics = Metrics(service.queue_metrics)
    app = FastAPI(title="Grounded SAM ML backend for Label Studio", version="0.1.0")
    app.state.service = service
    _install_middleware(app, settings, metrics)
    _install_error_handlers(app)
    _install_routes(app, service, metrics)
    return app


def _install_middleware(app: FastAPI, settings: Settings, metrics: Metrics) -> None:
    """Outermost first: count every answer, stamp the arrival, check auth, then the body's size."""
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    if settings.basic_auth:
        app.add_middleware(BasicAuth, credentials=settings.basic_auth)
    app.add_middleware(StampArrival)
    app.add_middleware(CountRequests, counter=metrics.requests, routes=app.router.routes)


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


def _progress_body(progress: Progress) -> dict[str, Any]:
    return {**asdict(progress), "finished": progress.finished}


# Known failures → status code, message prefix, log level. Everything else is a logged 500.
_ERROR_ANSWERS: tuple[tuple[type[Exception], int, str, int], ...] = (
    (LabelConfigError, 400, "labeling config not supported: ", logging.INFO),
    (InteractiveContextError, 400, "interactive request not understood: ", logging.INFO),
    (RequestDataError, 400, "", logging.INFO),
    (RequestTooLargeError, 413, "too large: ", logging.INFO),
    (QueueUnavailableError, 503, "", logging.ERROR),
    (OutOfMemoryError, 503, "Redis is full (it reached its maxmemory): ", logging.ERROR),
    (RedisError, 503, "Redis is unreachable: ", logging.ERROR),
    (PredictTimeoutError, 504, "", logging.WARNING),
)


def _answer(status: int, prefix: str, level: int) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
    async def handler(request: Request, exc: Exception) -> JSONResponse:
        log.log(level, "%s %s → %d: %s", request.method, request.url.path, status, exc)
        return JSONResponse({"detail": f"{prefix}{exc}"}, status_code=status)

    return handler


def _install_error_handlers(app: FastAPI) -> None:
    for kind, status, prefix, level in _ERROR_ANSWERS:
        app.add_exception_handler(kind, _answer(status, prefix, level))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal error; see the backend log"}, status_code=500)


def _install_routes(app: FastAPI, service: PredictionService, metrics: Metrics) -> None:
    predict_slots = anyio.CapacityLimiter(PREDICT_WAITERS)
    health_slots = anyio.CapacityLimiter(CONTROL_THREADS)
    setup_slots = anyio.CapacityLimiter(CONTROL_THREADS)

    @app.get("/")
    @app.get("/health")
    async def health() -> JSONResponse:
        """Label Studio allows 1 s: answer from Redis alone, never from the models, within HEALTH_TIMEOUT_S."""
        try:
            with anyio.fail_after(HEALTH_TIMEOUT_S):
                state = await anyio.to_thread.run_sync(service.health, limiter=health_slots, abandon_on_cancel=True)
        except TimeoutError:
            return _down(f"Redis is unreachable: no answer within {HEALTH_TIMEOUT_S:g} s")
        except QueueUnavailableError as exc:
            return _down(str(exc))
        return JSONResponse({"status": "UP", "model_class": MODEL_CLASS, **state})

    @app.post("/setup")
    async def setup(body: SetupRequest) -> dict[str, str]:
        origin = http_origin(body.hostname)  # RequestDataError: 400, nothing stored
        version = await _in_thread(setup_slots, service.setup, project_key(body.project), body.schema_, origin)
        return {"model_version": version}

    @app.post("/predict")
    async def predict(request: Request, body: PredictRequest) -> dict[str, Any]:
        deadline = arrived_at(request.scope) + service.settings.predict_timeout
        context = (body.params or {}).get("context")
        tasks = body.task_dicts()
        report = await _predict_in_thread(
            predict_slots,
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
            return {"results": [], "run_id": report.run_id}
        metrics.tasks.labels("ok").inc(len(report.results) - report.failed)
        metrics.tasks.labels("failed").inc(report.failed)
        return {"results": report.results}

    @app.post("/prelabel")
    def prelabel(body: PrelabelRequest) -> dict[str, Any]:
        """Queue a project's tasks as bulk work (workers push predictions to Label Studio)."""
        tasks = [task.model_dump() for task in body.tasks]
        run_id = service.start_bulk(str(body.project), tasks, body.label_config, force=body.force)
        return {"run_id": run_id, "tasks": len(tasks), "model_version": service.model_version_for(body.label_config)}

    @app.get("/runs/{run_id}")
    def run_progress(run_id: str) -> JSONResponse:
        progress = service.bulk.progress(run_id)
        if progress is None:
            return JSONResponse({"detail": f"no run {run_id!r} (unknown or expired)"}, status_code=404)
        return JSONResponse(_progress_body(progress))

    @app.get("/jobs")
    def project_jobs(project: int) -> dict[str, Any]:
        """Task counts of a project's bulk work by state, with the reason of each failed chunk."""
        return _progress_body(service.bulk.project_progress(str(project)))

    @app.delete("/jobs")
    def cancel_jobs(project: int) -> dict[str, int]:
        """Cancel the project's queued bulk chunks (running ones finish)."""
        return {"canceled": service.bulk.cancel(str(project))}

    @app.post("/jobs/retry")
    def retry_jobs(project: int) -> dict[str, int]:
        """Queue the project's failed bulk chunks again."""
        return {"requeued": service.bulk.retry_failed(str(project))}

    @app.post("/webhook")
    def webhook(event: dict[str, Any]) -> dict[str, str]:
        """Label Studio posts every project event here; this backend does not train, so it only logs them."""
        action = str(event.get("action", "unknown"))
        log.info("webhook event %s ignored (no training)", action)
        return {"status": "ignored", "action": action}

    @app.get("/versions")
    def versions() -> dict[str, list[str]]:
        return {"versions": service.versions()}

    @app.get("/metrics")
    def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _down(detail: str) -> JSONResponse:
    return JSONResponse({"status": "DOWN", "model_class": MODEL_CLASS, "detail": detail}, status_code=503)
