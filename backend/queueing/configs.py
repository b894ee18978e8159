"""The labeling configs that job messages (backend.queueing.messages) refer to, stored once in Redis.

A labeling config can be megabytes and every task of a project carries the same one, so a message holds
only its sha256 (`label_config_ref`); the text is stored once under CONFIG_KEY with a TTL (see config_ttl)
refreshed by every request that uses it, every worker read of it (cached by digest, the TTL is refreshed even
when the text comes from the cache) and every progress poll of a bulk run whose chunks are still queued, so a
config lives as long as a job that refers to it waits, runs or stays readable. Messages queued before
references existed hold the text itself (`label_config`); workers still read those.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterable

from redis import Redis

from backend.errors import LabelConfigMissingError
from backend.lru import SizedLru
from backend.queueing.messages import ChunkJob, PredictJob

CONFIG_KEY = "grounded-sam:config:{}"
# Beyond the longest a job stays readable (finished or failed), the config outlives it by this margin.
CONFIG_TTL_MARGIN_S = 24 * 3600
# Worker-side texts by digest (the API sends a config once per request, a worker reads it per job).
_texts: SizedLru[str, str] = SizedLru(16 * 2**20, max_items=64)


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


def refresh_config(redis: Redis, ref: str, ttl_s: int) -> None:
    """Extend the life of the config `ref` names (a requeued job runs again later)."""
    if ref:
        redis.expire(CONFIG_KEY.format(ref), ttl_s)


def refresh_configs(redis: Redis, refs: Iterable[str], ttl_s: int) -> None:
    """`refresh_config` for each distinct one of these references, in one round trip."""
    distinct = sorted({ref for ref in refs if ref})
    if distinct:
        with redis.pipeline(transaction=False) as pipeline:
            for ref in distinct:
                pipeline.expire(CONFIG_KEY.format(ref), ttl_s)
            pipeline.execute()


def payload_config(redis: Redis, message: PredictJob | ChunkJob, ttl_s: int | None = None) -> str:
    """The labeling config text of a job message: inline (older messages) or read by its reference.

    With `ttl_s` (workers: the job's config_ttl) the stored config's life is extended by every read, from the
    cache too (and a cached text whose key expired is stored again), so queued jobs behind it still find it.
    Raises LabelConfigMissingError when the referenced config is gone from Redis.
    """
    if message.label_config is not None:
        return message.label_config
    digest = message.label_config_ref
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
