"""Real processes for integration tests: a Redis-protocol server, the `serve` and `worker` commands, an image server.

REDIS_URL, when set in the environment, is used instead of the embedded server (each test gets its own
queue name, so runs do not see each other's jobs).
"""

from __future__ import annotations

import http.server
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from PIL import Image

from backend.queueing.connection import embedded_redis

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    external = os.environ.get("REDIS_URL")
    if external:
        yield external
        return
    with embedded_redis() as url:
        yield url


@pytest.fixture()
def model_env(tiny_detector_dir: Path, tiny_hf_sam_dir: Path) -> dict[str, str]:
    """Environment for backend processes: tiny random models, CPU, offline, a fresh queue per test."""
    return tiny_backend_env(tiny_detector_dir, tiny_hf_sam_dir)


def tiny_backend_env(detector: Path, sam: Path, drop: tuple[str, ...] = ()) -> dict[str, str]:
    """This process's environment minus settings that would change the backend (and `drop`), plus tiny
    random models on the CPU, offline, a fresh queue name, fast heartbeats."""
    dropped = {"REDIS_URL", "BASIC_AUTH_USER", "BASIC_AUTH_PASS", *drop}
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env.update(
        HF_HUB_OFFLINE="1",
        DETECTOR_MODEL=str(detector),
        SAM_MODEL=str(sam),
        DEVICE="cpu",
        MAX_DETECTIONS="3",
        BOX_THRESHOLD="0.05",
        TEXT_THRESHOLD="0.05",
        QUEUE_NAME=f"test-{uuid.uuid4().hex[:8]}",
        WORKER_HEARTBEAT="0.5",
        PREDICT_TIMEOUT="60",
        LOG_LEVEL="INFO",
        PYTHONPATH=str(REPO),
        FETCH_ALLOW_NETWORKS="127.0.0.0/8,::1/128",  # test image servers listen on loopback, refused by default
        EMBEDDED_REDIS_DIR=tempfile.mkdtemp(prefix="gsam-redis-"),  # each env its own embedded Redis data
    )
    return env


@dataclass
class Proc:
    """A backend process started by a test; stopped (and reaped) by the fixture that made it."""

    popen: subprocess.Popen[bytes]
    log_path: Path
    url: str = ""
    env: dict[str, str] = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


class Processes:
    """Starts `grounded-sam` commands as real processes and stops every one of them at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self._tmp = tmp_path
        self._started: list[Proc] = []

    def start(self, args: list[str], env: dict[str, str]) -> Proc:
        log_path = self._tmp / f"{args[0]}-{len(self._started)}.log"
        with open(log_path, "wb") as log_file:
            popen = subprocess.Popen(
                [sys.executable, "-m", "backend.commands", *args], env=env, stdout=log_file, stderr=subprocess.STDOUT
            )
        proc = Proc(popen, log_path, env=env)
        self._started.append(proc)
        return proc

    def serve(self, env: dict[str, str], *, wait_workers: int = 1, auth: tuple[str, str] | None = None) -> Proc:
        port = free_port()
        proc = self.start(["serve"], {**env, "PORT": str(port), "HOST": "127.0.0.1"})
        proc.url = f"http://127.0.0.1:{port}"
        wait_healthy(proc, wait_workers, auth)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self._started):
            proc.stop()


def wait_healthy(proc: Proc, workers: int, auth: tuple[str, str] | None = None) -> dict[str, object]:
    """Poll /health until it is UP with at least `workers` workers, or fail with the process log."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            pytest.fail(f"process exited with {proc.popen.returncode}:\n{proc.log()}")
        try:
            body = httpx.get(f"{proc.url}/health", auth=auth, timeout=2).json()
            if body.get("status") == "UP" and int(body.get("workers", 0)) >= workers:
                return dict(body)
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    pytest.fail(f"backend not healthy within {START_TIMEOUT_S} s:\n{proc.log()}")


@pytest.fixture()
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    yield procs
    procs.stop_all()


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    """Serves files from the server's `root`; /slow/<name> waits `slow_s` first."""

    def do_GET(self) -> None:
        root: Path = self.server.root  # type: ignore[attr-defined]
        name = self.path.rsplit("/", 1)[-1]
        if self.path.startswith("/slow/"):
            time.sleep(self.server.slow_s)  # type: ignore[attr-defined]
        path = root / name
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "image/png" if name.endswith(".png") else "image/jpeg")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@dataclass
class ImageServer:
    root: Path
    url: str
    server: http.server.ThreadingHTTPServer

    def add(self, name: str, image: Image.Image, **save_kwargs: object) -> str:
        """Save `image` under `name` and return its absolute URL."""
        buffer = io.BytesIO()
        image.save(buffer, format="PNG" if name.endswith(".png") else "JPEG", **save_kwargs)
        (self.root / name).write_bytes(buffer.getvalue())
        return f"{self.url}/{name}"


@pytest.fixture()
def image_server(tmp_path: Path) -> Iterator[ImageServer]:
    root = tmp_path / "images"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    server.root = root  # type: ignore[attr-defined]
    server.slow_s = 30.0  # type: ignore[attr-defined]
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield ImageServer(root, f"http://127.0.0.1:{server.server_address[1]}", server)
    server.shutdown()
    server.server_close()


def exif_rotated_jpeg(width: int, height: int) -> tuple[Image.Image, dict[str, object]]:
    """A width x height JPEG whose EXIF Orientation=6 makes viewers show it height x width."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return Image.new("RGB", (width, height), (200, 60, 40)), {"exif": exif.tobytes()}
