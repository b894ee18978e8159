"""The FastAPI app: Label Studio's ML backend routes, basic auth, error mapping, metrics."""

from __future__ import annotations

import base64
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis import Redis
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool

from backend.api.metrics import Metrics
from backend.api.schemas import PredictRequest, PrelabelRequest, SetupRequest, project_key
from backend.api.service import PredictionService, PredictTimeoutError
from backend.errors import LabelConfigError, QueueUnavailableError
from backend.labelstudio.interactive import InteractiveContextError
from backend.queueing.bulk import Progress
from backend.queueing.connection import api_connection
from backend.settings import Settings

log = logging.getLogger(__name__)

MODEL_CLASS = "GroundedSam"


def create_app(settings: Settings, redis: Redis | None = None) -> FastAPI:
    """Build the app; `redis` defaults to a fast-failing connection to settings.redis_url."""
    if redis is None:
        if not settings.redis_url:
            raise ValueError("REDIS_URL is required to serve the API (the `serve` command sets it in embedded mode)")
        redis = api_connection(settings.redis_url)
    service = PredictionService(settings, redis)
    metrics = Metrics(service.queue_metrics)
    app = FastAPI(title="Grounded SAM ML backend for Label Studio", version="0.1.0")
    app.state.service = service
    _install_middleware(app, settings, metrics)
    _install_error_handlers(app)
    _install_routes(app, service, metrics)
    return app


def _install_middleware(app: FastAPI, settings: Settings, metrics: Metrics) -> None:
    expected = _basic_auth_header(settings.basic_auth) if settings.basic_auth else None

    @app.middleware("http")
    async def auth_and_count(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        given = request.headers.get("authorization", "")
        if expected is not None and not hmac.compare_digest(given.encode(), expected.encode()):
            response: Response = JSONResponse(
                {"detail": "authentication required"},
                status_code=401,
                headers={"WWW-Authenticate": 'Basic realm="Login required"'},
            )
        else:
            response = await call_next(request)
        metrics.requests.labels(request.url.path, str(response.status_code)).inc()
        return response


def _progress_body(progress: Progress) -> dict[str, Any]:
    return {**asdict(progress), "finished": progress.finished}


def _basic_auth_header(credentials: tuple[str, str]) -> str:
    token = base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
    return f"Basic {token}"


# Known failures → status code, message prefix, log level. Everything else is a logged 500.
_ERROR_ANSWERS: tuple[tuple[type[Exception], int, str, int], ...] = (
    (LabelConfigError, 400, "labeling config not supported: ", logging.INFO),
    (InteractiveContextError, 400, "interactive request not understood: ", logging.INFO),
    (QueueUnavailableError, 503, "", logging.ERROR),
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
    @app.get("/")
    @app.get("/health")
    def health() -> JSONResponse:
        """Label Studio allows 1 s: answer from Redis alone, never from the models."""
        try:
            state = service.health()
        except QueueUnavailableError as exc:
            return JSONResponse({"status": "DOWN", "model_class": MODEL_CLASS, "detail": str(exc)}, status_code=503)
        return JSONResponse({"status": "UP", "model_class": MODEL_CLASS, **state})

    @app.post("/setup")
    def setup(body: SetupRequest) -> dict[str, str]:
        return {"model_version": service.setup(project_key(body.project), body.schema_, body.hostname)}

    @app.post("/predict")
    async def predict(body: PredictRequest) -> dict[str, Any]:
        started = time.perf_counter()
        context = (body.params or {}).get("context")
        report = await run_in_threadpool(
            service.predict, project_key(body.project), body.tasks, body.label_config, context
        )
        metrics.predict_seconds.observe(time.perf_counter() - started)
        if report.run_id is not None:
            # Too large to answer in time: queued, pushed to Label Studio by workers. An empty list
            # makes Label Studio store nothing now (it logs "results ... at least one item").
            metrics.tasks.labels("queued").inc(len(body.tasks))
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
