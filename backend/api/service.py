"""What the routes do, without HTTP: validate a request, queue its tasks, collect their predictions."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from redis import Redis
from redis.exceptions import RedisError

from backend.errors import BackendError, QueueUnavailableError, TaskDataError
from backend.labelstudio.config import LabelConfig, parse_label_config
from backend.labelstudio.interactive import parse_context
from backend.labelstudio.results import empty_prediction
from backend.labelstudio.tasks import image_ref
from backend.labelstudio.version import model_version
from backend.queueing.bulk import BulkRuns, ChunkSpec
from backend.queueing.client import (
    JobLimits,
    JobOutcome,
    PredictionQueue,
    chunk_job_id,
    job_counts,
    prediction_job_id,
)
from backend.queueing.connection import ping
from backend.queueing.stats import metric_families, seconds_per_task
from backend.settings import Settings

log = logging.getLogger(__name__)

PROJECT_VERSIONS_KEY = "grounded-sam:model-versions"
# The address Label Studio writes into absolute task URLs (its LABEL_STUDIO_HOST), per project, from /setup.
PROJECT_HOSTS_KEY = "grounded-sam:label-studio-hosts"


class PredictTimeoutError(BackendError):
    """Some jobs of a /predict did not finish within PREDICT_TIMEOUT."""


@dataclass(frozen=True, slots=True)
class PredictReport:
    """One /predict's answer: a prediction per task in order, and how many came out empty through errors.

    `run_id` is set instead when the request was too large for the synchronous budget: its tasks were
    queued as bulk work whose predictions workers push to Label Studio; `results` is then empty.
    """

    results: list[dict[str, Any]]
    failed: int
    run_id: str | None = None


class PredictionService:
    """The backend as the routes see it: one Settings, one Redis connection, one queue."""

    def __init__(self, settings: Settings, redis: Redis) -> None:
        self.settings = settings
        self.redis = redis
        limits = JobLimits(settings.job_timeout, settings.result_ttl, settings.failure_ttl)
        self.queue = PredictionQueue(redis, settings.queue_name, limits)
        self.bulk = BulkRuns(redis, self.queue)

    def model_version_for(self, label_config: str) -> str:
        """model_version for a labeling config; raises LabelConfigError for configs we cannot serve."""
        return model_version(self.settings.model_fingerprint(), parse_label_config(label_config))

    def setup(self, project: str, label_config: str, hostname: str | None = None) -> str:
        """Validate the config; remember its model_version (for /versions) and Label Studio's hostname."""
        version = self.model_version_for(label_config)
        try:
            self.redis.hset(PROJECT_VERSIONS_KEY, project, version)
            if hostname:
                self.redis.hset(PROJECT_HOSTS_KEY, project, hostname)
        except RedisError as exc:  # /setup must still answer; /health reports Redis
            log.warning("could not record the setup of project %s: %s", project, exc)
        return version

    def versions(self) -> list[str]:
        """model_versions this backend has answered /setup with, across projects."""
        try:
            return sorted({value.decode() for value in self.redis.hvals(PROJECT_VERSIONS_KEY)})
        except RedisError as exc:
            raise QueueUnavailableError(f"Redis is unreachable: {exc}") from exc

    def predict(
        self, project: str, tasks: Sequence[dict[str, Any]], label_config: str, context: object = None
    ) -> PredictReport:
        """Queue every task, wait up to PREDICT_TIMEOUT, and answer one prediction per task, in order.

        A task without usable data, or whose job failed, gets an empty prediction (and is logged);
        the others are unaffected. Raises PredictTimeoutError if jobs are still running at the deadline
        (they keep running, and a retry of the same request collects their results).
        """
        config = parse_label_config(label_config)
        version = model_version(self.settings.model_fingerprint(), config)
        interactive = parse_context(context, config) is not None  # InteractiveContextError: a 400, nothing queued
        if not interactive and self._too_large_for_sync(len(tasks)):
            run_id = self.start_bulk(project, tasks, label_config, force=False)
            log.info("predict of %d tasks queued as bulk run %s", len(tasks), run_id)
            return PredictReport([], failed=0, run_id=run_id)
        job_ids: list[str | None] = []
        for task in tasks:
            job_ids.append(self._submit(project, task, label_config, version, config, context if interactive else None))
        queued = [job_id for job_id in job_ids if job_id is not None]
        outcomes = {o.job_id: o for o in self.queue.wait(queued, self.settings.predict_timeout)}
        pending = [o for o in outcomes.values() if o.state == "pending"]
        if pending:
            raise PredictTimeoutError(
                f"{len(pending)} of {len(tasks)} tasks still running after {self.settings.predict_timeout:g} s; "
                "they continue in the background and a retry collects them"
            )
        results = [self._result(job_id, outcomes, version) for job_id in job_ids]
        return PredictReport([prediction for prediction, _ in results], failed=sum(1 for _, ok in results if not ok))

    def start_bulk(self, project: str, tasks: Sequence[dict[str, Any]], label_config: str, *, force: bool) -> str:
        """Queue `tasks` as bulk chunks whose predictions workers push to Label Studio; returns the run id."""
        version = self.model_version_for(label_config)
        size = self.settings.bulk_chunk_size
        host = self._label_studio_host(project)
        slim = [{"id": int(task["id"]), "data": task.get("data")} for task in tasks]
        chunks = []
        for start in range(0, len(slim), size):
            part = slim[start : start + size]
            payload = {"project": project, "tasks": part, "label_config": label_config,
                       "model_version": version, "force": force, "label_studio_host": host}
            job_id = chunk_job_id(project, [t["id"] for t in part], version, force)
            chunks.append(ChunkSpec(job_id, payload))
        try:
            return self.bulk.start(project, chunks)
        except RedisError as exc:
            raise QueueUnavailableError(f"cannot queue bulk work: {exc}") from exc

    def health(self) -> dict[str, Any]:
        """Redis reachability, live workers, queued jobs per queue; QueueUnavailableError when Redis is down."""
        ping(self.redis)
        return {"workers": self.queue.worker_count(), "queued": self.queue.depth()}

    def queue_metrics(self) -> Iterator[Metric]:
        """Prometheus families read from Redis: workers, jobs per queue and state, worker statistics."""
        ping(self.redis)
        yield GaugeMetricFamily("grounded_sam_workers", "Workers listening on the queues", value=self.queue.worker_count())
        jobs = GaugeMetricFamily("grounded_sam_jobs", "Jobs per queue and state", labels=["queue", "state"])
        for queue in self.queue.queues:
            for state, count in job_counts(queue).items():
                jobs.add_metric([queue.name, state], count)
        yield jobs
        yield from metric_families(self.redis)

    def _label_studio_host(self, project: str) -> str | None:
        value = self.redis.hget(PROJECT_HOSTS_KEY, project)
        return value.decode() if value is not None else None

    def _too_large_for_sync(self, tasks: int) -> bool:
        """Whether `tasks` would likely outlast SYNC_BUDGET; only when workers can push to Label Studio."""
        if tasks <= 1 or not (self.settings.label_studio_url and self.settings.label_studio_api_key):
            return False
        per_task = seconds_per_task(self.redis) or self.settings.prior_task_seconds
        return tasks * per_task / max(1, self.queue.worker_count()) > self.settings.sync_budget

    def _submit(
        self, project: str, task: dict[str, Any], label_config: str, version: str, config: LabelConfig,
        context: object,
    ) -> str | None:
        """Queue one task's job on the interactive queue; None (nothing queued) when it has no image."""
        try:
            ref = image_ref(task, config)
        except TaskDataError as exc:
            log.warning("task %s: %s", task.get("id"), exc)
            return None
        # The context (clicks, box, typed text) is part of the job's identity: another click is another job.
        identity = ref if context is None else f"{ref}\n{json.dumps(context, sort_keys=True)}"
        job_id = prediction_job_id(project, task, identity, version)
        payload = {
            "task": {"id": task.get("id"), "data": task.get("data")},
            "label_config": label_config,
            "model_version": version,
            "context": context,
            "label_studio_host": self._label_studio_host(project),
        }
        self.queue.submit(job_id, payload)
        return job_id

    def _result(
        self, job_id: str | None, outcomes: dict[str, JobOutcome], version: str
    ) -> tuple[dict[str, Any], bool]:
        """The task's prediction and whether it succeeded; failures become an empty prediction."""
        if job_id is None:
            return empty_prediction(version), False
        outcome = outcomes[job_id]
        if outcome.state == "finished" and outcome.prediction is not None:
            return outcome.prediction, True
        log.warning("job %s failed: %s", job_id, outcome.error)
        return empty_prediction(version), False
