"""Readiness you can see (backend/commands/worker.py, backend/queueing/fleet.py): a worker checks Redis before its
models, says "loading" while it loads and "failed" with the load error when it cannot; /health stays UP and lists
each worker's state, /setup, /predict and /prelabel refuse with a sentence Label Studio shows the user.

Real worker processes against the session's embedded valkey; the API in-process (TestClient) over the same Redis.
No network: the hub is a closed loopback port and the Hugging Face cache an empty folder.
"""

from __future__ import annotations

import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from redis import Redis

from backend.api.app import create_app
from backend.commands import worker as worker_command
from backend.queueing.fleet import LOADING_TTL_S, read_fleet
from backend.settings import Settings
from tests.support.api import queueing_answers
from tests.support.paths import REPO
from tests.support.ports import free_port
from tests.support.processes import START_TIMEOUT_S, Processes, wait_healthy
from tests.support.workers import announced_worker, settings_of

CONFIG = (REPO / "label_config" / "brush_and_rectangle.xml").read_text()
TASK = {"id": 1, "data": {"image": "http://127.0.0.1:9/a.png"}}
MISSING_DETECTOR = "nobody-here/no-detector"


def _offline_hub_env(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """`env` with a hub that cannot be reached (a closed loopback port), an empty cache and downloads allowed."""
    unreachable = {k: v for k, v in env.items() if k != "HF_HUB_OFFLINE"}
    hf_home = tmp_path / "hf-home"
    hf_home.mkdir()
    return {**unreachable, "HF_HOME": str(hf_home), "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}


def _wait_exit(popen: subprocess.Popen[bytes]) -> int:
    try:
        return popen.wait(START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail("the worker did not exit")


def test_a_worker_with_redis_at_a_closed_port_exits_with_one_line_before_loading(
    processes: Processes, model_env: dict[str, str]
) -> None:
    proc = processes.start(["worker"], {**model_env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert _wait_exit(proc.popen) == 1
    lines = proc.log().strip().splitlines()
    assert len(lines) == 1, proc.log()
    assert (
        lines[0].startswith("error: the worker cannot start: Redis is unreachable") and "Connection refused" in lines[0]
    )
    assert "loading models" not in proc.log()


def test_a_failed_load_is_announced_and_shown_by_health_and_setup(
    processes: Processes, model_env: dict[str, str], redis_url: str, tmp_path: Path
) -> None:
    """A detector that is neither local nor cached, with the hub unreachable: the worker exits 1 at once with one
    line naming it; its "failed" record outlives it, so /health (UP, not ready) and every refusal give the error."""
    env = {**_offline_hub_env(model_env, tmp_path), "REDIS_URL": redis_url, "DETECTOR_MODEL": MISSING_DETECTOR}
    proc = processes.start(["worker"], env)
    assert _wait_exit(proc.popen) == 1
    errors = [line for line in proc.log().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.log(), proc.log()
    assert f"(DETECTOR_MODEL='{MISSING_DETECTOR}') is neither a local folder nor a hub id in the Hugging" in errors[0]
    assert "does not answer" in errors[0] and f"hf download {MISSING_DETECTOR}" in errors[0]

    client = TestClient(create_app(settings_of(env)))
    health = client.get("/health")
    assert health.status_code == 200, health.text
    body = health.json()
    assert (body["status"], body["ready"], body["workers"]) == ("UP", False, 0)
    [state] = body["worker_states"]
    assert state["state"] == "failed" and state["name"].endswith(f":{proc.popen.pid}")
    assert MISSING_DETECTOR in state["error"] and state["models"][0] == f"detector {MISSING_DETECTOR}"
    assert "failed to load" in body["detail"]
    for status, detail in queueing_answers(client, CONFIG, TASK, 7):
        assert status == 503
        assert f"worker {state['name']} failed to load: cannot load the models" in detail
        assert MISSING_DETECTOR in detail and "ago" in detail and "\n" not in detail


def test_a_loading_worker_is_loading_until_rq_lists_it_as_ready(redis_url: str) -> None:
    """The production loading record (refreshed from its side thread) says which models and since when; once rq
    lists the same process as a live worker that announced its models, it is ready and the record is not shown."""
    settings = Settings(redis_url=redis_url, queue_name=f"ready-{uuid.uuid4().hex[:8]}")  # type: ignore[call-arg]
    redis = Redis.from_url(redis_url)
    client = TestClient(create_app(settings))
    with worker_command._loading(redis, settings, worker_command._process_name()):
        body = client.get("/health").json()
        [state] = body["worker_states"]
        assert (body["status"], body["ready"], state["state"]) == ("UP", False, "loading")
        assert state["models"] == [f"detector {settings.detector_model}", f"SAM {settings.sam_model}"]
        for status, detail in queueing_answers(client, CONFIG, TASK, 7):
            assert status == 503 and "the backend is not ready yet" in detail
            assert f"is loading detector {settings.detector_model}, SAM {settings.sam_model} (for " in detail
        with announced_worker(redis, settings) as ready:  # this process, as rq records it (hostname, pid)
            body = client.get("/health").json()
            assert body["ready"] is True and body["detail"] is None
            assert body["worker_states"] == [
                {"name": ready.name, "state": "ready", "models": [], "since": None, "error": None}
            ]
            assert client.post("/setup", json={"project": "7.1", "schema": CONFIG}).status_code == 200


def test_a_loading_record_lapses_when_its_worker_dies_while_loading(redis_url: str) -> None:
    """No refresh (the worker was killed mid-load): the record is stale after LOADING_TTL_S and not shown."""
    from backend.queueing.fleet import WorkerState, write_state

    redis, prefix = Redis.from_url(redis_url), f"lapse-{uuid.uuid4().hex[:8]}"
    now = time.time()
    write_state(redis, prefix, WorkerState("gone:1", "loading", ("detector x",), now - 2 * LOADING_TTL_S, now - 1))
    write_state(redis, prefix, WorkerState("alive:2", "loading", ("detector x",), now, now + LOADING_TTL_S))
    assert [state.name for state in read_fleet(redis, prefix).not_ready] == ["alive:2"]
    assert redis.hkeys(f"grounded-sam:worker-states:{prefix}") == [b"alive:2"]  # pruned by the next write


def test_a_worker_that_loads_clears_its_failed_forerunner(
    processes: Processes, model_env: dict[str, str], redis_url: str, tmp_path: Path
) -> None:
    """As when `serve` restarts a worker after the models were fixed: once loaded, the failed record of the
    earlier worker on this host is gone and /health lists the one ready worker."""
    broken = processes.start(["worker"], {**model_env, "REDIS_URL": redis_url, "DETECTOR_MODEL": str(tmp_path / "x")})
    assert _wait_exit(broken.popen) == 1
    redis, prefix = Redis.from_url(redis_url), model_env["QUEUE_NAME"]
    assert [state.state for state in read_fleet(redis, prefix).not_ready] == ["failed"]
    port = free_port()
    serve_env = {**model_env, "REDIS_URL": redis_url, "PORT": str(port), "HOST": "127.0.0.1"}
    api = processes.start(["serve"], serve_env)
    api.url = f"http://127.0.0.1:{port}"
    processes.start(["worker"], {**model_env, "REDIS_URL": redis_url})
    body = wait_healthy(api, 1)
    assert body["ready"] is True
    assert [state["state"] for state in body["worker_states"]] == ["ready"]  # type: ignore[attr-defined]


def test_a_worker_stopped_while_loading_or_after_leaves_no_record(
    processes: Processes, model_env: dict[str, str], redis_url: str
) -> None:
    """SIGTERM as soon as its loading record is there (still loading, or ready by then): the stopped worker is
    neither loading nor failed afterwards."""
    redis, prefix = Redis.from_url(redis_url), model_env["QUEUE_NAME"]
    proc = processes.start(["worker"], {**model_env, "REDIS_URL": redis_url})
    key = f"grounded-sam:worker-states:{prefix}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while not redis.hkeys(key) and time.monotonic() < deadline and proc.popen.poll() is None:
        time.sleep(0.05)
    assert [state.state for state in read_fleet(redis, prefix).not_ready] in (["loading"], []), proc.log()
    proc.stop(signal.SIGTERM)  # its exit status is not the point (a stop mid-import can end it by SIGINT)
    assert proc.popen.returncode is not None
    assert redis.hkeys(key) == [] and read_fleet(redis, prefix).not_ready == ()
