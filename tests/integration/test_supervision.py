"""Supervision in embedded mode, as real processes: `serve` with its valkey and worker children, killed for real.

A dead worker is replaced while the API answers and its job is retried once; a job that kills two workers is
failed as a poison task and never run again; a dead embedded Redis comes back with its data; a crash loop
stops `serve` with one message; one failed task is one log record. Jobs are surely in flight when a test
kills something: the image they fetch comes from a gate server that holds the request until told.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image
from redis import Redis
from rq import Queue, SimpleWorker
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from backend.errors import ImageFetchError
from backend.queueing.client import CRASH_RETRIES, JobLimits, PredictionQueue, failure_reason, queue_names
from backend.queueing.messages import PredictJob, QueuedTask
from backend.queueing.worker import HeartbeatWorker
from tests.support.images import ImageServer
from tests.support.paths import REPO
from tests.support.ports import free_port
from tests.support.processes import Processes, wait_healthy

BRUSH_AND_RECT = (REPO / "label_config" / "brush_and_rectangle.xml").read_text()
DEADLINE_S = 90.0


class Gate:
    """An image server that counts requests and holds the first `hold` of them until `release` is set."""

    def __init__(self, hold: int) -> None:
        self.hold = hold
        self.release = threading.Event()
        self.requests = 0
        self._seen = threading.Condition()
        buffer = io.BytesIO()
        Image.new("RGB", (48, 40), (20, 160, 90)).save(buffer, format="PNG")
        self.png = buffer.getvalue()
        gate = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with gate._seen:
                    gate.requests += 1
                    held = gate.requests <= gate.hold
                    gate._seen.notify_all()
                if held:
                    gate.release.wait(DEADLINE_S)
                with contextlib.suppress(OSError):  # the worker fetching it may have been killed meanwhile
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(gate.png)))
                    self.end_headers()
                    self.wfile.write(gate.png)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/gate.png"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_requests(self, count: int) -> None:
        with self._seen:
            assert self._seen.wait_for(lambda: self.requests >= count, DEADLINE_S), f"{self.requests} < {count}"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def gate() -> Iterator[Gate]:
    server = Gate(hold=1)
    yield server
    server.close()


@pytest.fixture()
def env(model_env: dict[str, str]) -> dict[str, str]:
    """The tiny-model environment, with loopback images allowed (the gate and image servers)."""
    return {**model_env, "FETCH_ALLOW_NETWORKS": "127.0.0.0/8", "PREDICT_TIMEOUT": "80"}


def _predict(url: str, image: str, task_id: int = 1, timeout: float = 120) -> httpx.Response:
    body = {
        "tasks": [{"id": task_id, "data": {"image": image}}],
        "label_config": BRUSH_AND_RECT,
        "project": "7.1700000000",
    }
    return httpx.post(f"{url}/predict", json=body, timeout=timeout)


def _in_background(call: Callable[[], httpx.Response]) -> tuple[threading.Thread, list[httpx.Response]]:
    answers: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: answers.append(call()), daemon=True)
    thread.start()
    return thread, answers


def _child(serve_pid: int, marker: str) -> psutil.Process | None:
    """The live child of `serve` whose command line contains `marker` ("worker" or "valkey")."""
    for child in psutil.Process(serve_pid).children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and any(marker in part for part in child.cmdline()):
                return child
        except psutil.NoSuchProcess:
            continue
    return None


def _wait_for(what: str, predicate: Callable[[], object], timeout: float = DEADLINE_S) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def _new_worker(serve_pid: int, old_pid: int, url: str | None = None) -> psutil.Process:
    """Wait for the worker that replaces `old_pid`; with `url`, /health must answer UP all the while."""

    def found() -> psutil.Process | None:
        if url is not None:
            health = _health(url)
            assert health.status_code == 200 and health.json()["status"] == "UP", health.text
        child = _child(serve_pid, "worker")
        return child if child is not None and child.pid != old_pid else None

    return _wait_for(f"a worker to replace {old_pid}", found)  # type: ignore[return-value]


def _embedded_redis(serve_pid: int) -> Redis:
    valkey = _child(serve_pid, "valkey")
    assert valkey is not None, "no embedded Redis child"
    [port] = {c.laddr.port for c in valkey.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    return Redis(port=port, socket_connect_timeout=1)


def _health(url: str) -> httpx.Response:
    return httpx.get(f"{url}/health", timeout=5)


def _only_job(redis: Redis, queue_prefix: str) -> Job:
    queue = Queue(queue_names(queue_prefix)[0], connection=redis, serializer=JSONSerializer)
    registries = (queue.finished_job_registry, queue.failed_job_registry, queue.started_job_registry)
    ids = {*queue.get_job_ids(), *(i for registry in registries for i in registry.get_job_ids(cleanup=False))}
    assert len(ids) == 1, ids
    return Job.fetch(ids.pop(), connection=redis, serializer=JSONSerializer)


def test_killed_worker_is_replaced_and_the_waiting_predict_gets_the_retry(
    processes: Processes, env: dict[str, str], gate: Gate
) -> None:
    """SIGKILL of the worker mid-job: /health answers throughout, a new worker appears, and the /predict that
    was waiting gets a 200 with the prediction computed by the retry; `serve` itself never stops."""
    serve = processes.serve(env)
    worker = _child(serve.popen.pid, "worker")
    assert worker is not None
    thread, answers = _in_background(lambda: _predict(serve.url, gate.url))
    gate.wait_requests(1)  # the job is running: its worker is fetching the held image
    worker.send_signal(signal.SIGKILL)
    gate.release.set()
    _new_worker(serve.popen.pid, worker.pid, serve.url)
    # The killed worker is unregistered: /health counts the replacement only, not a ghost for rq's worker TTL.
    _wait_for("one live worker in /health", lambda: _health(serve.url).json()["workers"] == 1)
    assert _health(serve.url).json()["workers"] == 1
    thread.join(DEADLINE_S + 30)
    [answer] = answers
    assert answer.status_code == 200, answer.text
    [prediction] = answer.json()["results"]
    assert prediction["result"], "the retried job's prediction, not an empty one"
    assert gate.requests == 2, "the job ran twice: once killed, once retried"
    assert serve.popen.poll() is None
    assert "worker was killed by SIGKILL; restarting it in 1 s" in serve.log()


def test_job_that_kills_two_workers_is_failed_as_poison_and_never_run_again(
    processes: Processes, env: dict[str, str], gate: Gate
) -> None:
    gate.hold = 10**6  # every request is held: the test kills the worker each time the job fetches its image
    serve = processes.serve(env)
    thread, answers = _in_background(lambda: _predict(serve.url, gate.url))
    for death in (1, 2):
        gate.wait_requests(death)
        worker = _child(serve.popen.pid, "worker")
        assert worker is not None
        worker.send_signal(signal.SIGKILL)
        _new_worker(serve.popen.pid, worker.pid)
    thread.join(DEADLINE_S + 30)
    [answer] = answers
    assert answer.status_code == 200, answer.text
    assert answer.json()["results"][0]["result"] == []
    redis = _embedded_redis(serve.popen.pid)
    job = _only_job(redis, env["QUEUE_NAME"])
    assert job.get_status() == JobStatus.FAILED
    assert failure_reason(job) == f"took down {CRASH_RETRIES + 1} workers; not retried"

    wait_healthy(serve, 1)  # the last replacement announced its models: /predict has a model_version again
    again = _predict(serve.url, gate.url)  # the same task: re-attaches to the poison job's id
    assert again.status_code == 200 and again.json()["results"][0]["result"] == []
    assert gate.requests == 2, "the poison job ran again"
    assert job.get_status(refresh=True) == JobStatus.FAILED
    assert serve.popen.poll() is None


def test_killed_embedded_redis_comes_back_with_its_data_and_work_resumes(
    processes: Processes, env: dict[str, str], gate: Gate, image_server: ImageServer
) -> None:
    """SIGKILL of valkey: /health says DOWN, then UP without anyone acting; a finished job is still there and a
    job that was running through the outage finishes and is collected by the next /predict."""
    serve = processes.serve(env)
    first = image_server.add("first.png", Image.new("RGB", (40, 32), (200, 30, 30)))
    before = _predict(serve.url, first, task_id=1)
    assert before.status_code == 200 and before.json()["results"][0]["result"]
    thread, answers = _in_background(lambda: _predict(serve.url, gate.url, task_id=2))
    gate.wait_requests(1)
    redis = _embedded_redis(serve.popen.pid)
    aof = Path(env["EMBEDDED_REDIS_DIR"]) / "appendonlydir"
    _wait_for(
        "the running job in the append-only file",
        lambda: b"pred-7-2-" in b"".join(f.read_bytes() for f in aof.iterdir()),
    )
    valkey = _child(serve.popen.pid, "valkey")
    assert valkey is not None
    valkey.send_signal(signal.SIGKILL)
    _wait_for("/health DOWN", lambda: _health(serve.url).status_code == 503)
    down = _health(serve.url)
    assert down.status_code == 503 and down.json()["status"] == "DOWN"
    _wait_for("/health UP again", lambda: _health(serve.url).status_code == 200)
    gate.release.set()
    thread.join(DEADLINE_S + 30)
    [answer] = answers  # the request that waited through the outage: JSON either way
    assert answer.status_code in (200, 503), answer.text
    assert "results" in answer.json() or "detail" in answer.json()
    after = _predict(serve.url, gate.url, task_id=2)
    assert after.status_code == 200, after.text
    assert after.json()["results"][0]["result"], "the job that ran through the outage delivered its prediction"
    again = _predict(serve.url, first, task_id=1)
    assert again.json()["results"] == before.json()["results"], "the finished job survived the crash"
    assert redis.ping()
    assert serve.popen.poll() is None


def test_restarted_serve_keeps_finished_results_and_a_second_serve_cannot_share_the_folder(
    processes: Processes, env: dict[str, str], gate: Gate
) -> None:
    gate.hold = 0
    serve = processes.serve(env)
    first = _predict(serve.url, gate.url)
    assert first.status_code == 200 and first.json()["results"][0]["result"]

    port = free_port()
    rival = processes.start(["serve"], {**env, "PORT": str(port), "HOST": "127.0.0.1"})
    assert rival.popen.wait(DEADLINE_S) != 0
    assert "is in use by another `grounded-sam serve`" in rival.log()
    assert rival.log().count("EMBEDDED_REDIS_DIR") == 1, rival.log()

    assert serve.stop() == 0
    restarted = processes.serve(env)
    second = _predict(restarted.url, gate.url)
    assert second.json()["results"] == first.json()["results"]
    assert gate.requests == 1, "the finished prediction was reused, not computed again"


def test_worker_that_keeps_dying_stops_serve_with_one_clear_message(
    processes: Processes, env: dict[str, str], tmp_path: Path
) -> None:
    bad = {
        **env,
        "DETECTOR_MODEL": str(tmp_path / "no-such-model"),
        "SUPERVISE_MAX_RESTARTS": "1",
        "PORT": str(free_port()),
        "HOST": "127.0.0.1",
    }
    serve = processes.start(["serve"], bad)
    assert serve.popen.wait(DEADLINE_S * 2) == 1
    log = serve.log()
    assert log.count("the worker died 2 times within 300 s") == 1, log
    assert "not restarting it again" in log
    assert log.count("restarting it in") == 1, log


def test_predict_cut_short_by_shutdown_gets_a_json_answer(
    processes: Processes, env: dict[str, str], gate: Gate
) -> None:
    """SIGTERM while a /predict waits: after the grace period uvicorn cancels it; the answer is a JSON 503,
    not uvicorn's plain-text 500."""
    serve = processes.serve(env)
    thread, answers = _in_background(lambda: _predict(serve.url, gate.url))
    gate.wait_requests(1)
    serve.popen.send_signal(signal.SIGTERM)
    thread.join(DEADLINE_S)
    [answer] = answers
    assert answer.status_code == 503
    assert answer.headers["content-type"] == "application/json"
    assert "shutting down" in answer.json()["detail"]
    assert serve.popen.wait(DEADLINE_S) == 0


def _health_command(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "backend.commands", "health"], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("auth", [None, ("ls", "s3cret")])
def test_health_command_answers_for_a_real_serve(
    processes: Processes, env: dict[str, str], redis_url: str, auth: tuple[str, str] | None
) -> None:
    """`grounded-sam health` (the Dockerfile's HEALTHCHECK): 0 and one UP line; 1 with wrong credentials or
    nothing listening."""
    api_env = {**env, "REDIS_URL": redis_url}
    if auth is not None:
        api_env.update(BASIC_AUTH_USER=auth[0], BASIC_AUTH_PASS=auth[1])
    api = processes.serve(api_env, wait_workers=0, auth=auth)
    port = api.url.rsplit(":", 1)[1]
    ok = _health_command({**api_env, "PORT": port})
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.startswith("UP") and ok.stdout.count("\n") == 1
    if auth is not None:
        wrong = _health_command({**api_env, "PORT": port, "BASIC_AUTH_PASS": "wrong"})
        assert wrong.returncode == 1 and "401" in wrong.stdout
    nothing = _health_command({**api_env, "PORT": str(free_port())})
    assert nothing.returncode == 1 and nothing.stdout.startswith("DOWN")


def test_a_failed_task_is_one_log_record_in_the_serve_output(
    processes: Processes, env: dict[str, str], image_server: ImageServer
) -> None:
    serve = processes.serve(env)
    answer = _predict(serve.url, f"{image_server.url}/missing.png")
    assert answer.status_code == 200 and answer.json()["results"][0]["result"] == []
    serve.stop()
    log = serve.log()
    records = [
        line
        for line in log.splitlines()
        if ("missing.png" in line or "pred-7-1-" in line) and (" WARNING " in line or " ERROR " in line)
    ]
    assert len(records) == 1, records
    assert "ImageFetchError" in records[0] or "404" in records[0]
    assert "Traceback" not in log


def explode(payload: dict[str, object]) -> None:
    """A job that fails the way a bug would."""
    raise RuntimeError(f"boom {payload['n']}")


def refuse(payload: dict[str, object]) -> None:
    """A job that fails the way a known bad input does."""
    raise ImageFetchError(f"no image {payload['n']}")


def test_worker_logs_one_record_per_failed_job_and_does_not_retry_exceptions(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """In one real worker: an unexpected exception is one record with one traceback, a BackendError one line
    without; neither is retried (the crash retry is for dead workers), and a later resubmit runs them again."""
    redis = Redis.from_url(redis_url)
    prefix = f"logs-{time.monotonic_ns()}"
    queue = PredictionQueue(redis, prefix, JobLimits(job_timeout=60, result_ttl=60, failure_ttl=60))
    module = __name__
    for name, func in (("boom", f"{module}.explode"), ("refused", f"{module}.refuse")):
        queue._enqueue(queue.interactive, func, name + prefix, {"n": name})
    caplog.set_level(logging.INFO)
    worker = HeartbeatWorker(list(queue.queues), connection=redis, serializer=JSONSerializer, heartbeat_s=0.5)
    worker.work(burst=True)
    for name in ("boom", "refused"):
        records = [r for r in caplog.records if name + prefix in r.getMessage() and r.levelno >= logging.WARNING]
        assert len(records) == 1, [r.getMessage() for r in records]
        assert (records[0].exc_info is not None) == (name == "boom")
        job = Job.fetch(name + prefix, connection=redis, serializer=JSONSerializer)
        assert job.get_status() == JobStatus.FAILED and job.retries_left == 0
    assert caplog.text.count("Traceback") == 1
    assert isinstance(worker, SimpleWorker)

    resubmit = PredictJob(QueuedTask(1, None), label_config_ref="0" * 64, model_version="v")
    queue.submit("boom" + prefix, resubmit)  # ordinary failure: a resubmit queues it again
    job = Job.fetch("boom" + prefix, connection=redis, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.QUEUED and job.retries_left == CRASH_RETRIES


def test_a_job_that_outlives_two_shutdowns_is_not_failed_as_poison(
    processes: Processes, env: dict[str, str], gate: Gate
) -> None:
    """`serve` stopped twice while the same job runs (each time past WORKER_STOP_GRACE_S, so its worker is
    killed): a deliberate stop is no crash, the job keeps its crash retry and runs again after each restart.
    Before, the second stop made it "took down 2 workers" and it was never run again."""
    gate.hold = 10**6  # the job's image never comes: it is in flight at each stop
    serve = processes.serve(env)
    thread, _ = _in_background(lambda: _predict(serve.url, gate.url))
    for stop in (1, 2):
        gate.wait_requests(stop)  # the job runs (again)
        assert serve.stop(timeout=DEADLINE_S) == 0
        assert "did not stop within" in serve.log(), "the worker was not killed: the test proves nothing"
        serve = processes.serve(env)  # same EMBEDDED_REDIS_DIR and queue: the job is still there
    thread.join(DEADLINE_S)
    redis = _embedded_redis(serve.popen.pid)
    job = _only_job(redis, env["QUEUE_NAME"])
    _wait_for("the job to run again or fail", lambda: gate.requests >= 3 or job.get_status() == JobStatus.FAILED)
    job.refresh()
    assert job.get_status() != JobStatus.FAILED, failure_reason(job)
    assert gate.requests == 3, "the job did not run again after the second stop"
    assert job.retries_left == CRASH_RETRIES, "a deliberate stop spent the job's crash retry"
    gate.release.set()
    answer = _predict(serve.url, gate.url)
    assert answer.status_code == 200 and answer.json()["results"][0]["result"], answer.text
