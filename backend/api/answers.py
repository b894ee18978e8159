"""Response bodies of the routes, as the OpenAPI spec describes them (and FastAPI checks them on the way out)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel


class ErrorAnswer(BaseModel):
    """Every refused or failed request (400, 404, 413, 503, 504, 500): what went wrong, in one line."""

    detail: str


class WorkerFingerprint(BaseModel):
    """Live workers that announced the same model fingerprint (what enters model_version): how many, their rq
    names, the devices they run on and their package versions (the last two do not enter model_version)."""

    fingerprint: dict[str, Any]
    workers: int
    names: list[str]
    devices: list[str]
    package_versions: list[str]


class WorkerStateAnswer(BaseModel):
    """One worker's readiness: "ready" (live, announced its models), "loading" its models (since: Unix time the
    load started) or "failed" to load them (since: when; error: the load error, one line). models: what it loads,
    in words (empty for ready workers: their fingerprint says it)."""

    name: str
    state: Literal["loading", "ready", "failed"]
    models: list[str]
    since: float | None
    error: str | None


class HealthUp(BaseModel):
    """GET /health when Redis answers: live workers, jobs waiting per queue name, and the workers' model
    fingerprints; `fingerprints_differ` when workers run different model settings (then /setup, /predict and
    /prelabel answer 503 until they agree). `ready` when a worker can answer; `worker_states` tells each worker
    loading / ready / failed (a failed load stays listed for 10 minutes); `detail` says in one sentence why
    /setup is refused while no worker is ready. `status` is UP whenever Redis answers: Label Studio needs it."""

    status: Literal["UP"]
    model_class: str
    workers: int
    queued: dict[str, int]
    fingerprints: list[WorkerFingerprint]
    fingerprints_differ: bool
    ready: bool
    worker_states: list[WorkerStateAnswer]
    detail: str | None = None


class HealthDown(BaseModel):
    """GET /health (503) when Redis is unreachable or too slow."""

    status: Literal["DOWN"]
    model_class: str
    detail: str


class SetupAnswer(BaseModel):
    """POST /setup: the model version of the project's labeling config."""

    model_version: str


class PredictAnswer(BaseModel):
    """POST /predict: one prediction per task in order; or, for requests too large to answer in time, no results
    and the `run_id` of the bulk run whose predictions workers push to Label Studio (absent otherwise)."""

    results: list[dict[str, Any]]
    run_id: str | None = None


class PrelabelAnswer(BaseModel):
    """POST /prelabel: the queued run, its task count and model version."""

    run_id: str
    tasks: int
    model_version: str


class ProgressAnswer(BaseModel):
    """Task counts of a bulk run (GET /runs/{run_id}) or project (GET /jobs) by state; one line per failed chunk."""

    total: int
    queued: int
    running: int
    done: int
    failed: int
    failures: list[str]
    finished: bool


class CancelAnswer(BaseModel):
    """DELETE /jobs: how many queued chunks were canceled."""

    canceled: int


class RetryAnswer(BaseModel):
    """POST /jobs/retry: how many failed chunks were queued again."""

    requeued: int


class WebhookAnswer(BaseModel):
    """POST /webhook, always 200: "queued" with the review job's id for an event to learn from (an annotation
    created, updated or deleted; START_TRAINING), else "ignored" with the reason in one line. action: the event's
    action as sent (shortened; empty when it named none)."""

    status: Literal["queued", "ignored"]
    action: str
    reason: str | None = None
    job_id: str | None = None


class VersionsAnswer(BaseModel):
    """GET /versions: the model versions of the projects set up."""

    versions: list[str]
