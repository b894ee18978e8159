"""The on-disk tier of the embedding cache: one safetensors file per key, float16, bounded in bytes.

Keys are opaque strings (the caller's image identity and model); a file is named by the key's sha256, never by the
key itself (keys hold URLs). Floating tensors are stored as float16 and come back in the dtype and on the device
the caller asks for. Everything else (sizes, input_hw, image_hw, the caller's meta strings, the format version, a
digest of the tensor bytes) lives in the safetensors header's `__metadata__`.

Several workers of one machine may share the folder: a write goes to a temporary file in the same folder and is
renamed over the entry (os.replace), so a reader sees a whole old file, a whole new one or none; after a write the
least recently used entries (by mtime: `get` touches its file) are deleted until the folder is within its bound. A
file that is truncated, corrupt, foreign or of another format version is a miss: it is deleted and logged, never
raised to the caller.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import safetensors
import safetensors.torch
import torch

from backend.pipeline.embeddings import ImageEmbedding

log = logging.getLogger(__name__)

FORMAT = "grounded-sam-embedding"
VERSION = "1"
SUFFIX = ".safetensors"
TEMP_PREFIX = ".tmp-"
# The JSON header a valid entry has is a few kB (a dozen tensors, a few meta strings); a larger claim is refused
# before anything is allocated for it.
MAX_HEADER_BYTES = 1 << 20
# A temporary file this old is a crashed writer's; the next eviction pass deletes it.
STALE_TEMP_S = 3600.0
_FP16_MAX = torch.finfo(torch.float16).max
_ENTRY_NAME = re.compile(r"[0-9a-f]{64}" + re.escape(SUFFIX))


class _BadEntry(Exception):
    """A file that is no readable entry of this format version (the store deletes it and reports a miss)."""


@dataclass(frozen=True, slots=True)
class _Listed:
    name: str
    size: int
    mtime_ns: int


def key_digest(key: str) -> str:
    """The sha256 (hex) of a key: its file's name without the suffix."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


class EmbeddingStore:
    """A folder of image embeddings (float16 safetensors files) bounded by `max_bytes` in all."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        """Creates `folder` when missing (OSError when it cannot be created)."""
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.folder = folder
        self.max_bytes = max_bytes
        self._reported: set[str] = set()
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        """The file that holds `key`'s entry (whether or not it exists)."""
        return self.folder / (key_digest(key) + SUFFIX)

    def put(self, key: str, embedding: ImageEmbedding, meta: Mapping[str, str]) -> None:
        """Writes `key`'s entry (replacing any), then evicts the least recently used entries down to the bound.

        An entry larger than the whole bound is not written; a failed write (disk full, folder gone) is logged and
        leaves the store as it was.
        """
        data = encode_entry(embedding, meta, key_digest(key))
        if len(data) > self.max_bytes:
            log.debug(
                "embedding store: a %d-byte entry exceeds the %d-byte bound; not written", len(data), self.max_bytes
            )
            return
        path = self.path(key)
        try:
            self._write(path, data)
        except OSError as exc:
            log.warning("embedding store: cannot write %s: %s", path, exc)
            return
        self._evict(keep=path.name)

    def get(
        self, key: str, device: torch.device | str, dtype: torch.dtype
    ) -> tuple[ImageEmbedding, dict[str, str]] | None:
        """`key`'s embedding (floating tensors in `dtype`, all on `device`) and the meta stored with it, or None.

        A hit marks the entry as just used (its mtime). A bad file is a miss, deleted.
        """
        path = self.path(key)
        try:
            with path.open("rb") as file:
                data = _read_entry(file, self.max_bytes)
            embedding, meta = decode_entry(data, key_digest(key))
        except FileNotFoundError:
            return None
        except (_BadEntry, OSError) as exc:
            self._drop_bad(path, exc)
            return None
        with contextlib.suppress(OSError):  # evicted meanwhile by another worker: the entry is still ours
            os.utime(path)
        return embedding.to(device, dtype), meta

    def forget(self, key: str) -> None:
        """Deletes `key`'s entry if there is one (a file that cannot be deleted is logged, never raised)."""
        try:
            self.path(key).unlink(missing_ok=True)
        except OSError as exc:
            log.warning("embedding store: cannot delete %s: %s", self.path(key), exc)

    def total_bytes(self) -> int:
        """Summed size of the entries now in the folder (other workers' included)."""
        return sum(listed.size for listed in self._entries())

    def _write(self, path: Path, data: bytes) -> None:
        descriptor, temp = tempfile.mkstemp(dir=self.folder, prefix=TEMP_PREFIX, suffix=".tmp")
        try:
            os.fchmod(descriptor, 0o644)  # mkstemp's 0600 would keep other users' workers of the machine out
            with os.fdopen(descriptor, "wb") as file:
                file.write(data)
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise

    def _entries(self) -> list[_Listed]:
        """The folder's entries, oldest use first; deletes stale temporary files on the way."""
        listed: list[_Listed] = []
        now = time.time()
        try:
            scan = list(os.scandir(self.folder))
        except OSError as exc:
            log.warning("embedding store: cannot list %s: %s", self.folder, exc)
            return listed
        for item in scan:
            try:
                stat = item.stat(follow_symlinks=False)
            except FileNotFoundError:  # deleted meanwhile (another worker evicted or renamed it)
                continue
            if item.name.startswith(TEMP_PREFIX) and now - stat.st_mtime > STALE_TEMP_S:
                with contextlib.suppress(OSError):
                    os.unlink(item.path)
            elif _ENTRY_NAME.fullmatch(item.name):
                listed.append(_Listed(item.name, stat.st_size, stat.st_mtime_ns))
        return sorted(listed, key=lambda entry: (entry.mtime_ns, entry.name))

    def _evict(self, keep: str) -> None:
        entries = self._entries()
        total = sum(entry.size for entry in entries)
        for entry in entries:
            if total <= self.max_bytes:
                return
            if entry.name == keep:
                continue
            with contextlib.suppress(FileNotFoundError):  # another worker evicted it first: gone all the same
                os.unlink(self.folder / entry.name)
            total -= entry.size

    def _drop_bad(self, path: Path, exc: BaseException) -> None:
        if path.name not in self._reported:
            self._reported.add(path.name)
            log.warning("embedding store: %s is no readable entry (%s); deleted, counted as a miss", path, exc)
        with contextlib.suppress(OSError):
            path.unlink()


def _read_entry(file: BinaryIO, max_bytes: int) -> bytes:
    """A whole entry file, after checking that its header length is sane for the file's size: a corrupt or hostile
    length never makes this allocate more than the file holds (or MAX_HEADER_BYTES for the header)."""
    size = os.fstat(file.fileno()).st_size
    if size > max_bytes:
        raise _BadEntry(f"{size} bytes, over the store's bound")
    head = file.read(8)
    if len(head) < 8:
        raise _BadEntry("truncated before its header length")
    header_len = int.from_bytes(head, "little")
    if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
        raise _BadEntry(f"header length {header_len} impossible for a {size}-byte file")
    header = file.read(header_len)
    _check_header(header)
    rest = file.read(size - 8 - header_len)
    return head + header + rest


def _check_header(header: bytes) -> None:
    """Refuses foreign files and other format versions before their tensor bytes are read."""
    try:
        parsed = json.loads(header)
    except ValueError as exc:
        raise _BadEntry("header is no JSON") from exc
    meta = parsed.get("__metadata__") if isinstance(parsed, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _BadEntry("not an embedding entry")
    if meta.get("version") != VERSION:
        raise _BadEntry(f"format version {meta.get('version')!r}, this store reads {VERSION}")


def _stored(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` as written: on the CPU in a storage of its own, floating ones float16 (clamped to its range: no inf
    from a large value; cast on their device, so half the bytes cross to the CPU)."""
    tensor = tensor.detach()
    if tensor.is_floating_point():
        tensor = tensor.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)  # clamp copies: the caller's stays as it was
    elif tensor.device.type == "cpu":
        tensor = tensor.clone()
    return tensor.to("cpu").contiguous()


def _tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the names and bytes of CPU contiguous tensors, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode("utf-8", "surrogatepass") + b"\0")
        digest.update(tensors[name].reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def encode_entry(embedding: ImageEmbedding, meta: Mapping[str, str], key_hex: str) -> bytes:
    """One entry's file bytes: the embedding's tensors (floating ones float16) with everything else in the
    header's metadata; `key_hex` (the key's digest) ties the file to its name."""
    tensors = {name: _stored(tensor) for name, tensor in embedding.tensors.items()}
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "key": key_hex,
        "digest": _tensor_digest(tensors),
        "sizes": json.dumps({name: list(size) for name, size in embedding.sizes.items()}),
        "input_hw": json.dumps(list(embedding.input_hw)),
        "image_hw": json.dumps(list(embedding.image_hw)),
        "meta": json.dumps(dict(meta)),
    }
    return safetensors.torch.save(tensors, metadata)


def decode_entry(data: bytes, key_hex: str) -> tuple[ImageEmbedding, dict[str, str]]:
    """The embedding (on the CPU, as stored) and caller's meta of an entry's file bytes; _BadEntry when they are
    anything but an intact entry of this format version for `key_hex`."""
    try:
        tensors = safetensors.torch.load(data)
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
        metadata = header["__metadata__"]
        if metadata["key"] != key_hex:
            raise _BadEntry("written for another key")
        if metadata["digest"] != _tensor_digest(tensors):
            raise _BadEntry("tensor bytes do not match their digest")
        sizes_json = json.loads(metadata["sizes"])
        sizes = {str(name): _pair(size) for name, size in sizes_json.items()}
        embedding = ImageEmbedding(
            tensors=tensors,
            sizes=sizes,
            input_hw=_pair(json.loads(metadata["input_hw"])),
            image_hw=_pair(json.loads(metadata["image_hw"])),
        )
        meta = json.loads(metadata["meta"])
    except (safetensors.SafetensorError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _BadEntry(f"unreadable: {exc}") from exc
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _BadEntry("meta is no mapping of strings")
    return embedding, {str(name): value for name, value in meta.items()}


def _pair(value: object) -> tuple[int, int]:
    """A stored (H, W)-like pair of non-negative ints."""
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    ):
        raise _BadEntry(f"{value!r} is no pair of sizes")
    return (value[0], value[1])
