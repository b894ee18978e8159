"""Out of device memory: a batch that does not fit is split in two and run again rather than failing the job."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from backend.errors import DeviceOutOfMemoryError

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


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
