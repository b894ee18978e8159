"""/setup, /predict and /health through the real API and a real burst worker in this process (fixed models)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from PIL import Image

from tests.support.inprocess import InProcessBackend
from tests.support.paths import REPO
from tests.support.workers import announce_worker
from tests.validation import assert_valid_prediction

CONFIG = (REPO / "label_config" / "brush_and_rectangle.xml").read_text()
INTERACTIVE = (REPO / "label_config" / "interactive.xml").read_text()


def _setup(backend: InProcessBackend, config: str = CONFIG) -> httpx.Response:
    return backend.client.post("/setup", json={"project": f"{backend.project}.1", "schema": config})


def _predict(backend: InProcessBackend, tasks: list[dict[str, Any]], config: str = CONFIG, **params: object):
    body = {"tasks": tasks, "label_config": config, "project": f"{backend.project}.1", "params": params or None}
    return backend.while_working(lambda: backend.client.post("/predict", json=body))


def test_predict_answers_each_task_in_order_and_an_unfetchable_one_alone_empty(backend: InProcessBackend) -> None:
    backend.announce()
    version = _setup(backend).json()["model_version"]
    image = backend.images.add("street.png", Image.new("RGB", (80, 60), (90, 120, 30)))
    tasks = [{"id": 1, "data": {"image": image}}, {"id": 2, "data": {"image": f"{backend.images.url}/missing.png"}}]

    answer = _predict(backend, tasks)

    assert answer.status_code == 200, answer.text
    found, missing = answer.json()["results"]
    assert_valid_prediction(found, CONFIG, 80, 60)
    assert {(r["type"], r["value"][r["type"]][0]) for r in found["result"]} == {
        ("brushlabels", "Car"),
        ("rectanglelabels", "Car"),
    }
    box = next(r["value"] for r in found["result"] if r["type"] == "rectanglelabels")
    assert (box["x"], box["y"], box["width"], box["height"]) == (10.0, 20.0, 50.0, 50.0)  # the fixed object, in %
    assert missing == {"result": [], "score": 0.0, "model_version": version, "error": missing["error"]}
    assert "missing.png" in missing["error"] and "404" in missing["error"]  # why it is empty, naming the image
    assert found["model_version"] == version
    assert backend.pipeline.images == [(80, 60)]  # the missing image never reached the models


def test_a_click_goes_to_sam_alone_and_answers_one_object_with_the_clicked_label(backend: InProcessBackend) -> None:
    backend.announce()
    image = backend.images.add("click.png", Image.new("RGB", (80, 60), (10, 10, 10)))
    click = {
        "original_width": 80,
        "original_height": 60,
        "is_positive": True,
        "value": {"x": 50.0, "y": 50.0, "width": 0.5, "keypointlabels": ["Person"]},
        "from_name": "click",
        "to_name": "image",
        "type": "keypointlabels",
    }

    answer = _predict(backend, [{"id": 7, "data": {"image": image}}], INTERACTIVE, context={"result": [click]})

    assert answer.status_code == 200, answer.text
    [prediction] = answer.json()["results"]
    assert_valid_prediction(prediction, INTERACTIVE, 80, 60)
    assert [(r["type"], r["value"][r["type"]]) for r in prediction["result"]] == [
        ("brushlabels", ["Person"]),
        ("rectanglelabels", ["Person"]),
    ]
    box = prediction["result"][1]["value"]
    assert (box["x"], box["y"], box["width"], box["height"]) == pytest.approx((43.75, 41.667, 12.5, 16.667), abs=1e-3)


def test_without_a_live_worker_setup_and_predict_say_why_and_queue_nothing(backend: InProcessBackend) -> None:
    image = backend.images.add("a.png", Image.new("RGB", (32, 32)))

    setup = _setup(backend)
    predict = backend.client.post(
        "/predict", json={"tasks": [{"id": 1, "data": {"image": image}}], "label_config": CONFIG}
    )

    for answer in (setup, predict):
        assert answer.status_code == 503, answer.text
        assert "no worker has announced its models" in answer.json()["detail"]
    assert backend.queued() == 0


def test_health_lists_the_live_workers_fingerprints_and_reports_a_disagreement(backend: InProcessBackend) -> None:
    backend.announce()
    health = backend.client.get("/health").json()
    assert (health["status"], health["workers"], health["fingerprints_differ"]) == ("UP", 1, False)
    [group] = health["fingerprints"]
    assert group["fingerprint"] == backend.settings.model_fingerprint()
    assert sum(health["queued"].values()) == 0

    other = {**backend.settings.model_fingerprint(), "box_threshold": 0.9}
    announce_worker(backend.redis, backend.settings, fingerprint=other)
    health = backend.client.get("/health").json()
    assert (health["workers"], health["fingerprints_differ"], len(health["fingerprints"])) == (2, True, 2)
    assert health["ready"] is False and "box_threshold" in health["detail"]  # /setup refuses: not ready
    refused = _setup(backend)
    assert refused.status_code == 503 and "box_threshold" in refused.json()["detail"], refused.text
