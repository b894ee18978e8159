"""Clicks go where the embedding is: each worker's own queue, and the Redis map from an image to the worker that
holds its embedding.

A worker listens on its own queue (`own_queue_name`) first, then on the shared queues. After a job put an image's
embedding in its cache it remembers the route (`remember_route`: image reference → worker name, expiring with
CLICK_ROUTE_TTL). The API routes an interactive job of that image to the worker's own queue (`choose_worker`)
only while the worker is live (rq's record present, registered, no death), runs no bulk chunk or review job, its
own queue holds fewer than ROUTE_QUEUE_BOUND jobs, and it has not released its queue (stopping). Else, and for
bulk chunks and review jobs always, the shared queues serve as before.

A routed job's rq origin is the shared interactive queue: only its id sits in the worker's list, so rq's
registries (started, finished, failed), the abandoned-job sweep (which queues a dead worker's job again on its
origin) and re-attaching by job id are those of any interactive job. Moving a job out of an own queue is one
atomic LREM + LPUSH (`rescue`): exactly one mover wins, and a worker that popped it first runs it. Who moves:
the waiting API request, once the job waited CLICK_ROUTE_WAIT or its worker is gone (client.PredictionQueue.wait);
a worker that stops, its whole queue (`release`); the sweeper thread of every worker, the queues of workers that
died (`release_if_dead`).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

from redis import Redis
from rq import Queue, Worker
from rq.job import Job
from rq.worker_registration import WORKERS_BY_QUEUE_KEY

from backend.redis_replies import text

log = logging.getLogger(__name__)

# A worker's own queue takes no more routed jobs while it holds this many: the next click goes to any worker.
ROUTE_QUEUE_BOUND = 3
# Job ids of the work that keeps a worker from clicks: bulk chunks (client.chunk_job_id) and review jobs.
BUSY_PREFIXES = ("bulk-", "review-")
# A routed job's meta names the worker it was routed to (read by the waiting request to rescue it).
ROUTE_META = "routed_to"
DEFAULT_ROUTE_WAIT_S = 2.0

# Save a new job (KEYS[1]) and push its id on the worker's own queue (KEYS[2]) while that worker (ARGV[2]) is in
# the own-queue set (KEYS[4]), else on the shared queue (KEYS[3]); KEYS[5]: rq's set of queues. ARGV[3]: the
# job's TTL (-1 none), ARGV[4..]: its hash fields. 0: the job exists (rq's DuplicateJobError), 1: routed,
# 2: shared (the worker released its queue meanwhile).
_ENQUEUE = """
if redis.call('exists', KEYS[1]) == 1 then return 0 end
redis.call('hset', KEYS[1], unpack(ARGV, 4))
local ttl = tonumber(ARGV[3])
if ttl and ttl > 0 then redis.call('expire', KEYS[1], ttl) end
redis.call('sadd', KEYS[5], KEYS[3])
if redis.call('sismember', KEYS[4], ARGV[2]) == 1 then
  redis.call('rpush', KEYS[2], ARGV[1])
  return 1
end
redis.call('rpush', KEYS[3], ARGV[1])
return 2
"""

# Move job ARGV[1] from the own queue KEYS[1] to the front of the shared queue KEYS[2], only while it is there.
_RESCUE = """
if redis.call('lrem', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('lpush', KEYS[2], ARGV[1])
  return 1
end
return 0
"""

# Take worker ARGV[1] out of the own-queue set KEYS[1] and move its queue KEYS[2] to the front of the shared queue
# KEYS[3], in order; with ARGV[2] == '1' only when its rq record KEYS[4] is gone or holds its death (-1: live).
# Returns how many jobs moved.
_RELEASE = """
if ARGV[2] == '1' and redis.call('hexists', KEYS[4], 'birth') == 1 and redis.call('hexists', KEYS[4], 'death') == 0 then
  return -1
end
redis.call('srem', KEYS[1], ARGV[1])
local moved = 0
while redis.call('rpoplpush', KEYS[2], KEYS[3]) do moved = moved + 1 end
return moved
"""


def image_route_key(prefix: str, image_ref: str) -> str:
    """Redis key of one image's route (a digest of its reference, as the task data holds it)."""
    return f"{prefix}:routes:{hashlib.sha256(image_ref.encode()).hexdigest()[:32]}"


def own_queue_name(prefix: str, worker_name: str) -> str:
    """A worker's private interactive queue, which it listens on before the shared ones."""
    return f"{prefix}-worker-{worker_name}"


def own_queues_key(prefix: str) -> str:
    """The set of workers whose own queue takes routed jobs (a worker joins once registered, leaves as it stops)."""
    return f"{prefix}:own-queues"


def remember_route(redis: Redis, prefix: str, image_ref: str, worker_name: str, ttl_s: float) -> None:
    """Image `image_ref`'s embedding is on worker `worker_name` for the next `ttl_s` seconds (each use renews it);
    ttl_s <= 0 remembers nothing. Raises RedisError."""
    if ttl_s > 0:
        redis.set(image_route_key(prefix, image_ref), worker_name, px=max(1, math.ceil(ttl_s * 1000)))


@dataclass(frozen=True, slots=True)
class WorkerView:
    """What routing needs to know of one worker, read in one round trip.

    live: rq's record is there without a death and the worker is registered on the shared interactive queue;
    joined: its own queue takes routed jobs (it has not released it); current_job: the id it runs now, if any;
    queued: jobs waiting in its own queue.
    """

    name: str
    live: bool
    joined: bool
    current_job: str | None
    queued: int

    @property
    def busy(self) -> bool:
        """Whether it runs a bulk chunk or a review job now (a click would wait behind it)."""
        return self.current_job is not None and self.current_job.startswith(BUSY_PREFIXES)

    @property
    def routable(self) -> bool:
        """Whether a click may go to its own queue."""
        return self.live and self.joined and not self.busy and self.queued < ROUTE_QUEUE_BOUND


def worker_view(redis: Redis, prefix: str, shared: str, worker_name: str) -> WorkerView:
    """Worker `worker_name` as routing sees it; `shared`: the shared interactive queue's name. Raises RedisError."""
    key = Worker.redis_worker_namespace_prefix + worker_name
    with redis.pipeline(transaction=False) as pipe:
        pipe.hmget(key, ["birth", "death", "current_job"])
        pipe.sismember(WORKERS_BY_QUEUE_KEY % shared, key)
        pipe.sismember(own_queues_key(prefix), worker_name)
        pipe.llen(_queue_key(own_queue_name(prefix, worker_name)))
        (birth, death, current), registered, joined, queued = pipe.execute()
    live = birth is not None and death is None and bool(registered)
    return WorkerView(worker_name, live, bool(joined), None if current is None else text(current), int(queued))


def choose_worker(redis: Redis, prefix: str, shared: str, image_ref: str) -> str | None:
    """The worker whose own queue should take the next interactive job of `image_ref`, or None (the shared queue):
    no route, or the routed worker is not `routable`. Raises RedisError."""
    raw = redis.get(image_route_key(prefix, image_ref))
    if raw is None:
        return None
    view = worker_view(redis, prefix, shared, text(raw))
    if not view.routable:
        log.debug("route of %s to worker %s not taken: %s", image_ref[:80], view.name, view)
        return None
    return view.name


def enqueue_routed(redis: Redis, prefix: str, shared: Queue, job: Job, worker_name: str) -> bool:
    """Save `job` (made by `shared.create_job`: its origin is the shared queue) and queue it on the worker's own
    queue, or on the shared queue when that worker released its own meanwhile (False). Raises rq's
    DuplicateJobError when a job of that id exists, RedisError."""
    from rq.exceptions import DuplicateJobError
    from rq.utils import now

    job.enqueued_at = now()
    job.meta[ROUTE_META] = worker_name
    fields = [part for pair in job.to_dict().items() for part in pair]
    keys = [
        job.key,
        _queue_key(own_queue_name(prefix, worker_name)),
        shared.key,
        own_queues_key(prefix),
        Queue.redis_queues_keys,
    ]
    ttl = job.ttl if job.ttl is not None else -1
    placed = redis.eval(_ENQUEUE, len(keys), *keys, job.id, worker_name, ttl, *fields)
    if placed == 0:
        raise DuplicateJobError(f"Job with ID '{job.id}' already exists")
    return bool(placed == 1)


def routed_worker(meta: Mapping[str, object]) -> str | None:
    """The worker a job was routed to, from its meta (None: it was queued on the shared queue)."""
    worker = meta.get(ROUTE_META)
    return worker if isinstance(worker, str) else None


def rescue(redis: Redis, prefix: str, shared: str, job_id: str, worker_name: str) -> bool:
    """Move a job still waiting in `worker_name`'s own queue to the front of the shared queue `shared`; False
    when it is not there (taken by its worker, or moved already). Raises RedisError."""
    own = _queue_key(own_queue_name(prefix, worker_name))
    moved = bool(redis.eval(_RESCUE, 2, own, _queue_key(shared), job_id))
    if moved:
        log.info("job %s waited too long for worker %s (or it is gone): moved to the shared queue", job_id, worker_name)
    return moved


def release(redis: Redis, prefix: str, shared: str, worker_name: str) -> int:
    """Worker `worker_name` stops: its own queue takes no more jobs, and those waiting there move to the front of
    the shared queue in order. Returns how many moved. Raises RedisError."""
    return _release(redis, prefix, shared, worker_name, only_if_dead=False)


def release_if_dead(redis: Redis, prefix: str, shared: str) -> int:
    """`release` every worker of the own-queue set whose rq record is gone or holds its death (it was killed, or
    stopped without releasing); live ones are left alone. Returns how many jobs moved. Raises RedisError."""
    moved = 0
    for member in redis.smembers(own_queues_key(prefix)):
        moved += max(0, _release(redis, prefix, shared, text(member), only_if_dead=True))
    return moved


def _release(redis: Redis, prefix: str, shared: str, worker_name: str, *, only_if_dead: bool) -> int:
    keys = [
        own_queues_key(prefix),
        _queue_key(own_queue_name(prefix, worker_name)),
        _queue_key(shared),
        Worker.redis_worker_namespace_prefix + worker_name,
    ]
    moved = int(redis.eval(_RELEASE, len(keys), *keys, worker_name, "1" if only_if_dead else "0"))
    if moved > 0:
        log.info("worker %s stopped: %d job(s) of its own queue moved to the shared queue", worker_name, moved)
    return moved


def _queue_key(name: str) -> str:
    return Queue.redis_queue_namespace_prefix + name
