"""The worker's alive file (WORKER_HEARTBEAT_FILE): touched by the sweeper thread after each sweep that reached
Redis, never while Redis does not answer, and removed when the worker stops — what `health --worker` reads."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from backend.queueing.client import queue_names
from backend.queueing.worker import _sweep_until, run_worker
from tests.support.inprocess import HEARTBEAT_S, InProcessBackend
from tests.support.ports import free_port

LONG_AGO = 1_000_000_000.0  # 2001: an mtime no touch of today's leaves
DEADLINE_S = 60.0  # generous: a loaded 2-core machine


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"still not {what} after {DEADLINE_S} s"
        time.sleep(0.05)


@contextmanager
def sweeping(queues: list[Queue], alive: Path) -> Iterator[None]:
    """The sweeper thread as run_worker starts it, stopped and joined afterwards."""
    stop = threading.Event()
    thread = threading.Thread(target=_sweep_until, args=(queues, HEARTBEAT_S, stop, alive), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _queues(redis: Redis, prefix: str) -> list[Queue]:
    return [Queue(name, connection=redis, serializer=JSONSerializer) for name in queue_names(prefix)]


def test_the_sweeper_touches_the_alive_file_again_and_again(backend: InProcessBackend, tmp_path: Path) -> None:
    alive = tmp_path / "worker.alive"
    with sweeping(_queues(backend.redis, backend.settings.queue_name), alive):
        wait_for(alive.exists, "the first touch, at once")
        os.utime(alive, (LONG_AGO, LONG_AGO))
        wait_for(lambda: alive.stat().st_mtime > LONG_AGO, "a later touch")


def test_no_touch_while_redis_does_not_answer(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    closed = Redis(port=free_port(), socket_connect_timeout=1)
    alive = tmp_path / "worker.alive"
    caplog.set_level(logging.DEBUG, logger="backend.queueing.worker")

    def failed_sweeps() -> int:
        return sum("sweep failed" in record.getMessage() for record in caplog.records)

    with sweeping(_queues(closed, "closed"), alive):
        wait_for(lambda: failed_sweeps() >= 2, "two failed sweeps")
    assert not alive.exists()


def test_a_stopped_worker_removes_its_alive_file(backend: InProcessBackend, tmp_path: Path) -> None:
    alive = tmp_path / "worker.alive"
    alive.touch()  # left by an earlier run, say
    run_worker(
        backend.redis, backend.settings.queue_name, HEARTBEAT_S, backend.announcement(), burst=True, alive_file=alive
    )
    assert not alive.exists()
