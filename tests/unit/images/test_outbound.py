"""The outbound policy, the per-fetch deadline and the byte caps, against real HTTP servers on loopback.

Loopback is refused by default, so every server here is "internal" unless a test allows it: 127.0.0.2 stands
for another host (Linux routes all of 127/8 to lo), allowed alone where a hop must matter.
"""

from __future__ import annotations

import functools
import gzip
import io
import ipaddress
import random
import shutil
import socket
import ssl
import subprocess
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import pytest
from PIL import Image
from pydantic import ValidationError

from backend.errors import ImageFetchError, OutboundRefusedError, TaskDataError
from backend.images.content import CHUNK
from backend.images.fetch import FetchOptions, ImageFetcher
from backend.images.outbound import OutboundPolicy, address_kind, parse_hosts, parse_networks
from backend.settings import Settings
from tests.support.serving import serving

TOKEN = "0123456789abcdef0123456789abcdef01234567"
MAX_BYTES = 200_000


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 10, 10)).save(buffer, "PNG")
    return buffer.getvalue()


PNG = _png()
BOMB_BYTES = 64 * 2**20  # what the gzip-of-gzip bomb inflates to: far over MAX_BYTES


@dataclass
class Server:
    """A loopback HTTP server; `connections` counts accepted TCP connections, `requests` the requests seen."""

    host: str
    port: int = 0
    connections: int = 0
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def headers_of(self, path: str) -> dict[str, str]:
        return next(headers for seen, headers in self.requests if seen == path)


class Handler(BaseHTTPRequestHandler):
    state: Server

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        self.state.requests.append((parts.path, {k.lower(): v for k, v in self.headers.items()}))
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        route = ROUTES.get(parts.path)
        if route is None:
            return self._send(404, b"not found")
        route(self, query)

    def _send(self, status: int, body: bytes, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def image(self, query: dict[str, str]) -> None:
        self._send(200, PNG)

    def redirect(self, query: dict[str, str]) -> None:
        """Redirect to `to`, sent as its UTF-8 bytes (as some servers do; http.server would insist on Latin-1)."""
        self._send(302, b"", Location=query["to"].encode("utf-8", "surrogatepass").decode("latin-1"))

    def loop(self, query: dict[str, str]) -> None:
        self._send(302, b"", Location="/loop")

    def encoded(self, query: dict[str, str]) -> None:
        self._send(200, ENCODED[query["body"]](), Content_Encoding=query["as"])

    def trickle(self, query: dict[str, str]) -> None:
        """Headers at once, then one byte every 0.5 s: no single read waits long, the whole never ends."""
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        try:
            for _ in range(1000):
                self.wfile.write(b"\x89")
                self.wfile.flush()
                time.sleep(0.5)
        except OSError:
            pass


ROUTES: dict[str, Callable[[Handler, dict[str, str]], None]] = {
    "/img.png": Handler.image,
    "/data/upload/1/a.png": Handler.image,
    "/api/projects": Handler.image,
    "/redirect": Handler.redirect,
    "/loop": Handler.loop,
    "/data/upload/redirect": Handler.redirect,
    "/encoded": Handler.encoded,
    "/trickle": Handler.trickle,
}


def _bomb() -> bytes:
    """A few hundred bytes on the wire; gzip inside gzip; BOMB_BYTES once both layers are undone."""
    return gzip.compress(gzip.compress(b"\0" * BOMB_BYTES, 9), 9)


def _raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


@functools.cache
def _cached_bomb() -> bytes:
    return _bomb()


ENCODED: dict[str, Callable[[], bytes]] = {
    "bomb": _cached_bomb,
    "gzip-png": lambda: gzip.compress(PNG),
    "gzip-gzip-png": lambda: gzip.compress(gzip.compress(PNG)),
    "zlib-png": lambda: zlib.compress(PNG),
    "raw-deflate-png": lambda: _raw_deflate(PNG),
    "png": lambda: PNG,
}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64
    state: Server

    def process_request(self, request: object, client_address: object) -> None:
        self.state.connections += 1
        super().process_request(request, client_address)  # type: ignore[arg-type]


@contextmanager
def _serving(host: str, port: int = 0, tls: ssl.SSLContext | None = None) -> Iterator[Server]:
    state = Server(host)
    httpd = _Server((host, port), type("Bound", (Handler,), {"state": state}))
    httpd.state = state
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    state.port = httpd.server_address[1]
    with serving(httpd):
        yield state


@pytest.fixture
def inside() -> Iterator[Server]:
    """An internal service on 127.0.0.1 (loopback: refused unless allowed)."""
    with _serving("127.0.0.1") as server:
        yield server


@pytest.fixture
def outside() -> Iterator[Server]:
    """ "Another host" on 127.0.0.2, which tests allow alone (FETCH_ALLOW_NETWORKS=127.0.0.2/32)."""
    with _serving("127.0.0.2") as server:
        yield server


@dataclass
class FakeDNS:
    """Answers for the names in `answers` (successive answers for successive lookups; the last one repeats);
    other names fail to resolve (nothing here reaches a real DNS server); addresses resolve as usual."""

    answers: dict[str, list[list[str]]] = field(default_factory=dict)
    lookups: list[str] = field(default_factory=list)
    delay: dict[str, float] = field(default_factory=dict)  # seconds a name's lookup hangs first

    def getaddrinfo(self, host: str, port: int, *args: object, **kwargs: object) -> list[tuple[object, ...]]:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return self._answer(host, port)
        return REAL_GETADDRINFO(host, port, *args, **kwargs)  # type: ignore[arg-type]

    def _answer(self, host: str, port: int) -> list[tuple[object, ...]]:
        self.lookups.append(host)
        time.sleep(self.delay.get(host, 0.0))
        if host not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        sequence = self.answers[host]
        addresses = sequence.pop(0) if len(sequence) > 1 else sequence[0]
        return [
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (a, port, 0, 0))
            if ":" in a
            else (socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
            for a in addresses
        ]


REAL_GETADDRINFO = socket.getaddrinfo


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> FakeDNS:
    fake = FakeDNS()
    monkeypatch.setattr(socket, "getaddrinfo", fake.getaddrinfo)
    return fake


def _fetcher(
    *, allow: str | None = None, hosts: str | None = None, label_studio_url: str | None = None, **changes: object
) -> ImageFetcher:
    policy = OutboundPolicy(allow_networks=parse_networks(allow), allow_hosts=parse_hosts(hosts))
    options: dict[str, object] = {
        "label_studio_url": label_studio_url,
        "api_key": TOKEN,
        "connect_timeout": 5.0,
        "read_timeout": 10.0,
        "max_bytes": MAX_BYTES,
        "max_pixels": 10**7,
        "local_files_root": None,
        "policy": policy,
        "deadline": 60.0,
    }
    return ImageFetcher(FetchOptions(**{**options, **changes}))  # type: ignore[arg-type]


def _error(fetcher: ImageFetcher, ref: object, **kwargs: object) -> ImageFetchError:
    with fetcher, pytest.raises(ImageFetchError) as info:
        fetcher.fetch(ref, **kwargs)  # type: ignore[arg-type]
    assert TOKEN not in str(info.value)
    return info.value


def _refused(fetcher: ImageFetcher, ref: str, **kwargs: object) -> str:
    """The message of the OutboundRefusedError fetching `ref` raises (its class name is the failure metric)."""
    error = _error(fetcher, ref, **kwargs)
    assert type(error).__name__ == "OutboundRefusedError", error
    assert str(error).startswith(ref) and not error.retryable
    return str(error)


def _redirect(server: Server, to: str, path: str = "/redirect") -> str:
    return f"{server.url}{path}?to={quote(to, safe='', errors='surrogatepass')}"


# --- the address policy


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("8.8.8.8", None),
        ("2001:4860:4860::8888", None),
        ("127.0.0.1", "loopback"),
        ("127.9.9.9", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.20", "private"),
        ("fd00:ec2::254", "private"),
        ("fec0::1", "private"),  # site-local (deprecated)
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("100.64.0.1", "special-purpose"),
        ("192.0.2.1", "special-purpose"),
        ("240.0.0.1", "special-purpose"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:169.254.169.254", "link-local"),
        ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 of 169.254.169.254
        ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
    ],
)
def test_address_kinds(address: str, kind: str | None) -> None:
    assert address_kind(ipaddress.ip_address(address)) == kind


def test_allowed_networks_apply_to_ipv4_mapped_addresses_too() -> None:
    policy = OutboundPolicy(allow_networks=parse_networks("127.0.0.0/8"))
    assert policy.refusal(ipaddress.ip_address("::ffff:127.0.0.1")) is None
    assert policy.refusal(ipaddress.ip_address("::1")) == "loopback"
    assert policy.refusal(ipaddress.ip_address("10.0.0.1")) == "private"


def test_allowed_hosts_match_names_and_subdomains() -> None:
    policy = OutboundPolicy(allow_hosts=parse_hosts("Images.Example, .corp.example, image_server"))
    assert policy.host_allowed("image_server")  # Docker service names may have underscores
    assert policy.host_allowed("images.example") and policy.host_allowed("IMAGES.EXAMPLE.")
    assert policy.host_allowed("a.corp.example") and policy.host_allowed("a.b.corp.example")
    assert not policy.host_allowed("corp.example") and not policy.host_allowed("evilcorp.example")
    assert not policy.host_allowed("images.example.evil")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FETCH_ALLOW_NETWORKS": "10.0.0.1/8"}, "FETCH_ALLOW_NETWORKS: '10.0.0.1/8' is not an IP network"),
        ({"FETCH_ALLOW_NETWORKS": "10.0.0.0/8,banana"}, "FETCH_ALLOW_NETWORKS: 'banana'"),
        ({"FETCH_ALLOW_NETWORKS": "300.1.2.3"}, "FETCH_ALLOW_NETWORKS: '300.1.2.3'"),
        ({"FETCH_ALLOW_HOSTS": "127.0.0.1"}, "FETCH_ALLOW_HOSTS: '127.0.0.1' is an address"),
        ({"FETCH_ALLOW_HOSTS": "good.example,bad host"}, "FETCH_ALLOW_HOSTS: 'bad host' is not a host name"),
        ({"IMAGE_FETCH_DEADLINE": "0"}, "image_fetch_deadline"),
    ],
)
def test_bad_allowances_are_settings_errors_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=message):
        Settings()


def test_settings_carry_the_policy_and_deadline_to_the_fetcher(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FETCH_ALLOW_NETWORKS", " 10.0.0.0/8, 192.168.1.20 ,::1/128")
    monkeypatch.setenv("FETCH_ALLOW_HOSTS", ".corp.example")
    monkeypatch.setenv("IMAGE_FETCH_DEADLINE", "2.5")
    options = Settings().fetch_options()
    assert [str(n) for n in options.policy.allow_networks] == ["10.0.0.0/8", "192.168.1.20/32", "::1/128"]
    assert options.policy.allow_hosts == (".corp.example",) and options.deadline == 2.5
    for name in ("FETCH_ALLOW_NETWORKS", "FETCH_ALLOW_HOSTS", "IMAGE_FETCH_DEADLINE"):
        monkeypatch.delenv(name)
    default = Settings().fetch_options()
    assert default.policy == OutboundPolicy() and default.deadline == 60.0


# --- refused before connecting


def test_loopback_address_is_refused_before_connecting(inside: Server) -> None:
    ref = inside.url + "/img.png"
    message = _refused(_fetcher(), ref)
    assert message == f"{ref}: refused: 127.0.0.1 is a loopback address; allow it with FETCH_ALLOW_NETWORKS"
    assert inside.connections == 0


def test_allowed_network_is_fetched(inside: Server) -> None:
    with _fetcher(allow="127.0.0.0/8") as fetcher:
        assert fetcher.fetch(inside.url + "/img.png").size == (32, 24)
    assert inside.headers_of("/img.png")["accept-encoding"] == "identity"


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST", "2130706433", "127.1", "[::ffff:127.0.0.1]"])
def test_other_names_of_loopback_are_refused(inside: Server, host: str) -> None:
    message = _refused(_fetcher(), f"http://{host}:{inside.port}/img.png")
    assert "loopback address; allow it with FETCH_ALLOW_NETWORKS" in message
    assert inside.connections == 0


def test_allowed_host_name_is_fetched_whatever_it_resolves_to(inside: Server) -> None:
    with _fetcher(hosts="localhost") as fetcher:
        assert fetcher.fetch(f"http://localhost:{inside.port}/img.png").size == (32, 24)


@pytest.mark.parametrize(
    ("ref", "reason"),
    [
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local address"),
        ("http://[fd00:ec2::254]/latest/meta-data/", "fd00:ec2::254 is a private address"),
        ("http://[fe80::1]/a.png", "fe80::1 is a link-local address"),
        ("http://[::ffff:a9fe:a9fe]/latest/", "::ffff:a9fe:a9fe is a link-local address"),
        ("http://10.1.2.3:6379/x", "10.1.2.3 is a private address"),
        ("https://192.168.1.1/admin", "192.168.1.1 is a private address"),
        ("http://0.0.0.0:6379/x", "0.0.0.0 is a unspecified address"),
        ("http://224.0.0.1/a.png", "224.0.0.1 is a multicast address"),
        ("http://100.64.0.1/a.png", "100.64.0.1 is a special-purpose address"),
    ],
)
def test_metadata_private_and_other_internal_addresses_are_refused(ref: str, reason: str) -> None:
    assert reason in _refused(_fetcher(allow="127.0.0.0/8"), ref)


def test_name_resolving_to_a_refused_address_is_refused_without_naming_it(dns: FakeDNS) -> None:
    dns.answers["metadata.internal.test"] = [["169.254.169.254"]]
    dns.answers["mixed.test"] = [["93.184.215.14", "10.0.0.7"]]  # one refused address is enough
    message = _refused(_fetcher(), "http://metadata.internal.test/latest/meta-data/")
    assert "metadata.internal.test resolves to a link-local address" in message and "169.254" not in message
    assert "FETCH_ALLOW_HOSTS" in message
    assert "resolves to a private address" in _refused(_fetcher(), "http://mixed.test/a.png")


def test_rebinding_cannot_reach_another_address(dns: FakeDNS) -> None:
    """The name is checked on its first answer (allowed) and connected to that very address, never re-resolved
    (a second lookup would answer the refused one, where a trap listens on the same port)."""
    with _servers_on_one_port() as (allowed, trap):
        dns.answers["rebind.test"] = [["127.0.0.2"], ["127.0.0.1"]]
        with _fetcher(allow="127.0.0.2/32") as fetcher:
            assert fetcher.fetch(f"http://rebind.test:{allowed.port}/img.png").size == (32, 24)
        assert dns.lookups == ["rebind.test"]
        assert [path for path, _ in allowed.requests] == ["/img.png"] and trap.connections == 0


@contextmanager
def _servers_on_one_port() -> Iterator[tuple[Server, Server]]:
    """A server on 127.0.0.2 and a trap on 127.0.0.1 listening on the same port number."""
    for _ in range(20):
        with ExitStack() as stack:
            allowed = stack.enter_context(_serving("127.0.0.2"))
            try:
                trap = stack.enter_context(_serving("127.0.0.1", allowed.port))
            except OSError:  # that port is taken on 127.0.0.1: try another
                continue
            yield allowed, trap
            return
    pytest.fail("no port free on both 127.0.0.1 and 127.0.0.2")


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A self-signed certificate (and its key, same file) for the name images.test only."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    path = tmp_path_factory.mktemp("tls") / "images.test.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=images.test",
            "-addext",
            "subjectAltName=DNS:images.test",
            "-keyout",
            str(path),
            "-out",
            str(path),
        ],
        check=True,
        capture_output=True,
    )
    return path


def test_tls_is_verified_for_the_url_host_while_connecting_to_the_checked_address(
    dns: FakeDNS, tls_cert: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection goes to the address checked; TLS still checks the certificate against the URL's name."""
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_cert))  # trust the test certificate (read when the client is made)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls_cert)
    dns.answers["images.test"] = [["127.0.0.2"]]
    with _serving("127.0.0.2", tls=context) as server, _fetcher(allow="127.0.0.2/32") as fetcher:
        assert fetcher.fetch(f"https://images.test:{server.port}/img.png").size == (32, 24)
        with pytest.raises(ImageFetchError, match="CERTIFICATE_VERIFY_FAILED") as info:
            fetcher.fetch(f"https://127.0.0.2:{server.port}/img.png")  # the certificate names images.test only
    assert [path for path, _ in server.requests] == ["/img.png"] and not isinstance(info.value, OutboundRefusedError)


# --- redirects


@pytest.mark.parametrize(
    "target",
    ["http://127.0.0.1:{port}/img.png", "http://localhost:{port}/img.png", "http://[::ffff:127.0.0.1]:{port}/img.png"],
)
def test_redirect_to_loopback_is_refused(inside: Server, outside: Server, target: str) -> None:
    ref = _redirect(outside, target.format(port=inside.port))
    message = _refused(_fetcher(allow="127.0.0.2/32"), ref)
    assert "loopback address" in message
    assert [path for path, _ in outside.requests] == ["/redirect"] and inside.connections == 0


def test_redirect_between_allowed_hosts_is_followed(outside: Server) -> None:
    with _fetcher(allow="127.0.0.2/32") as fetcher:
        assert fetcher.fetch(_redirect(outside, outside.url + "/img.png")).size == (32, 24)


def test_redirects_are_bounded(outside: Server) -> None:
    error = _error(_fetcher(allow="127.0.0.2/32"), outside.url + "/loop")
    assert "more than 5 redirects" in str(error) and not error.retryable
    assert len(outside.requests) == 6


@pytest.mark.parametrize(
    ("location", "message"),
    [("http://[::1", "redirect to a malformed URL"), ("gopher://a/x", "redirect to gopher://a/x: not an http(s) URL")],
)
def test_redirect_to_a_malformed_url_names_it(outside: Server, location: str, message: str) -> None:
    error = _error(_fetcher(allow="127.0.0.2/32"), _redirect(outside, location))
    assert message in str(error) and not error.retryable and type(error) is ImageFetchError


# --- Label Studio: its media paths are allowed with the token; nothing else is


def test_label_studio_media_is_fetched_with_the_token_other_paths_are_not_exempt(inside: Server) -> None:
    with _fetcher(label_studio_url=inside.url) as fetcher:
        assert fetcher.fetch("/data/upload/1/a.png").size == (32, 24)
    assert inside.headers_of("/data/upload/1/a.png")["authorization"] == f"Token {TOKEN}"
    assert "127.0.0.1 is a loopback address" in _refused(
        _fetcher(label_studio_url=inside.url), inside.url + "/api/projects"
    )
    assert [path for path, _ in inside.requests] == ["/data/upload/1/a.png"]


def test_label_studio_under_a_path_is_exempt_under_that_path_only(inside: Server) -> None:
    ls = inside.url + "/ls"
    assert "loopback address" in _refused(_fetcher(label_studio_url=ls), inside.url + "/data/upload/1/a.png")
    error = _error(_fetcher(label_studio_url=ls), "/data/upload/1/a.png")  # sent to /ls/data/upload/1/a.png
    assert (
        "HTTP 404" in str(error) and inside.headers_of("/ls/data/upload/1/a.png")["authorization"] == f"Token {TOKEN}"
    )


@pytest.mark.parametrize(
    "ref",
    [
        "/data/upload/../../api/projects",
        "upload/../../api/projects",
        "/data/upload/%2e%2e/%2E%2E/api/projects",
        "/data/upload/..%5c..%5capi/projects",
        "/data/local-files/../api/projects?d=x",
        "{ls}/data/upload/../../api/projects",
        "{ls}/data/upload/./1/a.png",
    ],
)
def test_paths_out_of_label_studio_media_are_refused(inside: Server, ref: str) -> None:
    """/data/upload/../../X would be sent as GET /X with the token: refused, even with loopback allowed."""
    ref = ref.format(ls=inside.url)
    message = _refused(_fetcher(label_studio_url=inside.url, allow="127.0.0.0/8"), ref)
    assert "refused: '.' or '..' in the path of a Label Studio URL" in message
    assert inside.connections == 0


def test_redirects_carry_the_token_only_to_label_studio_media(inside: Server, outside: Server) -> None:
    with _fetcher(label_studio_url=inside.url, allow="127.0.0.0/8") as fetcher:
        for target in ("/img.png", outside.url + "/img.png", "/data/upload/1/a.png"):
            fetcher.fetch(_redirect(inside, target, path="/data/upload/redirect").removeprefix(inside.url))
    assert inside.headers_of("/data/upload/redirect")["authorization"] == f"Token {TOKEN}"
    assert "authorization" not in inside.headers_of("/img.png")
    assert "authorization" not in outside.headers_of("/img.png")
    assert inside.headers_of("/data/upload/1/a.png")["authorization"] == f"Token {TOKEN}"


def test_label_studio_exemption_does_not_follow_redirects(inside: Server) -> None:
    ref = _redirect(inside, "/img.png", path="/data/upload/redirect").removeprefix(inside.url)
    assert "127.0.0.1 is a loopback address" in _refused(_fetcher(label_studio_url=inside.url), ref)
    assert [path for path, _ in inside.requests] == ["/data/upload/redirect"]


# --- bytes: on the wire and decoded


def test_gzip_of_gzip_bomb_stops_at_the_cap_in_bounded_memory(outside: Server) -> None:
    """A few hundred bytes inflating to 64 MiB: refused at the 200 kB cap, in memory bounded by the cap and a few
    64 KiB pieces (before: one zlib call inflated each layer's whole chunk, and the cap was checked after)."""
    wire = len(_cached_bomb())
    ref = outside.url + "/encoded?body=bomb&as=" + quote("gzip, gzip")
    fetcher = _fetcher(allow="127.0.0.2/32")
    tracemalloc.start()
    try:
        error = _error(fetcher, ref)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert f"larger than the {MAX_BYTES}-byte limit" in str(error) and not error.retryable
    # The body (cap + one piece; twice that for a moment while the bytearray grows) and a few pieces in flight.
    assert wire < 10_000 and peak < 2 * (MAX_BYTES + CHUNK) + 6 * CHUNK, (wire, peak)
    assert outside.headers_of("/encoded")["accept-encoding"] == "identity"


@pytest.mark.parametrize(
    ("body", "encoding"),
    [
        ("gzip-png", "gzip"),
        ("gzip-png", "x-gzip"),
        ("gzip-gzip-png", "gzip, gzip"),
        ("zlib-png", "deflate"),
        ("raw-deflate-png", "deflate"),
        ("png", "identity"),
    ],
)
def test_encoded_images_are_decoded(outside: Server, body: str, encoding: str) -> None:
    with _fetcher(allow="127.0.0.2/32") as fetcher:
        image = fetcher.fetch(f"{outside.url}/encoded?body={body}&as={quote(encoding)}")
    assert image.size == (32, 24)


@pytest.mark.parametrize(
    ("body", "encoding", "message"),
    [
        ("png", "br", "unsupported Content-Encoding 'br'"),
        ("png", "zstd", "unsupported Content-Encoding 'zstd'"),
        ("gzip-png", "gzip, compress", "unsupported Content-Encoding 'compress'"),
        ("png", "gzip, gzip, gzip, gzip", "Content-Encoding has 4 layers"),
        ("png", "gzip", "corrupt gzip Content-Encoding"),
    ],
)
def test_other_encodings_are_refused(outside: Server, body: str, encoding: str, message: str) -> None:
    ref = f"{outside.url}/encoded?body={body}&as={quote(encoding)}"
    error = _error(_fetcher(allow="127.0.0.2/32"), ref)
    assert str(error).startswith(ref) and message in str(error) and not error.retryable


# --- time


def test_slow_server_stops_at_the_fetch_deadline(outside: Server) -> None:
    """One byte every 0.5 s never trips the 10 s read timeout; the 1.5 s deadline for the whole fetch does."""
    started = time.monotonic()
    error = _error(_fetcher(allow="127.0.0.2/32", deadline=1.5), outside.url + "/trickle")
    elapsed = time.monotonic() - started
    assert "not fetched within IMAGE_FETCH_DEADLINE (1.5 s)" in str(error) and error.retryable
    assert 1.5 <= elapsed < 15, elapsed  # upper bound: generous for a loaded machine


def test_hung_dns_lookup_stops_at_the_fetch_deadline(dns: FakeDNS) -> None:
    """getaddrinfo has no timeout of its own: a resolver that hangs is given up at the deadline."""
    dns.answers["hung.test"] = [["8.8.8.8"]]
    dns.delay["hung.test"] = 20.0
    started = time.monotonic()
    error = _error(_fetcher(connect_timeout=30.0, deadline=1.0), "http://hung.test/a.png")
    elapsed = time.monotonic() - started
    assert "not fetched within IMAGE_FETCH_DEADLINE (1 s)" in str(error) and error.retryable
    assert 1.0 <= elapsed < 15, elapsed  # the lookup itself would take 20 s


# --- malformed references


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("http://[::1", "malformed URL"),
        ("http://[::1/a.png", "malformed URL"),
        ("http://example.test/a\x00.png", "control character in the image reference"),
        ("http://example.test/a.png\r\nX-Injected: 1", "control character in the image reference"),
        ("/data/upload/a\x7f.png", "control character in the image reference"),
        ("http://example.test/" + "a" * 20_000, "longer than 16384 characters"),
        ("http://example.test:99999/a.png", "malformed URL"),
        ("http://example.test:port/a.png", "malformed URL"),
        ("http://example.test:0/a.png", "malformed URL (port 0)"),
        ("http:///a.png", "malformed URL (no host)"),
        ("gopher://example.test/a.png", "not an http(s) URL"),
        ("", "empty image reference"),
        (None, "must be a string, not NoneType"),
        (17, "must be a string, not int"),
        ({"url": "http://example.test"}, "must be a string, not dict"),
    ],
)
def test_malformed_references_fail_their_own_task_with_a_reason(dns: FakeDNS, ref: object, message: str) -> None:
    error = _error(_fetcher(label_studio_url="http://127.0.0.1:9"), ref, label_studio_host="http://[::1")
    assert message in str(error) and type(error) is ImageFetchError


FRAGMENTS = (
    [
        "http://",
        "https://",
        "HTTP://",
        "s3://",
        "ftp://",
        "//",
        "/data/upload/",
        "upload/",
        "/data/local-files/?d=",
        "data:",
        "",
        "http:",
        "http:/",
    ],
    [
        "[::1",
        "[::1]",
        "127.0.0.1",
        "fuzz.test",
        "%00",
        "[",
        "]",
        "@",
        ":",
        "user:pw@fuzz.test",
        "xn--",
        "é.test",
        "a..b",
        "[fe80::1%eth0]",
        "0x7f.1",
        "",
        "169.254.169.254",
        "[::ffff:10.0.0.1]",
        "-",
        "*",
        "..",
        "\\",
    ],
    ["", ":", ":80", ":99999", ":-1", ":abc", ":0", ":65535", "::"],
    [
        "/",
        "/a.png",
        "/../..",
        "/%2e%2e/",
        "?d=../x",
        "#frag",
        "\\",
        "\x00",
        "\t",
        " ",
        "\u202e",
        "%",
        "%zz",
        "?",
        "&",
        "/data/upload/../../x",
        "\ud800",
        "\n",
        "/" * 50,
    ],
)


def test_fuzzed_references_raise_only_image_fetch_errors(dns: FakeDNS) -> None:
    """Odd strings through fetch: each fails as ImageFetchError (or TaskDataError), never another exception
    (before, `http://[::1` raised ValueError, and every task of its bulk chunk failed with it)."""
    dns.answers["fuzz.test"] = [["127.0.0.1"]]
    rng = random.Random(20261201)
    with _fetcher(label_studio_url="http://127.0.0.1:9", connect_timeout=0.5, deadline=2.0) as fetcher:
        for _ in range(600):
            ref = "".join(rng.choice(part) for part in FRAGMENTS) * rng.choice([1, 1, 1, 2])
            host = rng.choice([None, "http://[::1", "http://127.0.0.1:9", ref])
            try:
                fetcher.fetch(ref, task_id=rng.choice([None, 3]), label_studio_host=host)
            except (ImageFetchError, TaskDataError):
                continue
            pytest.fail(f"{ref!r} was fetched")


def test_fuzzed_redirect_locations_raise_only_image_fetch_errors(dns: FakeDNS, outside: Server) -> None:
    dns.answers["fuzz.test"] = [["127.0.0.1"]]
    rng = random.Random(1201)
    with _fetcher(allow="127.0.0.2/32", label_studio_url=outside.url, connect_timeout=0.5, deadline=2.0) as fetcher:
        for _ in range(150):
            location = "".join(rng.choice(part) for part in FRAGMENTS)
            try:
                fetcher.fetch(_redirect(outside, location))
            except (ImageFetchError, TaskDataError):
                continue
            pytest.fail(f"a redirect to {location!r} was fetched")
