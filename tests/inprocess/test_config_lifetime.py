"""A stored labeling config lives as long as the jobs that refer to it (real Redis, real rq jobs and worker).

Before, only requests refreshed its TTL: a long bulk run's tail (queued jobs have no TTL) outlived it and failed
with LabelConfigMissingError, beyond the reach of /jobs/retry. Now each worker read and each progress poll of a
run with chunks still to run extends it.
"""

from __future__ import annotations

import contextlib
import uuid
from types import SimpleNamespace
from typing import Any

from redis import Redis
from rq import Queue, SimpleWorker
from rq.serializers import JSONSerializer

from backend.errors import ModelVersionMismatchError
from backend.queueing.bulk import BulkRuns
from backend.queueing.client import JobLimits, PredictionQueue
from backend.queueing.configs import CONFIG_KEY, config_ttl, payload_config, store_config
from backend.queueing.messages import ChunkJob, PredictJob, QueuedTask

SHORT_TTL_S = 30
LIMITS = JobLimits(job_timeout=600, result_ttl=3600, failure_ttl=7200)


def a_config(redis: Redis, ttl_s: int = SHORT_TTL_S) -> str:
    xml = f'<View><Image name="image" value="$image"/><!-- {uuid.uuid4().hex} --></View>'
    return store_config(redis, xml, ttl_s)


def read_config_as_a_job(payload: dict[str, Any]) -> None:
    """What a job does first: read its config (backend.jobs.checked_config); the version check may refuse."""
    from backend.jobs import checked_config

    with contextlib.suppress(ModelVersionMismatchError):
        checked_config(SimpleNamespace(model_version=lambda config: "y"), PredictJob.from_json(payload))  # type: ignore[arg-type]


def test_a_worker_read_extends_the_configs_life_to_the_jobs_config_ttl(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    ref = a_config(redis)
    queue = Queue(f"cfg-{uuid.uuid4().hex[:8]}", connection=redis, serializer=JSONSerializer)
    queue.enqueue(
        f"{__name__}.read_config_as_a_job",
        PredictJob(QueuedTask(1, None), label_config_ref=ref, model_version="x").to_json(),
        job_timeout=LIMITS.job_timeout,
        result_ttl=LIMITS.result_ttl,
        failure_ttl=LIMITS.failure_ttl,
    )
    assert SimpleWorker([queue], connection=redis, serializer=JSONSerializer).work(burst=True)
    ttl = redis.ttl(CONFIG_KEY.format(ref))
    assert ttl > SHORT_TTL_S, f"the worker's read left the config to expire in {ttl} s"
    assert ttl <= config_ttl(LIMITS.job_timeout, LIMITS.result_ttl, LIMITS.failure_ttl)


def test_a_cached_read_extends_it_too_and_stores_an_expired_one_again(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    ref = a_config(redis)
    key = CONFIG_KEY.format(ref)
    payload = PredictJob(QueuedTask(1, None), label_config_ref=ref, model_version="x")
    text = payload_config(redis, payload, 1000)
    redis.expire(key, SHORT_TTL_S)
    assert payload_config(redis, payload, 1000) == text
    assert redis.ttl(key) > SHORT_TTL_S, "a read from the worker's cache did not extend the stored config"
    redis.delete(key)
    assert payload_config(redis, payload, 1000) == text
    assert redis.get(key) == text.encode() and redis.ttl(key) > SHORT_TTL_S, "an expired cached config was lost"


def test_progress_of_a_run_extends_the_configs_of_its_waiting_chunks(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    ref = a_config(redis)
    ttl_s = config_ttl(LIMITS.job_timeout, LIMITS.result_ttl, LIMITS.failure_ttl)
    queue = PredictionQueue(redis, f"cfg-{uuid.uuid4().hex[:8]}", LIMITS)
    runs = BulkRuns(redis, queue, ttl_s)
    chunk = ChunkJob("1", (QueuedTask(1, {}),), label_config_ref=ref, model_version=f"x-{uuid.uuid4().hex[:8]}")
    run_id = runs.start("1", [chunk])  # no worker: it waits
    redis.expire(CONFIG_KEY.format(ref), SHORT_TTL_S)  # the request that stored it was long ago
    progress = runs.progress(run_id)
    assert progress is not None and progress.queued == 1
    assert redis.ttl(CONFIG_KEY.format(ref)) > SHORT_TTL_S, "progress left a waiting chunk's config to expire"
