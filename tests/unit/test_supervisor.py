"""The supervisor restarts real child processes with a capped, doubling back-off and gives up on a crash loop."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from backend.errors import CrashLoopError
from backend.supervisor import Child, RestartPolicy, Supervisor, describe_exit


def _python(code: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", code])


def test_backoff_doubles_per_recent_death_and_is_capped() -> None:
    policy = RestartPolicy(max_restarts=10, window_s=300, first_backoff_s=1, max_backoff_s=30)
    assert [policy.backoff(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]


def test_exit_descriptions_name_the_signal() -> None:
    assert describe_exit(-9) == "was killed by SIGKILL"
    assert describe_exit(3) == "exited with code 3"


def test_a_child_that_keeps_dying_is_restarted_then_given_up_on() -> None:
    starts: list[subprocess.Popen[bytes]] = []
    dead: list[int] = []

    def start() -> subprocess.Popen[bytes]:
        starts.append(_python("import sys; sys.exit(3)"))
        return starts[-1]

    child = Child("worker", start, on_death=lambda process: dead.append(process.pid))
    child.launch()
    supervisor = Supervisor([child], RestartPolicy(max_restarts=2, window_s=60, first_backoff_s=0.01))
    with pytest.raises(CrashLoopError, match=r"the worker died 3 times within 60 s \(last: exited with code 3\)"):
        supervisor.watch()
    assert len(starts) == 3  # the first start and two restarts
    assert dead == [p.pid for p in starts]


def test_a_living_child_is_left_alone_and_stopping_ends_the_watch() -> None:
    child = Child("server", lambda: _python("import time; time.sleep(60)"))
    child.launch()
    supervisor = Supervisor([child], RestartPolicy(max_restarts=1, window_s=60, first_backoff_s=0.01))
    watcher = threading.Thread(target=supervisor.watch)
    watcher.start()
    try:
        first = child.process
        assert first is not None
        first.kill()
        first.wait()
        deadline = time.monotonic() + 30
        while child.process is first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert child.process is not first and child.process is not None and child.process.poll() is None
    finally:
        supervisor.stopping.set()
        watcher.join(10)
        assert child.process is not None
        child.process.kill()
        child.process.wait()
    assert not watcher.is_alive()
