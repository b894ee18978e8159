"""CPU preprocessing on several threads, so the device waits less for it (the processors' resize and normalise
release the GIL in torch and PIL)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

# Threads for the processors' CPU work. 1: in the calling thread (the benchmark's staged pass, whose stage
# timers are per thread, sets it).
PREPROCESS_THREADS = 4


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
