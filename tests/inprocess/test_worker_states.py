"""A worker that loaded clears the failed records of its forerunners on its host, never a sibling's that runs."""

from __future__ import annotations

import time
import uuid

from redis import Redis

from backend.queueing.fleet import FAILED_TTL_S, WorkerState, clear_states, read_fleet, state_name, write_state


def test_clearing_drops_the_records_of_gone_processes_on_this_host_only(redis_url: str) -> None:
    redis, prefix = Redis.from_url(redis_url), f"states-{uuid.uuid4().hex[:8]}"
    now = time.time()
    names = {
        "gone": state_name("gpu-box", 111),
        "sibling": state_name("gpu-box", 222),
        "me": state_name("gpu-box", 333),
        "elsewhere": state_name("other-box", 111),
    }
    for name in names.values():
        write_state(
            redis, prefix, WorkerState(name, "failed", ("detector d", "SAM s"), now, now + FAILED_TTL_S, "boom")
        )

    clear_states(redis, prefix, "gpu-box", lambda pid: pid in (222, 333), keep=names["me"])

    left = sorted(state.name for state in read_fleet(redis, prefix).not_ready)
    assert left == sorted([names["sibling"], names["me"], names["elsewhere"]])
