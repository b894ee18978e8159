"""Issue 13 through the real API and worker loop: a prediction leaves its image's embedding in the worker, the
first click on that task runs only the decoder on it (the image is not decoded or encoded again), the worker
routes later clicks on the image to itself, and /metrics shows the cache's hits, misses and bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from backend import jobs
from backend.embedding_cache import ImageCache
from backend.pipeline.embedding_store import EmbeddingStore
from backend.queueing.routing import image_route_key
from tests.support.inprocess import InProcessBackend
from tests.support.paths import REPO

INTERACTIVE = (REPO / "label_config" / "interactive.xml").read_text()


def _predict(backend: InProcessBackend, task: dict[str, Any], context: object = None) -> httpx.Response:
    body = {"tasks": [task], "label_config": INTERACTIVE, "project": f"{backend.project}.1", "params": {}}
    if context is not None:
        body["params"] = {"context": context}
    return backend.while_working(lambda: backend.client.post("/predict", json=body))


def _click(x: float, y: float) -> dict[str, Any]:
    region = {"type": "keypointlabels", "from_name": "click", "to_name": "image", "is_positive": True}
    return {"result": [region | {"value": {"x": x, "y": y, "width": 0.5, "keypointlabels": ["Car"]}}]}


def _metric(text: str, name: str, before: str) -> float:
    """A metric's largest sample in a /metrics text among the workers not in the text `before` (other tests'
    workers published theirs into the same Redis): one sample per worker name, and every burst worker here (a
    name per job) publishes the figures of the one cache this test's flow holds, so the last job's are largest."""
    samples = [line for line in text.splitlines() if line.startswith(name + "{")]
    old = {line.rsplit(" ", 1)[0] for line in before.splitlines() if line.startswith(name + "{")}
    return max(float(line.rsplit(" ", 1)[1]) for line in samples if line.rsplit(" ", 1)[0] not in old)


def test_a_prediction_leaves_the_embedding_and_clicks_on_that_task_only_decode(backend: InProcessBackend) -> None:
    backend.announce()
    image = backend.images.add("kept.png", Image.new("RGB", (80, 60), (40, 90, 30)))
    task = {"id": 11, "data": {"image": image}}
    before = backend.client.get("/metrics").text

    predicted = _predict(backend, task)
    first = _predict(backend, task, _click(50, 50))
    second = _predict(backend, task, _click(20, 30))

    for answer in (predicted, first, second):
        assert answer.status_code == 200, answer.text
    assert predicted.json()["results"][0]["result"] and first.json()["results"][0]["result"]
    assert backend.pipeline.encoded == 1, "a click encoded an image the prediction had encoded already"
    assert backend.pipeline.images == [(80, 60)], "a click gave the models the image again"
    # The image server sends no validator, so every use downloads the bytes and compares their sha256.
    assert backend.images.served == ["kept.png"] * 3
    route = backend.redis.get(image_route_key(backend.settings.queue_name, image))
    assert route is not None and route.decode(), "the worker did not announce that it holds the image"
    first_ids = {region["id"] for region in first.json()["results"][0]["result"]}
    second_ids = {region["id"] for region in second.json()["results"][0]["result"]}
    assert not first_ids & second_ids, "two answers' regions share ids: accepting one replaces the other's"

    metrics = backend.client.get("/metrics").text
    assert _metric(metrics, "grounded_sam_embedding_cache_hits_total", before) == 2  # the two clicks
    assert _metric(metrics, "grounded_sam_embedding_cache_misses_total", before) == 1  # the prediction
    assert _metric(metrics, "grounded_sam_embedding_cache_memory_bytes", before) >= 80 * 60 * 3  # the decoded image
    assert _metric(metrics, "grounded_sam_embedding_cache_entries", before) == 1


def test_a_click_outside_the_image_is_a_400_and_queues_nothing(backend: InProcessBackend) -> None:
    backend.announce()
    image = backend.images.add("edge.png", Image.new("RGB", (80, 60)))

    answer = _predict(backend, {"id": 12, "data": {"image": image}}, _click(101.0, 50))

    assert answer.status_code == 400, answer.text
    assert "outside the image" in answer.json()["detail"]
    assert backend.queued() == 0 and backend.pipeline.images == []


def test_a_click_on_a_task_whose_image_cannot_be_fetched_gets_an_empty_prediction_with_the_reason(
    backend: InProcessBackend,
) -> None:
    backend.announce()

    answer = _predict(backend, {"id": 13, "data": {"image": f"{backend.images.url}/gone.png"}}, _click(50, 50))

    assert answer.status_code == 200, answer.text
    [prediction] = answer.json()["results"]
    assert prediction["result"] == [] and "gone.png" in prediction["error"] and "404" in prediction["error"]


def test_prelabel_with_embeddings_writes_every_tasks_embedding_to_disk_the_predicted_ones_too(
    backend: InProcessBackend, tmp_path: Path
) -> None:
    """`prelabel --embeddings`: the chunk predicts what has no prediction yet and writes every task's embedding to
    the on-disk cache, also that of a task it skips (its prediction exists): that one is only encoded."""
    backend.announce()
    flow = jobs.current_flow()
    flow.cache = ImageCache(64 * 2**20, EmbeddingStore(tmp_path / "embeddings", 64 * 2**20))
    tasks = [{"id": tid, "data": {"image": backend.images.add(f"bulk-{tid}.png", Image.new("RGB", (40, 30)))}}
             for tid in (21, 22)]  # fmt: skip
    version = backend.client.post("/setup", json={"project": str(backend.project), "schema": INTERACTIVE}).json()
    backend.studio.create_prediction(22, {"result": [], "score": 0.0, "model_version": version["model_version"]})
    body = {"project": backend.project, "label_config": INTERACTIVE, "tasks": tasks, "embeddings": True}
    assert backend.client.post("/prelabel", json=body).status_code == 200

    assert backend.work()

    assert backend.studio.created == [22, 21], "the skipped task was predicted again"
    assert backend.pipeline.encoded == 2 and backend.pipeline.images == [(40, 30)]
    assert len(list((tmp_path / "embeddings").glob("*.safetensors"))) == 2


def test_a_prediction_that_found_nothing_still_leaves_the_embedding_for_the_first_click(
    backend: InProcessBackend,
) -> None:
    backend.announce()
    backend.pipeline.objects = ()  # the detector finds nothing: SAM is not run on any box
    image = backend.images.add("empty.png", Image.new("RGB", (80, 60)))
    task = {"id": 14, "data": {"image": image}}

    assert _predict(backend, task).json()["results"][0]["result"] == []
    assert backend.pipeline.encoded == 1, "the image was not encoded for the clicks to come"
    assert _predict(backend, task, _click(50, 50)).json()["results"][0]["result"]
    assert backend.pipeline.encoded == 1, "the first click encoded the image again"


def test_a_worker_that_keeps_nothing_routes_no_clicks_to_itself(backend: InProcessBackend) -> None:
    """EMBEDDING_CACHE_MB=0: every click encodes, so no worker is the better place for the next one."""
    backend.announce()
    jobs.current_flow().cache = ImageCache(0)
    image = backend.images.add("unkept.png", Image.new("RGB", (80, 60)))

    for x in (30, 60):
        assert _predict(backend, {"id": 15, "data": {"image": image}}, _click(x, 50)).status_code == 200

    assert backend.pipeline.encoded == 2
    assert backend.redis.get(image_route_key(backend.settings.queue_name, image)) is None
