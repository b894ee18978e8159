"""Bulk job: a chunk of tasks in, their predictions pushed to Label Studio, at most once per task and version.

rq calls `prelabel_chunk` (bulk queue) with a JSON payload, backend.queueing.payloads.ChunkPayload
(the project, its tasks, the labeling config by reference, model_version, force).

Tasks of a chunk share one prompt plan; their images are fetched concurrently. A task already holding a
prediction of this model version (in Label Studio, or marked done by another worker) is skipped unless
`force`, which replaces it. A task another worker holds is waited for (it finishes it, or dies and its
claim lapses within seconds and this chunk takes it), so a finished chunk leaves no task undone. Failed
tasks are listed in the job's meta and in the error that fails the job, so rq's failed registry says which
task failed and why; a retry recomputes only those. A chunk pushes a task only while it still holds its
claim (checked and renewed atomically right before the push, and after the fetch): a worker cut off past
CLAIM_TTL_S comes back to skip ("lost") the tasks another worker took over, without counting them failed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from backend.errors import BackendError, DeviceOutOfMemoryError, StudioNotConfiguredError, TasksFailedError
from backend.jobs import (
    Runtime,
    checked_config,
    current_job,
    current_runtime,
    fetch_image,
    finish_image,
    stream_images,
    text_classes,
    to_prediction,
)
from backend.labelstudio.config import LabelConfig
from backend.lsclient import LabelStudioApi
from backend.pipeline.types import Segmented, TextClass
from backend.queueing.bulk import META_FAILED
from backend.queueing.claims import Claimant, TaskClaims
from backend.queueing.stats import WorkerStats

log = logging.getLogger(__name__)

FETCH_THREADS = 4
# Threads for each image's cleanup, RLE and push while the models go on with the next image.
FINISH_THREADS = 4
# How often a chunk looks again at tasks another worker holds.
HELD_ELSEWHERE_POLL_S = 1.0


@dataclass
class ChunkReport:
    pushed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    # Tasks whose claim this chunk lost before pushing (it lapsed and another worker took or finished them).
    lost: list[int] = field(default_factory=list)


def prelabel_chunk(payload: dict[str, Any]) -> dict[str, Any]:
    """Predict and push every task of the chunk; returns {"pushed": [...], "skipped": [...], "lost": [...]}."""
    runtime = current_runtime()
    if runtime.studio is None:
        raise StudioNotConfiguredError("set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY for workers doing bulk work")
    job = current_job()
    config, version = checked_config(runtime, payload)
    claims = TaskClaims(job.connection, str(payload["project"]), version)
    with Claimant(claims, owner=f"{job.worker_name or 'worker'}:{job.id}") as claimant:
        chunk = _Chunk(runtime, runtime.studio, payload, config, version, claimant, WorkerStats(job.connection))
        chunk.run(payload["tasks"], force=bool(payload.get("force")))
    job.meta[META_FAILED] = sorted(chunk.report.failed)
    job.save_meta()
    if chunk.report.failed:
        failed = sorted(chunk.report.failed.items())
        raise TasksFailedError("; ".join(f"task {t}: {reason}" for t, reason in failed))
    return {"pushed": chunk.report.pushed, "skipped": chunk.report.skipped, "lost": chunk.report.lost}


@dataclass
class _Chunk:
    """One chunk's work and what it needs: models, Label Studio, the config, claims, stats, the report."""

    runtime: Runtime
    studio: LabelStudioApi
    payload: dict[str, Any]
    config: LabelConfig
    version: str
    claimant: Claimant
    stats: WorkerStats
    report: ChunkReport = field(default_factory=ChunkReport)

    def run(self, tasks: Sequence[dict[str, Any]], force: bool) -> None:
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

    def claim(self, tasks: Sequence[dict[str, Any]], force: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Split `tasks` into those to compute now and those another worker holds; done ones are skipped."""
        todo, held_elsewhere = [], []
        for task in tasks:
            tid = int(task["id"])
            if not force and self.claimant.claims.is_done(tid):
                self.report.skipped.append(tid)
            elif not self.claimant.take(tid, force=force):
                held_elsewhere.append(task)
            elif not force and self.studio.prediction_ids(tid, self.version):
                self.claimant.mark_done(tid)
                self.report.skipped.append(tid)
            else:
                todo.append(task)
        return todo, held_elsewhere

    def compute(self, tasks: Sequence[dict[str, Any]]) -> None:
        """Fetch, predict and push `tasks`, which this chunk holds.

        The models run on this thread, image after image as `stream` yields them; each image's cleanup, RLE
        and push run on FINISH_THREADS threads meanwhile, so the device does not wait for the CPU or for
        Label Studio.
        """
        started = time.perf_counter()
        tasks, images = self.still_held(tasks, self.fetch_all(tasks))
        if not tasks:
            return
        classes = text_classes(self.config)
        with ThreadPoolExecutor(FINISH_THREADS) as finishers:
            outcomes = [
                finishers.submit(self.finish, int(task["id"]), image, segmented, classes)
                for task, image, segmented in zip(tasks, images, self.segment_all(images, classes), strict=True)
            ]
            pushed = sum(outcome.result() for outcome in outcomes)
        seconds_each = (time.perf_counter() - started) / len(tasks)
        for _ in range(pushed):
            self.stats.task_done(seconds_each)

    def still_held(
        self, tasks: Sequence[dict[str, Any]], images: Sequence[Image.Image | BackendError]
    ) -> tuple[list[dict[str, Any]], list[Image.Image | BackendError]]:
        """The tasks (and their images) whose claims this chunk still holds, renewed; the others are lost.

        Checked after the fetch, before the models: a worker that was cut off while fetching comes back to
        find its tasks taken over, and does not compute them again.
        """
        held = set(self.claimant.keep([int(task["id"]) for task in tasks]))
        kept = [(task, image) for task, image in zip(tasks, images, strict=True) if int(task["id"]) in held]
        lost = [int(task["id"]) for task in tasks if int(task["id"]) not in held]
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

    def fetch_all(self, tasks: Sequence[dict[str, Any]]) -> list[Image.Image | BackendError]:
        """Images of `tasks`, fetched concurrently (network-bound); an error stands in for a failed fetch."""

        def fetch(task: dict[str, Any]) -> Image.Image | BackendError:
            try:
                with self.stats.stage("fetch"):
                    return fetch_image(self.runtime, task, self.config, self.payload)
            except BackendError as exc:
                return exc

        with ThreadPoolExecutor(FETCH_THREADS) as pool:
            return list(pool.map(fetch, tasks))

    def segment_all(
        self, images: Sequence[Image.Image | BackendError], classes: tuple[TextClass, ...]
    ) -> Iterator[Segmented | BackendError]:
        """The models' output for each image, in order, each as soon as it is ready; fetch errors pass through."""
        outputs = self._model_outputs([image for image in images if isinstance(image, Image.Image)], classes)
        for image in images:
            yield image if isinstance(image, BackendError) else next(outputs)

    def _model_outputs(
        self, images: Sequence[Image.Image], classes: tuple[TextClass, ...]
    ) -> Iterator[Segmented | BackendError]:
        """All images through the models in one stream; when one image does not fit in device memory even
        alone, the images not yet done go one by one, so that only that image's task fails."""
        stream = stream_images(self.runtime, images, classes)
        for done in range(len(images)):
            started = time.perf_counter()
            try:
                segmented = next(stream)
            except DeviceOutOfMemoryError:
                yield from (self._alone(image, classes) for image in images[done:])
                return
            self.stats.observe("model", time.perf_counter() - started)
            yield segmented

    def _alone(self, image: Image.Image, classes: tuple[TextClass, ...]) -> Segmented | BackendError:
        try:
            return next(stream_images(self.runtime, [image], classes))
        except DeviceOutOfMemoryError as exc:
            return exc

    def finish(
        self,
        tid: int,
        image: Image.Image | BackendError,
        segmented: Segmented | BackendError,
        classes: tuple[TextClass, ...],
    ) -> bool:
        """Clean up, encode and push one task's result, or record its failure; True when pushed.
        Runs on a finisher thread. A failed fetch's error comes as both `image` and `segmented`."""
        try:
            if isinstance(segmented, BackendError):
                raise segmented
            if isinstance(image, BackendError):
                raise image
            with self.stats.stage("postprocess"):
                instances = finish_image(self.runtime, segmented, classes)
                prediction = to_prediction(self.runtime, instances, classes, self.config, image, self.version)
            if not self.claimant.holds(tid):  # renewed when held: the push has a full CLAIM_TTL_S
                return self.lose([tid])
            self.push(tid, prediction)
        except BackendError as exc:
            if not self.claimant.release(tid):  # another worker has the task now: its failure is not ours
                return self.lose([tid])
            log.debug("task %s failed: %s", tid, exc)  # the chunk's failure names it (one record per task)
            self.stats.failure(type(exc).__name__)
            self.report.failed[tid] = str(exc)
            return False
        if not self.claimant.mark_done(tid):
            log.warning("task %s: pushed, but this worker's claim lapsed during the push; left to its new holder", tid)
        self.report.pushed.append(tid)
        return True

    def push(self, tid: int, prediction: dict[str, Any]) -> None:
        """Store the task's prediction in Label Studio, replacing one of this version (with force, or a race)."""
        with self.stats.stage("push"):
            replaced = self.studio.prediction_ids(tid, self.version)
            self.studio.create_prediction(tid, prediction)
            for old in replaced:
                self.studio.delete_prediction(old)
