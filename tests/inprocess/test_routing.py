"""Routing clicks to the worker that holds their image's embedding (backend.queueing.routing), decided and moved on
a real embedded valkey with real rq worker records (HeartbeatWorker births and deaths; no job runs here)."""

from __future__ import annotations

import uuid

from redis import Redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from backend.queueing import routing
from backend.queueing.client import JobLimits, PredictionQueue, queue_names, worker_queue_names
from backend.queueing.messages import PredictJob, QueuedTask
from backend.queueing.worker import HeartbeatWorker

LIMITS = JobLimits(job_timeout=60, result_ttl=600, failure_ttl=600)
IMAGE = "http://images/street.png"


def a_worker(redis: Redis, prefix: str) -> HeartbeatWorker:
    """A registered worker that listens on its own queue first, as run_worker builds it (it takes no job here)."""
    name = f"w{uuid.uuid4().hex[:8]}"
    names = [routing.own_queue_name(prefix, name), *worker_queue_names(prefix)]
    queues = [Queue(queue, connection=redis, serializer=JSONSerializer) for queue in names]
    worker = HeartbeatWorker(queues, connection=redis, serializer=JSONSerializer, name=name, route_prefix=prefix)
    worker.register_birth()
    return worker


def a_message(task: int) -> PredictJob:
    return PredictJob(QueuedTask(task, {"image": IMAGE}), "0" * 64, "v1", {"result": [task]})


def own_ids(redis: Redis, prefix: str, worker: HeartbeatWorker) -> list[str]:
    return Queue(routing.own_queue_name(prefix, worker.name), connection=redis).get_job_ids()


def test_a_route_is_taken_only_to_a_live_worker_free_of_bulk_and_reviews_with_room_in_its_queue(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    prefix = f"route-{uuid.uuid4().hex[:8]}"
    shared = queue_names(prefix)[0]
    worker = a_worker(redis, prefix)

    def chosen() -> str | None:
        return routing.choose_worker(redis, prefix, shared, IMAGE)

    assert chosen() is None  # no route yet
    routing.remember_route(redis, prefix, IMAGE, worker.name, 60)
    assert chosen() == worker.name
    assert 0 < redis.pttl(routing.image_route_key(prefix, IMAGE)) <= 60_000

    for busy in ("bulk-7-0123456789abcdef", "review-7-0123456789abcdef"):
        worker.set_current_job_id(busy)
        assert chosen() is None, busy
    worker.set_current_job_id("pred-7-11-0123456789abcdef")  # another click: it is worth waiting for
    assert chosen() == worker.name
    worker.set_current_job_id(None)

    own = routing.own_queue_name(prefix, worker.name)
    redis.rpush(f"rq:queue:{own}", *[f"pred-x-{n}" for n in range(routing.ROUTE_QUEUE_BOUND)])
    assert chosen() is None  # its own queue is full
    redis.delete(f"rq:queue:{own}")
    assert chosen() == worker.name

    routing.remember_route(redis, prefix, IMAGE, "a-worker-nobody-knows", 60)
    assert chosen() is None
    routing.remember_route(redis, prefix, IMAGE, worker.name, 60)
    worker.register_death()
    assert chosen() is None

    routing.remember_route(redis, prefix, "http://images/other.png", worker.name, 0)  # 0: not remembered
    assert not redis.exists(routing.image_route_key(prefix, "http://images/other.png"))


def test_a_routed_job_waits_in_the_own_queue_with_the_shared_queue_as_origin_and_is_moved_once(
    redis_url: str,
) -> None:
    redis = Redis.from_url(redis_url)
    queue = PredictionQueue(redis, f"route-{uuid.uuid4().hex[:8]}", LIMITS)
    worker = a_worker(redis, queue.prefix)
    queue.interactive.enqueue_call("backend.jobs.predict_task", args=({},), job_id="pred-already-waiting")
    queue.submit("pred-routed", a_message(1), route=worker.name)
    queue.submit("pred-routed", a_message(1), route=worker.name)  # a retried request re-attaches

    assert own_ids(redis, queue.prefix, worker) == ["pred-routed"]
    job = Job.fetch("pred-routed", connection=redis, serializer=JSONSerializer)
    assert job.origin == queue.interactive.name and job.get_status() == "queued"
    assert routing.routed_worker(job.meta) == worker.name

    shared = queue.interactive.name
    assert routing.rescue(redis, queue.prefix, shared, "pred-routed", worker.name)
    assert not routing.rescue(redis, queue.prefix, shared, "pred-routed", worker.name)  # moved once, never twice
    assert queue.interactive.get_job_ids() == ["pred-routed", "pred-already-waiting"]  # at the front
    assert own_ids(redis, queue.prefix, worker) == []


def test_a_waiting_request_moves_a_routed_job_after_the_route_wait_or_when_its_worker_is_gone(
    redis_url: str,
) -> None:
    redis = Redis.from_url(redis_url)
    patient = PredictionQueue(redis, f"route-{uuid.uuid4().hex[:8]}", LIMITS, route_wait=3600)
    eager = PredictionQueue(redis, patient.prefix, LIMITS, route_wait=0)
    worker = a_worker(redis, patient.prefix)
    patient.submit("pred-a", a_message(1), route=worker.name)

    assert patient.wait(["pred-a"], timeout=0)[0].state == "pending"  # one poll: live worker, short wait
    assert own_ids(redis, patient.prefix, worker) == ["pred-a"]
    eager.wait(["pred-a"], timeout=0)  # waited longer than route_wait
    assert own_ids(redis, patient.prefix, worker) == []
    assert patient.interactive.get_job_ids() == ["pred-a"]

    patient.submit("pred-b", a_message(2), route=worker.name)
    worker.register_death()  # it stopped without moving its queue (the API sees a death, or no record)
    patient.wait(["pred-b"], timeout=0)
    assert own_ids(redis, patient.prefix, worker) == []
    assert patient.interactive.get_job_ids() == ["pred-b", "pred-a"]


def test_a_stopping_worker_moves_its_queue_in_order_and_takes_no_more_routed_jobs(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    queue = PredictionQueue(redis, f"route-{uuid.uuid4().hex[:8]}", LIMITS)
    worker = a_worker(redis, queue.prefix)
    queue.interactive.enqueue_call("backend.jobs.predict_task", args=({},), job_id="pred-shared")
    for name in ("pred-1", "pred-2"):
        queue.submit(name, a_message(int(name[-1])), route=worker.name)
    routing.remember_route(redis, queue.prefix, IMAGE, worker.name, 60)

    worker.teardown()  # what rq's work loop ends with: the own queue is released, then the death registered

    assert queue.interactive.get_job_ids() == ["pred-1", "pred-2", "pred-shared"]
    assert own_ids(redis, queue.prefix, worker) == []
    assert queue.route_for(IMAGE) is None
    queue.submit("pred-3", a_message(3), route=worker.name)  # routed before it stopped, queued after: shared
    assert own_ids(redis, queue.prefix, worker) == []
    assert queue.interactive.get_job_ids()[-1] == "pred-3"


def test_a_sweep_moves_the_own_queues_of_dead_workers_and_leaves_live_ones(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    queue = PredictionQueue(redis, f"route-{uuid.uuid4().hex[:8]}", LIMITS)
    live, killed = a_worker(redis, queue.prefix), a_worker(redis, queue.prefix)
    queue.submit("pred-live", a_message(1), route=live.name)
    queue.submit("pred-killed", a_message(2), route=killed.name)
    redis.delete(killed.key)  # killed: its record expired without a death

    assert routing.release_if_dead(redis, queue.prefix, queue.interactive.name) == 1

    assert queue.interactive.get_job_ids() == ["pred-killed"]
    assert own_ids(redis, queue.prefix, live) == ["pred-live"]
    assert redis.smembers(routing.own_queues_key(queue.prefix)) == {live.name.encode()}
    live.register_death()
