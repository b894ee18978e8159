"""A full Redis (maxmemory reached, noeviction) met while a request waits for its jobs is reported as full, not as
unreachable: the sweep the wait runs writes, and Redis refuses the write. A real valkey of its own."""

from __future__ import annotations

import uuid

import pytest
from redis import Redis
from rq.job import JobStatus

from backend.errors import RedisFullError
from backend.queueing.client import JobLimits, PredictionQueue
from backend.queueing.connection import embedded_redis
from backend.queueing.messages import PredictJob, QueuedTask


def test_wait_reports_a_full_redis_as_full() -> None:
    with embedded_redis() as url:
        redis = Redis.from_url(url)
        queue = PredictionQueue(redis, f"full-{uuid.uuid4().hex[:8]}", JobLimits(600, 600, 600))
        queue.submit("pred-full-1", PredictJob(QueuedTask(1, None), label_config_ref="0" * 64, model_version="v"))
        job = queue.interactive.fetch_job("pred-full-1")
        queue.interactive.remove(job)
        job.set_status(JobStatus.STARTED)  # its worker died: the entry below expired long ago
        redis.zadd(queue.interactive.started_job_registry.key, {f"{job.id}:{uuid.uuid4().hex}": 1})
        redis.config_set("maxmemory", 1)  # every write is refused from now on
        with pytest.raises(RedisFullError, match="Redis is full"):
            queue.wait([job.id], timeout=10)
