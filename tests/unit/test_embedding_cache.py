"""The worker's image cache: a memory LRU bounded in bytes that evicts and never fails, a disk tier it falls back
to (a worker restarted finds its embeddings there), figures counted across threads, and the settings that make
the disk tier."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from backend.embedding_cache import CachedImage, CacheFigures, ImageCache
from backend.images.validators import Validator
from backend.lru import SizedLru
from backend.pipeline.embedding_store import EmbeddingStore
from backend.pipeline.embeddings import ImageEmbedding
from backend.settings import Settings

VALIDATOR = Validator("etag", '"v1"')


def _embedding(seed: int = 0) -> ImageEmbedding:
    generator = torch.Generator().manual_seed(seed)
    return ImageEmbedding(
        tensors={"image_embeddings": torch.randn(1, 8, 4, 4, generator=generator)},
        sizes={"original_sizes": (30, 40)},
        input_hw=(64, 64),
        image_hw=(30, 40),
    )


def _entry(seed: int = 0, image: bool = True) -> CachedImage:
    pixels = Image.new("RGB", (40, 30), (seed, 0, 0)) if image else None
    return CachedImage(VALIDATOR, (40, 30), pixels, _embedding(seed))


ENTRY_BYTES = 40 * 30 * 3 + 8 * 4 * 4 * 4  # RGB pixels + float32 embedding


def _figures(**counts: int) -> CacheFigures:
    defaults = {"hits": 0, "misses": 0, "disk_hits": 0, "evictions": 0, "memory_bytes": 0, "entries": 0}
    return CacheFigures(**(defaults | counts))


def test_an_entrys_bytes_are_its_pixels_and_its_embedding() -> None:
    assert _entry().nbytes == ENTRY_BYTES
    assert _entry(image=False).nbytes == 8 * 4 * 4 * 4
    assert CachedImage(VALIDATOR, (40, 30), None, None).nbytes == 0


def test_a_put_entry_is_a_memory_hit_and_an_unknown_key_a_miss() -> None:
    cache = ImageCache(max_bytes=10 * ENTRY_BYTES)
    entry = _entry()
    cache.put("a", entry)
    assert cache.get("a") is entry
    assert cache.get("b") is None
    assert cache.figures() == _figures(hits=1, misses=1, memory_bytes=ENTRY_BYTES, entries=1)


def test_a_full_cache_evicts_the_least_recently_used_entry() -> None:
    cache = ImageCache(max_bytes=2 * ENTRY_BYTES)
    cache.put("a", _entry(1))
    cache.put("b", _entry(2))
    assert cache.get("a") is not None  # a is now the most recently used
    cache.put("c", _entry(3))
    assert (cache.get("a") is not None, cache.get("b"), cache.get("c") is not None) == (True, None, True)
    assert cache.figures() == _figures(hits=3, misses=1, evictions=1, memory_bytes=2 * ENTRY_BYTES, entries=2)


def test_an_entry_larger_than_the_bound_is_not_kept_and_no_error() -> None:
    cache = ImageCache(max_bytes=ENTRY_BYTES - 1)
    cache.put("a", _entry())
    assert cache.get("a") is None
    assert cache.figures() == _figures(misses=1)


def test_a_zero_bound_keeps_nothing_and_every_get_is_a_miss() -> None:
    cache = ImageCache(max_bytes=0)
    cache.put("a", _entry())
    cache.put("empty", CachedImage(VALIDATOR, (40, 30), None, None))  # zero bytes: still not kept
    assert cache.get("a") is None and cache.get("empty") is None
    assert cache.figures() == _figures(misses=2)


def test_forget_drops_an_entry_from_memory_and_disk(tmp_path: Path) -> None:
    store = EmbeddingStore(tmp_path, max_bytes=2**20)
    cache = ImageCache(max_bytes=10 * ENTRY_BYTES, store=store)
    cache.put("a", _entry(), to_disk=True)
    cache.forget("a")
    cache.forget("never there")
    assert cache.get("a") is None and store.get("a", "cpu", torch.float32) is None
    assert cache.figures().memory_bytes == 0


def test_a_restarted_worker_finds_the_embedding_on_disk_and_keeps_it_in_memory(tmp_path: Path) -> None:
    before = ImageCache(max_bytes=10 * ENTRY_BYTES, store=EmbeddingStore(tmp_path, max_bytes=2**20))
    entry = _entry()
    before.put("https://host/image.jpg?x=1\nmodel", entry, to_disk=True)

    store = EmbeddingStore(tmp_path, max_bytes=2**20)
    after = ImageCache(max_bytes=10 * ENTRY_BYTES, store=store, dtype=torch.bfloat16)
    found = after.get("https://host/image.jpg?x=1\nmodel")
    assert found is not None and found.image is None
    assert (found.validator, found.image_wh) == (VALIDATOR, (40, 30))
    assert found.embedding is not None and found.embedding.tensors["image_embeddings"].dtype == torch.bfloat16
    torch.testing.assert_close(
        found.embedding.tensors["image_embeddings"].float(),
        entry.embedding.tensors["image_embeddings"] if entry.embedding else None,
        atol=3e-2,
        rtol=1e-2,
    )
    store.forget("https://host/image.jpg?x=1\nmodel")  # from now on only memory has it
    assert after.get("https://host/image.jpg?x=1\nmodel") is found
    figures = after.figures()
    assert (figures.hits, figures.disk_hits, figures.misses, figures.entries) == (2, 1, 0, 1)
    assert figures.memory_bytes == 8 * 4 * 4 * 2  # the bfloat16 embedding, no pixels


def test_the_disk_is_written_only_when_asked_and_only_with_an_embedding(tmp_path: Path) -> None:
    store = EmbeddingStore(tmp_path, max_bytes=2**20)
    cache = ImageCache(max_bytes=10 * ENTRY_BYTES, store=store)
    cache.put("memory only", _entry())
    cache.put("no embedding", CachedImage(VALIDATOR, (40, 30), None, None), to_disk=True)
    assert list(tmp_path.iterdir()) == []
    cache.put("both", _entry(), to_disk=True)
    assert store.path("both").exists()


def test_a_zero_memory_bound_still_reads_and_writes_the_disk(tmp_path: Path) -> None:
    cache = ImageCache(max_bytes=0, store=EmbeddingStore(tmp_path, max_bytes=2**20))
    cache.put("a", _entry(), to_disk=True)
    found = cache.get("a")
    assert found is not None and found.embedding is not None
    assert cache.figures() == _figures(hits=1, disk_hits=1)


def test_a_disk_entry_with_unreadable_meta_is_a_miss_and_deleted(tmp_path: Path) -> None:
    store = EmbeddingStore(tmp_path, max_bytes=2**20)
    store.put("no validator", _embedding(), {"image_wh": "40x30"})
    store.put("bad size", _embedding(), {"validator": VALIDATOR.to_text(), "image_wh": "forty"})
    store.put("bad validator", _embedding(), {"validator": "nonsense", "image_wh": "40x30"})
    cache = ImageCache(max_bytes=10 * ENTRY_BYTES, store=store)
    for key in ("no validator", "bad size", "bad validator"):
        assert cache.get(key) is None and not store.path(key).exists()
    assert cache.figures() == _figures(misses=3)


def test_figures_count_every_get_from_many_threads() -> None:
    cache = ImageCache(max_bytes=10 * ENTRY_BYTES)
    cache.put("a", _entry())

    def clicks() -> None:
        for index in range(500):
            cache.get("a" if index % 2 else "missing")

    threads = [threading.Thread(target=clicks) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert cache.figures() == _figures(hits=1000, misses=1000, memory_bytes=ENTRY_BYTES, entries=1)


def test_the_lru_counts_evictions_and_discards_without_counting() -> None:
    lru: SizedLru[str, int] = SizedLru(max_bytes=10, max_items=2)
    lru.put("a", 1, 4)
    lru.put("b", 2, 4)
    lru.put("c", 3, 4)  # over the count bound: a goes
    lru.put("d", 4, 8)  # over the byte bound: b and c go
    assert (lru.evictions, len(lru), lru.size) == (3, 1, 8)
    lru.discard("d")
    lru.discard("never there")
    assert (lru.evictions, len(lru), lru.size, lru.get("d")) == (3, 0, 0, None)


def test_settings_make_the_disk_store_only_when_its_folder_is_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EMBEDDING_DISK_DIR", raising=False)
    monkeypatch.delenv("EMBEDDING_DISK_MB", raising=False)
    assert Settings().embedding_store() is None
    monkeypatch.setenv("EMBEDDING_DISK_DIR", "  ")
    assert Settings().embedding_store() is None  # blank is unset
    monkeypatch.setenv("EMBEDDING_DISK_DIR", str(tmp_path / "embeddings"))
    monkeypatch.setenv("EMBEDDING_DISK_MB", "3")
    store = Settings().embedding_store()
    assert store is not None and store.folder == tmp_path / "embeddings" and store.folder.is_dir()
    assert store.max_bytes == 3 * 2**20


@pytest.mark.parametrize(("name", "value"), [("embedding_disk_mb", 0), ("embedding_disk_dir", "/tmp/a\0b")])
def test_bad_disk_settings_are_refused(name: str, value: object) -> None:
    with pytest.raises(ValidationError, match=name):
        Settings(**{name: value})
