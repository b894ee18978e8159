"""Task claims on a real Redis: one holder per task, renewed while its holder lives, lapsing once it dies."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import uuid

import pytest
from redis import Redis

from backend.queueing.claims import Claimant, TaskClaims
from tests.integration.conftest import redis_url  # noqa: F401  (session fixture)

TTL_S = 2


@pytest.fixture()
def claims(redis_url: str) -> TaskClaims:  # noqa: F811
    return TaskClaims(Redis.from_url(redis_url), f"p{uuid.uuid4().hex[:8]}", "gsam-test")


def test_one_holder_per_task_and_done_is_final_unless_forced(claims: TaskClaims) -> None:
    with Claimant(claims, "a", TTL_S) as a, Claimant(claims, "b", TTL_S) as b:
        assert a.take(1)
        assert not b.take(1), "a held task was taken twice"
        a.mark_done(1)
        assert claims.is_done(1) and claims.holder(1) == "done"
        assert not b.take(1), "a done task was taken again without force"
        assert b.take(1, force=True)
        assert claims.holder(1) == "b"


def test_release_frees_only_the_own_claim(claims: TaskClaims) -> None:
    with Claimant(claims, "a", TTL_S) as a, Claimant(claims, "b", TTL_S) as b:
        assert a.take(2)
        b.release(2)  # b never held it: nothing changes
        assert claims.holder(2) == "a"
        a.release(2)
        assert claims.holder(2) is None
        assert b.take(2)


def test_leaving_the_context_frees_unfinished_claims_and_keeps_done_marks(claims: TaskClaims) -> None:
    with Claimant(claims, "a", TTL_S) as a:
        assert a.take(3) and a.take(4)
        a.mark_done(3)
    assert claims.holder(3) == "done"
    assert claims.holder(4) is None, "a job that ended left its unfinished task blocked"


def test_a_live_holder_keeps_its_claim_past_the_ttl(claims: TaskClaims) -> None:
    with Claimant(claims, "a", TTL_S) as a:
        assert a.take(5)
        time.sleep(TTL_S * 2.5)
        assert claims.holder(5) == "a", "the holder is alive but its claim lapsed"


def test_a_killed_holders_claim_lapses_within_the_ttl(claims: TaskClaims, redis_url: str) -> None:  # noqa: F811
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import time
            from redis import Redis
            from backend.queueing.claims import Claimant, TaskClaims
            claims = TaskClaims(Redis.from_url({redis_url!r}), {claims.project!r}, {claims.model_version!r})
            with Claimant(claims, "doomed", {TTL_S}) as claimant:
                assert claimant.take(6)
                print("held", flush=True)
                time.sleep(600)
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        time.sleep(TTL_S * 1.5)  # it renewed meanwhile
        assert claims.holder(6) == "doomed"
        holder.kill()
        holder.wait()
        assert claims.holder(6) == "doomed", "the claim must stay until its time to live runs out"
        deadline = time.monotonic() + TTL_S + 2
        while claims.holder(6) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        with Claimant(claims, "heir", TTL_S) as heir:
            assert heir.take(6), f"a killed worker's claim still blocks the task: {claims.holder(6)}"
    finally:
        holder.kill()
