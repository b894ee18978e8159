"""Loopback ports for servers that tests start."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A 127.0.0.1 TCP port nothing listens on now (the kernel's pick; free until someone binds it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Nothing is bound to 127.0.0.1:`port` (binding it here succeeds)."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True
