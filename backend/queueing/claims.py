"""Per-task claims in Redis: at most one worker computes and pushes a (project, task, model_version).

A claim is taken before computing and turned into a "done" mark after the push. A claim lives
CLAIM_TTL_S and its holder renews it from a side thread while it works, so a claim outlives its worker
by at most CLAIM_TTL_S: a killed worker's tasks are free again seconds later, not after the job timeout.
A holder that was cut off or stalled past CLAIM_TTL_S has lost the claims another worker took meanwhile, and
every step after taking one checks it atomically (compare-and-act in Lua): it renews, pushes, marks done or frees
only what still names it (or what lapsed and nobody took: re-claimed), so a worker coming back from a network
partition leaves the tasks another worker took alone and still does those nobody took.
Together with the check against Label Studio's stored predictions this keeps one prediction per task and
version under retries, overlapping runs and killed workers.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

from redis import Redis
from redis.exceptions import RedisError

from backend.redis_replies import text

log = logging.getLogger(__name__)

DONE = b"done"
DONE_TTL_S = 7 * 24 * 3600
# Renewed every CLAIM_TTL_S / 3: two renewals may be missed (a busy Redis) before a live claim lapses.
CLAIM_TTL_S = 15

# Compare-and-act: touch a key only while it still names this owner (it may have lapsed and been retaken).
# A claim that lapsed and that nobody took (the key is gone) is still this owner's to have: taken again.
# _KEEP renews (or re-takes) each key and answers, per key, 1 (held, renewed) or 0 (lost: another owner's, or done).
_KEEP = """
local held = {}
for i, key in ipairs(KEYS) do
  local value = redis.call('get', key)
  if value == ARGV[1] then redis.call('expire', key, ARGV[2]); held[i] = 1
  elseif not value then redis.call('set', key, ARGV[1], 'EX', ARGV[2]); held[i] = 1
  else held[i] = 0 end
end
return held
"""
# Done over this owner's claim, or over a lapsed one nobody took (nobody else can be pushing it).
_FINISH = """
local value = redis.call('get', KEYS[1])
if value == ARGV[1] or not value then redis.call('set', KEYS[1], ARGV[2], 'EX', ARGV[3]); return 1 end
return 0
"""
# A lapsed claim nobody took is free already: released (1) like one still held.
_RELEASE = """
local value = redis.call('get', KEYS[1])
if value == ARGV[1] then return redis.call('del', KEYS[1]) end
if not value then return 1 end
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
        return text(value) if value is not None else None


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
        self._keep = claims.redis.register_script(_KEEP)
        self._finish = claims.redis.register_script(_FINISH)
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

    def keep(self, tasks: Sequence[int]) -> list[int]:
        """Those of `tasks` this claimant still holds, each renewed for a full TTL in the same atomic step.

        A task whose claim lapsed (this worker was cut off or stalled) and was taken by another worker, or
        finished by one, is lost: it is left out and forgotten, so this claimant never touches it again. One
        whose claim lapsed but that nobody took is claimed again and kept (otherwise nobody would predict it).
        """
        if not tasks:
            return []
        held = self._keep(keys=[self.claims.key(task) for task in tasks], args=[self.owner, self.ttl_s])
        lost = {task for task, still in zip(tasks, held, strict=True) if not still}
        with self._lock:
            self._held -= lost
        return [task for task in tasks if task not in lost]

    def holds(self, task: int) -> bool:
        """Whether the task's claim is still this claimant's; if so it is renewed (a full TTL from now)."""
        return bool(self.keep([task]))

    def mark_done(self, task: int) -> bool:
        """Turn the claim into the task's "done" mark; False (nothing written) when the claim is no longer ours."""
        finished = self._finish(keys=[self.claims.key(task)], args=[self.owner, DONE, DONE_TTL_S])
        with self._lock:
            self._held.discard(task)
        return bool(finished)

    def release(self, task: int) -> bool:
        """Give a claimed task back (its computation or push failed), so a retry can take it at once.
        False when the claim was no longer ours (nothing is touched)."""
        released = self._release(keys=[self.claims.key(task)], args=[self.owner])
        with self._lock:
            self._held.discard(task)
        return bool(released)

    def _renew_until_stopped(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            with self._lock:
                tasks = list(self._held)
            try:
                self.keep(tasks)
            except RedisError as exc:  # a missed renewal is survivable; the next one may get through
                log.warning("renewing %d task claims failed: %s", len(tasks), exc)
