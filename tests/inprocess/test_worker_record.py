"""A worker's record and connection in Redis. A live worker whose record vanished from Redis (a restart without its
data, a flush, an outage longer than the record's TTL) registers again at its next idle heartbeat, so the API sees
it and its fingerprint again."""

from __future__ import annotations

import uuid

from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from backend.queueing.client import queue_names
from backend.queueing.connection import worker_connection
from backend.queueing.fleet import read_fleet
from backend.queueing.worker import HeartbeatWorker
from backend.settings import Settings
from tests.support.workers import announced_worker


def test_an_idle_worker_whose_record_was_lost_registers_again_with_its_announcement(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    settings = Settings(queue_name=f"rec-{uuid.uuid4().hex[:8]}")
    with announced_worker(redis, settings) as worker:
        assert read_fleet(redis, settings.queue_name).fingerprint() == settings.model_fingerprint()
        redis.delete(worker.key)
        for queue in queue_names(settings.queue_name):
            redis.delete(f"rq:workers:{queue}")
        assert not read_fleet(redis, settings.queue_name).groups  # what rq's own heartbeat would leave

        worker.heartbeat()

        fleet = read_fleet(redis, settings.queue_name)
        assert fleet.fingerprint() == settings.model_fingerprint()
        assert fleet.groups[0].workers == (worker.name,)
        assert redis.ttl(worker.key) > 0


def test_a_heartbeat_of_a_registered_worker_writes_nothing_more(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    settings = Settings(queue_name=f"rec-{uuid.uuid4().hex[:8]}")
    with announced_worker(redis, settings) as worker:
        before = redis.hget(worker.key, "birth")
        worker.heartbeat()
        assert redis.hget(worker.key, "birth") == before
        assert read_fleet(redis, settings.queue_name).groups[0].workers == (worker.name,)


def test_a_connection_opened_before_the_worker_outlasts_its_blocking_dequeue(redis_url: str) -> None:
    """The worker's pool is used before rq builds the worker (the loading announcements): such a connection kept
    redis-py's default 5 s socket timeout, and an idle worker quit with "Redis connection timeout" after 5 s."""
    redis = worker_connection(redis_url)
    redis.ping()  # opens the pool's first connection, as the loading announcements do
    worker = HeartbeatWorker([Queue("rec-idle", connection=redis, serializer=JSONSerializer)], connection=redis)
    connection = redis.connection_pool.get_connection()
    try:
        assert connection.socket_timeout is not None
        assert connection.socket_timeout > worker.dequeue_timeout
    finally:
        redis.connection_pool.release(connection)
