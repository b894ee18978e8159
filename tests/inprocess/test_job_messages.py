"""Job messages on the queue: what the API queues reads back as the same typed message, and a message of another
schema (queued by an API older or newer than the worker) fails its job with the schema reason, which the waiting
request and the bulk run's progress report. Real embedded valkey, a real burst worker in this process."""

from __future__ import annotations

import uuid

from redis import Redis
from rq.serializers import JSONSerializer

from backend.queueing.bulk import RUN_KEY, BulkRuns, RecordedChunk, RunRecord
from backend.queueing.client import PREDICT_JOB, PRELABEL_JOB, JobLimits, PredictionQueue, chunk_job_id
from backend.queueing.messages import SCHEMA_KEY, ChunkJob, PredictJob, QueuedTask
from backend.queueing.worker import HeartbeatWorker

LIMITS = JobLimits(job_timeout=60, result_ttl=600, failure_ttl=600)
REF = "0" * 64


def a_queue(redis: Redis) -> PredictionQueue:
    return PredictionQueue(redis, f"messages-{uuid.uuid4().hex[:8]}", LIMITS)


def test_submit_queues_each_message_on_its_queue_for_its_job_function(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    queue = a_queue(redis)
    predict = PredictJob(QueuedTask(7, {"image": "http://images/7.png"}), REF, "v1", {"result": []}, "http://ls")
    chunk = ChunkJob("3", (QueuedTask(1, {}), QueuedTask(2, None)), REF, f"v-{uuid.uuid4().hex[:8]}", force=True)
    queue.submit("pred-messages-7", predict)
    queue.submit(chunk_job_id(chunk), chunk)

    [predict_job] = queue.interactive.get_jobs()
    [chunk_job] = queue.bulk.get_jobs()
    assert (predict_job.func_name, chunk_job.func_name) == (PREDICT_JOB, PRELABEL_JOB)
    assert PredictJob.from_json(predict_job.args[0]) == predict
    assert ChunkJob.from_json(chunk_job.args[0]) == chunk
    assert chunk_job.id.startswith("bulk-3-") and chunk_job_id(chunk) == chunk_job.id  # deterministic


def test_a_message_of_another_schema_fails_its_job_with_the_schema_reason(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    queue = a_queue(redis)
    predict_id = f"pred-schema-{uuid.uuid4().hex[:8]}"
    predict = {**PredictJob(QueuedTask(1, {}), REF, "v").to_json(), SCHEMA_KEY: 99}
    chunk = ChunkJob("p", (QueuedTask(1, {}), QueuedTask(2, {})), REF, f"v-{uuid.uuid4().hex[:8]}")
    queue.interactive.enqueue_call(PREDICT_JOB, args=(predict,), job_id=predict_id)  # by hand, as a newer API would
    queue.bulk.enqueue_call(PRELABEL_JOB, args=({**chunk.to_json(), SCHEMA_KEY: 99},), job_id=chunk_job_id(chunk))
    run_id = uuid.uuid4().hex[:12]
    redis.set(RUN_KEY.format(run_id), RunRecord("p", (RecordedChunk(chunk_job_id(chunk), 2),)).to_json())

    worker = HeartbeatWorker(list(queue.queues), connection=redis, serializer=JSONSerializer, heartbeat_s=0.5)
    worker.work(burst=True)

    [outcome] = queue.wait([predict_id], timeout=60)
    assert outcome.state == "failed" and "JobMessageError" in (outcome.error or "")
    assert "message schema 99" in (outcome.error or ""), outcome.error
    progress = BulkRuns(redis, queue).progress(run_id)
    assert progress is not None and (progress.total, progress.failed) == (2, 2)  # the recorded count of its tasks
    [failure] = progress.failures
    assert failure.startswith(chunk_job_id(chunk)) and "message schema 99" in failure, failure
