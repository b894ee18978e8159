"""The HTTP edge through real processes: /health and /setup under load and under a hung Redis, the body cap on
the wire, malformed image URLs, and secrets that never reach any output."""

from __future__ import annotations

import contextlib
import http.server
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image
from redis import Redis

from backend.queueing.connection import EmbeddedRedis
from tests.support.images import ImageServer
from tests.support.paths import REPO
from tests.support.processes import Processes
from tests.support.serving import serving
from tests.support.workers import announce_worker, settings_of

CONFIG = (REPO / "label_config" / "brush_and_rectangle.xml").read_text()
MARKER = "sekrit-MARKER-8c1d"
WAITING = 100


def _predict(client: httpx.Client, url: str, tasks: list[dict[str, object]], **kwargs: object) -> httpx.Response:
    body = {"tasks": tasks, "label_config": CONFIG, "project": "7.1700000000"}
    return client.post(f"{url}/predict", json=body, **kwargs)  # type: ignore[arg-type]


def _timed(call: object) -> tuple[float, httpx.Response]:
    started = time.monotonic()
    response = call()  # type: ignore[operator]
    return time.monotonic() - started, response


def test_health_and_setup_answer_in_time_while_100_predictions_wait(
    processes: Processes, model_env: dict[str, str], image_server: ImageServer
) -> None:
    """100 /predict on slow images wait at once: /health stays under 1 s and /setup under 3 s, and every
    /predict answers 504 by PREDICT_TIMEOUT counted from its arrival (before: /health took 18.8 s with 45)."""
    timeout = 20.0
    image_server.slow_s = 25.0
    for index in range(WAITING):
        image_server.add(f"w{index}.png", Image.new("RGB", (32, 32), (index, 0, 0)))
    serve = processes.serve({**model_env, "PREDICT_TIMEOUT": str(timeout)})
    limits = httpx.Limits(max_connections=WAITING + 10, max_keepalive_connections=0)
    answers: list[tuple[float, int]] = []

    def wait_one(index: int, client: httpx.Client) -> None:
        task = {"id": index + 1, "data": {"image": f"{image_server.url}/slow/w{index}.png"}}
        elapsed, response = _timed(lambda: _predict(client, serve.url, [task]))
        answers.append((elapsed, response.status_code))

    with httpx.Client(timeout=120, limits=limits) as waiting, httpx.Client(timeout=30) as probe:
        pool = ThreadPoolExecutor(WAITING)
        futures = [pool.submit(wait_one, index, waiting) for index in range(WAITING)]
        deadline = time.monotonic() + timeout
        queued = 0
        while time.monotonic() < deadline and queued < WAITING - 1:  # one job runs, the others are queued
            queued = sum(probe.get(f"{serve.url}/health").json()["queued"].values())
            time.sleep(0.2)
        assert queued >= WAITING - 1, f"only {queued} of {WAITING} predictions queued in time"
        health = [_timed(lambda: probe.get(f"{serve.url}/health")) for _ in range(20)]
        setup = [
            _timed(lambda: probe.post(f"{serve.url}/setup", json={"project": "7.1", "schema": CONFIG}))
            for _ in range(10)
        ]
        assert len(answers) == 0, "predictions answered before their timeout"
        for future in futures:
            future.result(timeout=timeout + 60)
        pool.shutdown()
    assert all(r.status_code == 200 for _, r in health) and all(r.status_code == 200 for _, r in setup)
    assert max(t for t, _ in health) < 1.0, sorted(t for t, _ in health)
    assert max(t for t, _ in setup) < 3.0, sorted(t for t, _ in setup)
    assert {status for _, status in answers} == {504}
    assert max(elapsed for elapsed, _ in answers) < timeout + 10, sorted(elapsed for elapsed, _ in answers)[-5:]


@pytest.fixture()
def stoppable_redis() -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis()
    server.start()
    try:
        yield server
    finally:
        assert server.process is not None
        with contextlib.suppress(ProcessLookupError):
            server.process.send_signal(signal.SIGCONT)
        server.stop()


def test_health_says_down_within_a_second_when_redis_hangs(
    processes: Processes, model_env: dict[str, str], stoppable_redis: EmbeddedRedis
) -> None:
    """SIGSTOP of the Redis server (connections accepted, nothing answered): DOWN in ~1 s, not 5 s; /setup still
    answers in time, with the workers' announcements the API read last (here by serve's first /health)."""
    env = {**model_env, "REDIS_URL": stoppable_redis.url}
    announce_worker(Redis.from_url(stoppable_redis.url), settings_of(env))
    api = processes.serve(env, wait_workers=0)
    assert stoppable_redis.process is not None
    stoppable_redis.process.send_signal(signal.SIGSTOP)
    try:
        for _ in range(3):
            elapsed, response = _timed(lambda: httpx.get(f"{api.url}/health", timeout=30))
            assert response.status_code == 503 and response.json()["status"] == "DOWN", response.text
            assert "Redis" in response.json()["detail"]
            assert elapsed < 1.5, elapsed
        elapsed, setup = _timed(
            lambda: httpx.post(f"{api.url}/setup", json={"project": "1.1", "schema": CONFIG}, timeout=30)
        )
        assert setup.status_code == 200 and elapsed < 3.0, (elapsed, setup.text)
    finally:
        stoppable_redis.process.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + 30
    while httpx.get(f"{api.url}/health", timeout=30).status_code != 200:
        assert time.monotonic() < deadline, "Redis answers again but /health stays DOWN"
        time.sleep(0.2)


def _raw_request(url: str, head: bytes, body_chunks: Iterator[bytes]) -> bytes:
    """Send a request by hand (a lying or missing Content-Length) and read what comes back."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head)
        with contextlib.suppress(OSError):  # the server may close as soon as it has answered
            for chunk in body_chunks:
                sock.sendall(chunk)
        answer = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                answer += chunk
    return answer


def test_request_bodies_over_the_cap_get_413_declared_or_streamed(
    processes: Processes, model_env: dict[str, str], redis_url: str
) -> None:
    env = {**model_env, "REDIS_URL": redis_url, "MAX_REQUEST_BYTES": "100000"}
    api = processes.serve(env, wait_workers=0)
    announce_worker(Redis.from_url(redis_url), settings_of(env))  # no worker runs a job here
    declared = _raw_request(
        api.url,
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 52428800\r\n\r\n",
        iter([b"{" * 1000]),
    )
    assert declared.startswith(b"HTTP/1.1 413"), declared[:200]
    assert b"MAX_REQUEST_BYTES=100000" in declared

    def chunks() -> Iterator[bytes]:
        for _ in range(60):
            piece = b" " * 4096
            yield f"{len(piece):x}\r\n".encode() + piece + b"\r\n"

    streamed = _raw_request(
        api.url,
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
        chunks(),
    )
    assert streamed.startswith(b"HTTP/1.1 413"), streamed[:200]
    small = httpx.post(f"{api.url}/predict", json={"tasks": [{"id": 1, "data": {}}], "label_config": CONFIG})
    assert small.status_code == 200
    assert httpx.get(f"{api.url}/health").status_code == 200


def test_malformed_image_urls_fail_only_their_own_tasks(
    processes: Processes, model_env: dict[str, str], image_server: ImageServer
) -> None:
    good = image_server.add("good.png", Image.new("RGB", (40, 30), (0, 120, 0)))
    odd = [
        "http://",
        "::::",
        "http://[::1",
        "ftp://example.invalid/a.png",
        "http://exa mple/a.png",
        "\x00",
        "s3://",
        "/data/upload/../../etc/passwd",
        "x" * 5000,
        "http://127.0.0.1:0/a.png",
        "data:image/png;base64,@@",
    ]
    serve = processes.serve(model_env)
    tasks = [{"id": index + 1, "data": {"image": url}} for index, url in enumerate([good, *odd])]
    with httpx.Client(timeout=120) as client:
        response = _predict(client, serve.url, tasks)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == len(tasks)
    assert results[0]["result"], "the good image got no regions"
    assert all(result["result"] == [] for result in results[1:])
    # One failed task, one log record: the worker's. The API mentions failed jobs at DEBUG only.
    assert "backend.api.service: job" not in serve.log()


class _RejectingStudio(http.server.BaseHTTPRequestHandler):
    """A Label Studio that refuses every token (401), like one whose API key was revoked."""

    def _refuse(self) -> None:
        body = json.dumps({"detail": "Invalid token."}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PATCH = do_DELETE = _refuse

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def rejecting_studio() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RejectingStudio)
    with serving(server) as url:
        yield url


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "backend.commands", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        check=False,
    )


def test_secrets_never_reach_any_output(
    processes: Processes, model_env: dict[str, str], image_server: ImageServer, rejecting_studio: str, tmp_path: Path
) -> None:
    """Bad settings, wrong logins and a Label Studio refusing the key: the marker set as BASIC_AUTH_PASS and
    LABEL_STUDIO_API_KEY appears in no output of the CLI, the server, the worker or any response."""
    outputs: list[str] = []
    for bad in (
        {"BASIC_AUTH_PASS": MARKER},
        {"BASIC_AUTH_PASS": MARKER, "BOX_THRESHOLD": MARKER},
        {"BASIC_AUTH_USER": "ls", "BASIC_AUTH_PASS": MARKER, "PORT": MARKER, "DEVICE": MARKER},
    ):
        for command in (["serve"], ["worker"], ["status", "--project", "1"]):
            done = _cli(command, {**model_env, "LABEL_STUDIO_API_KEY": MARKER, **bad})
            assert done.returncode == 2 and "invalid settings" in done.stderr, done.stderr
            outputs += [done.stdout, done.stderr]
    assert "BASIC_AUTH_USER" in "".join(outputs) and "BOX_THRESHOLD" in "".join(outputs)

    env = {
        **model_env,
        "BASIC_AUTH_USER": "ls",
        "BASIC_AUTH_PASS": MARKER,
        "LABEL_STUDIO_URL": rejecting_studio,
        "LABEL_STUDIO_API_KEY": MARKER,
        "LOG_LEVEL": "DEBUG",
    }
    serve = processes.serve(env, auth=("ls", MARKER))
    with httpx.Client(timeout=120) as client:
        for auth in (("ls", "wrong"), ("ls", MARKER[:-1]), (MARKER, MARKER), ("", "")):
            refused = client.get(f"{serve.url}/health", auth=auth)
            assert refused.status_code == 401
            outputs.append(refused.text + str(refused.headers))
        token = httpx.BasicAuth("ls", MARKER)._auth_header.replace("Basic", "basic")  # type: ignore[attr-defined]
        assert client.get(f"{serve.url}/health", headers={"Authorization": token}).status_code == 200
        upload = {"id": 1, "data": {"image": "/data/upload/1/a.png"}}
        predicted = _predict(client, serve.url, [upload], auth=("ls", MARKER))
        assert predicted.status_code == 200 and predicted.json()["results"][0]["result"] == []
        outputs.append(predicted.text)
        outputs.append(client.get(f"{serve.url}/metrics", auth=("ls", MARKER)).text)
    prelabel = _cli(["prelabel", "--project", "1", "--backend", serve.url], env)
    assert prelabel.returncode != 0
    outputs += [prelabel.stdout, prelabel.stderr]
    serve.stop()
    outputs.append(serve.log())
    leaks = [text for text in outputs if MARKER in text]
    assert not leaks, leaks[0][max(0, leaks[0].find(MARKER) - 500) :][:1000]
    assert "401" in prelabel.stderr + prelabel.stdout or "refused" in prelabel.stderr + prelabel.stdout, prelabel
