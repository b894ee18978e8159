"""Prometheus metrics at GET /metrics (prometheus-client text format).

The HTTP process counts its own requests and webhook events; queue state, worker statistics and what reviewers
did with the predictions (backend.queueing.reviews) are read from Redis at scrape time, so they cover every worker
on every machine and are never stale. Review figures are bounded: the REVIEW_PROJECTS most recently reviewed
projects, each with its newest model version only and at most REVIEW_LABELS labels (`grounded-sam report` shows
any project and version in full). Each (project, version)'s figures are computed once per revision of its records
(ReviewStore.revision: every write changes it), so a scrape reads the records again only where they changed.
"""

from __future__ import annotations

from collections.abc import Iterator
from threading import Lock

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis import Redis
from redis.exceptions import RedisError

from backend.errors import QueueUnavailableError
from backend.learning.reviews import OUTCOMES
from backend.learning.thresholds import LabelReport, label_reports
from backend.queueing.client import PredictionQueue, job_counts
from backend.queueing.connection import ping
from backend.queueing.reviews import ReviewStore
from backend.queueing.stats import metric_families

# Bounds of the review figures in one scrape (each project's records are read and summed at scrape time).
REVIEW_PROJECTS = 5
REVIEW_LABELS = 50
_REVIEW_LABELS = ["project", "model_version", "label"]


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
    """Yields `queue_families` and `review_families`, plus grounded_sam_redis_up (0 when Redis did not answer)."""

    def __init__(self, redis: Redis, queue: PredictionQueue, reviews: ReviewStore, min_reviews: int) -> None:
        self._redis = redis
        self._queue = queue
        self._reviews = ReviewFigures(reviews, min_reviews)

    def collect(self) -> Iterator[Metric]:
        try:
            families = list(queue_families(self._redis, self._queue))
            families += review_families(self._reviews)
        except (QueueUnavailableError, RedisError):  # a scrape must not fail because Redis is down
            families = []
        yield GaugeMetricFamily("grounded_sam_redis_up", "1 when Redis answered this scrape", value=int(bool(families)))
        yield from families


class ReviewFigures:
    """The label reports of a project's records of one model version, kept while its revision holds (only for the
    versions last asked for: at most REVIEW_PROJECTS entries). Safe to call from several scrape threads."""

    def __init__(self, store: ReviewStore, min_reviews: int) -> None:
        self.store = store
        self._min_reviews = min_reviews
        self._cache: dict[tuple[int, str], tuple[int, tuple[LabelReport, ...]]] = {}
        self._lock = Lock()

    def reports(self, wanted: list[tuple[int, str]]) -> dict[tuple[int, str], tuple[LabelReport, ...]]:
        """The reports of each (project, version) in `wanted`, read and computed again only where its revision
        changed (or a version with no revision: none recorded). Raises RedisError."""
        fresh: dict[tuple[int, str], tuple[int, tuple[LabelReport, ...]]] = {}
        for project, version in wanted:
            revision = self.store.revision(project, version) or 0
            with self._lock:
                cached = self._cache.get((project, version))
            if cached is None or cached[0] != revision or revision == 0:
                objects = self.store.objects(project, version)
                cached = (revision, label_reports(objects, min_reviews=self._min_reviews))
            fresh[project, version] = cached
        with self._lock:
            self._cache = fresh
        return {key: reports for key, (_, reports) in fresh.items()}


def review_families(figures: ReviewFigures) -> Iterator[Metric]:
    """Per project, model version and label of the reviewed projects (bounded, see the module docstring): the
    predictions reviewed, the objects by outcome, precision, recall and the suggested threshold (when enough
    reviews); and the review jobs' event counts by reason. Raises RedisError when Redis does not answer."""
    store = figures.store
    reviewed = GaugeMetricFamily("grounded_sam_review_predictions", "Reviewed predictions", labels=_REVIEW_LABELS)
    outcomes = GaugeMetricFamily(
        "grounded_sam_review_objects",
        "Reviewed objects by outcome (kept, relabelled, deleted; missed: added by the reviewer)",
        labels=[*_REVIEW_LABELS, "outcome"],
    )
    ratios = {
        "precision": GaugeMetricFamily("grounded_sam_review_precision", "Kept / reviewed", labels=_REVIEW_LABELS),
        "recall": GaugeMetricFamily("grounded_sam_review_recall", "Kept / (kept + missed)", labels=_REVIEW_LABELS),
        "suggested_threshold": GaugeMetricFamily(
            "grounded_sam_review_suggested_threshold",
            "Score threshold the reviews suggest (only with REVIEW_MIN_REVIEWS reviews)",
            labels=_REVIEW_LABELS,
        ),
    }
    newest = [
        (project, versions[0]) for project in store.projects(REVIEW_PROJECTS) if (versions := store.versions(project))
    ]
    for (project, version), reports in figures.reports(newest).items():
        for report in reports[:REVIEW_LABELS]:
            key = [str(project), version, report.label]
            reviewed.add_metric(key, report.reviewed)
            for outcome in OUTCOMES:
                outcomes.add_metric([*key, outcome], getattr(report, outcome))
            values = (report.precision, report.recall, report.suggested_threshold)
            for family, value in zip(ratios.values(), values, strict=True):
                if value is not None:
                    family.add_metric(key, value)
    events = GaugeMetricFamily(
        "grounded_sam_review_events", "Annotations review jobs looked at, by what became of them", labels=["reason"]
    )
    for reason, count in sorted(store.counters().items()):
        events.add_metric([reason], count)
    yield from (reviewed, outcomes, *ratios.values(), events)


class Metrics:
    """One registry per app (tests build several apps in one process); queue state and review records are read
    over `redis`, under the queue's prefix; suggested thresholds need `min_reviews` reviews (REVIEW_MIN_REVIEWS)."""

    def __init__(self, redis: Redis, queue: PredictionQueue, *, min_reviews: int) -> None:
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
        self.webhook_events = Counter(
            "grounded_sam_webhook_events",
            "Label Studio webhook events: queued, or the kind of reason why they were ignored",
            ["outcome"],
            registry=self.registry,
        )
        reviews = ReviewStore(redis, queue.prefix, max_annotations=1)  # reads only: the bound is the writers'
        self.registry.register(_RedisCollector(redis, queue, reviews, min_reviews))
