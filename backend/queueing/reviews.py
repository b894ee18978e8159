"""What reviewers did with the predictions, kept in Redis per project and model version, bounded.

Keys, under the queue prefix (QUEUE_NAME):
  <prefix>:reviews:projects                      sorted set: project → time of its latest record
  <prefix>:reviews:<project>:versions            sorted set: model_version → time of its latest record
  <prefix>:reviews:<project>:<version>:objects   hash: annotation id → its ReviewedObjects, compact JSON (`encode`)
  <prefix>:reviews:<project>:<version>:times     sorted set: annotation id → time of its record
  <prefix>:reviews:<project>:<version>:updated   hash: annotation id → its Label Studio updated_at (epoch seconds)
  <prefix>:reviews:all                           sorted set: "<project>|<annotation>|<version>" → time of its record
  <prefix>:reviews:revisions                     hash: "<project>|<version>" → revision (changes with every write)
  <prefix>:reviews:counters                      hash: reason → count of events not recorded (and of those recorded)

An annotation's record replaces its previous one (an annotation edited twice counts once: its latest state), unless
the stored one comes from a later state of the annotation (updated_at): a job that read Label Studio before another
job does not overwrite what that one recorded. Bounds, the least recently recorded going first: `max_annotations`
annotations per (project, model_version), `max_total` over the whole store (what bounds Redis memory: about 1 kB
per annotation of 20 objects), MAX_VERSIONS model versions per project, MAX_PROJECTS projects. A version left with
no annotations is dropped, and a project left with no version. Each write, with the evictions it causes, is one Lua
script (Redis runs a script as one transaction: concurrent writers keep the bounds exactly, with no retries); the
scripts name keys they derive from the records (a standalone Redis, as this backend uses, allows it; Cluster
would not).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence

from redis import Redis

from backend.learning.reviews import OUTCOMES, ReviewedObject
from backend.redis_replies import text

log = logging.getLogger(__name__)

# Model versions kept per project (each --apply of thresholds makes a new one), projects kept per store.
MAX_VERSIONS = 3
MAX_PROJECTS = 1000
# Decimals a score keeps in a record (thresholds are written with 6; 4 tell reviews apart well enough).
SCORE_DECIMALS = 4

# Shared by both scripts (ARGV[1] is always the root "<prefix>:reviews"): drop one annotation's record of one
# version, and the version (then the project) when that was its last; every drop moves the version's revision.
_DROP = """
local root = ARGV[1]
local function revise(project, version)
  local seq = redis.call('hincrby', root .. ':revisions', '#seq', 1)
  redis.call('hset', root .. ':revisions', project .. '|' .. version, seq)
end
local function drop_version(project, version)
  local base = root .. ':' .. project .. ':' .. version
  for _, annotation in ipairs(redis.call('zrange', base .. ':times', 0, -1)) do
    redis.call('zrem', root .. ':all', project .. '|' .. annotation .. '|' .. version)
  end
  redis.call('del', base .. ':objects', base .. ':times', base .. ':updated')
  redis.call('hdel', root .. ':revisions', project .. '|' .. version)
  redis.call('zrem', root .. ':' .. project .. ':versions', version)
  if redis.call('zcard', root .. ':' .. project .. ':versions') == 0 then
    redis.call('zrem', root .. ':projects', project)
  end
end
local function drop(project, annotation, version)
  local base = root .. ':' .. project .. ':' .. version
  redis.call('hdel', base .. ':objects', annotation)
  redis.call('hdel', base .. ':updated', annotation)
  redis.call('zrem', base .. ':times', annotation)
  redis.call('zrem', root .. ':all', project .. '|' .. annotation .. '|' .. version)
  if redis.call('zcard', base .. ':times') == 0 then drop_version(project, version) else revise(project, version) end
end
"""
# One record (ARGV: root, project, version, annotation, payload, now, updated_at or "", max_annotations, max_total or
# 0, MAX_VERSIONS, MAX_PROJECTS): refused (-1) when the stored record is of a later updated_at; else written, then
# the least recently recorded beyond each bound evicted (never this record); returns how many were evicted.
_RECORD = (
    _DROP
    + """
local project, version, annotation, now = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[6])
local bound, total = tonumber(ARGV[8]), tonumber(ARGV[9])
local max_versions, max_projects = tonumber(ARGV[10]), tonumber(ARGV[11])
local base = root .. ':' .. project .. ':' .. version
local member = project .. '|' .. annotation .. '|' .. version
if ARGV[7] ~= '' then
  local stored = redis.call('hget', base .. ':updated', annotation)
  if stored and tonumber(stored) > tonumber(ARGV[7]) then return -1 end
  redis.call('hset', base .. ':updated', annotation, ARGV[7])
end
redis.call('hset', base .. ':objects', annotation, ARGV[5])
redis.call('zadd', base .. ':times', now, annotation)
redis.call('zadd', root .. ':all', now, member)
redis.call('zadd', root .. ':' .. project .. ':versions', now, version)
redis.call('zadd', root .. ':projects', now, project)
revise(project, version)
local evicted = 0
local excess = redis.call('zcard', base .. ':times') - bound
if excess > 0 then
  for _, old in ipairs(redis.call('zrange', base .. ':times', 0, excess)) do
    if old ~= annotation and excess > 0 then drop(project, old, version); excess = excess - 1; evicted = evicted + 1 end
  end
end
excess = total > 0 and redis.call('zcard', root .. ':all') - total or 0
if excess > 0 then
  for _, old in ipairs(redis.call('zrange', root .. ':all', 0, excess)) do
    if old ~= member and excess > 0 then
      local p, a, v = string.match(old, '^([^|]*)|([^|]*)|(.*)$')
      drop(p, a, v); excess = excess - 1; evicted = evicted + 1
    end
  end
end
for _, old in ipairs(redis.call('zrange', root .. ':' .. project .. ':versions', 0, -max_versions - 1)) do
  drop_version(project, old)
end
for _, old in ipairs(redis.call('zrange', root .. ':projects', 0, -max_projects - 1)) do
  for _, old_version in ipairs(redis.call('zrange', root .. ':' .. old .. ':versions', 0, -1)) do
    drop_version(old, old_version)
  end
  redis.call('zrem', root .. ':projects', old)
end
return evicted
"""
)
# Forget one annotation in every version of its project (ARGV: root, project, annotation); returns how many records.
_FORGET = (
    _DROP
    + """
local project, annotation, found = ARGV[2], ARGV[3], 0
for _, version in ipairs(redis.call('zrange', root .. ':' .. project .. ':versions', 0, -1)) do
  if redis.call('zscore', root .. ':' .. project .. ':' .. version .. ':times', annotation) then
    drop(project, annotation, version); found = found + 1
  end
end
return found
"""
)


def encode(objects: Sequence[ReviewedObject]) -> str:
    """The compact JSON of a record: one [label, outcome index in OUTCOMES, score (SCORE_DECIMALS) or null] per
    object, a relabelled one with its new label as a fourth item."""
    items: list[list[object]] = []
    for obj in objects:
        score = None if obj.score is None else round(obj.score, SCORE_DECIMALS)
        item: list[object] = [obj.label, OUTCOMES.index(obj.outcome), score]
        items.append(item if obj.new_label is None else [*item, obj.new_label])
    return json.dumps(items, separators=(",", ":"), ensure_ascii=False)


def decode(raw: str) -> list[ReviewedObject]:
    """The objects `encode` wrote. Raises ValueError (or TypeError) for anything else."""
    found = []
    for item in json.loads(raw):
        if not isinstance(item, list) or len(item) not in (3, 4) or not isinstance(item[1], int):
            raise ValueError(f"a review record item must be [label, outcome, score(, new label)], got {item!r}")
        outcome = OUTCOMES[item[1]] if 0 <= item[1] < len(OUTCOMES) else item[1]
        new_label = item[3] if len(item) == 4 else None
        found.append(
            ReviewedObject.from_json({"label": item[0], "outcome": outcome, "score": item[2], "new_label": new_label})
        )
    return found


class ReviewStore:
    """Review records in Redis (see the module docstring for the keys). Methods raise RedisError.

    max_total: the store-wide bound; None for a store that only reads (the bounds are the writers')."""

    def __init__(self, redis: Redis, prefix: str, max_annotations: int, max_total: int | None = None) -> None:
        self._redis = redis
        self._record = redis.register_script(_RECORD)
        self._forget = redis.register_script(_FORGET)
        self._root = f"{prefix}:reviews"
        self._max = max_annotations
        self._max_total = max_total or 0

    def record(
        self,
        project: int,
        model_version: str,
        annotation: int,
        objects: Sequence[ReviewedObject],
        updated_at: float | None = None,
    ) -> bool:
        """Keep `objects` as annotation `annotation`'s review of `model_version`'s prediction, replacing its
        previous record of that version, unless that one was of a later state (`updated_at`, epoch seconds, when
        known): then nothing changes and False. Evicts the oldest records beyond the bounds."""
        stamp = "" if updated_at is None else repr(float(updated_at))
        args: list[str | int | float] = [self._root, project, model_version, annotation, encode(objects)]
        args += [time.time(), stamp, self._max, self._max_total, MAX_VERSIONS, MAX_PROJECTS]
        return int(self._record(keys=[], args=args)) >= 0

    def forget(self, project: int, annotation: int) -> int:
        """Drop annotation `annotation`'s records of every model version of `project` (it was deleted), and the
        versions it leaves empty; how many records it dropped."""
        return int(self._forget(keys=[], args=[self._root, project, annotation]))

    def objects(self, project: int, model_version: str) -> list[ReviewedObject]:
        """Every reviewed object of `project`'s records of `model_version`, annotation after annotation (a record
        that does not parse is skipped, with a log line)."""
        found: list[ReviewedObject] = []
        bad = 0
        for raw in self._redis.hvals(self._objects(project, model_version)):
            try:
                found.extend(decode(text(raw)))
            except (ValueError, TypeError, AttributeError, IndexError):
                bad += 1
        if bad:
            log.warning("%d review records of project %d, %s do not parse; skipped", bad, project, model_version)
        return found

    def revision(self, project: int, model_version: str) -> int | None:
        """A number that changes whenever `project`'s records of `model_version` do (None: no records), never
        repeating within the store: figures computed at one revision hold until it changes."""
        value = self._redis.hget(self._revisions(), f"{project}|{model_version}")
        return None if value is None else int(text(value))

    def versions(self, project: int) -> list[str]:
        """Model versions of `project` with records, the most recently recorded first."""
        return [text(version) for version in self._redis.zrevrange(self._versions(project), 0, -1)]

    def projects(self, limit: int) -> list[int]:
        """At most `limit` projects with records, the most recently recorded first."""
        return [int(text(project)) for project in self._redis.zrevrange(self._projects(), 0, limit - 1)]

    def annotations(self, project: int, model_version: str) -> int:
        """How many annotations `project`'s records of `model_version` rest on."""
        return int(self._redis.zcard(self._times(project, model_version)))

    def total(self) -> int:
        """How many annotations the whole store holds records of (at most max_total)."""
        return int(self._redis.zcard(f"{self._root}:all"))

    def count(self, reason: str, amount: int = 1) -> None:
        """Add `amount` to the counter of `reason` (a fixed word: the counters are /metrics labels)."""
        self._redis.hincrby(self._counters(), reason, amount)

    def counters(self) -> dict[str, int]:
        """Event counts by reason: what review jobs recorded, forgot, ignored or failed on."""
        return {text(key): int(value) for key, value in self._redis.hgetall(self._counters()).items()}

    def _projects(self) -> str:
        return f"{self._root}:projects"

    def _versions(self, project: int) -> str:
        return f"{self._root}:{project}:versions"

    def _objects(self, project: int, version: str) -> str:
        return f"{self._root}:{project}:{version}:objects"

    def _times(self, project: int, version: str) -> str:
        return f"{self._root}:{project}:{version}:times"

    def _revisions(self) -> str:
        return f"{self._root}:revisions"

    def _counters(self) -> str:
        return f"{self._root}:counters"
