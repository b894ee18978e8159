"""Supervision of `serve`'s children in embedded mode: the worker and the embedded Redis are restarted when they die.

A child that dies (killed, out of memory, exited) is started again after a back-off that doubles with each
death of that child within the window (1 s, 2 s, 4 s ... capped); when it dies once more after
`max_restarts` restarts within the window, supervision gives up with CrashLoopError and `serve` stops with
that message. The HTTP API keeps answering meanwhile. Nothing here knows rq or models: a child is a way to
start a process, a way to stop it, and optionally something to do once it died.

The owner ends supervision with `stop_all`: once it returns no child is being started or will be, and every
process a child started has been stopped (a restart in progress is waited for, then stopped too).
"""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from backend.errors import BackendError, CrashLoopError

log = logging.getLogger(__name__)

POLL_S = 0.2


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """How often a child may die before supervision gives up, and how long to wait before each restart."""

    max_restarts: int
    window_s: float
    first_backoff_s: float = 1.0
    max_backoff_s: float = 30.0

    def backoff(self, deaths: int) -> float:
        """Seconds before restarting a child that died `deaths` times (>= 1) within the window."""
        return min(self.max_backoff_s, self.first_backoff_s * 2.0 ** (deaths - 1))


def terminate(process: subprocess.Popen[bytes]) -> None:
    """The default way to stop a child: SIGTERM and reap."""
    if process.poll() is None:
        process.terminate()
    process.wait()


class Child:
    """One supervised process: how to start and stop it, the process now running, when it died recently."""

    def __init__(
        self,
        name: str,
        start: Callable[[], subprocess.Popen[bytes]],
        on_death: Callable[[subprocess.Popen[bytes]], None] | None = None,
        stop: Callable[[subprocess.Popen[bytes]], None] = terminate,
    ) -> None:
        self.name = name
        self.start = start
        self.on_death = on_death
        self.stop = stop
        self.process: subprocess.Popen[bytes] | None = None
        self.deaths: deque[float] = deque()

    def launch(self) -> None:
        self.process = self.start()


def describe_exit(code: int | None) -> str:
    """ "exited with code 1", "was killed by SIGKILL" (Popen's negative return code is the signal)."""
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class Supervisor:
    """Keeps `children` running until stopped; `watch` runs on its own thread."""

    def __init__(self, children: Sequence[Child], policy: RestartPolicy) -> None:
        self.children = list(children)
        self.policy = policy
        self.stopping = threading.Event()  # set by the owner: no more restarts
        self.released = threading.Event()  # set once the owner stopped the children
        self._launching = threading.Lock()  # held while a child is (re)started, and while stop_all stops them

    def stop_all(self) -> None:
        """End supervision: no more (re)starts, then each child's process stopped, in reverse order of
        `children` (the last started first), and `released` set. A restart in progress finishes first (a child
        whose start can take long should give up when `stopping` is set), and its process is stopped too."""
        self.stopping.set()
        try:
            with self._launching:
                for child in reversed(self.children):
                    if child.process is not None:
                        child.stop(child.process)
        finally:
            self.released.set()

    def watch(self) -> None:
        """Restart children that die until `stopping` is set; CrashLoopError when one keeps dying."""
        while not self.stopping.wait(POLL_S):
            for child in self.children:
                process = child.process
                if process is not None and process.poll() is not None and not self.stopping.is_set():
                    if child.on_death is not None:
                        child.on_death(process)
                    self._restart(child, describe_exit(process.returncode))

    def _restart(self, child: Child, how: str) -> None:
        """Record the death, wait out the back-off, start the child again (a failed start is another death)."""
        while not self.stopping.is_set():
            deaths = self._record_death(child, how)
            delay = self.policy.backoff(deaths)
            log.error(
                "%s %s; restarting it in %.0f s (restart %d of %d within %.0f s)",
                child.name,
                how,
                delay,
                deaths,
                self.policy.max_restarts,
                self.policy.window_s,
            )
            if self.stopping.wait(delay):
                return
            try:
                with self._launching:
                    if not self.stopping.is_set():  # stop_all may have begun during the back-off
                        child.launch()
                return
            except BackendError as exc:
                how = f"did not start: {exc}"

    def _record_death(self, child: Child, how: str) -> int:
        now = time.monotonic()
        child.deaths.append(now)
        while child.deaths and child.deaths[0] < now - self.policy.window_s:
            child.deaths.popleft()
        if len(child.deaths) > self.policy.max_restarts:
            raise CrashLoopError(
                f"the {child.name} died {len(child.deaths)} times within {self.policy.window_s:.0f} s "
                f"(last: {how}); not restarting it again, stopping (SUPERVISE_MAX_RESTARTS, see the log above)"
            )
        return len(child.deaths)
