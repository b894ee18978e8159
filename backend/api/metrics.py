"""Prometheus metrics of the HTTP process (prometheus-client text format at GET /metrics)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from redis.exceptions import RedisError

from backend.errors import QueueUnavailableError


class _QueueCollector(Collector):
    """Reads queue depth and worker count at scrape time, so the numbers are never stale."""

    def __init__(self, read: Callable[[], dict[str, int]]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            values = self._read()
        except (QueueUnavailableError, RedisError):  # a scrape must not fail because Redis is down
            yield GaugeMetricFamily("grounded_sam_redis_up", "1 when Redis answered this scrape", value=0)
            return
        yield GaugeMetricFamily("grounded_sam_redis_up", "1 when Redis answered this scrape", value=1)
        yield GaugeMetricFamily("grounded_sam_queue_depth", "Jobs waiting in the queue", value=values["queued"])
        yield GaugeMetricFamily("grounded_sam_workers", "Workers listening on the queue", value=values["workers"])


class Metrics:
    """One registry per app (tests build several apps in one process)."""

    def __init__(self, read_queue: Callable[[], dict[str, int]]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "grounded_sam_http_requests", "HTTP requests by route and status", ["route", "status"], registry=self.registry
        )
        self.predict_seconds = Histogram(
            "grounded_sam_predict_seconds",
            "Wall time of POST /predict",
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 100),
            registry=self.registry,
        )
        self.tasks = Counter(
            "grounded_sam_predict_tasks", "Tasks answered by /predict, by outcome", ["outcome"], registry=self.registry
        )
        self.registry.register(_QueueCollector(read_queue))
