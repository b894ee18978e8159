"""Workers announce what they run (backend/queueing/fleet.py) and the API takes model_version from them.

Real worker processes where the announcement's life is the point; elsewhere workers announced in-process through
the production path (tests/support/workers.py), against the session's embedded valkey.
"""

from __future__ import annotations

import json
import logging
import signal
import time
import uuid
from collections.abc import Callable
from importlib.metadata import version

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from backend.api.app import create_app
from backend.commands.usage import DISTRIBUTION
from backend.labelstudio.config import parse_label_config
from backend.labelstudio.version import model_version
from backend.queueing.client import queue_names
from backend.queueing.fleet import Fleet, read_fleet
from backend.queueing.worker import HeartbeatWorker, forget_worker
from backend.settings import Settings
from tests.support.api import queueing_answers
from tests.support.paths import REPO
from tests.support.processes import START_TIMEOUT_S, Proc, Processes
from tests.support.workers import announce_worker, announced_worker, settings_of

CONFIG = (REPO / "label_config" / "brush_and_rectangle.xml").read_text()
TASK = {"id": 1, "data": {"image": "http://127.0.0.1:9/a.png"}}


def _settings(redis_url: str, **changes: object) -> Settings:
    values: dict[str, object] = {"redis_url": redis_url, "queue_name": f"fleet-{uuid.uuid4().hex[:8]}"}
    return Settings(**{**values, **changes})  # type: ignore[arg-type]


def _as_json(fingerprint: object) -> object:
    return json.loads(json.dumps(fingerprint))


def _wait_for(redis: Redis, prefix: str, done: Callable[[Fleet], bool], procs: list[Proc]) -> Fleet:
    """Read the fleet until `done` holds, or fail with the worker logs."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        fleet = read_fleet(redis, prefix)
        if done(fleet):
            return fleet
        time.sleep(0.2)
    pytest.fail("the fleet never got there:\n" + "\n".join(proc.log() for proc in procs))


def test_a_workers_announcement_lives_as_long_as_the_worker(
    processes: Processes, model_env: dict[str, str], redis_url: str
) -> None:
    """Two `grounded-sam worker` processes announce the fingerprint of their settings (one group), device and
    package version; a stopped worker's announcement goes with its registered death, a killed one's when it is
    unregistered (as `serve` does for its killed worker; else rq's worker TTL ends it)."""
    env = {**model_env, "REDIS_URL": redis_url}
    prefix = env["QUEUE_NAME"]
    redis = Redis.from_url(redis_url)
    stopped, killed = processes.start(["worker"], env), processes.start(["worker"], env)
    fleet = _wait_for(redis, prefix, lambda f: sum(len(g.workers) for g in f.groups) == 2, [stopped, killed])
    [group] = fleet.groups
    assert group.fingerprint == _as_json(settings_of(env).model_fingerprint())
    assert group.devices == ("cpu",) and group.package_versions == (version(DISTRIBUTION),)
    assert stopped.stop(signal.SIGTERM) == 0
    fleet = _wait_for(redis, prefix, lambda f: sum(len(g.workers) for g in f.groups) == 1, [killed])
    killed.stop(signal.SIGKILL)
    assert read_fleet(redis, prefix) == fleet  # rq's record of a killed worker outlives it...
    forget_worker(redis, killed.popen.pid)
    assert read_fleet(redis, prefix) == Fleet(())  # ...until it is unregistered


def test_no_worker_is_503_with_the_reason(redis_url: str) -> None:
    """No worker, one on other queues, or one that announced nothing: /setup, /predict, /prelabel refuse with
    the way out and queue nothing; /health is UP and lists no fingerprint."""
    settings = _settings(redis_url, label_studio_url="http://127.0.0.1:9", label_studio_api_key="unused")
    redis = Redis.from_url(redis_url)
    client = TestClient(create_app(settings))
    elsewhere = announce_worker(redis, _settings(redis_url))
    queues = [Queue(name, connection=redis, serializer=JSONSerializer) for name in queue_names(settings.queue_name)]
    silent = HeartbeatWorker(queues, connection=redis, serializer=JSONSerializer, name=f"silent-{uuid.uuid4().hex}")
    silent.register_birth()
    try:
        for status, detail in queueing_answers(client, CONFIG, TASK, 5):
            assert status == 503
            assert "no worker has announced its models yet" in detail and "grounded-sam worker" in detail
        health = client.get("/health")
        assert health.status_code == 200
        assert health.json() | {"queued": {}} == {
            "status": "UP",
            "model_class": "GroundedSam",
            "workers": 1,
            "queued": {},
            "fingerprints": [],
            "fingerprints_differ": False,
            "ready": False,
            "worker_states": [],
            "detail": detail,
        }
        assert all(queue.count == 0 for queue in queues)
    finally:
        silent.register_death()
        elsewhere.register_death()


def test_the_version_from_workers_is_the_one_label_studio_got_before(redis_url: str) -> None:
    """model_version(Settings().model_fingerprint(), config), as the API computed it from its own settings before,
    is what /setup and /prelabel answer once a worker with those settings announced them; /health shows the
    fingerprint, its workers and their devices."""
    settings = _settings(redis_url, box_threshold=0.31, sam_dtype="bfloat16")
    redis = Redis.from_url(redis_url)
    client = TestClient(create_app(_settings(redis_url, queue_name=settings.queue_name)))  # the API's own differ
    today = model_version(settings.model_fingerprint(), parse_label_config(CONFIG))
    with (
        announced_worker(redis, settings, name=f"gpu-{uuid.uuid4().hex[:6]}", device="cuda") as gpu,
        announced_worker(redis, settings, name=f"cpu-{uuid.uuid4().hex[:6]}") as cpu,
    ):
        assert client.post("/setup", json={"project": "6.1", "schema": CONFIG}).json() == {"model_version": today}
        prelabel = client.post("/prelabel", json={"project": 6, "label_config": CONFIG, "tasks": [TASK]})
        assert prelabel.status_code == 200 and prelabel.json()["model_version"] == today
        [entry] = client.get("/health").json()["fingerprints"]
    assert entry == {
        "fingerprint": _as_json(settings.model_fingerprint()),
        "workers": 2,
        "names": sorted([gpu.name, cpu.name]),
        "devices": ["cpu", "cuda"],
        "package_versions": ["test"],
    }


def test_workers_with_different_settings_are_refused_and_listed(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Two fingerprints on one queue: every request that needs a model_version is refused naming the settings
    that differ and the workers; /health lists both; the log warns once, and says when they agree again."""
    settings = _settings(redis_url)
    redis = Redis.from_url(redis_url)
    client = TestClient(create_app(settings))
    odd_settings = settings.model_copy(update={"box_threshold": 0.4, "min_area": 7})
    caplog.set_level(logging.INFO, logger="backend.api.service")
    with announced_worker(redis, settings, name=f"a-same-{uuid.uuid4().hex[:6]}") as same:
        odd = announce_worker(redis, odd_settings, name=f"b-odd-{uuid.uuid4().hex[:6]}")
        for _ in range(2):
            for status, detail in queueing_answers(client, CONFIG, TASK, 5):
                assert status == 503
                assert "different model settings" in detail
                assert f"box_threshold: {settings.box_threshold} on {same.name}; 0.4 on {odd.name}" in detail
                assert f"postprocess.min_area: {settings.min_area} on {same.name}; 7 on {odd.name}" in detail
                assert "sam_dtype" not in detail  # only what differs
        health = client.get("/health").json()
        assert health["fingerprints_differ"] is True
        assert [entry["names"] for entry in health["fingerprints"]] == [[same.name], [odd.name]]
        assert health["fingerprints"][1]["fingerprint"] == _as_json(odd_settings.model_fingerprint())
        odd.register_death()
        setup = client.post("/setup", json={"project": "8.1", "schema": CONFIG})
        assert setup.status_code == 200 and client.get("/health").json()["fingerprints_differ"] is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "different" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert any("agree on their model settings again" in r.getMessage() for r in caplog.records)
