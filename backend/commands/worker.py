"""`grounded-sam worker`: check Redis, say "loading" while the models load, then process jobs (or say "failed").

The order is what makes readiness visible (backend/queueing/fleet.py): Redis is checked first (a wrong REDIS_URL
is one line within seconds, not a traceback after the models loaded); then a "loading" record (which models,
since when), refreshed from a side thread while the models load; then the worker registers with rq, whose worker
hash carries its announcement: ready. A load that fails leaves a "failed" record with its one-line error for
fleet.FAILED_TTL_S and exits 1 with that line (`serve`'s supervisor restarts it, and stops after a crash loop).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from backend.settings import Settings

if TYPE_CHECKING:
    from redis import Redis

    from backend.flow import PredictionFlow
    from backend.queueing.fleet import Announcement, WorkerState

log = logging.getLogger(__name__)


def run(settings: Settings, *, burst: bool = False) -> int:
    """The `worker` command: 0 once stopped, 1 when Redis is unreachable or the models fail to load, 2 without
    REDIS_URL; each failure one line on stderr."""
    if not settings.redis_url:
        print("error: the worker needs REDIS_URL (the Redis the API enqueues to)", file=sys.stderr)
        return 2
    from backend.errors import BackendError
    from backend.queueing.connection import api_connection, ping, worker_connection

    # Before the models (and torch's import): a wrong REDIS_URL is one line within a second (short timeouts).
    probe = api_connection(settings.redis_url, connect_timeout=5.0)  # a remote or TLS Redis may need seconds
    try:
        ping(probe)
    except BackendError as exc:
        print(f"error: the worker cannot start: {exc}", file=sys.stderr)
        return 1
    finally:
        probe.close()
    redis = worker_connection(settings.redis_url)
    from backend import jobs
    from backend.flow import PredictionFlow
    from backend.queueing.stats import WorkerStats
    from backend.queueing.worker import run_worker

    name = _process_name()
    stats = WorkerStats(redis)  # the flow's stage timer too, for the whole process
    try:
        with _loading(redis, settings, name):
            flow = PredictionFlow.load(settings, timer=stats)
    except KeyboardInterrupt:  # stopped while loading (SIGTERM): no longer loading, and not broken
        _forget(redis, settings.queue_name, name)
        raise
    except Exception as exc:  # the process boundary: every failed load is announced, then reported
        line = _one_line(exc)
        _announce(redis, settings.queue_name, _failed(name, settings, line))
        if not isinstance(exc, BackendError):
            raise
        log.debug("loading the models failed", exc_info=True)  # the traceback, at LOG_LEVEL=DEBUG only
        print(f"error: the worker cannot start: {line}", file=sys.stderr)
        return 1
    jobs.install(flow, stats, jobs.ClickRoutes(settings.queue_name, settings.click_route_ttl))
    _forget_forerunners(redis, settings.queue_name, name)
    alive_file = Path(settings.worker_heartbeat_file) if settings.worker_heartbeat_file else None
    try:
        run_worker(
            redis,
            settings.queue_name,
            settings.worker_heartbeat,
            announcement(flow),
            burst=burst,
            alive_file=alive_file,
            on_registered=lambda: _forget(redis, settings.queue_name, name),  # ready: no longer loading
        )
    finally:
        _forget(redis, settings.queue_name, name)
    return 0


def announcement(flow: PredictionFlow) -> Announcement:
    """What this worker runs, as the API reads it: the very fingerprint the loaded flow computes model_version
    from (so the API's version is the one this worker checks jobs against), its device and package version."""
    from backend.commands.usage import package_version
    from backend.queueing.fleet import Announcement

    return Announcement(flow.fingerprint, flow.device, package_version())


def models_of(settings: Settings) -> tuple[str, ...]:
    """The models a worker of `settings` loads, in words: ("detector <id>", "SAM <id or checkpoint>")."""
    return (f"detector {settings.detector_model}", f"SAM {settings.sam_checkpoint or settings.sam_model}")


@contextmanager
def _loading(redis: Redis, settings: Settings, name: str) -> Iterator[None]:
    """A "loading" record for the duration, refreshed every fleet.LOADING_REFRESH_S from a side thread."""
    from backend.queueing.fleet import LOADING_REFRESH_S, LOADING_TTL_S, WorkerState

    since = time.time()

    def record() -> WorkerState:
        return WorkerState(name, "loading", models_of(settings), since, time.time() + LOADING_TTL_S)

    done = threading.Event()

    def refresh() -> None:
        while not done.wait(LOADING_REFRESH_S):
            _announce(redis, settings.queue_name, record())

    _announce(redis, settings.queue_name, record())
    refresher = threading.Thread(target=refresh, daemon=True, name="loading-announcer")
    refresher.start()
    try:
        yield
    finally:
        done.set()
        refresher.join()


def _failed(name: str, settings: Settings, error: str) -> WorkerState:
    from backend.queueing.fleet import FAILED_TTL_S, WorkerState

    now = time.time()
    return WorkerState(name, "failed", models_of(settings), now, now + FAILED_TTL_S, error)


def _announce(redis: Redis, queue_prefix: str, state: WorkerState) -> None:
    """Write `state`; Redis trouble is logged, not raised (the state is for people; the work goes on)."""
    from redis.exceptions import RedisError

    from backend.queueing.fleet import write_state

    try:
        write_state(redis, queue_prefix, state)
    except RedisError as exc:
        log.warning("could not record the worker's state %r: %s", state.state, exc)


def _forget_forerunners(redis: Redis, queue_prefix: str, name: str) -> None:
    """Loaded: the failed records of earlier workers on this host (restarted by `serve`) are history."""
    from redis.exceptions import RedisError

    from backend.queueing.fleet import clear_states

    try:
        clear_states(redis, queue_prefix, socket.gethostname(), _running, keep=name)
    except RedisError as exc:
        log.debug("could not clear earlier workers' states: %s", exc)


def _running(pid: int) -> bool:
    """Whether process `pid` of this host still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


def _forget(redis: Redis, queue_prefix: str, name: str) -> None:
    from redis.exceptions import RedisError

    from backend.queueing.fleet import drop_state

    try:
        drop_state(redis, queue_prefix, name)
    except RedisError as exc:  # it lapses on its own (fleet.LOADING_TTL_S)
        log.debug("could not drop the worker's state record: %s", exc)


def _process_name() -> str:
    from backend.queueing.fleet import state_name

    return state_name(socket.gethostname(), os.getpid())


def _one_line(exc: Exception) -> str:
    """The error as one line, line breaks folded; an unexpected one (no BackendError) names its type."""
    from backend.errors import BackendError

    message = " ".join(str(exc).split())
    return message if isinstance(exc, BackendError) and message else f"{type(exc).__name__}: {message}".rstrip(": ")
