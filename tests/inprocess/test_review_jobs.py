"""Label Studio's annotation events → /webhook → review jobs on the reviews queue → a burst worker in this process
compares each annotation with the task's prediction (MemoryStudio stands in for Label Studio) → ReviewStore in
the session's Redis → /metrics."""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import replace
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from backend import jobs
from backend.api import metrics
from backend.api.app import create_app
from backend.labelstudio.results import THRESHOLD_KEY
from backend.queueing.client import REVIEW_JOB_TIMEOUT_S, PredictionQueue, failure_reason, review_queue_name
from backend.queueing.connection import embedded_redis
from backend.queueing.messages import ReviewJob
from backend.queueing.reviews import ReviewStore
from backend.settings import Settings
from tests.support.fakes import FixedObject
from tests.support.inprocess import InProcessBackend
from tests.support.paths import REPO

CONFIG = (REPO / "label_config" / "brush_and_rectangle.xml").read_text()
# Every image: a Car (0.9) and a Person (0.4), each a brush mask and a box.
OBJECTS = (FixedObject(0, (0.1, 0.2, 0.5, 0.7), 0.9), FixedObject(1, (0.6, 0.1, 0.95, 0.5), 0.4))
Tally = Counter[tuple[str, str, str | None]]


def _prelabelled(backend: InProcessBackend, tasks: int) -> str:
    """Tasks 1..`tasks` of the backend's project pre-labelled into MemoryStudio; their model_version."""
    backend.pipeline.objects = OBJECTS
    backend.studio.label_configs[backend.project] = CONFIG
    backend.announce()
    body = []
    for tid in range(1, tasks + 1):
        url = backend.images.add(f"{backend.project}-{tid}.png", Image.new("RGB", (40, 30)))
        body.append({"id": tid, "data": {"image": url}})
    answer = backend.client.post("/prelabel", json={"project": backend.project, "label_config": CONFIG, "tasks": body})
    assert answer.status_code == 200, answer.text
    assert backend.work()
    return str(answer.json()["model_version"])


def _reviewed(backend: InProcessBackend, task: int, label: str | None = None, drop: str | None = None) -> list[Any]:
    """The task's prediction as a reviewer submits it: scores gone, `drop`'s regions deleted, every other Car
    region relabelled `label` (when given)."""
    [prediction] = backend.studio.of_task(task)
    result = []
    for item in copy.deepcopy(prediction["result"]):
        item.pop("score", None)
        kind = item["type"]
        if item["value"][kind] == [drop]:
            continue
        if label is not None and item["value"][kind] == ["Car"]:
            item["value"][kind] = [label]
        result.append(item)
    return result


def _event(backend: InProcessBackend, action: str, task: int, annotation: int) -> dict[str, Any]:
    """The body Label Studio posts for an annotation event (fields trimmed)."""
    return {
        "action": action,
        "annotation": {"id": annotation, "task": task, "project": backend.project, "result": []},
        "task": {"id": task, "project": backend.project},
        "project": {"id": backend.project},
    }


def _post(backend: InProcessBackend, event: object) -> dict[str, Any]:
    answer = backend.client.post("/webhook", json=event)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def _store(backend: InProcessBackend) -> ReviewStore:
    return ReviewStore(backend.redis, backend.settings.queue_name, backend.settings.review_max_annotations)


def _tally(backend: InProcessBackend, version: str) -> Tally:
    return Counter((o.label, o.outcome, o.new_label) for o in _store(backend).objects(backend.project, version))


def _reviews_queued(backend: InProcessBackend) -> int:
    name = review_queue_name(backend.settings.queue_name)
    return Queue(name, connection=backend.redis, serializer=JSONSerializer).count


def test_annotation_events_are_reviewed_by_a_worker_and_recorded_once_per_annotation(
    backend: InProcessBackend,
) -> None:
    version = _prelabelled(backend, 3)
    project = backend.project
    backend.studio.annotate(project, 1, 101, _reviewed(backend, 1))  # all kept
    backend.studio.annotate(project, 2, 102, _reviewed(backend, 2, drop="Person"))
    backend.studio.annotate(project, 3, 103, _reviewed(backend, 3, label="Bicycle"))
    for task, annotation in ((1, 101), (2, 102), (3, 103)):
        answer = _post(backend, _event(backend, "ANNOTATION_CREATED", task, annotation))
        assert answer["status"] == "queued" and answer["job_id"], answer
    assert _reviews_queued(backend) == 3

    assert backend.work()

    assert _tally(backend, version) == {
        ("Car", "kept", None): 2,
        ("Car", "relabelled", "Bicycle"): 1,
        ("Person", "kept", None): 2,
        ("Person", "deleted", None): 1,
    }
    [prediction] = backend.studio.of_task(1)
    person = max(item[THRESHOLD_KEY] for item in prediction["result"] if item["value"][item["type"]] == ["Person"])
    assert [o.score for o in _store(backend).objects(project, version) if o.label == "Person"] == [person] * 3

    # Edited: the reviewer deleted everything of task 1. Its annotation counts once, as it is now.
    backend.studio.annotate(project, 1, 101, [])
    _post(backend, _event(backend, "ANNOTATION_UPDATED", 1, 101))
    # Deleted: annotation 103 goes, and its record with it.
    backend.studio.delete_annotation(103)
    deleted = {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 103}], "project": {"id": project}}
    assert _post(backend, deleted)["status"] == "queued"
    # Skipped: a cancelled annotation is no review.
    backend.studio.annotate(project, 2, 104, [], cancelled=True)
    _post(backend, _event(backend, "ANNOTATION_CREATED", 2, 104))
    assert backend.work()

    assert _tally(backend, version) == {
        ("Car", "deleted", None): 1,
        ("Car", "kept", None): 1,
        ("Person", "deleted", None): 2,
    }
    assert _store(backend).annotations(project, version) == 2
    counters = _store(backend).counters()
    assert counters["forgotten"] >= 1 and counters["cancelled"] >= 1, counters

    metrics = backend.client.get("/metrics").text
    person = {"label": "Person", "model_version": version, "project": str(project)}
    assert _sample("grounded_sam_review_predictions", **person) + " 2.0" in metrics
    assert _sample("grounded_sam_review_objects", **person, outcome="deleted") + " 2.0" in metrics
    assert _sample("grounded_sam_review_precision", **person) + " 0.0" in metrics
    assert _sample("grounded_sam_review_events", reason="recorded") + " 5.0" in metrics
    assert _sample("grounded_sam_webhook_events_total", outcome="queued") + " 6.0" in metrics


def _sample(name: str, **labels: str) -> str:
    """A sample's name and labels as Prometheus' text format writes them (labels sorted)."""
    return name + "{" + ",".join(f'{key}="{value}"' for key, value in sorted(labels.items())) + "}"


def test_a_task_without_a_prediction_of_the_current_model_version_is_counted_not_recorded(
    backend: InProcessBackend,
) -> None:
    version = _prelabelled(backend, 1)
    backend.studio.create_prediction(7, {"model_version": "gsam-older", "result": [], "score": 0.5})
    backend.studio.annotate(backend.project, 7, 701, _reviewed(backend, 1))
    _post(backend, _event(backend, "ANNOTATION_CREATED", 7, 701))

    assert backend.work()

    assert _store(backend).objects(backend.project, version) == []
    assert _store(backend).counters().get("no_prediction") == 1


def test_start_training_reviews_every_annotated_task_of_the_project_up_to_the_bound(
    backend: InProcessBackend,
) -> None:
    version = _prelabelled(backend, 3)
    for task in (1, 2, 3):
        backend.studio.annotate(backend.project, task, 200 + task, _reviewed(backend, task))
    answer = _post(backend, {"action": "START_TRAINING", "project": {"id": backend.project, "label_config": CONFIG}})
    assert answer["status"] == "queued"
    assert backend.work()
    assert _store(backend).annotations(backend.project, version) == 3

    # At most REVIEW_MAX_ANNOTATIONS annotations per rescan (here 2, queued with the API's options).
    other = backend.project + 1
    backend.studio.label_configs[other] = CONFIG
    for task in (1, 2, 3):  # MemoryStudio's task ids are not per project: the tasks move to the other project
        backend.studio.delete_annotation(200 + task)
        backend.studio.annotate(other, task, 300 + task, _reviewed(backend, task))
    options = replace(backend.settings.review_options(), max_annotations=2)
    queue: PredictionQueue = backend.client.app.state.service.queue
    queue.submit_review(ReviewJob(other, None, None, "START_TRAINING", options))
    assert backend.work()
    assert _store(backend).annotations(other, version) == 2


def test_a_project_label_studio_does_not_know_fails_the_job_and_is_counted(backend: InProcessBackend) -> None:
    _prelabelled(backend, 1)
    event = _event(backend, "ANNOTATION_CREATED", 1, 901)
    event["project"] = {"id": backend.project + 5}
    _post(backend, event)

    assert backend.work()

    failed = Queue(review_queue_name(backend.settings.queue_name), connection=backend.redis).failed_job_registry
    assert failed.count == 1
    assert _store(backend).counters().get("label_studio_error") == 1


def test_other_and_malformed_events_are_ignored_counted_and_never_queued(backend: InProcessBackend) -> None:
    answers = [
        _post(backend, {"action": "TASKS_CREATED", "tasks": [{"id": 1}], "project": {"id": 3}}),
        _post(backend, {"action": "PROJECT_UPDATED", "project": {"id": 3}}),
        _post(backend, {"action": "ANNOTATION_CREATED", "project": {"id": 3}}),
        _post(backend, [1, 2]),
    ]
    raw = backend.client.post("/webhook", content=b"{not json", headers={"content-type": "application/json"})
    assert raw.status_code == 200 and raw.json()["status"] == "ignored"
    assert all(answer["status"] == "ignored" and answer["reason"] for answer in answers), answers
    assert _reviews_queued(backend) == 0
    metrics = backend.client.get("/metrics").text
    assert _sample("grounded_sam_webhook_events_total", outcome="other_action") + " 2.0" in metrics
    assert _sample("grounded_sam_webhook_events_total", outcome="malformed") + " 1.0" in metrics
    assert _sample("grounded_sam_webhook_events_total", outcome="not_json") + " 2.0" in metrics


def test_a_worker_without_label_studio_fails_the_review_job_saying_so(
    backend: InProcessBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobs.current_flow(), "studio", None)
    backend.announce()
    _post(backend, _event(backend, "ANNOTATION_CREATED", 1, 901))

    assert backend.work()

    queue = Queue(review_queue_name(backend.settings.queue_name), connection=backend.redis, serializer=JSONSerializer)
    [job_id] = queue.failed_job_registry.get_job_ids()
    assert "LABEL_STUDIO_URL" in failure_reason(queue.fetch_job(job_id))


def test_events_of_a_task_whose_review_is_waiting_queue_nothing_more(backend: InProcessBackend) -> None:
    """One waiting review job per task: it reads the task's latest state, so it serves every event meanwhile."""
    version = _prelabelled(backend, 2)
    backend.studio.annotate(backend.project, 1, 101, _reviewed(backend, 1))
    first = _post(backend, _event(backend, "ANNOTATION_CREATED", 1, 101))
    again = _post(backend, _event(backend, "ANNOTATION_UPDATED", 1, 101))
    other_task = _post(backend, _event(backend, "ANNOTATION_CREATED", 2, 102))
    assert first["status"] == "queued" and other_task["status"] == "queued"
    assert again["status"] == "ignored" and "queued already" in again["reason"], again
    assert _reviews_queued(backend) == 2

    assert backend.work()  # each job clears its task's marker as it starts: the next event queues again

    assert _store(backend).annotations(backend.project, version) == 1
    assert _post(backend, _event(backend, "ANNOTATION_UPDATED", 1, 101))["status"] == "queued"
    metrics = backend.client.get("/metrics").text
    assert _sample("grounded_sam_webhook_events_total", outcome="already_queued") + " 1.0" in metrics


def test_a_review_of_one_task_runs_under_its_own_short_timeout(backend: InProcessBackend) -> None:
    _post(backend, _event(backend, "ANNOTATION_CREATED", 1, 101))
    _post(backend, {"action": "START_TRAINING", "project": {"id": backend.project}})
    queue = Queue(review_queue_name(backend.settings.queue_name), connection=backend.redis, serializer=JSONSerializer)
    task_job, training_job = queue.get_jobs()
    assert task_job.timeout == min(REVIEW_JOB_TIMEOUT_S, backend.settings.job_timeout)
    assert training_job.timeout == backend.settings.job_timeout  # a rescan of the whole project


def test_a_bulk_creation_is_reviewed_task_by_task(backend: InProcessBackend) -> None:
    version = _prelabelled(backend, 2)
    for task in (1, 2):
        backend.studio.annotate(backend.project, task, 100 + task, _reviewed(backend, task))
    listed = [{"id": 101, "task": 1}, {"id": 102, "task": 2}]
    answer = _post(backend, {"action": "ANNOTATIONS_CREATED", "annotation": listed, "project": {"id": backend.project}})
    assert answer["status"] == "queued" and _reviews_queued(backend) == 2, answer
    assert backend.work()
    assert _store(backend).annotations(backend.project, version) == 2


def test_an_event_naming_another_project_than_label_studio_records_nothing(backend: InProcessBackend) -> None:
    """The webhook is open: an event claiming project P for a task Label Studio holds in project Q is not taken."""
    version = _prelabelled(backend, 1)
    other = backend.project + 1
    backend.studio.label_configs[other] = CONFIG
    backend.studio.annotate(backend.project, 1, 101, _reviewed(backend, 1))
    event = _event(backend, "ANNOTATION_CREATED", 1, 101)
    event["project"] = {"id": other}
    _post(backend, event)
    assert backend.work()
    assert _store(backend).objects(other, version) == [] and _store(backend).projects(10) == []
    assert _store(backend).counters().get("other_project") == 1


def test_a_deletion_label_studio_does_not_confirm_forgets_nothing(backend: InProcessBackend) -> None:
    version = _prelabelled(backend, 1)
    backend.studio.annotate(backend.project, 1, 101, _reviewed(backend, 1))
    _post(backend, _event(backend, "ANNOTATION_CREATED", 1, 101))
    assert backend.work()
    deleted = {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 101}], "project": {"id": backend.project}}
    _post(backend, deleted)  # forged, or late: Label Studio still holds annotation 101
    assert backend.work()
    assert _store(backend).annotations(backend.project, version) == 1
    assert _store(backend).counters().get("not_deleted") == 1

    backend.studio.delete_annotation(101)
    _post(backend, deleted)
    assert backend.work()
    assert (
        _store(backend).annotations(backend.project, version) == 0 and _store(backend).versions(backend.project) == []
    )


def test_a_job_that_read_an_older_state_of_the_annotation_changes_nothing(backend: InProcessBackend) -> None:
    version = _prelabelled(backend, 1)
    backend.studio.annotate(backend.project, 1, 101, _reviewed(backend, 1), updated_at=2000.0)
    _post(backend, _event(backend, "ANNOTATION_UPDATED", 1, 101))
    assert backend.work()
    kept = _tally(backend, version)
    # A job that read Label Studio before the one above recorded (simulated: Label Studio answers the old state).
    backend.studio.annotate(backend.project, 1, 101, [], updated_at=1000.0)
    _post(backend, _event(backend, "ANNOTATION_UPDATED", 1, 101))
    assert backend.work()
    assert _tally(backend, version) == kept
    assert _store(backend).counters().get("stale") == 1


def test_metrics_compute_review_figures_again_only_when_the_records_change(
    backend: InProcessBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    version = _prelabelled(backend, 2)
    computed: list[int] = []
    real = metrics.label_reports

    def counting(objects: Any, **options: Any) -> Any:
        computed.append(len(objects))
        return real(objects, **options)

    monkeypatch.setattr(metrics, "label_reports", counting)
    backend.studio.annotate(backend.project, 1, 101, _reviewed(backend, 1))
    _post(backend, _event(backend, "ANNOTATION_CREATED", 1, 101))
    assert backend.work()
    car = {"label": "Car", "model_version": version, "project": str(backend.project)}
    for _ in range(3):
        assert _sample("grounded_sam_review_predictions", **car) + " 1.0" in backend.client.get("/metrics").text
    assert len(computed) == 1
    backend.studio.annotate(backend.project, 2, 102, _reviewed(backend, 2))
    _post(backend, _event(backend, "ANNOTATION_CREATED", 2, 102))
    assert backend.work()
    assert _sample("grounded_sam_review_predictions", **car) + " 2.0" in backend.client.get("/metrics").text
    assert len(computed) == 2


def test_a_full_redis_at_the_webhook_is_a_200_saying_so() -> None:
    with embedded_redis() as url:
        redis = Redis.from_url(url)
        client = TestClient(create_app(Settings(redis_url=url), redis))
        redis.config_set("maxmemory", 1)  # every write is refused from now on
        answer = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 3}})
        assert answer.status_code == 200, answer.text
        assert answer.json()["status"] == "ignored" and "Redis is full" in answer.json()["reason"]
        redis.close()
