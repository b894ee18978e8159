"""Keeping the device busy: a batch that does not fit in its memory is split in two and run again rather than
failing the job; CPU preprocessing runs on several threads so the device waits less for it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from backend.errors import BackendError

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# Threads for the processors' CPU work (resize, normalise): they release the GIL in torch and PIL. 1: in the
# calling thread (the benchmark's staged pass, whose stage timers are per thread, sets it).
PREPROCESS_THREADS = 4


class DeviceOutOfMemoryError(BackendError):
    """A single item (one image, one box) does not fit in the device's memory, even alone."""


def run_halving(run: Callable[[Sequence[T]], list[R]], items: Sequence[T], what: str) -> list[R]:
    """`run(items)`; when the device runs out of memory, the two halves one after the other, recursively.

    The halves' lists are concatenated, so `run` must return a list that concatenates that way (one
    result per item, in order; or one result per call).
    Raises DeviceOutOfMemoryError when one item alone does not fit. No items: `run` is not called.
    """
    if not items:
        return []
    try:
        return run(items)
    except torch.OutOfMemoryError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else "out of memory"
    # Retry outside the handler: the traceback holds the failed attempt's frames and their tensors.
    _release_cached_memory()
    if len(items) <= 1:
        raise DeviceOutOfMemoryError(f"one {what} does not fit in the device's memory: {reason}")
    middle = len(items) // 2
    log.warning(
        "out of device memory on %d %ss; running them as %d + %d", len(items), what, middle, len(items) - middle
    )
    return run_halving(run, items[:middle], what) + run_halving(run, items[middle:], what)


def _release_cached_memory() -> None:
    # The failed attempt's blocks stay in the caching allocator; hand them back before the smaller retry.
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def parallel_map(function: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """`[function(item) for item in items]`, on PREPROCESS_THREADS threads; results in order."""
    if PREPROCESS_THREADS <= 1 or len(items) <= 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(min(PREPROCESS_THREADS, len(items))) as pool:
        return list(pool.map(function, items))


def prefetched(function: Callable[[T], R], items: Sequence[T]) -> Iterator[R]:
    """`function(item)` for each item, in order; the next one is computed on a side thread while the caller
    works with the current one (in the calling thread when PREPROCESS_THREADS is 1 or there is one item)."""
    if PREPROCESS_THREADS <= 1 or len(items) <= 1:
        yield from map(function, items)
        return
    with ThreadPoolExecutor(1) as pool:
        upcoming = pool.submit(function, items[0]) if items else None
        for index in range(len(items)):
            current = upcoming.result()  # type: ignore[union-attr]
            upcoming = pool.submit(function, items[index + 1]) if index + 1 < len(items) else None
            yield current
