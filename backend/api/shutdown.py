"""A request cut short by the server's shutdown still gets a JSON answer.

When `serve` stops (SIGTERM, Ctrl-C, a crash loop) uvicorn waits HTTP_STOP_GRACE_S for requests in flight
and then cancels them; a cancelled request that had not started its response got uvicorn's own plain-text
"500 Internal Server Error". This outermost ASGI wrapper answers it with a JSON 503 instead.
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backend.api.edge import send_json

SHUTDOWN_DETAIL = "the backend is shutting down; retry the request in a few seconds"


class JsonWhenCancelled:
    """Outermost wrapper: a cancelled HTTP request without a response yet gets 503 {"detail": ...}."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except asyncio.CancelledError:
            if started:
                raise
            # The task ends right after this answer, so the cancellation is consumed here rather than
            # re-raised (uvicorn would log it as an application error).
            await send_json(send, 503, {"detail": SHUTDOWN_DETAIL}, [(b"retry-after", b"5")])
