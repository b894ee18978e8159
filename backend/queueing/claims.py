"""Per-task claims in Redis: at most one worker computes and pushes a (project, task, model_version).

A claim is taken before computing and turned into a "done" mark after the push. A worker that dies
leaves its claim to expire (after the job timeout), so a later run picks the task up again. Together
with the check against Label Studio's stored predictions this keeps one prediction per task and version
under retries, overlapping runs and killed workers.
"""

from __future__ import annotations

from dataclasses import dataclass

from redis import Redis

DONE = b"done"
DONE_TTL_S = 7 * 24 * 3600


@dataclass(frozen=True, slots=True)
class TaskClaims:
    """Claims of one project and model version; `busy_ttl` bounds how long a dead worker's claim lives."""

    redis: Redis
    project: str
    model_version: str
    busy_ttl: int

    def _key(self, task: int) -> str:
        return f"grounded-sam:claim:{self.project}:{self.model_version}:{task}"

    def is_done(self, task: int) -> bool:
        return self.redis.get(self._key(task)) == DONE

    def claim(self, task: int, owner: str, *, force: bool = False) -> bool:
        """Take the task; False when another worker holds it (or, unless `force`, it is done)."""
        if force and self.is_done(task):
            self.redis.delete(self._key(task))
        return bool(self.redis.set(self._key(task), owner, nx=True, ex=self.busy_ttl))

    def mark_done(self, task: int) -> None:
        self.redis.set(self._key(task), DONE, ex=DONE_TTL_S)

    def release(self, task: int) -> None:
        """Give a claimed task back (its computation or push failed), so a retry can take it."""
        self.redis.delete(self._key(task))
