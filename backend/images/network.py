"""Connections for image fetches: the outbound policy checked at connect time, and one deadline per fetch.

GuardedBackend is an httpcore network backend: every TCP connection httpx opens resolves the host once
(socket.getaddrinfo), checks every address it got against the OutboundPolicy and connects to one of those very
addresses, so a DNS answer that changes between check and connect (rebinding) cannot reach another address. TLS
still verifies the URL's host name (httpcore passes it as server_hostname). Connections are never kept alive,
so each request connects, and is checked, under the permission of its own hop.

A FetchScope (one per fetch, per thread: httpx's sync client does all I/O on the calling thread) carries the
fetch's deadline and the one origin allowed whatever it resolves to for the current hop (Label Studio's, for its
media paths); every connect, read and write waits at most until the deadline.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import httpcore
import httpx

from backend.errors import OutboundRefusedError
from backend.images.outbound import Address, OutboundPolicy, ip_literal


class FetchScope:
    """One fetch's deadline (time.monotonic() seconds), its current hop's exempt origin (host, port) or None,
    and whether the deadline is what ended a wait (`expired`)."""

    __slots__ = ("deadline", "exempt", "expired")

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.exempt: tuple[str, int] | None = None
        self.expired = False

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    @contextmanager
    def bounded(self, timeout: float | None, timeout_error: type[Exception]) -> Iterator[float]:
        """The seconds a wait of `timeout` may last: at most until the deadline. `timeout_error` is raised at once
        past the deadline; raised by the block when the deadline was the limit, it marks the scope `expired`."""
        left = self.remaining()
        if left <= 0:
            self.expired = True
            raise timeout_error("deadline reached")
        wait = left if timeout is None else min(timeout, left)
        by_deadline = wait == left
        try:
            yield wait
        except timeout_error:
            self.expired = self.expired or by_deadline
            raise


class GuardedBackend(httpcore.NetworkBackend):
    """httpcore's sync backend, behind the policy and the current thread's FetchScope (see module docstring)."""

    def __init__(self, policy: OutboundPolicy) -> None:
        self._policy = policy
        self._inner = httpcore.SyncBackend()
        self._local = threading.local()

    @contextmanager
    def scope(self, seconds: float) -> Iterator[FetchScope]:
        """Make a FetchScope of `seconds` the current thread's for the duration of the block."""
        scope = FetchScope(seconds)
        self._local.scope = scope
        try:
            yield scope
        finally:
            self._local.scope = None

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        scope: FetchScope | None = getattr(self._local, "scope", None)
        if scope is None:
            raise OutboundRefusedError("refused: a connection outside an image fetch")
        with scope.bounded(timeout, httpcore.ConnectTimeout) as wait:
            addresses = _resolved(host, port, wait)
        if scope.exempt != (host, port) and not self._policy.host_allowed(host):
            self._check(host, [address for address, _ in addresses])
        error: Exception = httpcore.ConnectError(f"no address for {host}")
        for _, text in addresses:  # every one checked: a failed connect tries the next, like create_connection
            try:
                with scope.bounded(timeout, httpcore.ConnectTimeout) as wait:
                    stream = self._inner.connect_tcp(text, port, wait, local_address, socket_options)
                return _DeadlineStream(stream, scope)
            except (httpcore.ConnectTimeout, httpcore.ConnectError) as exc:
                error = exc
        raise error

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None
    ) -> httpcore.NetworkStream:
        raise OutboundRefusedError("refused: image fetches do not use Unix sockets")

    def _check(self, host: str, addresses: list[Address]) -> None:
        """OutboundRefusedError when any address `host` resolved to is refused."""
        literal = ip_literal(host) is not None
        for address in addresses:
            kind = self._policy.refusal(address)
            if kind is not None:
                raise OutboundRefusedError(_refusal_reason(host, address, kind, literal))


def _resolved(host: str, port: int, wait: float) -> list[tuple[Address, str]]:
    """Every distinct address `host` resolves to, looked up once, within `wait` seconds: (address, text to
    connect to, IPv6 zone kept)."""
    literal = ip_literal(host)
    if literal is not None:
        return [(literal, str(literal))]
    answers = _lookup(host, port, wait)
    addresses: list[tuple[Address, str]] = []
    for *_, sockaddr in answers:
        text = str(sockaddr[0])
        address = ip_literal(text.split("%", 1)[0])
        if address is None:
            raise httpcore.ConnectError(f"cannot resolve {host} (no address in the answer)")
        if address not in [known for known, _ in addresses]:
            addresses.append((address, text))
    if not addresses:
        raise httpcore.ConnectError(f"cannot resolve {host} (empty answer)")
    return addresses


def _lookup(host: str, port: int, wait: float) -> list[tuple[Any, ...]]:
    """socket.getaddrinfo(host, port) given up after `wait` seconds (it has no timeout of its own): it runs on a
    daemon thread, which a hung resolver keeps until the resolver's own timeout."""
    answers: list[tuple[Any, ...]] = []
    errors: list[Exception] = []

    def resolve() -> None:
        try:
            answers.extend(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except (OSError, UnicodeError) as exc:
            errors.append(exc)

    thread = threading.Thread(target=resolve, name=f"resolve {host}", daemon=True)
    thread.start()
    thread.join(wait)
    if thread.is_alive():
        raise httpcore.ConnectTimeout(f"resolving {host} took over {wait:.3g} s")
    if errors:
        raise httpcore.ConnectError(f"cannot resolve {host} ({errors[0]})") from errors[0]
    return answers


class _DeadlineStream(httpcore.NetworkStream):
    """A network stream whose reads and writes wait at most until the scope's deadline."""

    def __init__(self, inner: httpcore.NetworkStream, scope: FetchScope) -> None:
        self._inner = inner
        self._scope = scope

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        with self._scope.bounded(timeout, httpcore.ReadTimeout) as wait:
            return self._inner.read(max_bytes, wait)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        with self._scope.bounded(timeout, httpcore.WriteTimeout) as wait:
            self._inner.write(buffer, wait)

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        with self._scope.bounded(timeout, httpcore.ConnectTimeout) as wait:
            return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname, wait), self._scope)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


def guarded_client(
    backend: GuardedBackend, timeout: httpx.Timeout, on_response: Callable[[httpx.Response], None]
) -> httpx.Client:
    """An httpx client whose every connection goes through `backend`: no redirects followed (the caller checks
    each hop), no proxies or .netrc from the environment, no keep-alive, `Accept-Encoding: identity`;
    `on_response` sees every response first (an httpx event hook)."""
    limits = httpx.Limits(max_keepalive_connections=0)
    transport = httpx.HTTPTransport(limits=limits, trust_env=False)
    # httpx 0.28 has no parameter for httpcore's network_backend: swap in a pool built with it (same arguments).
    transport._pool = httpcore.ConnectionPool(
        ssl_context=httpx.create_ssl_context(),
        max_connections=limits.max_connections,
        max_keepalive_connections=0,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=backend,
    )
    return httpx.Client(
        transport=transport,
        timeout=timeout,
        follow_redirects=False,
        trust_env=False,
        headers={"Accept-Encoding": "identity"},
        event_hooks={"response": [on_response]},
    )


def _refusal_reason(host: str, address: Address, kind: str, literal: bool) -> str:
    """Why a host is refused; a name's resolved address is not repeated (it may describe an internal network)."""
    if literal:
        return f"refused: {address} is a {kind} address; allow it with FETCH_ALLOW_NETWORKS"
    return f"refused: {host} resolves to a {kind} address; allow it with FETCH_ALLOW_NETWORKS or FETCH_ALLOW_HOSTS"
