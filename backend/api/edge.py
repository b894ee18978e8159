"""Pure ASGI middleware at the HTTP edge: arrival time, basic auth, the body cap, request counting.

Pure ASGI (not Starlette's BaseHTTPMiddleware) so that nothing buffers responses or runs on a thread, and
so that the checks run before FastAPI reads and parses a body.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import time
from collections.abc import Sequence
from typing import Any

from prometheus_client import Counter
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# The route label of every request whose path matches no route (scanners, typos): one Prometheus series.
UNMATCHED = "unmatched"


def arrived_at(scope: Scope) -> float:
    """time.monotonic() when the request's headers reached the app (stamped by StampArrival)."""
    return float(scope.get("state", {}).get("arrived", time.monotonic()))


async def send_json(send: Send, status: int, body: dict[str, Any], headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    """Answer a whole JSON response from middleware."""
    data = json.dumps(body).encode()
    start_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": start_headers})
    await send({"type": "http.response.body", "body": data})


class StampArrival:
    """Records when a request arrived, so deadlines (PREDICT_TIMEOUT) count from there, not from a free thread."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope.setdefault("state", {})["arrived"] = time.monotonic()
        await self.app(scope, receive, send)


def basic_credentials(header: str) -> tuple[bytes, bytes] | None:
    """(user, password) from an `Authorization: Basic <base64>` value; the scheme is case-insensitive
    (RFC 7617). None when the header is absent or not a well-formed basic credential."""
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, colon, password = decoded.partition(b":")
    return (user, password) if colon else None


class BasicAuth:
    """Refuses every request without the configured basic-auth pair with 401 (before its body is read), except
    those to `open_paths` (exact paths)."""

    def __init__(self, app: ASGIApp, credentials: tuple[str, str], open_paths: frozenset[str] = frozenset()) -> None:
        self.app = app
        self._user = credentials[0].encode()
        self._password = credentials[1].encode()
        self._open = open_paths

    def allows(self, header: str) -> bool:
        given = basic_credentials(header)
        if given is None:
            return False
        # Both compared, each in constant time: no early exit tells a right user from a wrong one.
        user_ok = hmac.compare_digest(given[0], self._user)
        password_ok = hmac.compare_digest(given[1], self._password)
        return user_ok and password_ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self._open or self.allows(_header(scope, b"authorization")):
            await self.app(scope, receive, send)
            return
        await send_json(
            send, 401, {"detail": "authentication required"}, [(b"www-authenticate", b'Basic realm="Login required"')]
        )


class BodyLimit:
    """Answers 413 to a body over `max_bytes`: at once when Content-Length says so, else as soon as the
    streamed (chunked) body passes the cap. The app sees the body only when it fits, replayed in one piece."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, size: str) -> dict[str, str]:
        return {
            "detail": f"request body too large: {size}, more than MAX_REQUEST_BYTES={self.max_bytes}; "
            "send fewer tasks per request (or raise MAX_REQUEST_BYTES)"
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await send_json(send, 413, self._too_large(f"Content-Length {declared}"), [(b"connection", b"close")])
            return
        body = await self._read(receive)
        if body is None:
            await send_json(send, 413, self._too_large("the streamed body"), [(b"connection", b"close")])
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive: Receive) -> bytes | None:
        """The whole body, or None as soon as it passes the cap (or the client went away)."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks)  # disconnect: the app sees an empty body and the disconnect after it
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()  # e.g. the disconnect a long request watches for
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def route_label(routes: Sequence[BaseRoute], scope: Scope) -> str:
    """The route template a request matches ("/runs/{run_id}"), also for a wrong method; UNMATCHED otherwise.

    Labels by template keep the Prometheus series bounded whatever paths clients send.
    """
    for route in routes:
        match, _ = route.matches(scope)
        if match != Match.NONE:
            return str(getattr(route, "path", UNMATCHED))
    return UNMATCHED


class CountRequests:
    """Counts every answered request (401s and 413s from the middleware included) by route template and status."""

    def __init__(self, app: ASGIApp, counter: Counter, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self._counter = counter
        self._routes = routes  # the routes whose templates label the requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            self._counter.labels(route_label(self._routes, scope), str(status)).inc()


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return ""
