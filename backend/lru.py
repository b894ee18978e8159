"""A small thread-safe LRU cache bounded by the summed size of its entries, not only by their count."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SizedLru(Generic[K, V]):
    """Keeps the most recently used entries while their sizes sum to at most `max_bytes` (and `max_items`).

    The caller states each entry's size (e.g. the bytes of the text it was computed from); an entry
    larger than the whole budget is not kept at all.
    """

    def __init__(self, max_bytes: int, max_items: int = 1024) -> None:
        self.max_bytes = max_bytes
        self.max_items = max_items
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._evictions = 0
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: K, value: V, size: int) -> None:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if size > self.max_bytes:
                return
            self._entries[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes or len(self._entries) > self.max_items:
                _, (_, dropped) = self._entries.popitem(last=False)
                self._bytes -= dropped
                self._evictions += 1

    def peek(self, key: K) -> V | None:
        """`key`'s value without making it the most recently used."""
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else entry[0]

    def discard(self, key: K) -> None:
        """Drops `key`'s entry if there is one (not counted as an eviction)."""
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]

    @property
    def size(self) -> int:
        """Summed size of the kept entries."""
        return self._bytes

    @property
    def evictions(self) -> int:
        """Entries dropped so far to make room for others (least recently used first)."""
        return self._evictions

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
