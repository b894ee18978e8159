"""The real path: HTTP server → rq on a Redis-protocol server → worker process with tiny models → predictions."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import httpx
import psutil
import pytest
from PIL import Image
from redis import Redis
from rq import Queue
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from backend.labelstudio.config import parse_label_config
from backend.labelstudio.version import model_version
from backend.queueing.client import queue_names
from tests.support.images import ImageServer, exif_rotated_jpeg
from tests.support.paths import REPO
from tests.support.ports import free_port
from tests.support.processes import Processes, wait_healthy
from tests.support.workers import announce_worker, settings_of
from tests.validation import assert_valid_prediction

BRUSH_AND_RECT = (REPO / "label_config" / "brush_and_rectangle.xml").read_text()


def _task(task_id: int, url: str) -> dict[str, object]:
    return {"id": task_id, "data": {"image": url}}


def _predict(
    url: str, tasks: list[dict[str, object]], label_config: str = BRUSH_AND_RECT, **kwargs: object
) -> httpx.Response:
    body = {"tasks": tasks, "label_config": label_config, "project": "7.1700000000", "params": {"context": None}}
    return httpx.post(f"{url}/predict", json=body, timeout=90, **kwargs)  # type: ignore[arg-type]


def test_embedded_serve_predicts_in_order_and_shuts_down_clean(
    processes: Processes, model_env: dict[str, str], image_server: ImageServer
) -> None:
    """One command, no REDIS_URL: embedded Redis + worker; every task answered in order; Ctrl-C stops all of it."""
    landscape = image_server.add("land.png", Image.new("RGB", (96, 64), (10, 200, 30)))
    portrait = image_server.add("portrait.png", Image.new("RGB", (48, 80), (200, 10, 30)))
    rotated, save_kwargs = exif_rotated_jpeg(80, 40)
    exif = image_server.add("exif.jpg", rotated, **save_kwargs)
    serve = processes.serve(model_env)
    children = psutil.Process(serve.popen.pid).children(recursive=True)
    assert len(children) >= 2, "expected the embedded Redis server and the worker as children"

    tasks = [
        _task(1, landscape),
        _task(2, f"{image_server.url}/missing.png"),
        _task(3, portrait),
        _task(4, exif),
        {"id": 5, "data": {}},
    ]
    response = _predict(serve.url, tasks)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == len(tasks)
    sizes = {0: (96, 64), 2: (48, 80), 3: (40, 80)}  # EXIF orientation 6 shows 80x40 as 40x80
    for index, (width, height) in sizes.items():
        assert results[index]["result"], f"task {index} got no regions"
        assert_valid_prediction(results[index], BRUSH_AND_RECT, width, height)
    for index in (1, 4):  # unreachable image, task without image data
        assert results[index]["result"] == []
    versions = {r["model_version"] for r in results}
    assert len(versions) == 1

    assert serve.stop(signal.SIGINT) == 0
    time.sleep(0.5)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE], "processes left running"


def test_external_redis_api_and_separate_worker(
    processes: Processes, model_env: dict[str, str], redis_url: str, image_server: ImageServer
) -> None:
    """REDIS_URL set: `serve` is API only and queues; a separate `worker` process does the work."""
    env = {**model_env, "REDIS_URL": redis_url}
    api = processes.serve(env, wait_workers=0)
    assert httpx.get(f"{api.url}/health").json()["workers"] == 0
    processes.start(["worker"], env)
    wait_healthy(api, 1)  # the worker announced its models: /predict has a model_version
    url = image_server.add("a.png", Image.new("RGB", (64, 48), (90, 90, 90)))
    response = _predict(api.url, [_task(1, url)])
    assert response.status_code == 200, response.text
    [prediction] = response.json()["results"]
    masks = assert_valid_prediction(prediction, BRUSH_AND_RECT, 64, 48)
    assert masks and all(mask.shape == (48, 64) for mask in masks)


def test_worker_killed_mid_job_is_retried_on_another_worker(
    processes: Processes, model_env: dict[str, str], redis_url: str, image_server: ImageServer
) -> None:
    """Separate workers (no supervisor): a worker that dies mid-job has its job queued again once, and the
    waiting /predict gets the prediction another worker computes; the job is not in the failed registry."""
    env = {**model_env, "REDIS_URL": redis_url, "FETCH_ALLOW_NETWORKS": "127.0.0.0/8"}
    api = processes.serve(env, wait_workers=0)
    worker = processes.start(["worker"], env)
    wait_healthy(api, 1)  # the worker announced its models: /predict has a model_version
    image_server.slow_s = 3.0
    image_server.add("slow.png", Image.new("RGB", (32, 32), (30, 90, 200)))
    redis = Redis.from_url(redis_url)
    interactive = queue_names(env["QUEUE_NAME"])[0]

    def kill_when_started_then_replace() -> None:
        queue = Queue(interactive, connection=redis, serializer=JSONSerializer)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not queue.started_job_registry.get_job_ids(cleanup=False):
            time.sleep(0.1)
        worker.popen.send_signal(signal.SIGKILL)
        processes.start(["worker"], env)

    killer = threading.Thread(target=kill_when_started_then_replace)
    killer.start()
    response = _predict(api.url, [_task(1, f"{image_server.url}/slow/slow.png")])
    killer.join()
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["result"], "the retried job's prediction"
    failed = FailedJobRegistry(interactive, connection=redis, serializer=JSONSerializer)
    assert failed.get_job_ids() == []


def test_bad_inputs_get_clear_answers(processes: Processes, model_env: dict[str, str], redis_url: str) -> None:
    """No Image / no supported control → 400 and nothing queued; malformed JSON → 422."""
    env = {**model_env, "REDIS_URL": redis_url}
    api = processes.serve(env, wait_workers=0)
    no_image = (
        "<View><BrushLabels name='m' toName='t'><Label value='a'/></BrushLabels><Text name='t' value='$t'/></View>"
    )
    no_control = (
        "<View><Image name='image' value='$image'/>"
        "<Choices name='c' toName='image'><Choice value='x'/></Choices></View>"
    )
    for config in (no_image, no_control, "<View><Image"):
        response = _predict(api.url, [_task(1, "http://example.invalid/a.png")], label_config=config)
        assert response.status_code == 400, response.text
        assert "labeling config" in response.json()["detail"]
        setup = httpx.post(f"{api.url}/setup", json={"project": "1.1", "schema": config})
        assert setup.status_code == 400
    assert all(Queue(n, connection=Redis.from_url(redis_url)).count == 0 for n in queue_names(env["QUEUE_NAME"]))
    malformed = httpx.post(f"{api.url}/predict", content=b"{not json", headers={"Content-Type": "application/json"})
    assert malformed.status_code == 422
    assert httpx.post(f"{api.url}/predict", json={"tasks": "x", "label_config": BRUSH_AND_RECT}).status_code == 422


def test_redis_unreachable_health_says_so_and_predict_503_fast(processes: Processes, model_env: dict[str, str]) -> None:
    """With Redis gone, /health reports it and /predict answers 503 in well under Label Studio's timeouts."""
    env = {**model_env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    port = free_port()
    api = processes.start(["serve"], {**env, "PORT": str(port), "HOST": "127.0.0.1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            health = httpx.get(f"{url}/health", timeout=2)
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline, api.log()
            time.sleep(0.2)
    assert health.status_code == 503 and health.json()["status"] == "DOWN"
    started = time.monotonic()
    response = _predict(url, [_task(1, "http://example.invalid/a.png")])
    assert response.status_code == 503
    assert time.monotonic() - started < 3.0


def test_basic_auth_guards_every_route_but_the_webhook(
    processes: Processes, model_env: dict[str, str], redis_url: str
) -> None:
    env = {**model_env, "REDIS_URL": redis_url, "BASIC_AUTH_USER": "ls", "BASIC_AUTH_PASS": "s3cret"}
    api = processes.serve(env, wait_workers=0, auth=("ls", "s3cret"))
    for method, path in (
        ("GET", "/health"),
        ("POST", "/setup"),
        ("POST", "/predict"),
        ("GET", "/metrics"),
        ("GET", "/versions"),
    ):
        assert httpx.request(method, f"{api.url}{path}").status_code == 401, path
        assert httpx.request(method, f"{api.url}{path}", auth=("ls", "wrong")).status_code == 401, path
    assert httpx.get(f"{api.url}/health", auth=("ls", "s3cret")).status_code == 200
    # Label Studio creates its webhook without credentials; the route only queues ids that workers re-read.
    answer = httpx.post(f"{api.url}/webhook", json={"action": "PROJECT_UPDATED"})
    assert answer.status_code == 200 and answer.json()["status"] == "ignored", answer.text


def test_setup_versions_metrics_webhook(processes: Processes, model_env: dict[str, str], redis_url: str) -> None:
    """model_version changes with the label set; /versions lists it; /metrics is Prometheus text."""
    env = {**model_env, "REDIS_URL": redis_url}
    api = processes.serve(env, wait_workers=0)
    announce_worker(Redis.from_url(redis_url), settings_of(env))  # no worker runs a job here
    first = httpx.post(f"{api.url}/setup", json={"project": "3.17", "schema": BRUSH_AND_RECT}).json()["model_version"]
    other = BRUSH_AND_RECT.replace('value="Bicycle"', 'value="Scooter"')
    second = httpx.post(f"{api.url}/setup", json={"project": "4.18", "schema": other}).json()["model_version"]
    assert first != second
    assert {first, second} <= set(httpx.get(f"{api.url}/versions").json()["versions"])
    metrics = httpx.get(f"{api.url}/metrics")
    assert metrics.status_code == 200
    bulk = queue_names(env["QUEUE_NAME"])[1]
    assert f'grounded_sam_jobs{{queue="{bulk}",state="queued"}} 0.0' in metrics.text
    assert "grounded_sam_redis_up 1.0" in metrics.text
    webhook = httpx.post(f"{api.url}/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 3}})
    assert webhook.status_code == 200


def test_api_process_never_imports_torch(model_env: dict[str, str], redis_url: str) -> None:
    """The HTTP layer stays light: building the app must not import torch or transformers."""
    import subprocess
    import sys

    code = (
        "import sys; from backend.settings import Settings; from backend.api.app import create_app; "
        "create_app(Settings()); print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**model_env, "REDIS_URL": redis_url},
        capture_output=True,
        text=True,
        check=True,
        cwd=os.fspath(REPO),
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_repeated_request_reuses_finished_jobs(
    processes: Processes, model_env: dict[str, str], redis_url: str, image_server: ImageServer
) -> None:
    """A double click or a retry re-attaches to the same jobs: no second computation, same predictions."""
    env = {**model_env, "REDIS_URL": redis_url}
    api = processes.serve(env, wait_workers=0)
    processes.start(["worker"], env)
    wait_healthy(api, 1)  # the worker announced its models: /predict has a model_version
    tasks = [_task(i, image_server.add(f"{i}.png", Image.new("RGB", (40 + i, 30), (i, 0, 0)))) for i in range(3)]
    first = _predict(api.url, tasks).json()["results"]
    queue = Queue(queue_names(env["QUEUE_NAME"])[0], connection=Redis.from_url(redis_url), serializer=JSONSerializer)
    finished = set(queue.finished_job_registry.get_job_ids())
    assert len(finished) == 3
    second = _predict(api.url, tasks).json()["results"]
    assert second == first
    assert set(queue.finished_job_registry.get_job_ids()) == finished


def test_the_api_answers_with_the_model_version_its_worker_computes(
    processes: Processes, model_env: dict[str, str], redis_url: str, image_server: ImageServer
) -> None:
    """Model settings are the workers' alone: an API started with other thresholds than its worker answers /setup
    and /predict with the worker's model_version (the one Label Studio got when both had the worker's settings),
    and the job runs instead of failing on a mismatch."""
    env = {**model_env, "REDIS_URL": redis_url}
    worker_env = {**env, "BOX_THRESHOLD": "0.9"}
    api = processes.serve(env, wait_workers=0)
    processes.start(["worker"], worker_env)
    wait_healthy(api, 1)
    config = parse_label_config(BRUSH_AND_RECT)
    expected = model_version(settings_of(worker_env).model_fingerprint(), config)
    assert expected != model_version(settings_of(env).model_fingerprint(), config)
    setup = httpx.post(f"{api.url}/setup", json={"project": "9.1", "schema": BRUSH_AND_RECT})
    assert setup.json() == {"model_version": expected}
    url = image_server.add("x.png", Image.new("RGB", (32, 32)))
    response = _predict(api.url, [_task(1, url)])
    assert response.status_code == 200 and response.json()["results"][0]["model_version"] == expected
    failed = FailedJobRegistry(
        queue_names(env["QUEUE_NAME"])[0], connection=Redis.from_url(redis_url), serializer=JSONSerializer
    )
    assert failed.get_job_ids() == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_serve_stopped_mid_job_leaves_nothing_running(
    processes: Processes, model_env: dict[str, str], image_server: ImageServer, sig: signal.Signals
) -> None:
    """SIGTERM (docker stop) while the worker is busy: bounded, ordered shutdown. SIGKILL: children die too."""
    serve = processes.serve(model_env)
    children = psutil.Process(serve.popen.pid).children(recursive=True)
    image_server.add("busy.png", Image.new("RGB", (32, 32)))

    def request_cut_short() -> None:
        with contextlib.suppress(httpx.HTTPError):  # the server goes away mid-request: that is the test
            _predict(serve.url, [_task(1, f"{image_server.url}/slow/busy.png")])

    threading.Thread(target=request_cut_short, daemon=True).start()
    time.sleep(3)  # the worker is now fetching the slow image
    started = time.monotonic()
    serve.popen.send_signal(sig)
    serve.popen.wait(60)
    _, alive = psutil.wait_procs(children, timeout=20)
    assert not alive, f"left running: {[p.cmdline() for p in alive]}"
    assert time.monotonic() - started < 40
