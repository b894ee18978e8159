"""Bulk job: a chunk of tasks in, their predictions pushed to Label Studio, at most once per task and version.

rq calls `prelabel_chunk` (bulk queue) with a JSON message, backend.queueing.messages.ChunkJob
(the project, its tasks, the labeling config by reference, model_version, force). The worker's PredictionFlow
(backend.flow) fetches the images, streams them through the models and turns each into its prediction; this
module decides which tasks to compute and pushes their predictions.

Tasks of a chunk share one prompt plan; their images are fetched concurrently. A task already holding a
prediction of this model version (in Label Studio, or marked done by another worker) is skipped unless
`force`, which replaces it. A task another worker holds is waited for (it finishes it, or dies and its
claim lapses within seconds and this chunk takes it), so a finished chunk leaves no task undone. The SAM
embeddings computed stay in the worker's cache (the first click on a pre-labelled task costs only the decoder);
with `embeddings` (prelabel --embeddings) every task's embedding is also written to the on-disk cache, the
skipped tasks' too (their image encoded alone), so a whole project's clicks are fast after worker restarts. Failed
tasks are listed in the job's meta and in the error that fails the job, so rq's failed registry says which
task failed and why; a retry recomputes only those. A chunk pushes a task only while it still holds its
claim (checked and renewed atomically right before the push, and after the fetch): a worker cut off past
CLAIM_TTL_S comes back to skip ("lost") the tasks another worker took over, without counting them failed.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from rq.job import Job

from backend.errors import BackendError, StudioNotConfiguredError, TasksFailedError
from backend.flow import PredictionFlow, PredictionStore, TaskImage
from backend.jobs import checked_config, current_flow, current_job, current_stats, record_cache
from backend.labelstudio.config import LabelConfig
from backend.pipeline.types import Segmented
from backend.queueing.bulk import META_FAILED
from backend.queueing.claims import Claimant, TaskClaims
from backend.queueing.messages import ChunkJob, QueuedTask
from backend.queueing.stats import WorkerStats

log = logging.getLogger(__name__)

# Both pools sized from the cores, in this one place: threads for fetching and decoding a chunk's images, and for
# each image's cleanup, RLE and push while the models go on with the next image. At least 4 (fetches and pushes
# wait on the network more than on a core), at most 8 (past that, decoding and RLE contend for the GIL-free numpy
# and zlib work of the cores the models' host side needs too).
FETCH_THREADS = min(8, max(4, os.cpu_count() or 1))
DELIVER_THREADS = FETCH_THREADS
# How often a chunk looks again at tasks another worker holds.
HELD_ELSEWHERE_POLL_S = 1.0


@dataclass
class ChunkReport:
    pushed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    # Each failed task's error (its message is the reason recorded).
    failed: dict[int, BackendError] = field(default_factory=dict)
    # Tasks whose claim this chunk lost before pushing (it lapsed and another worker took or finished them).
    lost: list[int] = field(default_factory=list)

    def failure(self) -> TasksFailedError | None:
        """The error that fails the chunk, naming each failed task and its reason (retryable when every task's
        failure was); None when no task failed."""
        if not self.failed:
            return None
        failed = sorted(self.failed.items())
        return TasksFailedError(
            "; ".join(f"task {tid}: {error}" for tid, error in failed),
            retryable=all(error.retryable for _, error in failed),
        )


def prelabel_chunk(payload: dict[str, Any]) -> dict[str, Any]:
    """Predict and push every task of the chunk; returns {"pushed": [...], "skipped": [...], "lost": [...]}.

    Raises JobMessageError for a message of another schema, TasksFailedError naming each failed task (retryable
    when every failure was)."""
    message = ChunkJob.from_json(payload)
    flow = current_flow()
    if flow.studio is None:
        raise StudioNotConfiguredError("set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY for workers doing bulk work")
    job = current_job()
    config, version = checked_config(flow, message)
    claims = TaskClaims(job.connection, message.project, version)
    with Claimant(claims, owner=f"{job.worker_name or 'worker'}:{job.id}") as claimant:
        chunk = Chunk(
            flow=flow,
            studio=flow.studio,
            config=config,
            version=version,
            claimant=claimant,
            stats=current_stats(),
            label_studio_host=message.label_studio_host,
            to_disk=message.embeddings,
        )
        todo = _still_to_do(message.tasks, job)
        try:
            chunk.run(todo, force=message.force)
            if message.embeddings:
                skipped = set(chunk.report.skipped)
                chunk.embed([task for task in todo if task.id in skipped])
        finally:
            record_cache(flow, current_stats())
    job.meta[META_FAILED] = sorted(chunk.report.failed)
    job.save_meta()
    failure = chunk.report.failure()
    if failure is not None:
        raise failure
    return {"pushed": chunk.report.pushed, "skipped": chunk.report.skipped, "lost": chunk.report.lost}


def _still_to_do(tasks: Sequence[QueuedTask], job: Job) -> Sequence[QueuedTask]:
    """The tasks this run computes: on a rerun of a chunk that recorded failed tasks (a transient retry, a retry
    by hand), only those; with `force` too, since the others' predictions were replaced already."""
    failed = set(job.meta.get(META_FAILED) or ())
    return [task for task in tasks if task.id in failed] if failed else tasks


@dataclass(kw_only=True)
class Chunk:
    """One chunk's work and what it needs: the flow, Label Studio, the config, claims, stats, the report.

    label_studio_host: the origin Label Studio writes into absolute task URLs (from the message); to_disk: write
    every embedding to the on-disk cache too (the message's `embeddings`)."""

    flow: PredictionFlow
    studio: PredictionStore
    config: LabelConfig
    version: str
    claimant: Claimant
    stats: WorkerStats
    label_studio_host: str | None = None
    to_disk: bool = False
    report: ChunkReport = field(default_factory=ChunkReport)

    def run(self, tasks: Sequence[QueuedTask], force: bool) -> None:
        """Push a prediction for every task, or record its failure, before returning.

        Tasks another worker holds are waited for: it finishes them, or it died and its claims lapse
        (CLAIM_TTL_S) and this chunk computes them. So a finished chunk means all its tasks are done.
        """
        pending = list(tasks)
        while True:
            todo, pending = self.claim(pending, force)
            if todo:
                self.compute(todo)
            if not pending:
                return
            log.info("waiting for %d tasks held by other workers", len(pending))
            force = False  # what another worker finished meanwhile is already this version, fresh
            time.sleep(HELD_ELSEWHERE_POLL_S)

    def claim(self, tasks: Sequence[QueuedTask], force: bool) -> tuple[list[QueuedTask], list[QueuedTask]]:
        """Split `tasks` into those to compute now and those another worker holds; done ones are skipped."""
        todo, held_elsewhere = [], []
        for task in tasks:
            if not force and self.claimant.claims.is_done(task.id):
                self.report.skipped.append(task.id)
            elif not self.claimant.take(task.id, force=force):
                held_elsewhere.append(task)
            elif not force and self.studio.prediction_ids(task.id, self.version):
                self.claimant.mark_done(task.id)
                self.report.skipped.append(task.id)
            else:
                todo.append(task)
        return todo, held_elsewhere

    def compute(self, tasks: Sequence[QueuedTask]) -> None:
        """Fetch, predict and push `tasks`, which this chunk holds.

        The models run on this thread, image after image as the flow's `stream` yields them; each image's
        cleanup, RLE and push run on DELIVER_THREADS threads meanwhile, so the device does not wait for the CPU
        or for Label Studio.
        """
        started = time.perf_counter()
        tasks, images = self.still_held(tasks, self.fetch_all(tasks))
        if not tasks:
            return
        segmented_images = self.flow.stream(images, self.config, to_disk=self.to_disk)
        with ThreadPoolExecutor(DELIVER_THREADS) as deliverers:
            outcomes = [
                deliverers.submit(self.deliver, task.id, image, segmented)
                for task, image, segmented in zip(tasks, images, segmented_images, strict=True)
            ]
            pushed = sum(outcome.result() for outcome in outcomes)
        if self.to_disk:  # images SAM saw no box on, and embeddings kept before this chunk, go to disk too
            self.embed_targets(
                [(t, image) for t, image in zip(tasks, images, strict=True) if isinstance(image, TaskImage)]
            )
        seconds_each = (time.perf_counter() - started) / len(tasks)
        for _ in range(pushed):
            self.stats.task_done(seconds_each)

    def still_held(
        self, tasks: Sequence[QueuedTask], images: Sequence[TaskImage | BackendError]
    ) -> tuple[list[QueuedTask], list[TaskImage | BackendError]]:
        """The tasks (and their images) whose claims this chunk still holds, renewed; the others are lost.

        Checked after the fetch, before the models: a worker that was cut off while fetching comes back to
        find its tasks taken over, and does not compute them again.
        """
        held = set(self.claimant.keep([task.id for task in tasks]))
        kept = [(task, image) for task, image in zip(tasks, images, strict=True) if task.id in held]
        lost = [task.id for task in tasks if task.id not in held]
        if lost:
            self.lose(lost)
        return [task for task, _ in kept], [image for _, image in kept]

    def lose(self, tids: Sequence[int]) -> bool:
        """Skip tasks whose claims this chunk lost: another worker took them over or finished them. False."""
        log.info(
            "skipped tasks %s: this worker's claims lapsed and another worker took them over", ", ".join(map(str, tids))
        )
        self.report.lost.extend(tids)
        return False

    def fetch_all(self, tasks: Sequence[QueuedTask], pixels: bool = True) -> list[TaskImage | BackendError]:
        """Images of `tasks` through the worker's cache, fetched concurrently (network-bound); an error stands in
        for a failed fetch. pixels: decoded images are needed (flow.task_image)."""

        def fetch(task: QueuedTask) -> TaskImage | BackendError:
            try:
                return self.flow.task_image(task, self.config, self.label_studio_host, pixels=pixels)
            except BackendError as exc:
                return exc

        with ThreadPoolExecutor(FETCH_THREADS) as pool:
            return list(pool.map(fetch, tasks))

    def embed(self, tasks: Sequence[QueuedTask]) -> None:
        """Write the SAM embeddings of `tasks` (skipped ones: their predictions exist) to the on-disk cache: an
        image whose embedding is kept is only checked for changes, not fetched again."""
        self.embed_targets(list(zip(tasks, self.fetch_all(tasks, pixels=False), strict=True)))

    def embed_targets(self, targets: Sequence[tuple[QueuedTask, TaskImage | BackendError]]) -> None:
        """Each target's SAM embedding, kept and written to the on-disk cache; a task whose image or embedding
        fails is logged: the chunk's outcome is its predictions. An embedding the target came with (kept before this
        chunk: `stream` did not write it) is written too; one the chunk's `stream` kept was written by it."""
        for task, target in targets:
            try:
                if isinstance(target, BackendError):
                    raise target
                self.flow.embed(target, to_disk=True, store_kept=target.entry.embedding is not None)
            except BackendError as exc:
                log.warning("task %s: its embedding was not cached: %s", task.id, exc)

    def deliver(self, tid: int, image: TaskImage | BackendError, segmented: Segmented | BackendError) -> bool:
        """Turn one task's model output into its prediction and push it, or record its failure; True when
        pushed. Runs on a deliverer thread. A failed fetch's error comes as both `image` and `segmented`."""
        try:
            if isinstance(segmented, BackendError):
                raise segmented
            if isinstance(image, BackendError):
                raise image
            prediction = self.flow.result(image.image, segmented, self.config, self.version)
            if not self.claimant.holds(tid):  # renewed when held: the push has a full CLAIM_TTL_S
                return self.lose([tid])
            self.push(tid, prediction)
        except BackendError as exc:
            return self.fail(tid, exc)
        if not self.claimant.mark_done(tid):
            log.warning("task %s: pushed, but this worker's claim lapsed during the push; left to its new holder", tid)
        self.report.pushed.append(tid)
        return True

    def fail(self, tid: int, error: BackendError) -> bool:
        """Record the task's failure and free its claim, unless another worker has it now (then it is lost). False."""
        if not self.claimant.release(tid):  # another worker has the task now: its failure is not ours
            return self.lose([tid])
        log.debug("task %s failed: %s", tid, error)  # the chunk's failure names it (one record per task)
        self.stats.failure(type(error).__name__)
        self.report.failed[tid] = error
        return False

    def push(self, tid: int, prediction: dict[str, Any]) -> None:
        """Store the task's prediction in Label Studio, replacing one of this version (with force, or a race)."""
        with self.stats.stage("push"):
            replaced = self.studio.prediction_ids(tid, self.version)
            self.studio.create_prediction(tid, prediction)
            for old in replaced:
                self.studio.delete_prediction(old)
