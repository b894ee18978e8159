"""Per-task claims in Redis: at most one worker computes and pushes a (project, task, model_version).

A claim is taken before computing and turned into a "done" mark after the push. A claim lives
CLAIM_TTL_S and its holder renews it from a side thread while it works, so a claim outlives its worker
by at most CLAIM_TTL_S: a killed worker's tasks are free again seconds later, not after the job timeout.
Together with the check against Label Studio's stored predictions this keeps one prediction per task and
version under retries, overlapping runs and killed workers.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from types import TracebackType

from redis import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

DONE = b"done"
DONE_TTL_S = 7 * 24 * 3600
# Renewed every CLAIM_TTL_S / 3: two renewals may be missed (a busy Redis) before a live claim lapses.
CLAIM_TTL_S = 15

# Compare-and-act: touch a key only while it still names this owner (it may have lapsed and been retaken).
_RENEW = """
local renewed = 0
for _, key in ipairs(KEYS) do
  if redis.call('get', key) == ARGV[1] then redis.call('expire', key, ARGV[2]); renewed = renewed + 1 end
end
return renewed
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


@dataclass(frozen=True, slots=True)
class TaskClaims:
    """Claims of one project and model version."""

    redis: Redis
    project: str
    model_version: str

    def key(self, task: int) -> str:
        return f"grounded-sam:claim:{self.project}:{self.model_version}:{task}"

    def is_done(self, task: int) -> bool:
        return self.redis.get(self.key(task)) == DONE

    def holder(self, task: int) -> str | None:
        """Who holds the task now: a claimant's owner id, "done", or None when nobody does."""
        value = self.redis.get(self.key(task))
        return value.decode() if value is not None else None


class Claimant:
    """One job's claims: takes tasks, renews what it holds while it works, then marks them done or frees them.

    Use as a context manager around the work; on exit every claim not marked done is given back, so a
    failed or retried job leaves nothing blocked.
    """

    def __init__(self, claims: TaskClaims, owner: str, ttl_s: int = CLAIM_TTL_S) -> None:
        self.claims = claims
        self.owner = owner
        self.ttl_s = ttl_s
        self._held: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew_until_stopped, daemon=True, name="claim-renewer")
        self._renew = claims.redis.register_script(_RENEW)
        self._release = claims.redis.register_script(_RELEASE)

    def __enter__(self) -> Claimant:
        self._renewer.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._renewer.join()
        for task in list(self._held):
            self.release(task)

    def take(self, task: int, *, force: bool = False) -> bool:
        """Claim the task; False when another claimant holds it or (unless `force`) it is done."""
        key = self.claims.key(task)
        if force and self.claims.is_done(task):
            self.claims.redis.delete(key)
        if not self.claims.redis.set(key, self.owner, nx=True, ex=self.ttl_s):
            return False
        with self._lock:
            self._held.add(task)
        return True

    def mark_done(self, task: int) -> None:
        self.claims.redis.set(self.claims.key(task), DONE, ex=DONE_TTL_S)
        with self._lock:
            self._held.discard(task)

    def release(self, task: int) -> None:
        """Give a claimed task back (its computation or push failed), so a retry can take it at once."""
        self._release(keys=[self.claims.key(task)], args=[self.owner])
        with self._lock:
            self._held.discard(task)

    def _renew_until_stopped(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            with self._lock:
                keys = [self.claims.key(task) for task in self._held]
            if not keys:
                continue
            try:
                self._renew(keys=keys, args=[self.owner, self.ttl_s])
            except RedisError as exc:  # a missed renewal is survivable; the next one may get through
                log.warning("renewing %d task claims failed: %s", len(keys), exc)
