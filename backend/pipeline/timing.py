"""A hook for timing the flow's stages: production passes no timer (or the worker's statistics), the benchmark
passes one that synchronises the device at stage boundaries. Nothing is patched to measure the real code."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol


class StageTimer(Protocol):
    """Times one named stage: `with timer.stage("sam_encoder"): ...`. Must be safe to use from several threads."""

    def stage(self, name: str) -> AbstractContextManager[None]: ...


class NoTimer:
    """The timer that measures nothing (the default)."""

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        yield


NO_TIMER: StageTimer = NoTimer()
