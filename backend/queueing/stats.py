"""Worker statistics kept in Redis, so the API's /metrics can show every worker on every machine.

Workers record stage latencies (histograms), images processed, failures by reason and a moving average
of seconds per task (used to decide whether a /predict fits the synchronous budget). The API reads them
at scrape time. prometheus-client's own multi-process mode needs a shared folder; workers on other
machines share only Redis.

A worker's one WorkerStats is also its prediction flow's StageTimer (backend.flow): the flow's stages
land in the histograms; finer stages (the pipeline's, which the benchmark reads) are not recorded.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from redis import Redis
from redis.typing import EncodableT, FieldT

from backend.redis_replies import text

PREFIX = "grounded-sam:stats"
BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STAGES = ("fetch", "model", "postprocess", "push", "task")
EWMA_WEIGHT = 0.2
# A worker's embedding cache figures outlive its last job by this long (a stopped worker's series then go).
CACHE_FIGURES_TTL_S = 600
CACHE_WORKERS_KEY = f"{PREFIX}:cache-workers"  # the workers that published figures (pruned as theirs expire)
# The cache figures a worker publishes (backend.embedding_cache.CacheFigures) and how /metrics shows each.
CACHE_COUNTERS = {
    "hits": "Lookups (clicks, predictions, bulk tasks) that found their image kept in the worker's cache",
    "misses": "Lookups (clicks, predictions, bulk tasks) whose image the worker's cache did not hold",
    "disk_hits": "Cache hits served from the on-disk embedding cache (EMBEDDING_DISK_DIR)",
    "evictions": "Entries the worker's embedding cache evicted to stay within EMBEDDING_CACHE_MB",
}
CACHE_GAUGES = {
    "memory_bytes": "Bytes held by the worker's embedding cache (decoded images and embeddings)",
    "entries": "Images held by the worker's embedding cache",
}


@dataclass(frozen=True, slots=True)
class WorkerStats:
    """Writer side (workers): one per worker process, shared by its threads (redis-py's pool is thread-safe).
    All calls are single Redis round trips. A StageTimer (backend.pipeline.timing)."""

    redis: Redis

    def observe(self, stage: str, seconds: float) -> None:
        """Add one latency observation of `stage` to its histogram."""
        bucket = next((f"{le:g}" for le in BUCKETS_S if seconds <= le), "+Inf")
        key = f"{PREFIX}:stage:{stage}"
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hincrby(key, bucket, 1)
            pipe.hincrbyfloat(key, "sum", seconds)
            pipe.hincrby(key, "count", 1)
            pipe.execute()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block as one observation of stage `name`, one of STAGES (recorded only when it succeeds;
        other names are not recorded)."""
        started = time.perf_counter()
        yield
        if name in STAGES:
            self.observe(name, time.perf_counter() - started)

    def task_done(self, seconds: float) -> None:
        """Count one processed image and fold its time into the seconds-per-task average."""
        self.observe("task", seconds)
        self.redis.hincrby(f"{PREFIX}:counters", "images", 1)
        previous = self.redis.get(f"{PREFIX}:task-seconds")
        average = seconds if previous is None else (1 - EWMA_WEIGHT) * float(previous) + EWMA_WEIGHT * seconds
        self.redis.set(f"{PREFIX}:task-seconds", average)

    def failure(self, reason: str) -> None:
        self.redis.hincrby(f"{PREFIX}:failures", reason, 1)

    def cache_figures(self, worker: str, figures: Mapping[str, int]) -> None:
        """Publish `worker`'s embedding cache figures (CACHE_COUNTERS and CACHE_GAUGES keys; others ignored)."""
        known: dict[FieldT, EncodableT] = {
            name: int(value) for name, value in figures.items() if name in CACHE_COUNTERS or name in CACHE_GAUGES
        }
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(f"{PREFIX}:cache:{worker}", mapping=known)
            pipe.expire(f"{PREFIX}:cache:{worker}", CACHE_FIGURES_TTL_S)
            pipe.sadd(CACHE_WORKERS_KEY, worker)
            pipe.execute()


def seconds_per_task(redis: Redis) -> float | None:
    """Moving average of seconds one worker spends per task, or None before the first task."""
    value = redis.get(f"{PREFIX}:task-seconds")
    return float(value) if value is not None else None


def metric_families(redis: Redis) -> Iterator[HistogramMetricFamily | CounterMetricFamily | GaugeMetricFamily]:
    """Prometheus families of everything workers recorded."""
    latency = HistogramMetricFamily(
        "grounded_sam_worker_stage_seconds",
        "Worker latency per stage (fetch, model, postprocess, push, task)",
        labels=["stage"],
    )
    for stage in STAGES:
        raw = {text(k): text(v) for k, v in redis.hgetall(f"{PREFIX}:stage:{stage}").items()}
        if raw:
            latency.add_metric([stage], _cumulative(raw), float(raw.get("sum", 0)))
    yield latency
    images = CounterMetricFamily("grounded_sam_images_processed", "Images run through the models by workers")
    images.add_metric([], float(redis.hget(f"{PREFIX}:counters", "images") or 0))
    yield images
    failures = CounterMetricFamily(
        "grounded_sam_task_failures", "Tasks that failed in workers, by reason", labels=["reason"]
    )
    for reason, count in redis.hgetall(f"{PREFIX}:failures").items():
        failures.add_metric([text(reason)], float(count))
    yield failures
    yield from cache_families(redis)


def cache_families(redis: Redis) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
    """Each worker's embedding cache figures (published within CACHE_FIGURES_TTL_S), labelled by worker name."""
    workers = sorted(text(name) for name in redis.smembers(CACHE_WORKERS_KEY))
    with redis.pipeline(transaction=False) as pipe:
        for worker in workers:
            pipe.hgetall(f"{PREFIX}:cache:{worker}")
        found = pipe.execute()
    published = zip(workers, found, strict=True)
    per_worker = {worker: {text(k): float(v) for k, v in raw.items()} for worker, raw in published if raw}
    gone = [worker for worker in workers if worker not in per_worker]
    if gone:
        redis.srem(CACHE_WORKERS_KEY, *gone)
    for name, meaning in CACHE_COUNTERS.items():
        counter = CounterMetricFamily(f"grounded_sam_embedding_cache_{name}", meaning, labels=["worker"])
        for worker, figures in sorted(per_worker.items()):
            counter.add_metric([worker], figures.get(name, 0.0))
        yield counter
    for name, meaning in CACHE_GAUGES.items():
        gauge = GaugeMetricFamily(f"grounded_sam_embedding_cache_{name}", meaning, labels=["worker"])
        for worker, figures in sorted(per_worker.items()):
            gauge.add_metric([worker], figures.get(name, 0.0))
        yield gauge


def _cumulative(raw: dict[str, str]) -> list[tuple[str, float]]:
    total = 0.0
    buckets = []
    for le in (*(f"{b:g}" for b in BUCKETS_S), "+Inf"):
        total += float(raw.get(le, 0))
        buckets.append((le, total))
    return buckets
