"""The API in-process over a real Redis-protocol server (workers announced, none runs a job): limits, validation,
bounded Redis state."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from redis.exceptions import OutOfMemoryError
from rq import Queue, SimpleWorker
from rq.serializers import JSONSerializer

from backend.api import service as service_module
from backend.api.app import create_app
from backend.api.service import PredictionService
from backend.errors import PredictTimeoutError
from backend.queueing.client import chunk_job_id, queue_names
from backend.queueing.configs import CONFIG_KEY, payload_config
from backend.queueing.connection import embedded_redis
from backend.queueing.messages import ChunkJob, PredictJob, QueuedTask
from backend.settings import Settings
from tests.support.paths import REPO
from tests.support.ports import free_port
from tests.support.workers import announce_worker

CONFIG = (REPO / "label_config" / "brush_and_rectangle.xml").read_text()
LS_CREDENTIALS = {"label_studio_url": "http://127.0.0.1:9", "label_studio_api_key": "unused"}
FULL_QUEUE = "edge-full"  # the queues of the small_redis fixture, which has a worker announced on them


def _settings(redis_url: str, **changes: object) -> Settings:
    values: dict[str, object] = {
        "redis_url": redis_url,
        "queue_name": f"edge-{uuid.uuid4().hex[:8]}",
        "predict_timeout": 1.0,
        "label_studio_url": None,
        "label_studio_api_key": None,
        "basic_auth_user": None,
        "basic_auth_pass": None,
    }
    return Settings(**{**values, **changes})  # type: ignore[arg-type]


@pytest.fixture()
def redis(redis_url: str) -> Redis:
    return Redis.from_url(redis_url)


def _client(settings: Settings, *, announce: bool = True) -> TestClient:
    """The app on `settings`; with `announce`, a worker on its queues announced `settings`' models (taking no
    jobs), so /setup and /predict have a model_version."""
    if announce:
        announce_worker(Redis.from_url(settings.redis_url), settings)
    return TestClient(create_app(settings))


def _queued(settings: Settings, redis: Redis) -> tuple[Queue, Queue]:
    interactive, bulk = queue_names(settings.queue_name)
    return (
        Queue(interactive, connection=redis, serializer=JSONSerializer),
        Queue(bulk, connection=redis, serializer=JSONSerializer),
    )


def _predict(client: TestClient, tasks: list[dict[str, object]], label_config: str = CONFIG, project: str = "7.1"):
    return client.post("/predict", json={"tasks": tasks, "label_config": label_config, "project": project})


def _task(task_id: int, image: object = "http://127.0.0.1:9/a.png") -> dict[str, object]:
    return {"id": task_id, "data": {"image": image}}


def test_too_many_tasks_without_label_studio_is_413_with_the_way_out(redis_url: str, redis: Redis) -> None:
    settings = _settings(redis_url, sync_max_tasks=5)
    response = _predict(_client(settings), [_task(i) for i in range(6)])
    assert response.status_code == 413
    assert "SYNC_MAX_TASKS=5" in response.json()["detail"] and "LABEL_STUDIO_API_KEY" in response.json()["detail"]
    assert all(queue.count == 0 for queue in _queued(settings, redis))


def test_too_many_tasks_with_label_studio_go_bulk_at_once(redis_url: str, redis: Redis) -> None:
    settings = _settings(redis_url, sync_max_tasks=5, bulk_chunk_size=4, **LS_CREDENTIALS)
    started = time.monotonic()
    response = _predict(_client(settings), [_task(i) for i in range(1, 11)])
    assert response.status_code == 200 and response.json()["results"] == [] and response.json()["run_id"]
    assert time.monotonic() - started < 10
    interactive, bulk = _queued(settings, redis)
    assert (interactive.count, bulk.count) == (0, 3)
    chunks = [ChunkJob.from_json(job.args[0]) for job in bulk.get_jobs()]  # typed messages of this schema
    assert sorted(task for chunk in chunks for task in chunk.task_ids) == list(range(1, 11))
    assert sorted(len(chunk.tasks) for chunk in chunks) == [2, 4, 4] and not any(c.force for c in chunks)


def test_label_config_over_the_cap_is_413_everywhere(redis_url: str, redis: Redis) -> None:
    settings = _settings(redis_url, label_config_max_bytes=len(CONFIG.encode()) + 10)
    client = _client(settings)
    big = CONFIG + " " * 11
    assert _predict(client, [_task(1)], big).status_code == 413
    setup = client.post("/setup", json={"project": "7.1", "schema": big})
    assert setup.status_code == 413 and "LABEL_CONFIG_MAX_BYTES" in setup.json()["detail"]
    prelabel = client.post("/prelabel", json={"project": 7, "label_config": big, "tasks": [{"id": 1, "data": {}}]})
    assert prelabel.status_code == 413
    assert client.post("/setup", json={"project": "7.1", "schema": CONFIG}).status_code == 200
    assert all(queue.count == 0 for queue in _queued(settings, redis))


@pytest.mark.parametrize(
    "task", [{"data": {}}, {"id": "abc", "data": {}}, {"id": 1.5, "data": {}}, {"id": True, "data": {}}]
)
def test_bad_task_ids_are_422_sync_and_bulk(redis_url: str, task: dict[str, object]) -> None:
    client = _client(_settings(redis_url, sync_max_tasks=1, **LS_CREDENTIALS))
    assert _predict(client, [task]).status_code == 422  # synchronous
    assert _predict(client, [_task(1), task]).status_code == 422  # over SYNC_MAX_TASKS: would go bulk
    assert client.post("/prelabel", json={"project": 7, "label_config": CONFIG, "tasks": [task]}).status_code == 422


def test_odd_task_data_fails_only_its_own_task(redis_url: str) -> None:
    """No image key, data not an object, a number as image, an empty URL: empty predictions, never a 500."""
    client = _client(_settings(redis_url))
    tasks = [
        {"id": 1, "data": {}},
        {"id": 2, "data": "text"},
        {"id": 3, "data": {"image": 5}},
        {"id": 4, "data": {"image": "  "}},
        {"id": 5, "data": None},
        {"id": 6, "data": {"image": ["x"]}},
    ]
    response = _predict(client, tasks)
    assert response.status_code == 200, response.text
    assert [r["result"] for r in response.json()["results"]] == [[]] * len(tasks)


def test_setup_refuses_a_hostname_that_is_no_origin_and_stores_nothing(redis_url: str, redis: Redis) -> None:
    client = _client(_settings(redis_url))
    project = str(uuid.uuid4().int % 10**9)
    response = client.post("/setup", json={"project": f"{project}.1", "schema": CONFIG, "hostname": "::::"})
    assert response.status_code == 400 and "hostname" in response.json()["detail"]
    assert not redis.exists(service_module.PROJECT_KEY.format(project))
    ok = client.post("/setup", json={"project": f"{project}.1", "schema": CONFIG, "hostname": "http://ls:8080/"})
    assert ok.status_code == 200
    assert redis.hget(service_module.PROJECT_KEY.format(project), "label_studio_host") == b"http://ls:8080"


def test_setup_data_expire_and_versions_lists_live_projects(
    redis_url: str, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = _client(_settings(redis_url))
    key = service_module.PROJECT_KEY.format("901")
    assert client.post("/setup", json={"project": "901.1", "schema": CONFIG}).status_code == 200
    assert 0 < redis.ttl(key) <= service_module.PROJECT_TTL_S
    version = client.post("/setup", json={"project": "901.1", "schema": CONFIG}).json()["model_version"]
    assert version in client.get("/versions").json()["versions"]

    other = CONFIG.replace('value="Bicycle"', 'value="Kayak"')
    monkeypatch.setattr(service_module, "PROJECT_TTL_S", 1)
    short = client.post("/setup", json={"project": "902.1", "schema": other}).json()["model_version"]
    assert short in client.get("/versions").json()["versions"]
    deadline = time.monotonic() + 30
    while redis.exists(service_module.PROJECT_KEY.format("902")) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.1)  # its entry in the project list has expired too
    versions = client.get("/versions").json()["versions"]
    assert short not in versions and version in versions
    assert redis.zscore(service_module.PROJECTS_KEY, "902") is None


def test_jobs_carry_a_reference_to_one_stored_config(redis_url: str, redis: Redis) -> None:
    """A 500 KB config x 40 tasks: stored once (with a TTL beyond the jobs' lives), each payload stays small."""
    settings = _settings(redis_url)
    big = CONFIG.replace("</View>", f"<!-- {'x' * 500_000} --></View>")
    response = _predict(_client(settings), [_task(i, f"http://127.0.0.1:9/{i}.png") for i in range(40)], big)
    assert response.status_code == 504  # no worker
    interactive, _ = _queued(settings, redis)
    jobs = interactive.get_jobs()
    assert len(jobs) == 40
    refs = {job.args[0]["label_config_ref"] for job in jobs}
    assert len(refs) == 1 and all("label_config" not in job.args[0] for job in jobs)
    key = CONFIG_KEY.format(refs.pop())
    assert redis.strlen(key) == len(big.encode())
    assert redis.ttl(key) > settings.failure_ttl + settings.job_timeout
    assert all(len(redis.hget(job.key, "data") or b"") < 5_000 for job in jobs)
    assert payload_config(redis, PredictJob.from_json(jobs[0].args[0])) == big  # what the worker reads
    older = PredictJob.from_json({"task": {"id": 1}, "model_version": "v", "label_config": "<View/>"})
    assert payload_config(redis, older) == "<View/>"  # messages queued by older versions carry the text


def test_a_request_past_its_deadline_answers_at_once_and_queues_nothing(redis_url: str, redis: Redis) -> None:
    settings = _settings(redis_url)
    service = PredictionService(settings, redis)
    started = time.monotonic()
    with pytest.raises(PredictTimeoutError, match="PREDICT_TIMEOUT"):
        service.predict("7", [_task(1)], CONFIG, deadline=time.monotonic() - 0.1)
    assert time.monotonic() - started < 1.0
    assert all(queue.count == 0 for queue in _queued(settings, redis))


def test_metrics_label_unknown_paths_as_one_series(redis_url: str) -> None:
    client = _client(_settings(redis_url))
    for index in range(300):
        client.get(f"/no/such/{uuid.uuid4().hex}/{index}")
    client.get("/runs/abc")
    client.get("/runs/def")
    text = client.get("/metrics").text
    lines = [line for line in text.splitlines() if line.startswith("grounded_sam_http_requests_total")]
    assert 'grounded_sam_http_requests_total{route="unmatched",status="404"} 300.0' in lines
    assert 'grounded_sam_http_requests_total{route="/runs/{run_id}",status="404"} 2.0' in lines
    assert len(lines) <= 4, lines


@pytest.fixture()
def small_redis() -> Iterator[str]:
    """A private Redis-protocol server whose maxmemory (noeviction) is nearly full."""
    with embedded_redis() as url:
        redis = Redis.from_url(url)
        used = int(redis.info("memory")["used_memory"])
        redis.config_set("maxmemory-policy", "noeviction")
        redis.config_set("maxmemory", str(used + 2 * 2**20))
        announce_worker(redis, _settings(url, queue_name=FULL_QUEUE))  # before Redis is full
        filler = b"x" * 100_000
        with contextlib.suppress(OutOfMemoryError):  # full: the state the test wants
            for index in range(1000):
                redis.set(f"filler:{index}", filler)
        yield url


def test_a_full_redis_is_503_saying_so(small_redis: str) -> None:
    client = _client(_settings(small_redis, queue_name=FULL_QUEUE), announce=False)
    for tasks in ([_task(1)], [_task(i) for i in range(3)]):
        response = _predict(client, tasks)
        assert response.status_code == 503, response.text
        assert response.json()["detail"].startswith("Redis is full"), response.text
        assert "unreachable" not in response.json()["detail"]
    assert client.get("/health").json()["status"] == "UP"  # reads still work
    bulk = _client(_settings(small_redis, queue_name=FULL_QUEUE, sync_max_tasks=1, **LS_CREDENTIALS), announce=False)
    response = _predict(bulk, [_task(1), _task(2)])
    assert response.status_code == 503 and response.json()["detail"].startswith("Redis is full")


def test_metrics_read_the_queues_from_redis_and_survive_redis_down(redis_url: str, redis: Redis) -> None:
    """GET /metrics (backend/api/metrics.py): workers, jobs per queue and state, redis_up; a Redis that does not
    answer is redis_up 0 in a scrape that still succeeds."""
    settings = _settings(redis_url, **LS_CREDENTIALS)
    client = _client(settings, announce=False)
    interactive, bulk = _queued(settings, redis)
    chunk = ChunkJob("7", (QueuedTask(1, {}),), "0" * 64, f"v-{uuid.uuid4().hex[:8]}")
    PredictionService(settings, redis).queue.submit(chunk_job_id(chunk), chunk)
    worker = SimpleWorker([interactive, bulk], connection=redis, serializer=JSONSerializer)
    worker.register_birth()
    try:
        text = client.get("/metrics").text
    finally:
        worker.register_death()
    assert f'grounded_sam_jobs{{queue="{bulk.name}",state="queued"}} 1.0' in text
    assert f'grounded_sam_jobs{{queue="{interactive.name}",state="queued"}} 0.0' in text
    assert "grounded_sam_workers 1.0" in text and "grounded_sam_redis_up 1.0" in text

    down = _client(_settings(f"redis://127.0.0.1:{free_port()}/0"), announce=False)
    response = down.get("/metrics")
    assert response.status_code == 200 and "grounded_sam_redis_up 0.0" in response.text
    assert "grounded_sam_jobs{" not in response.text
