"""The in-process backend: the real API in a TestClient and the real worker loop (run_worker, burst) on this
thread, over a real Redis-protocol server, with a PredictionFlow whose models and Label Studio are doubles."""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from backend.queueing.client import queue_names
from backend.queueing.fleet import Announcement
from backend.queueing.worker import HeartbeatWorker, run_worker
from backend.settings import Settings
from tests.support.fakes import FixedPipeline, MemoryStudio
from tests.support.images import ImageServer
from tests.support.workers import announce_worker

T = TypeVar("T")

HEARTBEAT_S = 0.5
# Bounds on waiting for a state: far beyond what any machine needs; reaching one is a failure, not a timing.
DEADLINE_S = 120.0
POLL_S = 0.02


@dataclass
class InProcessBackend:
    """The API client, its Redis, the worker's doubles and image server; `work` runs what is queued."""

    settings: Settings
    redis: Redis
    client: TestClient
    pipeline: FixedPipeline
    studio: MemoryStudio
    images: ImageServer
    project: int = field(default_factory=lambda: int(uuid.uuid4().int % 10**6) + 1)

    def announcement(self) -> Announcement:
        """What the in-process worker announces: the fingerprint of the settings, as `grounded-sam worker` does."""
        return Announcement(self.settings.model_fingerprint(), "cpu", "test")

    def announce(self) -> HeartbeatWorker:
        """An idle worker on this backend's queues that announced the settings' fingerprint (a worker that is up
        between jobs): the API takes model_version from it. Its death is registered at teardown."""
        return announce_worker(self.redis, self.settings)

    def queued(self) -> int:
        """Jobs waiting on this backend's queues."""
        names = queue_names(self.settings.queue_name)
        return sum(Queue(name, connection=self.redis, serializer=JSONSerializer).count for name in names)

    def work(self) -> bool:
        """Run what is queued now on a burst worker in this thread, as `grounded-sam worker` runs jobs; True when
        it ran at least one. rq's SIGINT/SIGTERM handlers are put back afterwards."""
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            return run_worker(self.redis, self.settings.queue_name, HEARTBEAT_S, self.announcement(), burst=True)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    def while_working(self, request: Callable[[], T]) -> T:
        """`request()` on another thread (a /predict waits for its jobs) while burst workers on this thread run
        whatever it queues, until it returns; its result, or its exception raised here."""
        outcome: list[T] = []
        failure: list[BaseException] = []

        def call() -> None:
            try:
                outcome.append(request())
            except BaseException as exc:  # re-raised in the test's thread
                failure.append(exc)

        thread = threading.Thread(target=call, daemon=True, name="in-process-request")
        thread.start()
        deadline = time.monotonic() + DEADLINE_S
        while thread.is_alive():
            assert time.monotonic() < deadline, f"the request did not return within {DEADLINE_S} s"
            if not (self.queued() and self.work()):
                time.sleep(POLL_S)
        thread.join()
        if failure:
            raise failure[0]
        return outcome[0]
