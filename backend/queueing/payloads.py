"""The JSON payloads of the two job kinds (written by backend.api.service, read by backend.jobs,
backend.prelabel and backend.queueing.bulk), and the labeling configs they refer to.

Interactive job (`backend.jobs.predict_task`, interactive queue), one task:

    {"task": {"id": 7, "data": {...}}, "label_config_ref": "<sha256 hex>", "model_version": "gsam-...",
     "context": null | {...}, "label_studio_host": null | "https://ls.example"}

Bulk chunk (`backend.prelabel.prelabel_chunk`, bulk queue), BULK_CHUNK_SIZE tasks:

    {"project": "3", "tasks": [{"id": 7, "data": {...}}, ...], "label_config_ref": "<sha256 hex>",
     "model_version": "gsam-...", "force": false, "label_studio_host": null | "https://ls.example"}

A labeling config can be megabytes and every task of a project carries the same one, so a payload holds
only its sha256; the text is stored once under CONFIG_KEY with a TTL (see config_ttl) refreshed by every
request that uses it, every worker read of it (cached by digest, the TTL is refreshed even when the text
comes from the cache) and every progress poll of a bulk run whose chunks are still queued, so a config lives
as long as a job that refers to it waits, runs or stays readable. Payloads queued before
references existed hold the text itself under "label_config"; workers still read those.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterable, Mapping
from typing import Any, TypedDict

from redis import Redis

from backend.errors import LabelConfigMissingError
from backend.lru import SizedLru

if sys.version_info >= (3, 11):
    from typing import NotRequired
else:  # Python 3.10: typing_extensions comes with pydantic
    from typing_extensions import NotRequired

CONFIG_KEY = "grounded-sam:config:{}"
# Beyond the longest a job stays readable (finished or failed), the config outlives it by this margin.
CONFIG_TTL_MARGIN_S = 24 * 3600
# Worker-side texts by digest (the API sends a config once per request, a worker reads it per job).
_texts: SizedLru[str, str] = SizedLru(16 * 2**20, max_items=64)


class PayloadTask(TypedDict):
    """A task as queued: Label Studio's integer id and its data (the image reference is read from it)."""

    id: int
    data: Any


class PredictPayload(TypedDict):
    task: PayloadTask
    label_config_ref: str
    model_version: str
    context: object
    label_studio_host: str | None
    label_config: NotRequired[str]  # payloads queued by older versions


class ChunkPayload(TypedDict):
    project: str
    tasks: list[PayloadTask]
    label_config_ref: str
    model_version: str
    force: bool
    label_studio_host: str | None
    label_config: NotRequired[str]  # payloads queued by older versions


def config_ttl(job_timeout: int, result_ttl: int, failure_ttl: int) -> int:
    """Seconds a stored config lives after its last use: longer than any job queued with it stays in Redis
    once it ran (its run, then its result or failure record), so a retry of a failed job still finds it."""
    return job_timeout + max(result_ttl, failure_ttl) + CONFIG_TTL_MARGIN_S


def config_digest(xml: str) -> str:
    return hashlib.sha256(xml.encode()).hexdigest()


def store_config(redis: Redis, xml: str, ttl_s: int) -> str:
    """Store `xml` once (or refresh its TTL) and return the reference jobs carry. Raises RedisError."""
    digest = config_digest(xml)
    key = CONFIG_KEY.format(digest)
    if not redis.expire(key, ttl_s):  # not there yet (or expired): write it
        redis.set(key, xml, ex=ttl_s)
    return digest


def refresh_config(redis: Redis, payload: Mapping[str, Any], ttl_s: int) -> None:
    """Extend the life of the config a queued payload refers to (a requeued job runs again later)."""
    ref = payload.get("label_config_ref")
    if ref:
        redis.expire(CONFIG_KEY.format(ref), ttl_s)


def refresh_configs(redis: Redis, payloads: Iterable[Mapping[str, Any]], ttl_s: int) -> None:
    """`refresh_config` for each distinct config these payloads refer to, in one round trip."""
    refs = {str(payload["label_config_ref"]) for payload in payloads if payload.get("label_config_ref")}
    if refs:
        with redis.pipeline(transaction=False) as pipeline:
            for ref in sorted(refs):
                pipeline.expire(CONFIG_KEY.format(ref), ttl_s)
            pipeline.execute()


def payload_config(redis: Redis, payload: Mapping[str, Any], ttl_s: int | None = None) -> str:
    """The labeling config text of a job payload: inline (older payloads) or read by its reference.

    With `ttl_s` (workers: the job's config_ttl) the stored config's life is extended by every read, from the
    cache too (and a cached text whose key expired is stored again), so queued jobs behind it still find it.
    Raises LabelConfigMissingError when the referenced config is gone from Redis.
    """
    inline = payload.get("label_config")
    if isinstance(inline, str):
        return inline
    digest = str(payload["label_config_ref"])
    key = CONFIG_KEY.format(digest)
    text = _texts.get(digest)
    if text is not None and ttl_s is not None and not redis.expire(key, ttl_s):
        redis.set(key, text, ex=ttl_s, nx=True)
    if text is None:
        raw = redis.get(key) if ttl_s is None else redis.getex(key, ex=ttl_s)
        if raw is None:
            raise LabelConfigMissingError(
                f"the labeling config {digest[:12]} of this job is no longer in Redis (expired); "
                "request the predictions again"
            )
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        _texts.put(digest, text, sys.getsizeof(text))
    return text
