"""The `predict` command and the start-up failures of `serve`/`worker`, as real processes."""

from __future__ import annotations

import base64
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from redis import Redis

from backend.commands import main as cli
from backend.labelstudio.templates import config_for_labels
from backend.queueing.connection import api_connection, embedded_redis
from tests.support.paths import REPO
from tests.support.ports import free_port
from tests.support.processes import Processes
from tests.support.serving import serving
from tests.validation import assert_valid_prediction


def _run(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "backend.commands", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_predict_writes_prediction_json_and_overlay(tmp_path: Path, model_env: dict[str, str]) -> None:
    """150 labels, two images: one valid prediction and one overlay PNG of the image's size per image."""
    labels = [f"object number {i}" for i in range(150)]
    images = []
    for name, size in (("wide.png", (120, 80)), ("tall.jpg", (60, 90))):
        path = tmp_path / name
        Image.new("RGB", size, (30, 140, 220)).save(path)
        images.append((path, size))
    out = tmp_path / "out"
    result = _run(["predict", *(str(p) for p, _ in images), "--labels", ",".join(labels), "--out", str(out)], model_env)
    assert result.returncode == 0, result.stderr
    config = config_for_labels(labels)
    for path, (width, height) in images:
        text = (out / f"{path.stem}.json").read_text()
        prediction = json.loads(text)
        assert prediction["result"], "tiny random models at threshold 0.05 always find something"
        assert_valid_prediction(prediction, config, width, height)
        # Compact: the prediction's keys and one region per line, never one RLE integer per line.
        assert len(text.splitlines()) == len(prediction) + len(prediction["result"]) + 3
        assert all(json.loads(line.rstrip(",")) for line in text.splitlines()[2 : 2 + len(prediction["result"])])
        with Image.open(out / f"{path.stem}.overlay.png") as overlay:
            assert overlay.size == (width, height)


def test_predict_reports_unreadable_image_and_keeps_the_others(tmp_path: Path, model_env: dict[str, str]) -> None:
    good = tmp_path / "good.png"
    Image.new("RGB", (40, 30)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "out"
    result = _run(["predict", str(bad), str(good), "--labels", "cat", "--out", str(out)], model_env)
    assert result.returncode == 1
    assert "bad.png" in result.stderr
    assert (out / "good.json").is_file() and not (out / "bad.json").exists()


def test_serve_exits_with_the_reason_when_models_cannot_load(tmp_path: Path, model_env: dict[str, str]) -> None:
    # One restart, not the default three: each worker start loads (fails to load) the models again.
    env = {
        **model_env,
        "DETECTOR_MODEL": str(tmp_path / "no-such-model"),
        "PORT": str(free_port()),
        "SUPERVISE_MAX_RESTARTS": "1",
    }
    result = _run(["serve"], env, timeout=120)
    assert result.returncode != 0
    assert "no-such-model" in result.stdout + result.stderr


def test_invalid_settings_are_refused_up_front(model_env: dict[str, str]) -> None:
    result = _run(["worker"], {**model_env, "BOX_THRESHOLD": "1.5", "REDIS_URL": "redis://127.0.0.1:1"})
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: invalid settings: BOX_THRESHOLD: Input should be less than or equal to 1"
    ]


def _without_studio(env: dict[str, str], **extra: str) -> dict[str, str]:
    return {k: v for k, v in env.items() if not k.startswith("LABEL_STUDIO_")} | extra


def test_a_command_error_is_one_line_and_its_traceback_shows_at_debug(model_env: dict[str, str]) -> None:
    """prelabel without LABEL_STUDIO_URL; LOG_LEVEL in lower case is accepted."""
    plain = _run(["prelabel", "--project", "1"], _without_studio(model_env), timeout=60)
    assert plain.returncode == 1
    assert len(plain.stderr.splitlines()) == 1 and plain.stderr.startswith("error: "), plain.stderr
    debug = _run(["prelabel", "--project", "1"], _without_studio(model_env, LOG_LEVEL="debug"), timeout=60)
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr and debug.stderr.splitlines()[-1] == plain.stderr.strip()


def test_a_sam_checkpoint_that_is_no_checkpoint_is_one_line(tmp_path: Path, model_env: dict[str, str]) -> None:
    text_file = tmp_path / "sam_vit_h.pth"
    text_file.write_text("not a checkpoint\n")
    image = tmp_path / "a.png"
    Image.new("RGB", (40, 30)).save(image)
    result = _run(
        ["predict", str(image), "--labels", "cat", "--out", str(tmp_path / "out")],
        {**model_env, "SAM_CHECKPOINT": str(text_file)},
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "sam_vit_h.pth" in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_serve_stopped_by_sigterm_logs_no_error(processes: Processes, model_env: dict[str, str]) -> None:
    """docker stop: the API, the worker and the embedded Redis stop in order, and nothing is logged as a failure
    (the worker that SIGTERM stopped is no dead worker)."""
    serve = processes.serve(model_env)
    assert serve.stop(signal.SIGTERM, timeout=60) == 0
    log = serve.log()
    assert " ERROR " not in log and "ERROR:" not in log, log
    assert "exited with code" not in log and "killed by" not in log, log


class _Health(http.server.BaseHTTPRequestHandler):
    """/health of a backend with basic auth ls:s3cret, UP."""

    def do_GET(self) -> None:
        token = "Basic " + base64.b64encode(b"ls:s3cret").decode()
        status, body = (
            (200, {"status": "UP", "workers": 1, "queued": 0})
            if self.headers.get("Authorization") == token
            else (401, {"detail": "unauthorized"})
        )
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def health_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    server.daemon_threads = True
    with serving(server):
        yield int(server.server_address[1])


class _Listener:
    """A TCP listener standing in for a proxy: records whatever reaches it and closes the connection."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:  # closed
                return
            with connection:
                connection.settimeout(5)
                try:
                    self.received.append(connection.recv(65536))
                except OSError:
                    self.received.append(b"(connected)")


def test_health_command_talks_to_this_machine_and_never_to_a_proxy(health_server: int) -> None:
    """HTTP(S)_PROXY/ALL_PROXY set (as in many corporate containers): the credentials go to the API only, and the
    answer is the API's (UP), not the proxy's."""
    proxy = _Listener()
    proxy_url = f"http://127.0.0.1:{proxy.port}"
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "redis_url")}
    env.update(
        PYTHONPATH=str(REPO),
        HOST="127.0.0.1",
        PORT=str(health_server),
        BASIC_AUTH_USER="ls",
        BASIC_AUTH_PASS="s3cret",
        HTTP_PROXY=proxy_url,
        http_proxy=proxy_url,
        ALL_PROXY=proxy_url,
        all_proxy=proxy_url,
        HTTPS_PROXY=proxy_url,
    )
    try:
        result = _run(["health"], env, timeout=60)
    finally:
        proxy.sock.close()
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("UP: 1 workers"), result.stdout
    assert proxy.received == []


def test_dead_workers_are_unregistered_over_one_connection() -> None:
    """Each worker death unregisters the dead worker; all of them over the one connection `serve` keeps, not a
    new connection pool per death."""
    with embedded_redis() as url, Redis.from_url(url) as admin:  # its own server: no other client connects
        before = int(admin.info("stats")["total_connections_received"])
        with api_connection(url) as registry:
            for _ in range(3):
                dead = subprocess.Popen([sys.executable, "-c", "pass"])
                dead.wait()
                cli._forget_worker(registry, dead)
        assert int(admin.info("stats")["total_connections_received"]) - before == 1
