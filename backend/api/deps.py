"""What the routes depend on, kept in `app.state` by create_app and handed to them through `Depends`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import anyio
from fastapi import Depends, FastAPI, Request

from backend.api.metrics import Metrics
from backend.api.service import PredictionService

# Threads waiting on /predict jobs are capped apart from everything else, so that waiting predictions never
# starve /health and /setup (Label Studio gives them 1 s and 3 s), which have their own small capacity.
PREDICT_WAITERS = 128
CONTROL_THREADS = 8


@dataclass(frozen=True, slots=True)
class Limiters:
    """Thread capacity per kind of route: /predict waiters, /health probes, /setup calls."""

    predict: anyio.CapacityLimiter
    health: anyio.CapacityLimiter
    setup: anyio.CapacityLimiter

    @classmethod
    def create(cls) -> Limiters:
        return cls(
            anyio.CapacityLimiter(PREDICT_WAITERS),
            anyio.CapacityLimiter(CONTROL_THREADS),
            anyio.CapacityLimiter(CONTROL_THREADS),
        )


def install_state(app: FastAPI, service: PredictionService, metrics: Metrics) -> None:
    """Keep what the routes depend on in `app.state` (one app, one of each)."""
    app.state.service = service
    app.state.metrics = metrics
    app.state.limiters = Limiters.create()


# Async: resolved on the event loop, so that no route waits for a worker thread before its own limiter.
async def _service(request: Request) -> PredictionService:
    service: PredictionService = request.app.state.service
    return service


async def _metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


async def _limiters(request: Request) -> Limiters:
    limiters: Limiters = request.app.state.limiters
    return limiters


ServiceDep = Annotated[PredictionService, Depends(_service)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]
LimitersDep = Annotated[Limiters, Depends(_limiters)]
