"""EmbeddedRedis.start with the real valkey binary, and with a RESP stand-in for servers that load or hang:
a failed start leaves no process behind, a server still loading its append-only file is waited for."""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
from redis import Redis

from backend.errors import QueueUnavailableError
from backend.queueing import connection
from backend.queueing.connection import WAIT_POLL_S, EmbeddedRedis

STUB = Path(__file__).with_name("resp_stub.py")
DEADLINE_S = 60.0


def _stub_server(*args: str) -> EmbeddedRedis:
    """An EmbeddedRedis whose binary is the RESP stand-in, on the port EmbeddedRedis chose."""
    server = EmbeddedRedis()
    server._args = lambda: [sys.executable, str(STUB), str(server.port), *args]  # type: ignore[method-assign]
    return server


def _refused(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _start_in_thread(server: EmbeddedRedis, **kwargs: object) -> BaseException | None:
    """Run server.start(**kwargs) with a bound on how long it may take; the exception it raised, if any.

    The thread lives on while the server it started runs: the server dies with the thread that started it
    (PR_SET_PDEATHSIG follows the parent thread), so a thread that ended would kill it under the test."""
    raised: list[BaseException] = []
    returned = threading.Event()

    def run() -> None:
        try:
            server.start(**kwargs)  # type: ignore[arg-type]
        except BaseException as exc:
            raised.append(exc)
        returned.set()
        while server.process is not None and server.process.poll() is None:
            time.sleep(WAIT_POLL_S)

    threading.Thread(target=run, daemon=True).start()
    assert returned.wait(DEADLINE_S), "start() did not return"
    return raised[0] if raised else None


def test_a_start_that_fails_waiting_stops_its_server_and_the_next_start_is_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The real server came up but the wait reported failure: it is stopped and reaped, the port is free, and a
    second start answers with the process it started (not an orphan of the first)."""
    real_wait = connection._wait_until_up

    def wait_then_fail(*args: object) -> None:
        real_wait(*args)  # type: ignore[arg-type]
        raise QueueUnavailableError("did not answer in time")

    server = EmbeddedRedis()
    monkeypatch.setattr(connection, "_wait_until_up", wait_then_fail)
    with pytest.raises(QueueUnavailableError):
        server.start()
    first = server.process
    assert first is not None and first.returncode is not None, "the first server is still running"
    assert _refused(server.port)
    monkeypatch.setattr(connection, "_wait_until_up", real_wait)
    try:
        second = server.start()
        assert second is not first and second.poll() is None
        with Redis(port=server.port) as client:
            assert client.ping()
    finally:
        server.stop()
    assert second.returncode is not None and _refused(server.port)


def test_a_server_that_accepts_but_never_answers_is_given_up_on_and_stopped() -> None:
    server = _stub_server("--silent")
    error = _start_in_thread(server, timeout=0.5)
    assert isinstance(error, QueueUnavailableError) and "did not answer within 0.5 s" in str(error)
    assert server.process is not None and server.process.returncode is not None


def test_a_server_still_loading_its_data_is_waited_for(caplog: pytest.LogCaptureFixture) -> None:
    """-LOADING to 20 PINGs (at least 20 polls of 50 ms: longer than the 0.3 s answer timeout), then PONG."""
    server = _stub_server("--loading", "20")
    caplog.set_level(logging.INFO, logger=connection.__name__)
    try:
        assert _start_in_thread(server, timeout=0.3) is None
        assert server.process is not None and server.process.poll() is None
        assert "loading its append-only file" in caplog.text
    finally:
        server.stop()


def test_a_server_loading_past_the_load_timeout_is_given_up_on_and_stopped() -> None:
    server = _stub_server("--loading", "-1")
    error = _start_in_thread(server, timeout=0.3, load_timeout=1.0)
    assert isinstance(error, QueueUnavailableError) and "still loading its data after 1 s" in str(error)
    assert server.process is not None and server.process.returncode is not None


def test_a_cancelled_start_stops_its_server_at_once() -> None:
    cancel = threading.Event()
    cancel.set()
    server = _stub_server("--loading", "-1")
    error = _start_in_thread(server, timeout=DEADLINE_S, cancel=cancel)
    assert isinstance(error, QueueUnavailableError) and "cancelled" in str(error)
    assert server.process is not None and server.process.returncode is not None
