"""The worker's cache of decoded images and their SAM image embeddings: a memory LRU bounded in bytes, optionally
backed by the on-disk EmbeddingStore (float16, survives restarts, shared by the workers of one machine).

Keys are opaque to the cache (the flow builds them from the image reference and the model). A full cache evicts
its least recently used entries; it never fails a request.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch
from PIL import Image

from backend.images.validators import Validator
from backend.lru import SizedLru
from backend.pipeline.embedding_store import EmbeddingStore
from backend.pipeline.embeddings import ImageEmbedding

log = logging.getLogger(__name__)

# Count bound of the memory tier besides its byte bound (a few hundred full-size entries fit 1 GB).
MAX_ENTRIES = 4096


@dataclass(frozen=True, slots=True, eq=False)
class CachedImage:
    """One image as a worker keeps it: how to tell whether it changed, its size, the decoded pixels (None when
    only the embedding came back from disk) and the SAM embedding (None before it was computed)."""

    validator: Validator
    image_wh: tuple[int, int]  # the decoded image's (width, height)
    image: Image.Image | None
    embedding: ImageEmbedding | None

    @property
    def nbytes(self) -> int:
        """Bytes held: the decoded pixels (W * H * bands) plus the embedding's tensors (on whatever device)."""
        pixels = self.image.width * self.image.height * len(self.image.getbands()) if self.image is not None else 0
        return pixels + (self.embedding.nbytes if self.embedding is not None else 0)


@dataclass(frozen=True, slots=True)
class CacheFigures:
    """Counts since the cache was made (hits include disk hits) and what the memory tier holds now."""

    hits: int
    misses: int
    disk_hits: int
    evictions: int  # memory entries dropped to make room
    memory_bytes: int
    entries: int


class ImageCache:
    """Memory LRU of CachedImage bounded by `max_bytes` (0: keeps nothing), with an optional disk tier.

    A disk hit comes back with image None and its embedding in `dtype` on `device` (the segmenter's), and is kept
    in memory from then on. Thread-safe.
    """

    def __init__(
        self,
        max_bytes: int,
        store: EmbeddingStore | None = None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self._memory: SizedLru[str, CachedImage] = SizedLru(max_bytes, max_items=MAX_ENTRIES)
        self._store = store
        self._device = device
        self._dtype = dtype
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0
        self._disk_hits = 0

    def get(self, key: str) -> CachedImage | None:
        """`key`'s entry from memory, else from disk (then kept in memory), else None (a miss)."""
        entry = self._memory.get(key)
        from_disk = False
        if entry is None and self._store is not None:
            entry, from_disk = self._from_store(self._store, key), True
        with self._lock:
            if entry is None:
                self._misses += 1
            else:
                self._hits += 1
                self._disk_hits += from_disk
        return entry

    def put(self, key: str, entry: CachedImage, to_disk: bool = False) -> bool:
        """Keeps `entry` (evicting the least recently used ones to fit; one larger than the bound is not kept);
        with `to_disk` and an embedding, also writes it to the store. True when memory keeps it."""
        kept = self._keep(key, entry)
        if to_disk and self._store is not None and entry.embedding is not None:
            meta = {"validator": entry.validator.to_text(), "image_wh": f"{entry.image_wh[0]}x{entry.image_wh[1]}"}
            self._store.put(key, entry.embedding, meta)
        return kept

    def peek(self, key: str) -> CachedImage | None:
        """`key`'s entry in memory, uncounted and without touching the disk (what a job just kept)."""
        return self._memory.peek(key)

    def drop_memory(self) -> None:
        """Forget every entry in memory (the disk keeps its own): frees the device memory the embeddings hold."""
        self._memory.clear()

    @property
    def has_store(self) -> bool:
        """Whether an on-disk tier is behind the memory one."""
        return self._store is not None

    def forget(self, key: str) -> None:
        """Drops `key` from memory and disk (its image changed)."""
        self._memory.discard(key)
        if self._store is not None:
            self._store.forget(key)

    def figures(self) -> CacheFigures:
        with self._lock:
            return CacheFigures(
                hits=self._hits,
                misses=self._misses,
                disk_hits=self._disk_hits,
                evictions=self._memory.evictions,
                memory_bytes=self._memory.size,
                entries=len(self._memory),
            )

    def _keep(self, key: str, entry: CachedImage) -> bool:
        if self._memory.max_bytes <= 0:  # a zero budget keeps nothing, not even an empty entry
            return False
        self._memory.put(key, entry, entry.nbytes)
        return self._memory.peek(key) is entry

    def _from_store(self, store: EmbeddingStore, key: str) -> CachedImage | None:
        found = store.get(key, self._device, self._dtype)
        if found is None:
            return None
        embedding, meta = found
        try:
            entry = CachedImage(_validator(meta), _image_wh(meta), None, embedding)
        except ValueError as exc:
            log.warning("embedding cache: a disk entry's meta is unreadable (%s); deleted, counted as a miss", exc)
            store.forget(key)
            return None
        self._keep(key, entry)
        return entry


def _validator(meta: dict[str, str]) -> Validator:
    if "validator" not in meta:
        raise ValueError("no validator")
    return Validator.from_text(meta["validator"])


def _image_wh(meta: dict[str, str]) -> tuple[int, int]:
    """ "<width>x<height>" as put() writes it; ValueError otherwise."""
    width, x, height = meta.get("image_wh", "").partition("x")
    if not x or not width.isdigit() or not height.isdigit():
        raise ValueError(f"image_wh {meta.get('image_wh', '')[:40]!r} is no <width>x<height>")
    return (int(width), int(height))
