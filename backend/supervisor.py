"""Supervision of `serve`'s children in embedded mode: the worker and the embedded Redis are restarted when they die.

A child that dies (killed, out of memory, exited) is started again after a back-off that doubles with each
death of that child within the window (1 s, 2 s, 4 s ... capped); when it dies once more after
`max_restarts` restarts within the window, supervision gives up with CrashLoopError and `serve` stops with
that message. The HTTP API keeps answering meanwhile. Nothing here knows rq or models: a child is a way to
start a process and, optionally, something to do once it died.
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
        return min(self.max_backoff_s, self.first_backoff_s * 2 ** (deaths - 1))


class Child:
    """One supervised process: how to start it, the process now running, when it died recently."""

    def __init__(
        self, name: str, start: Callable[[], subprocess.Popen[bytes]],
        on_death: Callable[[subprocess.Popen[bytes]], None] | None = None,
    ) -> None:
        self.name = name
        self.start = start
        self.on_death = on_death
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
        self.released = threading.Event()  # set by the owner once it stopped the children

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
            log.error("%s %s; restarting it in %.0f s (restart %d of %d within %.0f s)",
                      child.name, how, delay, deaths, self.policy.max_restarts, self.policy.window_s)
            if self.stopping.wait(delay):
                return
            try:
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
