"""Worker-side review job: one Label Studio annotation event in, what the reviewer kept, relabelled, deleted and
added recorded in Redis (backend.queueing.reviews.ReviewStore).

rq calls `review_event` (reviews queue) with a JSON message, backend.queueing.messages.ReviewJob. The job reads
the latest state from Label Studio (the event's payload may be stale: an annotation edited twice is reviewed
once, as it is now): the project's labeling config, which gives the model_version this worker's flow computes for
it, and the task's annotations and predictions. Each annotation that was not cancelled is compared
(backend.learning.reviews.compare_review) with the task's latest prediction of that model_version and recorded;
a task without one is counted ("no_prediction"), not an error. ANNOTATIONS_DELETED forgets the records;
START_TRAINING reviews every annotated task of the project, at most REVIEW_MAX_ANNOTATIONS annotations.

The webhook is open (no BASIC_AUTH), so nothing an event says is taken on trust: an annotation Label Studio holds
in another project than the event's is not recorded ("other_project"), and an annotation is forgotten only once
Label Studio answers 404 for it ("not_deleted" otherwise). A job of one task first clears the task's "review
pending" marker (PredictionQueue.submit_review), so an event arriving while it runs queues the next review. A
record carries the annotation's updated_at: a job that read an older state than the one recorded changes nothing
("stale").

Counters (ReviewStore.count, shown in /metrics): recorded, forgotten, cancelled, no_prediction, malformed_result,
other_project, not_deleted, stale, label_studio_error, label_config_error.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

from backend.errors import LabelConfigError, LabelStudioApiError, ReviewFormatError, StudioNotConfiguredError
from backend.jobs import current_flow, current_job
from backend.labelstudio.config import LabelConfig, parse_label_config
from backend.learning.reviews import compare_review
from backend.lsclient import StudioAnnotation, StudioPrediction, TaskReview
from backend.queueing.client import review_pending_key
from backend.queueing.messages import ANNOTATIONS_DELETED, START_TRAINING, ReviewJob
from backend.queueing.reviews import ReviewStore

log = logging.getLogger(__name__)


@runtime_checkable
class ReviewSource(Protocol):
    """What a review needs of Label Studio (backend.lsclient.LabelStudioApi)."""

    def label_config(self, project: int) -> str: ...

    def task_review(self, task: int) -> TaskReview: ...

    def annotated_tasks(self, project: int) -> Iterable[TaskReview]: ...

    def annotation_exists(self, annotation: int) -> bool: ...


def review_event(payload: dict[str, Any]) -> dict[str, int]:
    """Review one event's annotations; returns the counts of this job by reason (also added to the store's).

    Raises JobMessageError for a message of another schema, StudioNotConfiguredError on a worker without Label
    Studio, LabelStudioApiError or LabelConfigError (counted first), so rq records the job as failed.
    """
    message = ReviewJob.from_json(payload)
    redis, options = current_job().connection, message.options
    if message.task is not None:
        redis.delete(review_pending_key(options.prefix, message.project, message.task))
    store = ReviewStore(redis, options.prefix, options.max_annotations, options.max_total)
    tally: Counter[str] = Counter()
    try:
        if message.action == ANNOTATIONS_DELETED:
            studio = _source()
            for annotation in message.deleted:
                _forget(message.project, annotation, studio, store, tally)
        else:
            _review(message, _source(), store, tally)
    except LabelStudioApiError:
        tally["label_studio_error"] += 1
        raise
    except LabelConfigError:
        tally["label_config_error"] += 1
        raise
    finally:
        for reason, amount in tally.items():
            store.count(reason, amount)
    return dict(tally)


def _source() -> ReviewSource:
    studio = current_flow().studio
    if not isinstance(studio, ReviewSource):
        raise StudioNotConfiguredError("set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY on workers to learn from reviews")
    return studio


def _forget(project: int, annotation: int, studio: ReviewSource, store: ReviewStore, tally: Counter[str]) -> None:
    """Forget `annotation`'s records when Label Studio no longer holds it (an event may say so falsely)."""
    if studio.annotation_exists(annotation):
        log.warning("project %d: annotation %d said deleted but Label Studio holds it; kept", project, annotation)
        tally["not_deleted"] += 1
        return
    store.forget(project, annotation)
    tally["forgotten"] += 1


def _review(message: ReviewJob, studio: ReviewSource, store: ReviewStore, tally: Counter[str]) -> None:
    """Compare and record the annotations `message` names: the task's, or every annotated task's (bounded)."""
    config = parse_label_config(studio.label_config(message.project))
    version = current_flow().model_version(config)
    if message.action == START_TRAINING:
        budget = message.options.max_annotations
        for review in studio.annotated_tasks(message.project):
            budget -= _review_task(message.project, review, config, version, message.options.keep_iou, store, tally)
            if budget <= 0:
                log.info("project %d: START_TRAINING stopped at REVIEW_MAX_ANNOTATIONS annotations", message.project)
                break
        return
    if message.task is None:
        return
    review = studio.task_review(message.task)
    _review_task(message.project, review, config, version, message.options.keep_iou, store, tally)
    if message.annotation is not None and message.annotation not in {a.id for a in review.annotations}:
        _forget(message.project, message.annotation, studio, store, tally)  # deleted since the event


def _review_task(
    project: int,
    review: TaskReview,
    config: LabelConfig,
    version: str,
    keep_iou: float,
    store: ReviewStore,
    tally: Counter[str],
) -> int:
    """Record each annotation of the task against its latest prediction of `version`; how many it looked at."""
    prediction = latest_prediction(review.predictions, version)
    for annotation in review.annotations:
        if annotation.project is not None and annotation.project != project:
            log.warning(
                "task %d is in project %d, not the event's %d; not recorded", review.task, annotation.project, project
            )
            tally["other_project"] += 1
        elif annotation.cancelled:
            store.forget(project, annotation.id)
            tally["cancelled"] += 1
        elif (parent := _parent(annotation, review.predictions)) is not None and parent.model_version != version:
            tally["other_version"] += 1  # started from another model_version's prediction: not compared
        elif (compared := parent or prediction) is None:
            tally["no_prediction"] += 1
        else:
            try:
                objects = compare_review(compared.result, annotation.result, config, keep_iou)
            except ReviewFormatError as exc:
                log.warning("task %d, annotation %d not compared: %s", review.task, annotation.id, exc)
                tally["malformed_result"] += 1
                continue
            recorded = store.record(project, version, annotation.id, objects, annotation.updated_at)
            tally["recorded" if recorded else "stale"] += 1
    return len(review.annotations)


def latest_prediction(predictions: Iterable[StudioPrediction], version: str) -> StudioPrediction | None:
    """The task's newest prediction of model_version `version` (the highest id; without ids, the last listed), or
    None."""
    latest = None
    for prediction in predictions:
        if prediction.model_version == version and (latest is None or (prediction.id or 0) >= (latest.id or 0)):
            latest = prediction
    return latest


def _parent(annotation: StudioAnnotation, predictions: Iterable[StudioPrediction]) -> StudioPrediction | None:
    """The prediction the annotation started from (its parent_prediction) when the task still lists it, else None:
    preferred to the latest of the version, which may have come after the reviewer started."""
    wanted = annotation.parent_prediction
    return None if wanted is None else next((p for p in predictions if p.id == wanted), None)
