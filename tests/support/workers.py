"""Workers that announce what they run without taking jobs, for tests of the API with no worker process.

The announcement goes through the production path: a HeartbeatWorker with an Announcement registers its birth
(rq's own worker hash and queue worker sets, fleet.py's field); register_death takes it back.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from unittest import mock

from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from backend.queueing.client import queue_names
from backend.queueing.fleet import Announcement
from backend.queueing.worker import HeartbeatWorker
from backend.settings import Settings


def settings_of(env: Mapping[str, str]) -> Settings:
    """The Settings a backend process started with environment `env` reads."""
    with mock.patch.dict(os.environ, env, clear=True):
        return Settings()


def announce_worker(
    redis: Redis,
    settings: Settings,
    *,
    fingerprint: Mapping[str, object] | None = None,
    device: str = "cpu",
    name: str | None = None,
) -> HeartbeatWorker:
    """A worker registered on `settings`' queues that announced `fingerprint` (default: the fingerprint of
    `settings`, as `grounded-sam worker` with these settings would); it takes no jobs. Its rq record expires with
    rq's worker TTL unless `register_death()` removes it first."""
    queues = [Queue(queue, connection=redis, serializer=JSONSerializer) for queue in queue_names(settings.queue_name)]
    announcement = Announcement(settings.model_fingerprint() if fingerprint is None else fingerprint, device, "test")
    worker = HeartbeatWorker(
        queues,
        connection=redis,
        serializer=JSONSerializer,
        name=name or f"test-worker-{uuid.uuid4().hex[:8]}",
        announcement=announcement,
    )
    worker.register_birth()
    return worker


@contextmanager
def announced_worker(redis: Redis, settings: Settings, **kwargs: object) -> Iterator[HeartbeatWorker]:
    """`announce_worker` for the block; its death is registered when the block ends."""
    worker = announce_worker(redis, settings, **kwargs)  # type: ignore[arg-type]
    try:
        yield worker
    finally:
        worker.register_death()
