"""What the routes do, without HTTP: validate a request, queue its tasks, collect their predictions."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT

from backend.errors import (
    PredictTimeoutError,
    QueueUnavailableError,
    RequestTooLargeError,
    TaskDataError,
)
from backend.labelstudio.config import LabelConfig, parse_label_config
from backend.labelstudio.interactive import parse_context
from backend.labelstudio.results import empty_prediction
from backend.labelstudio.tasks import image_ref
from backend.labelstudio.version import model_version
from backend.queueing.bulk import BulkRuns
from backend.queueing.client import JobLimits, JobOutcome, PredictionQueue, prediction_job_id, queue_error
from backend.queueing.configs import config_ttl, store_config
from backend.queueing.connection import ping
from backend.queueing.fleet import FingerprintGroup, Fleet, WorkerState, read_fleet
from backend.queueing.messages import ChunkJob, PredictJob, QueuedTask
from backend.queueing.stats import seconds_per_task
from backend.queueing.transient import TransientRetry
from backend.redis_replies import text
from backend.settings import Settings

log = logging.getLogger(__name__)

# What /setup learns per project (model_version, and the address Label Studio writes into absolute task
# URLs: its LABEL_STUDIO_HOST), in one hash per project that lives PROJECT_TTL_S after its last /setup
# (Label Studio calls /setup before every batch). PROJECTS_KEY lists them, scored by expiry time; every
# /setup and /versions drops the expired, so it holds no more than the live projects.
PROJECT_KEY = "grounded-sam:project:{}"
PROJECTS_KEY = "grounded-sam:projects"
PROJECT_TTL_S = 30 * 24 * 3600


@dataclass(frozen=True, slots=True)
class PredictReport:
    """One /predict's answer: a prediction per task in order, and how many came out empty through errors.

    `run_id` is set instead when the request was too large for the synchronous budget: its tasks were
    queued as bulk work whose predictions workers push to Label Studio; `results` is then empty.
    """

    results: list[dict[str, Any]]
    failed: int
    run_id: str | None = None


@dataclass(frozen=True, slots=True)
class QueuedRun:
    """A bulk run just queued: its id and the model_version its chunks carry."""

    run_id: str
    model_version: str


class PredictionService:
    """The backend as the routes see it: one Settings, Redis, one queue.

    `redis` serves the work (queueing, waiting); `probe`, a connection with sub-second timeouts, serves
    /health and /setup, which Label Studio gives 1 s and 3 s whatever Redis does.
    """

    def __init__(self, settings: Settings, redis: Redis, probe: Redis | None = None) -> None:
        self.settings = settings
        self.redis = redis
        self.probe = probe if probe is not None else redis
        transient = TransientRetry(settings.transient_retries, settings.transient_retry_delay)
        limits = JobLimits(settings.job_timeout, settings.result_ttl, settings.failure_ttl, transient)
        self.config_ttl_s = config_ttl(settings.job_timeout, settings.result_ttl, settings.failure_ttl)
        self.queue = PredictionQueue(redis, settings.queue_name, limits, route_wait=settings.click_route_wait)
        self._probe_queue = PredictionQueue(self.probe, settings.queue_name, limits)
        self.bulk = BulkRuns(redis, self.queue, self.config_ttl_s)
        self._disagreement: str | None = None  # the workers' last logged disagreement (logged once per change)
        self._last_fleet: Fleet | None = None  # the last fleet read, for /setup while Redis does not answer

    def label_config(self, label_config: str) -> LabelConfig:
        """The parsed config; RequestTooLargeError over LABEL_CONFIG_MAX_BYTES, LabelConfigError if unservable."""
        size = len(label_config.encode())
        if size > self.settings.label_config_max_bytes:
            raise RequestTooLargeError(
                f"labeling config of {size} bytes, "
                f"more than LABEL_CONFIG_MAX_BYTES={self.settings.label_config_max_bytes}"
            )
        return parse_label_config(label_config)

    def model_version_for(self, label_config: str) -> str:
        """model_version for a labeling config, as the live workers compute it.

        Raises LabelConfigError for configs we cannot serve; NoWorkerError when no worker announced its models,
        WorkersDisagreeError when workers announced different ones; QueueUnavailableError when Redis cannot say.
        """
        config = self.label_config(label_config)
        return model_version(self.worker_fingerprint(), config)

    def worker_fingerprint(self) -> Mapping[str, object]:
        """The one model fingerprint the live workers announced (fleet.py), read over the probe connection."""
        return self.fleet().fingerprint()

    def fleet(self) -> Fleet:
        """The live workers and what they announced; logs a warning when their disagreement changes."""
        try:
            fleet = read_fleet(self.probe, self.settings.queue_name)
        except RedisError as exc:
            raise queue_error(exc, "reading the workers' announcements") from exc
        self._last_fleet = fleet
        disagreement = fleet.disagreement() if fleet.differ else None
        if disagreement != self._disagreement:
            if disagreement is not None:
                log.warning("%s; /setup, /predict and /prelabel are refused until they agree", disagreement)
            else:
                log.info("the workers agree on their model settings again")
            self._disagreement = disagreement
        return fleet

    def setup(self, project: str, label_config: str, origin: str | None = None) -> str:
        """Validate the config; remember its model_version (for /versions) and Label Studio's origin.

        The version comes from the live workers' announcements (model_version_for), read over the probe
        connection. /setup must answer within Label Studio's 3 s whatever Redis does (/health reports Redis):
        while Redis does not answer, the fingerprint last read serves (nothing can be queued meanwhile anyway),
        and trouble recording the setup is logged, not raised.
        """
        config = self.label_config(label_config)
        version = model_version(self._fingerprint_or_last(), config)
        fields: dict[FieldT, EncodableT] = {
            "model_version": version,
            **({"label_studio_host": origin} if origin else {}),
        }
        key = PROJECT_KEY.format(project)
        now = time.time()
        try:
            pipe = self.probe.pipeline(transaction=False)
            pipe.hset(key, mapping=fields)
            pipe.expire(key, PROJECT_TTL_S)
            pipe.zadd(PROJECTS_KEY, {project: now + PROJECT_TTL_S})
            pipe.zremrangebyscore(PROJECTS_KEY, "-inf", now)  # the list holds live projects only
            pipe.execute()
        except RedisError as exc:
            log.warning("could not record the setup of project %s: %s", project, exc)
        return version

    def _fingerprint_or_last(self) -> Mapping[str, object]:
        """worker_fingerprint(); when Redis cannot answer, that of the fleet last read (if one was)."""
        try:
            return self.worker_fingerprint()
        except QueueUnavailableError as exc:
            if self._last_fleet is None:
                raise
            log.debug("workers' announcements unreadable (%s); using the last ones read", exc)
            return self._last_fleet.fingerprint()

    def versions(self) -> list[str]:
        """model_versions this backend has answered /setup with, across projects set up in PROJECT_TTL_S."""
        try:
            self.redis.zremrangebyscore(PROJECTS_KEY, "-inf", time.time())
            projects = [text(value) for value in self.redis.zrange(PROJECTS_KEY, 0, -1)]
            pipe = self.redis.pipeline(transaction=False)
            for project in projects:
                pipe.hget(PROJECT_KEY.format(project), "model_version")
            return sorted({text(value) for value in pipe.execute() if value is not None})
        except RedisError as exc:
            raise queue_error(exc, "reading the model versions") from exc

    def predict(
        self,
        project: str,
        tasks: Sequence[dict[str, Any]],
        label_config: str,
        context: object = None,
        deadline: float | None = None,
    ) -> PredictReport:
        """Queue every task, wait until `deadline` (time.monotonic(); default PREDICT_TIMEOUT from now), and
        answer one prediction per task, in order.

        A task without usable data, or whose job failed, gets an empty prediction; the others are unaffected.
        More than SYNC_MAX_TASKS tasks (or more than SYNC_BUDGET seconds of work) go bulk when workers can push
        to Label Studio; over SYNC_MAX_TASKS without that, RequestTooLargeError. Raises PredictTimeoutError at
        once when the deadline passed before anything was queued, or when jobs are still running at the
        deadline (they keep running, and a retry of the same request collects their results).
        """
        deadline = time.monotonic() + self.settings.predict_timeout if deadline is None else deadline
        self._check_deadline(deadline, len(tasks))
        config = self.label_config(label_config)
        version = model_version(self.worker_fingerprint(), config)
        interactive = parse_context(context, config) is not None  # InteractiveContextError: a 400, nothing queued
        over_cap = len(tasks) > self.settings.sync_max_tasks
        if not interactive and self._can_push() and (over_cap or self._too_large_for_sync(len(tasks))):
            run_id = self.start_bulk(project, tasks, label_config, force=False, version=version).run_id
            log.info("predict of %d tasks queued as bulk run %s", len(tasks), run_id)
            return PredictReport([], failed=0, run_id=run_id)
        if over_cap:
            raise RequestTooLargeError(
                f"{len(tasks)} tasks in one request, more than SYNC_MAX_TASKS={self.settings.sync_max_tasks} "
                "computed while Label Studio waits: select fewer tasks, or set LABEL_STUDIO_URL and "
                "LABEL_STUDIO_API_KEY so that large selections are queued and pushed to Label Studio"
            )
        ref = self._store_config(label_config)
        host = self._label_studio_host(project)
        job_ids = [
            self._submit(project, task, ref, version, config, context if interactive else None, host) for task in tasks
        ]
        queued = [job_id for job_id in job_ids if job_id is not None]
        outcomes = {o.job_id: o for o in self.queue.wait(queued, max(0.0, deadline - time.monotonic()))}
        pending = [o for o in outcomes.values() if o.state == "pending"]
        if pending:
            raise PredictTimeoutError(
                f"{len(pending)} of {len(tasks)} tasks still running after {self.settings.predict_timeout:g} s; "
                "they continue in the background and a retry collects them"
            )
        results = [self._result(job_id, outcomes, version) for job_id in job_ids]
        return PredictReport([prediction for prediction, _ in results], failed=sum(1 for _, ok in results if not ok))

    def start_bulk(
        self,
        project: str,
        tasks: Sequence[dict[str, Any]],
        label_config: str,
        *,
        force: bool,
        version: str | None = None,
        embeddings: bool = False,
    ) -> QueuedRun:
        """Queue `tasks` (integer ids) as bulk chunks whose predictions workers push to Label Studio.

        version: the model_version already read from the workers for this request (read once per request, so the
        answer names the version the chunks carry); None: read it now. embeddings: the chunks also write every
        task's SAM embedding to the workers' on-disk cache."""
        version = self.model_version_for(label_config) if version is None else version
        size = self.settings.bulk_chunk_size
        ref = self._store_config(label_config)
        host = self._label_studio_host(project)
        queued = tuple(QueuedTask(task["id"], task.get("data")) for task in tasks)
        chunks = [
            ChunkJob(
                project,
                queued[start : start + size],
                ref,
                version,
                force=force,
                label_studio_host=host,
                embeddings=embeddings,
            )
            for start in range(0, len(queued), size)
        ]
        try:
            return QueuedRun(self.bulk.start(project, chunks), version)
        except RedisError as exc:
            raise queue_error(exc, "queueing bulk work") from exc

    def health(self) -> dict[str, Any]:
        """Redis reachability, live workers, queued jobs per queue, the workers' model fingerprints (grouped) and
        whether they differ, and each worker's state (ready, loading, failed); QueueUnavailableError when Redis is
        down."""
        ping(self.probe)
        try:
            state = {"workers": self._probe_queue.worker_count(), "queued": self._probe_queue.depth()}
            fleet = self.fleet()
        except (RedisError, OSError) as exc:
            raise QueueUnavailableError(f"Redis is unreachable: {exc}") from exc
        fingerprints = [_fingerprint_entry(group) for group in fleet.groups]
        ready = [_ready_entry(name) for group in fleet.groups for name in group.workers]
        states = ready + [_state_entry(worker) for worker in fleet.not_ready]
        # Ready means /setup answers: one fingerprint among the live workers (several: /setup refuses, saying why).
        readiness = {"ready": len(fleet.groups) == 1, "worker_states": states}
        why = fleet.disagreement() if fleet.differ else None if fleet.groups else fleet.why_not_ready()
        detail = {} if why is None else {"detail": why}
        return {**state, "fingerprints": fingerprints, "fingerprints_differ": fleet.differ, **readiness, **detail}

    def _check_deadline(self, deadline: float, tasks: int) -> None:
        late = time.monotonic() - deadline
        if late >= 0:
            raise PredictTimeoutError(
                f"the request waited longer than PREDICT_TIMEOUT={self.settings.predict_timeout:g} s for a free "
                f"slot before its {tasks} tasks could be queued; nothing was queued, try again"
            )

    def _store_config(self, label_config: str) -> str:
        try:
            return store_config(self.redis, label_config, self.config_ttl_s)
        except RedisError as exc:
            raise queue_error(exc, "storing the labeling config") from exc

    def _label_studio_host(self, project: str) -> str | None:
        try:
            value = self.redis.hget(PROJECT_KEY.format(project), "label_studio_host")
        except RedisError as exc:
            raise queue_error(exc, "reading the project's setup") from exc
        return text(value) if value is not None else None

    def _can_push(self) -> bool:
        """Whether workers can push predictions to Label Studio (the bulk path's precondition)."""
        return bool(self.settings.label_studio_url and self.settings.label_studio_api_key)

    def _too_large_for_sync(self, tasks: int) -> bool:
        """Whether `tasks` would likely outlast SYNC_BUDGET (tasks x seconds per task / workers)."""
        if tasks <= 1:
            return False
        per_task = seconds_per_task(self.redis) or self.settings.prior_task_seconds
        return tasks * per_task / max(1, self.queue.worker_count()) > self.settings.sync_budget

    def _submit(
        self,
        project: str,
        task: dict[str, Any],
        config_ref: str,
        version: str,
        config: LabelConfig,
        context: object,
        host: str | None,
    ) -> str | None:
        """Queue one task's job on the interactive queue, or on the own queue of the worker that holds its image's
        embedding (routing: CLICK_ROUTE_TTL, CLICK_ROUTE_WAIT); None (nothing queued) when it has no image."""
        try:
            ref = image_ref(task, config)
        except TaskDataError as exc:
            log.warning("%s", exc)  # the one record of this task's failure (it names the task)
            return None
        # The context (clicks, box, typed text) is part of the job's identity: another click is another job.
        identity = ref if context is None else f"{ref}\n{json.dumps(context, sort_keys=True)}"
        job_id = prediction_job_id(project, task, identity, version)
        message = PredictJob(QueuedTask(task["id"], task.get("data")), config_ref, version, context, host)
        route = self.queue.route_for(ref) if self.settings.click_route_ttl > 0 else None
        self.queue.submit(job_id, message, route=route)
        return job_id

    def _result(self, job_id: str | None, outcomes: dict[str, JobOutcome], version: str) -> tuple[dict[str, Any], bool]:
        """The task's prediction and whether it succeeded; failures become an empty prediction.

        A failed job is logged at DEBUG only: the worker logged its reason once already.
        """
        if job_id is None:
            return empty_prediction(version), False
        outcome = outcomes[job_id]
        if outcome.state == "finished" and outcome.prediction is not None:
            return outcome.prediction, True
        log.debug("job %s failed: %s", job_id, outcome.error)
        # Label Studio reads only result, score and model_version; the reason is for whoever reads the answer.
        return {**empty_prediction(version), "error": outcome.error or "the job failed"}, False


def _fingerprint_entry(group: FingerprintGroup) -> dict[str, Any]:
    """One /health entry: a fingerprint, how many live workers run it, their names, devices, package versions."""
    return {
        "fingerprint": dict(group.fingerprint),
        "workers": len(group.workers),
        "names": list(group.workers),
        "devices": list(group.devices),
        "package_versions": list(group.package_versions),
    }


def _ready_entry(name: str) -> dict[str, Any]:
    """One /health worker state of a live worker that announced its models."""
    return {"name": name, "state": "ready", "models": [], "since": None, "error": None}


def _state_entry(worker: WorkerState) -> dict[str, Any]:
    """One /health worker state of a worker loading its models, or that failed to."""
    error = worker.error if worker.state == "failed" else None
    return {
        "name": worker.name,
        "state": worker.state,
        "models": list(worker.models),
        "since": worker.since,
        "error": error,
    }
