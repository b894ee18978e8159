"""What the workers run, as they announce it: each worker's model fingerprint, read back by the API.

A worker writes its `Announcement` into rq's own worker hash (`rq:worker:<name>`, field ANNOUNCEMENT_FIELD)
when it registers its birth, so the announcement lives exactly as long as rq's record of the worker: rq's
heartbeat refreshes that key's TTL, register_death (a stopped worker, or `serve` unregistering a killed one)
removes the worker from its queues' worker sets, and a worker killed without either expires with rq's
worker TTL (queueing/worker.py WORKER_TTL_S: within 2 minutes). The API reads the live announcements of the
workers on its queues (`read_fleet`) and takes model_version from their one fingerprint (`Fleet.fingerprint`),
so only workers read the model settings.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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
    """

    groups: tuple[FingerprintGroup, ...]
    unannounced: tuple[str, ...] = ()

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
            raise NoWorkerError(
                "no worker has announced its models yet: start `grounded-sam worker` with the same REDIS_URL and "
                "QUEUE_NAME, or wait for `serve`'s worker to load its models"
            )
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


def announcement_fields(announcement: Announcement | None) -> dict[str, str]:
    """The fields a worker adds to rq's worker hash (none without an announcement)."""
    return {} if announcement is None else {ANNOUNCEMENT_FIELD: announcement.to_json()}


def read_fleet(redis: Redis, queue_prefix: str) -> Fleet:
    """The live workers on the queues of `queue_prefix` and what they announced, in two round trips.

    Live: listed in a queue's rq worker set, its hash still there and holding no death. Raises RedisError.
    """
    with redis.pipeline(transaction=False) as pipe:
        for name in queue_names(queue_prefix):
            pipe.smembers(WORKERS_BY_QUEUE_KEY % name)
        keys = sorted({text(key) for members in pipe.execute() for key in members})
        for key in keys:
            pipe.hmget(key, ["birth", "death", ANNOUNCEMENT_FIELD])
        records = pipe.execute()
    announced: dict[str, Announcement] = {}
    unannounced = []
    for key, (birth, death, raw) in zip(keys, records, strict=True):
        if birth is None or death is not None:
            continue  # expired, or registered its death: rq's own cleanup drops it from the set later
        name = key.removeprefix(Worker.redis_worker_namespace_prefix)
        announcement = _parsed(name, raw)
        if announcement is None:
            unannounced.append(name)
        else:
            announced[name] = announcement
    return Fleet(_grouped(announced), tuple(unannounced))


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


def _shown(values: Mapping[str, object], name: str) -> str:
    return json.dumps(values[name], sort_keys=True) if name in values else "(unset)"
