"""Prometheus metrics at GET /metrics (prometheus-client text format).

The HTTP process counts its own requests; queue state and worker statistics are read from Redis at
scrape time, so they cover every worker on every machine and are never stale.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.exceptions import RedisError

from backend.errors import QueueUnavailableError


class _RedisCollector(Collector):
    """Yields what `read` finds in Redis, plus grounded_sam_redis_up (0 when Redis did not answer)."""

    def __init__(self, read: Callable[[], Iterable[Metric]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        try:
            families = list(self._read())
        except (QueueUnavailableError, RedisError):  # a scrape must not fail because Redis is down
            families = []
        yield GaugeMetricFamily("grounded_sam_redis_up", "1 when Redis answered this scrape", value=int(bool(families)))
        yield from families


class Metrics:
    """One registry per app (tests build several apps in one process)."""

    def __init__(self, read_redis: Callable[[], Iterable[Metric]]) -> None:
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
        self.registry.register(_RedisCollector(read_redis))
