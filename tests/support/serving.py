"""Running an http.server in a background thread for the length of a block."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def serving(httpd: http.server.HTTPServer, poll_interval: float = 0.05) -> Iterator[str]:
    """Serve `httpd` from a daemon thread until the block ends; yields its base URL (http://host:port).

    The server is shut down and its socket closed however the block exits.
    """
    host, port = httpd.server_address[:2]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": poll_interval}, daemon=True)
    thread.start()
    try:
        yield f"http://{host!s}:{port}"
    finally:
        httpd.shutdown()
        httpd.server_close()
