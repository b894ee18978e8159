"""A real worker (under `serve`) keeps WORKER_HEARTBEAT_FILE fresh once its models are loaded, so
`grounded-sam health --worker` (the worker container's HEALTHCHECK) says UP; a stopped worker leaves no file."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from tests.support.processes import Processes

DEADLINE_S = 120.0  # generous: a loaded 2-core machine loading the tiny models


def _health_worker(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "backend.commands", "health", "--worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_running_worker_is_healthy_by_its_heartbeat_file_and_a_stopped_one_is_not(
    processes: Processes, model_env: dict[str, str], tmp_path: Path
) -> None:
    alive = tmp_path / "worker.alive"
    env = {**model_env, "WORKER_HEARTBEAT_FILE": str(alive), "WORKER_HEARTBEAT": "1"}
    serve = processes.serve(env)  # returns once /health counts one live worker
    deadline = time.monotonic() + DEADLINE_S
    while not alive.exists():
        assert time.monotonic() < deadline, f"no heartbeat file after {DEADLINE_S} s:\n{serve.log()}"
        time.sleep(0.1)
    result = _health_worker(env)
    assert result.returncode == 0 and result.stdout.startswith("UP: worker heartbeat"), result
    assert result.stdout.count("\n") == 1 and result.stderr == ""

    assert serve.stop() == 0, serve.log()
    assert not alive.exists(), "the stopped worker left its heartbeat file"
    result = _health_worker(env)
    assert result.returncode == 1 and result.stdout.startswith("DOWN: no worker heartbeat"), result
