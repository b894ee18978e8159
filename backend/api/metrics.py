"""Prometheus metrics at GET /metrics (prometheus-client text format).

The HTTP process counts its own requests; queue state and worker statistics are read from Redis at
scrape time, so they cover every worker on every machine and are never stale.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis import Redis
from redis.exceptions import RedisError

from backend.errors import QueueUnavailableError
from backend.queueing.client import PredictionQueue, job_counts
from backend.queueing.connection import ping
from backend.queueing.stats import metric_families


def queue_families(redis: Redis, queue: PredictionQueue) -> Iterator[Metric]:
    """Prometheus families read from Redis: workers, jobs per queue and state, worker statistics.
    Raises QueueUnavailableError or RedisError when Redis does not answer."""
    ping(redis)
    yield GaugeMetricFamily("grounded_sam_workers", "Workers listening on the queues", value=queue.worker_count())
    jobs = GaugeMetricFamily("grounded_sam_jobs", "Jobs per queue and state", labels=["queue", "state"])
    for rq_queue in queue.queues:
        for state, count in job_counts(rq_queue).items():
            jobs.add_metric([rq_queue.name, state], count)
    yield jobs
    yield from metric_families(redis)


class _RedisCollector(Collector):
    """Yields `queue_families`, plus grounded_sam_redis_up (0 when Redis did not answer)."""

    def __init__(self, redis: Redis, queue: PredictionQueue) -> None:
        self._redis = redis
        self._queue = queue

    def collect(self) -> Iterator[Metric]:
        try:
            families = list(queue_families(self._redis, self._queue))
        except (QueueUnavailableError, RedisError):  # a scrape must not fail because Redis is down
            families = []
        yield GaugeMetricFamily("grounded_sam_redis_up", "1 when Redis answered this scrape", value=int(bool(families)))
        yield from families


class Metrics:
    """One registry per app (tests build several apps in one process); queue state is read over `redis`."""

    def __init__(self, redis: Redis, queue: PredictionQueue) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "grounded_sam_http_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.predict_seconds = Histogram(
            "grounded_sam_predict_seconds",
            "Wall time of POST /predict",
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 100),
            registry=self.registry,
        )
        self.tasks = Counter(
            "grounded_sam_predict_tasks",
            "Tasks answered by /predict, by outcome (ok, failed, queued)",
            ["outcome"],
            registry=self.registry,
        )
        self.registry.register(_RedisCollector(redis, queue))
