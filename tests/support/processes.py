"""Backend commands (`python -m backend.commands ...`) as real processes: their environment, start, health, logs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.support.paths import REPO
from tests.support.ports import free_port

START_TIMEOUT_S = 60.0


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
    """A backend process started by a test; stopped (and reaped) by whoever made it."""

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
    """Starts `grounded-sam` commands as real processes (logs under `log_dir`) and stops every one in stop_all."""

    def __init__(self, log_dir: Path) -> None:
        self._logs = log_dir
        self._started: list[Proc] = []

    def start(self, args: list[str], env: dict[str, str]) -> Proc:
        log_path = self._logs / f"{args[0]}-{len(self._started)}.log"
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
    """Poll /health until it is UP with at least `workers` workers that announced their models (so /setup and
    /predict have a model_version), or fail with the process log."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            pytest.fail(f"process exited with {proc.popen.returncode}:\n{proc.log()}")
        try:
            body = httpx.get(f"{proc.url}/health", auth=auth, timeout=2).json()
            announced = sum(int(group["workers"]) for group in body.get("fingerprints", []))
            if body.get("status") == "UP" and min(int(body.get("workers", 0)), announced) >= workers:
                return dict(body)
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    pytest.fail(f"backend not healthy within {START_TIMEOUT_S} s:\n{proc.log()}")
