"""The on-disk embedding store: float16 round trips, files named by the key's digest, a byte bound kept by deleting
the least recently used files, folders shared by several stores, and bad files that are misses, never errors."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from backend.pipeline import embedding_store
from backend.pipeline.build import build_pipeline
from backend.pipeline.embedding_store import FORMAT, MAX_HEADER_BYTES, SUFFIX, TEMP_PREFIX, EmbeddingStore
from backend.pipeline.embeddings import ImageEmbedding
from backend.pipeline.grounded_sam import GroundedSam
from backend.pipeline.types import DetectionThresholds, ModelSpec

URL_KEY = "https://images.example/a b/c?token=x&y=%2F..%2F\n../../etc/passwd\nsam:deadbeef"
META = {"validator": "etag:%22abc%22", "image_wh": "40x30", "note": "ünïcode"}


def _embedding(seed: int = 0, scale: float = 1.0) -> ImageEmbedding:
    generator = torch.Generator().manual_seed(seed)
    return ImageEmbedding(
        tensors={
            "image_embeddings": torch.randn(1, 8, 4, 4, generator=generator) * scale,
            "image_embeddings.1": torch.randn(1, 4, 8, 8, generator=generator).to(torch.bfloat16),
            "positions": torch.arange(6, dtype=torch.int64).reshape(1, 6),
        },
        sizes={"original_sizes": (30, 40), "reshaped_sizes": (48, 64)},
        input_hw=(64, 64),
        image_hw=(30, 40),
    )


def _entry_bytes() -> int:
    """Bytes of one _embedding() file (all the same size: same shapes and meta)."""
    return len(embedding_store.encode_entry(_embedding(), META, "0" * 64))


def _files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def _age(store: EmbeddingStore, key: str, seconds_ago: float) -> None:
    """Sets `key`'s file's last use `seconds_ago` in the past (no wait on the clock)."""
    when = time.time_ns() - int(seconds_ago * 1e9)
    os.utime(store.path(key), ns=(when, when))


def test_an_entry_comes_back_within_float16_with_its_sizes_and_meta_exact(tmp_path: Path) -> None:
    store = EmbeddingStore(tmp_path / "cache", max_bytes=2**20)
    original = _embedding()
    store.put(URL_KEY, original, META)
    found = store.get(URL_KEY, "cpu", torch.float32)
    assert found is not None
    embedding, meta = found
    assert meta == META
    assert set(embedding.tensors) == set(original.tensors)
    for name, tensor in original.tensors.items():
        back = embedding.tensors[name]
        assert back.shape == tensor.shape and back.device.type == "cpu"
        if tensor.is_floating_point():
            assert back.dtype == torch.float32
            torch.testing.assert_close(back, tensor.float(), atol=1e-2, rtol=1e-3)  # float16's precision
        else:
            assert back.dtype == tensor.dtype and torch.equal(back, tensor)
    assert dict(embedding.sizes) == dict(original.sizes)
    assert (embedding.input_hw, embedding.image_hw) == (original.input_hw, original.image_hw)


@pytest.fixture(scope="module", params=["hf", "pth"])
def pipeline(request: pytest.FixtureRequest, tiny_detector_dir: Path, tiny_hf_sam_dir: Path) -> GroundedSam:
    """A tiny random pipeline with transformers SAM (hf) or segment-anything's (pth)."""
    if request.param == "hf":
        spec = ModelSpec(detector=str(tiny_detector_dir), sam=str(tiny_hf_sam_dir))
    else:
        checkpoint = request.getfixturevalue("tiny_sam_checkpoint")
        spec = ModelSpec(
            detector=str(tiny_detector_dir), sam="", sam_checkpoint=str(checkpoint), sam_model_type="vit_b"
        )
    return build_pipeline(spec, DetectionThresholds(box=0.0, text=0.0, max_detections=3))


def test_a_real_segmenters_embedding_answers_a_click_alike_after_the_disk(
    pipeline: GroundedSam, tmp_path: Path
) -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8))
    encoded = pipeline.encode(image)
    store = EmbeddingStore(tmp_path, max_bytes=2**24)
    store.put("k", encoded, {})
    found = store.get("k", pipeline.segmenter_device, pipeline.segmenter_dtype)
    assert found is not None
    points, positive = np.array([[40.0, 30.0], [10.0, 50.0]]), np.array([True, False])
    before = pipeline.segment_points(encoded, points, positive)
    after = pipeline.segment_points(found[0], points, positive)
    assert after.score == pytest.approx(before.score, abs=1e-2)
    mask_before, mask_after = before.mask.to_array(), after.mask.to_array()
    union = (mask_before | mask_after).sum()
    assert union == 0 or (mask_before & mask_after).sum() / union >= 0.9


def test_the_file_holds_float16_and_is_named_by_the_keys_digest_never_the_key(tmp_path: Path) -> None:
    store = EmbeddingStore(tmp_path, max_bytes=2**20)
    store.put(URL_KEY, _embedding(), META)
    name = hashlib.sha256(URL_KEY.encode()).hexdigest() + SUFFIX
    assert _files(tmp_path) == [name]  # no temporary file left behind either
    assert (tmp_path / name).stat().st_mode & 0o777 == 0o644  # other users' workers of the machine can read it
    with safetensors.safe_open(str(tmp_path / name), framework="pt") as file:
        metadata = file.metadata()
        dtypes = {key: file.get_slice(key).get_dtype() for key in file.keys()}  # noqa: SIM118
    assert dtypes == {"image_embeddings": "F16", "image_embeddings.1": "F16", "positions": "I64"}
    assert metadata["format"] == FORMAT and "images.example" not in (tmp_path / name).read_bytes().decode("latin-1")


def test_get_casts_to_the_asked_dtype_and_a_large_value_is_clamped_not_infinite(tmp_path: Path) -> None:
    store = EmbeddingStore(tmp_path, max_bytes=2**20)
    store.put("k", _embedding(scale=1e6), {})
    found = store.get("k", torch.device("cpu"), torch.bfloat16)
    assert found is not None
    tensors = found[0].tensors
    assert tensors["image_embeddings"].dtype == torch.bfloat16 and tensors["positions"].dtype == torch.int64
    assert torch.isfinite(tensors["image_embeddings"].float()).all()


def test_an_unknown_key_is_a_miss_and_a_second_put_replaces_the_entry(tmp_path: Path) -> None:
    store = EmbeddingStore(tmp_path, max_bytes=2**20)
    assert store.get("nothing", "cpu", torch.float32) is None
    store.put("k", _embedding(seed=1), {"v": "1"})
    store.put("k", _embedding(seed=2), {"v": "2"})
    found = store.get("k", "cpu", torch.float32)
    assert found is not None and found[1] == {"v": "2"}
    torch.testing.assert_close(
        found[0].tensors["image_embeddings"], _embedding(seed=2).tensors["image_embeddings"], atol=1e-2, rtol=1e-3
    )
    assert len(_files(tmp_path)) == 1


def test_forget_deletes_an_entry(tmp_path: Path) -> None:
    store = EmbeddingStore(tmp_path, max_bytes=2**20)
    store.put("k", _embedding(), {})
    store.forget("k")
    store.forget("k")  # twice: nothing left to delete, no error
    assert store.get("k", "cpu", torch.float32) is None and _files(tmp_path) == []


def test_the_bound_deletes_the_least_recently_used_files_first(tmp_path: Path) -> None:
    store = EmbeddingStore(tmp_path, max_bytes=3 * _entry_bytes())
    for index, key in enumerate(("a", "b", "c")):
        store.put(key, _embedding(), META)
        _age(store, key, seconds_ago=100 - index)  # a used first, then b, then c
    assert store.get("a", "cpu", torch.float32) is not None  # a is now the most recently used
    store.put("d", _embedding(), META)
    assert store.path("b").exists() is False
    assert all(store.path(key).exists() for key in ("a", "c", "d"))
    _age(store, "d", seconds_ago=1)
    store.put("e", _embedding(), META)
    assert [key for key in "abcde" if store.path(key).exists()] == ["a", "d", "e"]
    assert store.total_bytes() <= store.max_bytes


def test_an_entry_over_the_whole_bound_is_not_written(tmp_path: Path) -> None:
    store = EmbeddingStore(tmp_path, max_bytes=_entry_bytes() - 1)
    store.put("k", _embedding(), META)
    assert _files(tmp_path) == [] and store.get("k", "cpu", torch.float32) is None


def test_a_bound_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="positive"):
        EmbeddingStore(tmp_path, max_bytes=0)


def test_two_stores_share_one_folder(tmp_path: Path) -> None:
    first = EmbeddingStore(tmp_path, max_bytes=2 * _entry_bytes())
    second = EmbeddingStore(tmp_path, max_bytes=2 * _entry_bytes())
    first.put("from-first", _embedding(seed=1), {"by": "first"})
    found = second.get("from-first", "cpu", torch.float32)
    assert found is not None and found[1] == {"by": "first"}
    _age(second, "from-first", seconds_ago=50)
    second.put("x", _embedding(), {})
    second.put("y", _embedding(), {})  # evicts the first store's file: it is the least recently used
    assert first.get("from-first", "cpu", torch.float32) is None
    assert first.get("y", "cpu", torch.float32) is not None


def test_stores_writing_and_reading_one_folder_at_once_never_fail_and_end_within_the_bound(tmp_path: Path) -> None:
    stores = [EmbeddingStore(tmp_path, max_bytes=3 * _entry_bytes()) for _ in range(4)]
    errors: list[BaseException] = []

    def work(store: EmbeddingStore, offset: int) -> None:
        try:
            for index in range(12):
                store.put(f"key {(index + offset) % 6}", _embedding(seed=index), META)
                found = store.get(f"key {(index + offset + 1) % 6}", "cpu", torch.float32)
                assert found is None or found[1] == META  # a whole entry or none, never a torn one
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(store, index)) for index, store in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == [] and not any(thread.is_alive() for thread in threads)
    assert stores[0].total_bytes() <= stores[0].max_bytes
    assert not any(name.startswith(TEMP_PREFIX) for name in _files(tmp_path))


def test_a_file_evicted_by_another_worker_meanwhile_is_no_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = EmbeddingStore(tmp_path, max_bytes=2 * _entry_bytes())
    for index, key in enumerate(("a", "b")):
        store.put(key, _embedding(), META)
        _age(store, key, seconds_ago=100 - index)
    listing = store._entries

    def listed_then_evicted_elsewhere() -> list[embedding_store._Listed]:
        entries = listing()
        store.path("a").unlink(missing_ok=True)  # another worker deletes a between our listing and our unlink
        return entries

    monkeypatch.setattr(store, "_entries", listed_then_evicted_elsewhere)
    store.put("c", _embedding(), META)
    assert [key for key in "abc" if store.path(key).exists()] == ["b", "c"]


def test_stale_temporary_files_are_deleted_and_fresh_ones_kept(tmp_path: Path) -> None:
    store = EmbeddingStore(tmp_path, max_bytes=2**20)
    stale, fresh = tmp_path / f"{TEMP_PREFIX}crashed.tmp", tmp_path / f"{TEMP_PREFIX}writing.tmp"
    stale.write_bytes(b"x" * 10)
    fresh.write_bytes(b"x" * 10)
    old = time.time_ns() - int(2 * embedding_store.STALE_TEMP_S * 1e9)
    os.utime(stale, ns=(old, old))
    store.put("k", _embedding(), META)
    assert not stale.exists() and fresh.exists()


def test_a_write_that_fails_is_logged_and_leaves_no_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "cache"
    store = EmbeddingStore(folder, max_bytes=2**20)
    folder.rmdir()  # the folder went away (a cleaned-up disk)
    with caplog.at_level(logging.WARNING, logger=embedding_store.__name__):
        store.put("k", _embedding(), META)
    assert "cannot write" in caplog.text
    assert store.get("k", "cpu", torch.float32) is None


def _valid_file(store: EmbeddingStore, key: str) -> bytes:
    store.put(key, _embedding(), META)
    return store.path(key).read_bytes()


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _flipped(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0xFF])


def _header_claim(claim: int) -> bytes:
    return claim.to_bytes(8, "little") + b"{}" * 8


def _foreign(_: bytes) -> bytes:
    return safetensors.torch.save({"weight": torch.zeros(3)}, {"format": "pt"})


def _other_version(_: bytes) -> bytes:
    return safetensors.torch.save({"weight": torch.zeros(3)}, {"format": FORMAT, "version": "0"})


@pytest.mark.parametrize(
    "spoil",
    [
        lambda data: b"",
        lambda data: b"not a safetensors file at all",
        _truncated,
        _flipped,
        lambda data: _header_claim(2**62),  # a huge header length: refused before allocating it
        lambda data: _header_claim(MAX_HEADER_BYTES + 1),
        lambda data: _header_claim(100),  # more than the file holds
        lambda data: data[:8] + b"[" + data[9:],  # the JSON header broken
        _foreign,
        _other_version,
    ],
    ids=[
        "empty",
        "garbage",
        "truncated",
        "flipped-byte",
        "huge-header",
        "header-over-limit",
        "header-past-end",
        "bad-json",
        "foreign",
        "other-version",
    ],
)
def test_a_bad_file_is_a_miss_deleted_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, spoil: object
) -> None:
    store = EmbeddingStore(tmp_path, max_bytes=2**20)
    data = _valid_file(store, URL_KEY)
    assert callable(spoil)
    store.path(URL_KEY).write_bytes(spoil(data))
    with caplog.at_level(logging.WARNING, logger=embedding_store.__name__):
        assert store.get(URL_KEY, "cpu", torch.float32) is None
    assert _files(tmp_path) == []
    assert "no readable entry" in caplog.text and "images.example" not in caplog.text  # the key is never logged


def test_a_bad_file_is_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = EmbeddingStore(tmp_path, max_bytes=2**20)
    with caplog.at_level(logging.WARNING, logger=embedding_store.__name__):
        for _ in range(3):
            store.path("k").write_bytes(b"garbage")
            assert store.get("k", "cpu", torch.float32) is None
    assert len(caplog.records) == 1


def test_a_file_copied_under_another_keys_name_is_a_miss(tmp_path: Path) -> None:
    store = EmbeddingStore(tmp_path, max_bytes=2**20)
    store.path("other").write_bytes(_valid_file(store, "k"))
    assert store.get("other", "cpu", torch.float32) is None
    assert store.get("k", "cpu", torch.float32) is not None


def test_a_file_over_the_bound_is_a_miss_without_reading_it(tmp_path: Path) -> None:
    big = EmbeddingStore(tmp_path, max_bytes=2**20)
    big.put("k", _embedding(), META)
    small = EmbeddingStore(tmp_path, max_bytes=_entry_bytes() - 1)
    assert small.get("k", "cpu", torch.float32) is None and not small.path("k").exists()
