"""What the workers run, as they announce it: each worker's model fingerprint, read back by the API.

A worker writes its `Announcement` into rq's own worker hash (`rq:worker:<name>`, field ANNOUNCEMENT_FIELD)
when it registers its birth, so the announcement lives exactly as long as rq's record of the worker: rq's
heartbeat refreshes that key's TTL, register_death (a stopped worker, or `serve` unregistering a killed one)
removes the worker from its queues' worker sets, and a worker killed without either expires with rq's
worker TTL (queueing/worker.py WORKER_TTL_S: within 2 minutes). The API reads the live announcements of the
workers on its queues (`read_fleet`) and takes model_version from their one fingerprint (`Fleet.fingerprint`),
so only workers read the model settings.

Before it registers with rq a worker is not ready: it loads its models. It says so in a `WorkerState` record
("loading": which models, since when) in one hash per queue prefix (STATES_KEY), refreshed while it loads and
dropped from view once rq lists the same process (host and pid) as live; a load that failed leaves a "failed"
record with its one-line error for FAILED_TTL_S, so /health and /setup can tell "loading" from "broken" after the
process exited. Each record carries its own expiry (Redis hash fields have none); readers skip expired ones and
writers prune them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from redis import Redis
from rq.worker import Worker
from rq.worker_registration import WORKERS_BY_QUEUE_KEY

from backend.errors import NoWorkerError, WorkersDisagreeError
from backend.queueing.client import queue_names
from backend.redis_replies import text

log = logging.getLogger(__name__)

ANNOUNCEMENT_FIELD = "grounded_sam_announcement"
# A refusal names this many workers per fingerprint at most (then how many more).
NAMED_WORKERS = 5
# The loading and failed records of the workers of one queue prefix: field host:pid, value WorkerState JSON.
STATES_KEY = "grounded-sam:worker-states:{}"
# A loading record lives this long unless refreshed (the loading worker refreshes it every LOADING_REFRESH_S),
# so a worker killed while loading is "loading" no longer than this.
LOADING_TTL_S = 30.0
LOADING_REFRESH_S = 10.0
# A failed load stays visible this long after the worker exited (serve's supervisor may restart it meanwhile).
FAILED_TTL_S = 600.0

StateName = Literal["loading", "failed"]


@dataclass(frozen=True, slots=True)
class Announcement:
    """What one worker runs.

    fingerprint: Settings.model_fingerprint() of the worker (models, SAM dtype, thresholds, post-processing,
    output options): exactly what enters model_version. device (resolved, e.g. "cuda", "cpu") and
    package_version describe the worker and do not enter model_version (the same weights label alike anywhere).
    """

    fingerprint: Mapping[str, object]
    device: str
    package_version: str

    def to_json(self) -> str:
        body = {"fingerprint": dict(self.fingerprint), "device": self.device, "package_version": self.package_version}
        return json.dumps(body, sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, raw: str) -> Announcement:
        """ValueError when `raw` is not an announcement (another writer, a truncated value)."""
        body = json.loads(raw)
        if not isinstance(body, dict) or not isinstance(body.get("fingerprint"), dict):
            raise ValueError(f"not a worker announcement: {raw[:80]!r}")
        return cls(body["fingerprint"], str(body.get("device", "?")), str(body.get("package_version", "?")))


@dataclass(frozen=True, slots=True)
class WorkerState:
    """A worker that is not ready: loading its models, or failed to load them (then `error`, one line).

    name: "host:pid" of the worker process (`state_name`); models: what it loads, e.g. ("detector X", "SAM Y");
    since: Unix time the load started (loading) or failed (failed); expires: Unix time the record lapses.
    """

    name: str
    state: StateName
    models: tuple[str, ...]
    since: float
    expires: float
    error: str = ""

    def to_json(self) -> str:
        body = {
            "state": self.state,
            "models": list(self.models),
            "since": self.since,
            "expires": self.expires,
            "error": self.error,
        }
        return json.dumps(body, sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, name: str, raw: str) -> WorkerState:
        """ValueError when `raw` is not a worker state record."""
        body = json.loads(raw)
        if not isinstance(body, dict) or body.get("state") not in ("loading", "failed"):
            raise ValueError(f"not a worker state: {raw[:80]!r}")
        models = tuple(str(model) for model in body.get("models", ()))
        state: StateName = "loading" if body["state"] == "loading" else "failed"
        return cls(name, state, models, float(body["since"]), float(body["expires"]), str(body.get("error", "")))

    def describe(self, now: float) -> str:
        """This worker's state in words, e.g. "host:12 is loading detector X, SAM Y (for 12 s)"."""
        ago = _duration(now - self.since)
        if self.state == "loading":
            return f"{self.name} is loading {', '.join(self.models) or 'its models'} (for {ago})"
        return f"{self.name} failed to load: {self.error} ({ago} ago)"


@dataclass(frozen=True, slots=True)
class FingerprintGroup:
    """The live workers that announced one fingerprint: their names, devices and package versions (sorted)."""

    fingerprint: Mapping[str, object]
    workers: tuple[str, ...]
    devices: tuple[str, ...]
    package_versions: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Fleet:
    """The live workers on one backend's queues, grouped by fingerprint (most workers first).

    unannounced: live workers that announced nothing (another program's rq worker, or one started before
    workers announced); they count in /health's `workers` but give no fingerprint.
    not_ready: workers loading their models or that failed to load them (not live in rq), oldest first;
    read_at: the Unix time of the read (what "for 12 s" is counted from).
    """

    groups: tuple[FingerprintGroup, ...]
    unannounced: tuple[str, ...] = ()
    not_ready: tuple[WorkerState, ...] = ()
    read_at: float = field(default=0.0, compare=False)

    @property
    def differ(self) -> bool:
        """Whether live workers run different model settings."""
        return len(self.groups) > 1

    def fingerprint(self) -> Mapping[str, object]:
        """The one fingerprint all live workers announced.

        NoWorkerError when none announced one; WorkersDisagreeError (naming the differing settings and the
        workers) when they announced several: no model_version can be given that every worker computes.
        """
        if not self.groups:
            raise NoWorkerError(self.why_not_ready())
        if self.differ:
            raise WorkersDisagreeError(self.disagreement())
        return self.groups[0].fingerprint

    def disagreement(self) -> str:
        """One line naming each setting that differs between the groups, with each group's value and workers."""
        flat = [_flatten(group.fingerprint) for group in self.groups]
        names = sorted({name for values in flat for name in values})
        differing = [name for name in names if len({_shown(values, name) for values in flat}) > 1]
        parts = [
            f"{name}: "
            + "; ".join(f"{_shown(v, name)} on {_named(g.workers)}" for g, v in zip(self.groups, flat, strict=True))
            for name in differing
        ]
        return (
            f"workers on these queues run different model settings ({' | '.join(parts)}); give every worker the same "
            "settings (a worker killed without stopping stays listed for up to 2 minutes)"
        )

    def why_not_ready(self) -> str:
        """One sentence for Label Studio's connect dialog: why no worker is ready (loading, failed, or none)."""
        loading = [state for state in self.not_ready if state.state == "loading"]
        failed = [state for state in self.not_ready if state.state == "failed"]
        if loading:
            last_failure = f"; before that {failed[-1].describe(self.read_at)}" if failed else ""
            return (
                f"the backend is not ready yet: worker {loading[0].describe(self.read_at)}{last_failure}; "
                "try again when it has loaded (GET /health shows the workers' states)"
            )
        if failed:
            return (
                f"the backend has no ready worker: worker {failed[-1].describe(self.read_at)}; fix the models' "
                "settings and restart the worker (GET /health shows the workers' states)"
            )
        return (
            "no worker has announced its models yet: start `grounded-sam worker` with the same REDIS_URL and "
            "QUEUE_NAME, or wait for `serve`'s worker to load its models"
        )


def state_name(hostname: str, pid: int) -> str:
    """The name a worker's loading and failed records go by: its process, as rq's worker hash records it."""
    return f"{hostname}:{pid}"


def write_state(redis: Redis, queue_prefix: str, state: WorkerState) -> None:
    """Record (or refresh) `state` and prune the records that lapsed (two round trips). Raises RedisError."""
    key = STATES_KEY.format(queue_prefix)
    lapsed = [name for name, record in _states(redis.hgetall(key), time.time(), keep_lapsed=True) if record is None]
    with redis.pipeline(transaction=False) as pipe:
        if lapsed:
            pipe.hdel(key, *lapsed)
        pipe.hset(key, state.name, state.to_json())
        pipe.expire(key, int(FAILED_TTL_S) + 1)  # the hash outlives its longest record, no more
        pipe.execute()


def clear_states(
    redis: Redis, queue_prefix: str, hostname: str, running: Callable[[int], bool], keep: str | None = None
) -> None:
    """Drop the records of worker processes on `hostname` that no longer run (`running(pid)` False: a worker
    that loaded clears its failed forerunners, restarted by `serve`), except `keep`; a sibling worker on the same
    host (one per GPU) keeps its own. Raises RedisError."""
    key = STATES_KEY.format(queue_prefix)
    names = [text(name) for name in redis.hkeys(key)]
    gone = [name for name in names if name != keep and _on_host_and_gone(name, hostname, running)]
    if gone:
        redis.hdel(key, *gone)


def _on_host_and_gone(name: str, hostname: str, running: Callable[[int], bool]) -> bool:
    host, _, pid = name.rpartition(":")
    return host == hostname and pid.isdigit() and not running(int(pid))


def drop_state(redis: Redis, queue_prefix: str, name: str) -> None:
    """Drop worker `name`'s record (it stopped). Raises RedisError."""
    redis.hdel(STATES_KEY.format(queue_prefix), name)


def announcement_fields(announcement: Announcement | None) -> dict[str, str]:
    """The fields a worker adds to rq's worker hash (none without an announcement)."""
    return {} if announcement is None else {ANNOUNCEMENT_FIELD: announcement.to_json()}


def read_fleet(redis: Redis, queue_prefix: str) -> Fleet:
    """The live workers on the queues of `queue_prefix`, what they announced, and the workers not ready (loading
    or failed), in two round trips.

    Live: listed in a queue's rq worker set, its hash still there and holding no death. A loading record of a
    process that rq lists as live is not shown: that worker is ready. Raises RedisError.
    """
    with redis.pipeline(transaction=False) as pipe:
        for name in queue_names(queue_prefix):
            pipe.smembers(WORKERS_BY_QUEUE_KEY % name)
        pipe.hgetall(STATES_KEY.format(queue_prefix))
        *members, raw_states = pipe.execute()
        keys = sorted({text(key) for found in members for key in found})
        for key in keys:
            pipe.hmget(key, ["birth", "death", ANNOUNCEMENT_FIELD, "hostname", "pid"])
        records = pipe.execute()
    now = time.time()
    announced: dict[str, Announcement] = {}
    unannounced = []
    live_processes = set()
    for key, (birth, death, raw, hostname, pid) in zip(keys, records, strict=True):
        if birth is None or death is not None:
            continue  # expired, or registered its death: rq's own cleanup drops it from the set later
        if hostname is not None and pid is not None:
            live_processes.add(state_name(text(hostname), int(pid)))
        name = key.removeprefix(Worker.redis_worker_namespace_prefix)
        announcement = _parsed(name, raw)
        if announcement is None:
            unannounced.append(name)
        else:
            announced[name] = announcement
    states = [state for name, state in _states(raw_states, now) if state is not None and name not in live_processes]
    not_ready = tuple(sorted(states, key=lambda state: state.since))
    return Fleet(_grouped(announced), tuple(unannounced), not_ready, now)


def _states(
    raw: Mapping[bytes | str, bytes | str], now: float, *, keep_lapsed: bool = False
) -> list[tuple[str, WorkerState | None]]:
    """The records of a STATES_KEY hash by name; None for lapsed or unreadable ones (listed with keep_lapsed)."""
    states: list[tuple[str, WorkerState | None]] = []
    for raw_name, value in raw.items():
        name = text(raw_name)
        try:
            state: WorkerState | None = WorkerState.from_json(name, text(value))
        except (ValueError, KeyError, TypeError) as exc:
            log.debug("worker %s: unreadable state record ignored: %s", name, exc)
            state = None
        if state is not None and state.expires <= now:
            state = None
        if state is not None or keep_lapsed:
            states.append((name, state))
    return states


def _parsed(name: str, raw: bytes | None) -> Announcement | None:
    if raw is None:
        return None
    try:
        return Announcement.from_json(text(raw))
    except ValueError as exc:
        log.debug("worker %s: unreadable announcement ignored: %s", name, exc)
        return None


def _grouped(announced: Mapping[str, Announcement]) -> tuple[FingerprintGroup, ...]:
    members: dict[str, list[str]] = {}
    for name, announcement in announced.items():
        members.setdefault(_canonical(announcement.fingerprint), []).append(name)
    groups = [_group([announced[name] for name in names], names) for names in members.values()]
    return tuple(sorted(groups, key=lambda g: (-len(g.workers), g.workers)))


def _group(announcements: Sequence[Announcement], names: Sequence[str]) -> FingerprintGroup:
    return FingerprintGroup(
        fingerprint=announcements[0].fingerprint,
        workers=tuple(sorted(names)),
        devices=tuple(sorted({a.device for a in announcements})),
        package_versions=tuple(sorted({a.package_version for a in announcements})),
    )


def _canonical(fingerprint: Mapping[str, object]) -> str:
    """The identity of a fingerprint, as model_version sees it (canonical JSON)."""
    return json.dumps(dict(fingerprint), sort_keys=True, separators=(",", ":"))


def _flatten(fingerprint: Mapping[str, object], prefix: str = "") -> dict[str, Any]:
    """Nested settings by dotted name ("postprocess.min_area"), so a difference names the one setting."""
    flat: dict[str, Any] = {}
    for name, value in fingerprint.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def _named(workers: Sequence[str]) -> str:
    more = len(workers) - NAMED_WORKERS
    return ", ".join(workers[:NAMED_WORKERS]) + (f" and {more} more" if more > 0 else "")


def _duration(seconds: float) -> str:
    """`seconds` in words: "12 s", "3 min"."""
    whole = max(0, round(seconds))
    return f"{whole} s" if whole < 120 else f"{whole // 60} min"


def _shown(values: Mapping[str, object], name: str) -> str:
    return json.dumps(values[name], sort_keys=True) if name in values else "(unset)"
