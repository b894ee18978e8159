"""`grounded-sam health --worker`: one line and exit 0 only while WORKER_HEARTBEAT_FILE is fresh (the worker
container's HEALTHCHECK; the worker serves no HTTP)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from backend.commands.main import _parser
from backend.queueing.worker import alive_file_stale_after
from tests.support.workers import settings_of


def _health_worker(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    args = _parser().parse_args(["health", "--worker"])
    code = args.run(settings_of(env), args)
    out = capsys.readouterr().out
    assert out.count("\n") == 1, out  # one line, nothing else
    return code, out.strip()


def test_a_freshly_touched_heartbeat_file_is_up(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    alive = tmp_path / "worker.alive"
    alive.touch()
    code, line = _health_worker({"WORKER_HEARTBEAT_FILE": str(alive)}, capsys)
    assert code == 0 and line.startswith("UP: worker heartbeat"), line


def test_a_missing_heartbeat_file_is_down_and_says_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    alive = tmp_path / "worker.alive"
    code, line = _health_worker({"WORKER_HEARTBEAT_FILE": str(alive)}, capsys)
    assert code == 1 and line.startswith("DOWN: no worker heartbeat") and str(alive) in line, line
    assert "loading its models" in line


def test_a_heartbeat_older_than_three_beats_is_down(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    alive = tmp_path / "worker.alive"
    alive.touch()
    old = time.time() - alive_file_stale_after(2.0) - 30
    os.utime(alive, (old, old))
    code, line = _health_worker({"WORKER_HEARTBEAT_FILE": str(alive), "WORKER_HEARTBEAT": "2"}, capsys)
    assert code == 1 and "s old (limit 7 s)" in line, line


def test_without_a_heartbeat_file_setting_the_check_fails_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    code, line = _health_worker({}, capsys)
    assert code == 1 and line.startswith("DOWN:") and "WORKER_HEARTBEAT_FILE" in line, line


def test_the_stale_limit_is_three_missed_beats_plus_one_second() -> None:
    assert alive_file_stale_after(5.0) == 16.0
