"""The supervisor restarts real child processes with a capped, doubling back-off and gives up on a crash loop."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from backend.errors import CrashLoopError
from backend.supervisor import (
    Child,
    RestartPolicy,
    Supervisor,
    describe_exit,
    terminate,
)


def _python(code: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", code])


def _sleep() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "60"])


def _kill_all(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait()


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


def test_stop_all_waits_for_a_restart_in_progress_and_stops_the_process_it_started() -> None:
    """`serve` stopping while the supervisor is inside a restart: the process being started is not missed (the
    old code stopped the dead process it read, and the new one ran on)."""
    starts: list[subprocess.Popen[bytes]] = []
    stopped: list[subprocess.Popen[bytes]] = []
    restarting, finish_restart = threading.Event(), threading.Event()

    def start() -> subprocess.Popen[bytes]:
        starts.append(_sleep())
        if len(starts) > 1:  # the restart: spawned, not yet returned when stop_all begins
            restarting.set()
            assert finish_restart.wait(30)
        return starts[-1]

    def stop(process: subprocess.Popen[bytes]) -> None:
        stopped.append(process)
        terminate(process)

    child = Child("worker", start, stop=stop)
    child.launch()
    supervisor = Supervisor([child], RestartPolicy(max_restarts=5, window_s=60, first_backoff_s=0.01))
    watcher = threading.Thread(target=supervisor.watch)
    stopper = threading.Thread(target=supervisor.stop_all)
    watcher.start()
    try:
        starts[0].kill()
        assert restarting.wait(30)
        stopper.start()
        assert supervisor.stopping.wait(30)
        finish_restart.set()
        stopper.join(30)
        watcher.join(30)
        assert not stopper.is_alive() and not watcher.is_alive()
        assert len(starts) == 2 and stopped == [starts[1]]
        assert starts[1].returncode is not None and supervisor.released.is_set()
    finally:
        finish_restart.set()
        supervisor.stopping.set()
        _kill_all(starts)


def test_no_child_is_started_once_stop_all_has_begun() -> None:
    """A child dead and waiting out its back-off when `serve` stops is not started again; stop_all still stops
    (reaps) what it has."""
    starts: list[subprocess.Popen[bytes]] = []
    died = threading.Event()

    def start() -> subprocess.Popen[bytes]:
        starts.append(_sleep())
        return starts[-1]

    child = Child("worker", start, on_death=lambda _: died.set())
    child.launch()
    supervisor = Supervisor([child], RestartPolicy(max_restarts=5, window_s=60, first_backoff_s=60))
    watcher = threading.Thread(target=supervisor.watch)
    watcher.start()
    try:
        starts[0].kill()
        assert died.wait(30)
        supervisor.stop_all()
        watcher.join(30)
        assert not watcher.is_alive()
        assert len(starts) == 1 and starts[0].returncode is not None
    finally:
        supervisor.stopping.set()
        _kill_all(starts)


def test_stop_all_stops_the_children_last_started_first() -> None:
    """`serve`'s order: the worker (listed after the Redis it needs) stops before the Redis."""
    order: list[str] = []
    processes: list[subprocess.Popen[bytes]] = []

    def child(name: str) -> Child:
        def stop(process: subprocess.Popen[bytes]) -> None:
            assert process.poll() is None, f"{name} was not running when stopped"
            order.append(name)
            terminate(process)

        made = Child(name, _sleep, stop=stop)
        made.launch()
        assert made.process is not None
        processes.append(made.process)
        return made

    supervisor = Supervisor([child("redis"), child("worker")], RestartPolicy(max_restarts=1, window_s=60))
    try:
        supervisor.stop_all()
        assert order == ["worker", "redis"]
        assert all(process.returncode is not None for process in processes)
    finally:
        _kill_all(processes)
