"""A transparent HTTP relay in front of the backend that keeps the bodies of the requests Label Studio sends it.

Label Studio is connected to the relay's URL instead of the backend's; every request is passed on unchanged and
answered with the backend's answer, so what the backend got can be asserted on (the e2e tests' view of "the
backend side" of a click, without reading the backend's internals).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

RELAY_TIMEOUT_S = 300.0  # longer than any /predict a test waits for
_HOP_BY_HOP = {"connection", "content-length", "transfer-encoding", "keep-alive", "host"}


@dataclass
class Recorded:
    """One request that went through the relay: method, path, JSON body (None when not JSON), answer status."""

    method: str
    path: str
    body: Any
    status: int


@dataclass
class Recorder:
    """The relay's record, shared with its handler threads."""

    target: str
    requests: list[Recorded] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, entry: Recorded) -> None:
        with self.lock:
            self.requests.append(entry)

    def predicts(self) -> list[Recorded]:
        """The /predict requests so far, in the order their answers were sent."""
        with self.lock:
            return [entry for entry in self.requests if entry.path.split("?")[0] == "/predict"]

    def contexts(self) -> list[Any]:
        """params.context of each /predict so far (None for a request without one)."""
        return [(entry.body or {}).get("params", {}).get("context") for entry in self.predicts()]


def _handler(recorder: Recorder, client: httpx.Client) -> type[BaseHTTPRequestHandler]:
    class Relay(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _relay(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            headers = {key: value for key, value in self.headers.items() if key.lower() not in _HOP_BY_HOP}
            answer = client.request(self.command, recorder.target + self.path, content=raw, headers=headers)
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = None
            recorder.add(Recorded(self.command, self.path, body, answer.status_code))
            self.send_response(answer.status_code)
            for key, value in answer.headers.items():
                if key.lower() not in _HOP_BY_HOP and key.lower() != "content-encoding":
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(answer.content)))
            self.end_headers()
            self.wfile.write(answer.content)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _relay

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Relay


@contextmanager
def recording_relay(target: str) -> Iterator[tuple[str, Recorder]]:
    """A relay on loopback passing every request on to `target` (the backend's URL): (its URL, its Recorder)."""
    recorder = Recorder(target.rstrip("/"))
    with httpx.Client(timeout=RELAY_TIMEOUT_S) as client:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(recorder, client))
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}", recorder
        finally:
            server.shutdown()
            server.server_close()
            thread.join()
