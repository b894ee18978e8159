"""Task claims on a real Redis: one holder per task, renewed while its holder lives, lapsing once it dies; a
holder that lost a claim (cut off past its time to live) neither pushes that task nor touches its claim."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from redis import Redis

from backend.embedding_cache import CachedImage
from backend.errors import ImageFetchError
from backend.flow import PredictionFlow, TaskImage
from backend.images.validators import Validator
from backend.labelstudio.config import parse_label_config
from backend.pipeline.grounded_sam import GroundedSam
from backend.pipeline.types import DetectionThresholds
from backend.prelabel import Chunk
from backend.queueing.claims import Claimant, TaskClaims
from backend.queueing.messages import QueuedTask
from backend.queueing.stats import WorkerStats
from tests.support.models import hf_segmenter, tiny_detector
from tests.support.paths import REPO

TTL_S = 2


@pytest.fixture()
def claims(redis_url: str) -> TaskClaims:
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


def test_a_killed_holders_claim_lapses_within_the_ttl(claims: TaskClaims, redis_url: str) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import time
            from redis import Redis
            from backend.queueing.claims import Claimant, TaskClaims
            claims = TaskClaims(Redis.from_url({redis_url!r}), {claims.project!r}, {claims.model_version!r})
            with Claimant(claims, "doomed", {TTL_S}) as claimant:
                assert claimant.take(6)
                print("held", flush=True)
                time.sleep(600)
        """),
        ],
        stdout=subprocess.PIPE,
        text=True,
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


def lapsed(claims: TaskClaims, task: int) -> None:
    """Wait (bounded) until the task's claim has run out of time."""
    deadline = time.monotonic() + TTL_S + 5
    while claims.holder(task) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert claims.holder(task) is None, f"claim on {task} did not lapse: {claims.holder(task)}"


def test_a_claim_lost_to_another_worker_is_no_longer_touched(claims: TaskClaims) -> None:
    """A cut-off worker (its claimant stopped renewing) comes back: it keeps, finishes and frees only what is
    still its own; before, its mark_done overwrote the new holder's claim."""
    stalled = Claimant(claims, "stalled", TTL_S)  # not entered: nothing renews its claims, as when cut off
    assert stalled.take(7)
    lapsed(claims, 7)
    with Claimant(claims, "heir", TTL_S) as heir:
        assert heir.take(7)
        assert stalled.take(8)
        assert stalled.keep([7, 8]) == [8], "a claim taken over was still reported held"
        assert claims.redis.ttl(claims.key(8)) > TTL_S - 1, "keep did not renew the claim still held"
        assert not stalled.holds(7)
        assert not stalled.mark_done(7) and claims.holder(7) == "heir", "a lost claim was marked done"
        assert not stalled.release(7) and claims.holder(7) == "heir", "a lost claim was freed"
        assert stalled.mark_done(8) and claims.holder(8) == "done"
        heir.mark_done(7)
        assert not stalled.holds(7), "a task finished by another worker was reported held"


# A chunk's push under its claims: real claims and models, a recording stand-in for Label Studio.


class RecordingStudio:
    """Stands in for LabelStudioApi: records pushes; no task has a prediction yet."""

    def __init__(self) -> None:
        self.created: list[int] = []

    def prediction_ids(self, task: int, model_version: str) -> list[int]:
        return []

    def create_prediction(self, task: int, prediction: dict[str, Any]) -> None:
        self.created.append(task)

    def delete_prediction(self, prediction_id: int) -> None:
        raise AssertionError("nothing to replace")


@pytest.fixture(scope="module")
def flow(tiny_detector_dir: Path, tiny_hf_sam_dir: Path) -> PredictionFlow:
    detector = tiny_detector(tiny_detector_dir)
    thresholds = DetectionThresholds(box=0.0, text=0.0, max_detections=3, nms_iou=1.0)
    pipeline = GroundedSam(detector, hf_segmenter(tiny_hf_sam_dir), thresholds)
    return PredictionFlow(pipeline)


def chunk_of(flow: PredictionFlow, studio: RecordingStudio, claimant: Claimant) -> Chunk:
    config = parse_label_config((REPO / "label_config" / "rectangle.xml").read_text())
    stats = WorkerStats(claimant.claims.redis)
    version = claimant.claims.model_version
    return Chunk(flow=flow, studio=studio, config=config, version=version, claimant=claimant, stats=stats)


def fetched_image() -> TaskImage:
    """A task's image as the chunk fetched it (Chunk.fetch_all): a random 64x48 image, nothing kept yet."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    return TaskImage(
        "/data/upload/1/0000beef-a.png", "a", CachedImage(Validator("immutable", "a"), image.size, image, None)
    )


def test_a_chunk_pushes_only_the_tasks_whose_claims_it_still_holds(claims: TaskClaims, flow: PredictionFlow) -> None:
    """The models ran on two tasks; meanwhile task 2's claim lapsed and another worker took it. Only task 1 is
    pushed and marked done; task 2 is skipped as lost, not failed, and stays the other worker's. Before, both
    were pushed and task 2's claim was overwritten with "done"."""
    studio = RecordingStudio()
    mine = Claimant(claims, "returning", 600)
    assert mine.take(1) and mine.take(2)
    chunk = chunk_of(flow, studio, mine)
    image = fetched_image()
    segmented = list(flow.stream([image, image], chunk.config))
    claims.redis.delete(claims.key(2))  # as if it lapsed while this worker was cut off (lapsing is tested above)
    with Claimant(claims, "heir", TTL_S) as heir:
        assert heir.take(2)
        pushed = [chunk.deliver(task, image, found) for task, found in zip((1, 2), segmented, strict=True)]
        assert pushed == [True, False]
        assert studio.created == [1], f"pushed tasks {studio.created}: a task whose claim was lost was pushed"
        assert chunk.report.pushed == [1] and chunk.report.lost == [2] and not chunk.report.failed
        assert claims.holder(1) == "done" and claims.holder(2) == "heir"


def test_a_chunk_drops_lost_tasks_after_fetching_and_does_not_fail_them(
    claims: TaskClaims, flow: PredictionFlow
) -> None:
    """Back from a partition with its images: tasks taken over meanwhile are dropped before the models run; a
    task whose work failed after its claim was lost is lost, not failed (its new holder does it)."""
    studio = RecordingStudio()
    mine = Claimant(claims, "returning", 600)
    assert mine.take(3) and mine.take(4)
    chunk = chunk_of(flow, studio, mine)
    claims.redis.delete(claims.key(4))  # as if it lapsed
    with Claimant(claims, "heir", TTL_S) as heir:
        assert heir.take(4)
        fetched = [ImageFetchError("HTTP 503"), ImageFetchError("timed out")]
        tasks, images = chunk.still_held([QueuedTask(3, {}), QueuedTask(4, {})], fetched)
        assert tasks == [QueuedTask(3, {})] and images == fetched[:1]
        assert chunk.report.lost == [4]
        assert not chunk.deliver(4, fetched[1], fetched[1])
        assert chunk.report.lost == [4, 4] and not chunk.report.failed, "a lost task's failure counted as failed"
        assert not chunk.deliver(3, fetched[0], fetched[0])
        assert chunk.report.failed == {3: fetched[0]} and claims.holder(3) is None, "an own failure is failed"
        assert claims.holder(4) == "heir" and not studio.created


def test_a_lapsed_claim_nobody_took_is_still_held_and_taken_again(claims: TaskClaims) -> None:
    """Cut off past the TTL, but no other worker took the task: the claim is re-taken, not lost. Before, keep()
    dropped it as lost and nobody ever predicted the task."""
    stalled = Claimant(claims, "stalled", 1)  # not entered: nothing renews its claims, as when cut off
    assert stalled.take(9) and stalled.take(10) and stalled.take(11)
    lapsed(claims, 9)
    lapsed(claims, 10)
    lapsed(claims, 11)
    assert stalled.keep([9]) == [9], "a lapsed claim nobody took was reported lost"
    assert claims.holder(9) == "stalled" and claims.redis.ttl(claims.key(9)) > 0, "the lapsed claim was not re-taken"
    assert stalled.holds(9)
    assert stalled.mark_done(10) and claims.holder(10) == "done", "a lapsed claim nobody took could not be finished"
    assert stalled.release(11) and claims.holder(11) is None


def test_a_chunk_pushes_a_task_whose_claim_lapsed_and_nobody_took(claims: TaskClaims, flow: PredictionFlow) -> None:
    """Back from a partition with its images, the chunk finds its claim lapsed and the task untaken: it claims it
    again and pushes it (before, it was skipped as lost and the chunk ended "successfully" without it)."""
    studio = RecordingStudio()
    mine = Claimant(claims, "returning", 1)  # not entered: nothing renewed it while cut off
    assert mine.take(12)
    chunk = chunk_of(flow, studio, mine)
    image = fetched_image()
    lapsed(claims, 12)
    tasks, images = chunk.still_held([QueuedTask(12, {})], [image])
    assert tasks == [QueuedTask(12, {})] and not chunk.report.lost, "a lapsed claim nobody took was dropped as lost"
    segmented = next(flow.stream(images, chunk.config))
    assert chunk.deliver(12, image, segmented)
    assert studio.created == [12] and chunk.report.pushed == [12] and claims.holder(12) == "done"
