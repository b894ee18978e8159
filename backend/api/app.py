"""The FastAPI app: its state, middleware (basic auth, body cap, metrics), error mapping, and the routes."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from redis import Redis
from redis.exceptions import OutOfMemoryError, RedisError
from starlette.routing import BaseRoute, Route

from backend.api.deps import install_state
from backend.api.edge import BasicAuth, BodyLimit, CountRequests, StampArrival
from backend.api.metrics import Metrics
from backend.api.routes import ROUTERS
from backend.api.service import PredictionService
from backend.errors import (
    InteractiveContextError,
    LabelConfigError,
    ModelVersionUnknownError,
    PredictTimeoutError,
    QueueUnavailableError,
    RequestDataError,
    RequestTooLargeError,
)
from backend.queueing.connection import api_connection
from backend.settings import Settings

log = logging.getLogger(__name__)

# Paths BASIC_AUTH leaves open: Label Studio creates its webhook without credentials, and /webhook only queues
# ids whose content the worker reads from Label Studio itself (a forged event costs one bounded review job).
OPEN_PATHS = frozenset({"/webhook"})
# Each probe call of /health and /setup to Redis is bounded (routes.HEALTH_TIMEOUT_S bounds /health's answer).
PROBE_CONNECT_TIMEOUT_S = 0.3
PROBE_SOCKET_TIMEOUT_S = 0.5


def probe_connection(url: str) -> Redis:
    """The connection of /health and /setup: sub-second timeouts, no retries."""
    return api_connection(url, PROBE_CONNECT_TIMEOUT_S, PROBE_SOCKET_TIMEOUT_S)


def create_app(settings: Settings, redis: Redis | None = None) -> FastAPI:
    """Build the app; `redis` defaults to a fast-failing connection to settings.redis_url."""
    if redis is None:
        if not settings.redis_url:
            raise ValueError("REDIS_URL is required to serve the API (the `serve` command sets it in embedded mode)")
        redis = api_connection(settings.redis_url)
    probe = probe_connection(settings.redis_url) if settings.redis_url else redis
    service = PredictionService(settings, redis, probe)
    metrics = Metrics(service.redis, service.queue, min_reviews=settings.review_min_reviews)
    app = FastAPI(title="Grounded SAM ML backend for Label Studio", version="0.1.0")
    install_state(app, service, metrics)
    for router in ROUTERS:
        app.include_router(router)
    _install_middleware(app, settings, metrics)
    _install_error_handlers(app)
    return app


def _install_middleware(app: FastAPI, settings: Settings, metrics: Metrics) -> None:
    """Outermost first: count every answer, stamp the arrival, check auth, then the body's size."""
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    if settings.basic_auth:
        app.add_middleware(BasicAuth, credentials=settings.basic_auth, open_paths=OPEN_PATHS)
    app.add_middleware(StampArrival)
    app.add_middleware(CountRequests, counter=metrics.requests, routes=_labelled_routes(app))


def _labelled_routes(app: FastAPI) -> list[BaseRoute]:
    """The routes CountRequests labels requests by: the app's own (docs) and the routers', each with its template.

    FastAPI keeps an included router in app.router.routes as one route without a template, hence the routers' own.
    """
    own = [route for route in app.router.routes if isinstance(route, Route)]
    return [*own, *(route for router in ROUTERS for route in router.routes)]


# Known failures → status code, message prefix, log level. Everything else is a logged 500.
_ERROR_ANSWERS: tuple[tuple[type[Exception], int, str, int], ...] = (
    (LabelConfigError, 400, "labeling config not supported: ", logging.INFO),
    (InteractiveContextError, 400, "interactive request not understood: ", logging.INFO),
    (RequestDataError, 400, "", logging.INFO),
    (RequestTooLargeError, 413, "too large: ", logging.INFO),
    (QueueUnavailableError, 503, "", logging.ERROR),
    (ModelVersionUnknownError, 503, "", logging.INFO),  # the service logged a disagreement once, as it changed
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
