"""The in-process tier: the real API (`TestClient(create_app(settings))`) and the real worker loop (`run_worker`,
burst) in the test process, over the session's embedded valkey, with a PredictionFlow whose models are a double
(tests.support.fakes.FixedPipeline) and whose Label Studio is in memory (MemoryStudio). Image fetching is real,
from a loopback image server.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue, Worker
from rq.serializers import JSONSerializer

from backend import jobs
from backend.api.app import create_app
from backend.embedding_cache import ImageCache
from backend.flow import PredictionFlow
from backend.images.fetch import ImageFetcher
from backend.queueing.client import queue_names
from backend.queueing.stats import WorkerStats
from backend.settings import Settings
from tests.support.fakes import FixedPipeline, MemoryStudio
from tests.support.images import serve_images
from tests.support.inprocess import HEARTBEAT_S, InProcessBackend
from tests.support.workers import settings_of


@pytest.fixture()
def settings(redis_url: str) -> Settings:
    """Settings of API and worker alike: the session's Redis, a fresh queue name, made-up model names (no model
    is loaded: they only enter the fingerprint), loopback image hosts allowed, small bulk chunks."""
    env = {
        "REDIS_URL": redis_url,
        "QUEUE_NAME": f"inprocess-{uuid.uuid4().hex[:8]}",
        "DETECTOR_MODEL": "test/fixed-detector",
        "SAM_MODEL": "test/fixed-sam",
        "DEVICE": "cpu",
        "WORKER_HEARTBEAT": str(HEARTBEAT_S),
        "PREDICT_TIMEOUT": "60",
        "BULK_CHUNK_SIZE": "2",
        "FETCH_ALLOW_NETWORKS": "127.0.0.0/8,::1/128",
    }
    return settings_of(env)


@pytest.fixture()
def backend(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessBackend]:
    """The API in a TestClient and the worker's flow installed in this process (no worker announced yet)."""
    assert settings.redis_url is not None
    redis = Redis.from_url(settings.redis_url)
    pipeline, studio = FixedPipeline(), MemoryStudio()
    flow = PredictionFlow(
        pipeline,  # type: ignore[arg-type]  # a GroundedSam double
        fetcher=ImageFetcher(settings.fetch_options()),
        fingerprint=settings.model_fingerprint(),
        output=settings.output_options(),
        studio=studio,
        cache=ImageCache(64 * 2**20),
    )
    jobs.install(flow, WorkerStats(redis), jobs.ClickRoutes(settings.queue_name, settings.click_route_ttl))
    try:
        with (
            serve_images(tmp_path_factory.mktemp("images"), slow_s=0) as images,
            TestClient(create_app(settings)) as client,
        ):
            yield InProcessBackend(settings, redis, client, pipeline, studio, images)
    finally:
        jobs.uninstall()
        _register_deaths(redis, settings)
        redis.close()


def _register_deaths(redis: Redis, settings: Settings) -> None:
    """Take back every worker still registered on this test's queues (the announced idle ones)."""
    for name in queue_names(settings.queue_name):
        for worker in Worker.all(queue=Queue(name, connection=redis, serializer=JSONSerializer)):
            worker.register_death()
