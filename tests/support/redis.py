"""The Redis-protocol server tests run against: REDIS_URL when set, else an embedded valkey."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from backend.queueing.connection import embedded_redis


@contextmanager
def redis_for_tests() -> Iterator[str]:
    """Yield a redis:// URL for the block.

    REDIS_URL, when set in the environment, is used as it is (tests use their own queue names, so runs do not
    see each other's jobs); otherwise an embedded valkey without persistence runs for the block.
    """
    external = os.environ.get("REDIS_URL")
    if external:
        yield external
        return
    with embedded_redis() as url:
        yield url
