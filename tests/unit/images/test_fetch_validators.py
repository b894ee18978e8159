"""ImageFetcher.fetch_if_changed against a real HTTP server on loopback that counts requests and bodies served,
and Validator's text form."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from PIL import Image

from backend.errors import ImageFetchError, OutboundRefusedError
from backend.images.fetch import Fetched, FetchOptions, ImageFetcher, Validator
from backend.images.outbound import OutboundPolicy, parse_networks
from tests.support.serving import serving

TOKEN = "0123456789abcdef0123456789abcdef01234567"
LOOPBACK = OutboundPolicy(allow_networks=parse_networks("127.0.0.0/8,::1/128"))
UPLOAD = "/data/upload/3/0a1b2c3d-cat.png"  # as Label Studio names uploads: <project>/<uuid8>-<name>


def _png(color: tuple[int, int, int], size: tuple[int, int] = (8, 6)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


RED, GREEN = _png((255, 0, 0)), _png((0, 255, 0))


@dataclass
class Resource:
    """What the server holds at one path: the body and the validators it sends (None: not sent)."""

    body: bytes
    etag: str | None = None
    last_modified: str | None = None
    needs_token: bool = False
    honours_conditionals: bool = True


@dataclass
class Server:
    """The server's files and what it saw: requests and bodies sent per path, the last request headers."""

    port: int = 0
    files: dict[str, Resource] = field(default_factory=dict)
    requests: Counter[str] = field(default_factory=Counter)
    bodies: Counter[str] = field(default_factory=Counter)
    headers: dict[str, dict[str, str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def put(self, path: str, resource: Resource) -> str:
        """Serve `resource` at `path` from now on, forgetting what was counted there; its URL."""
        with self.lock:
            self.files[path] = resource
            self.requests[path] = self.bodies[path] = 0
        return self.url + path


class Handler(BaseHTTPRequestHandler):
    state: Server

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        with self.state.lock:
            self.state.requests[path] += 1
            self.state.headers[path] = dict(self.headers.items())
            resource = self.state.files.get(path)
        if path.startswith("/redirect/"):  # to another origin (localhost): a hop of its own
            return self._send(302, location=f"http://localhost:{self.state.port}/{path.removeprefix('/redirect/')}")
        if path == "/always-304":
            return self._send(304)
        if resource is None:
            return self._send(404)
        if resource.needs_token and self.headers.get("Authorization") != f"Token {TOKEN}":
            return self._send(401)
        validators = {"ETag": resource.etag, "Last-Modified": resource.last_modified}
        if resource.honours_conditionals and self._not_modified(resource):
            return self._send(304, validators)
        with self.state.lock:
            self.state.bodies[path] += 1
        self._send(200, validators, resource.body)

    def _not_modified(self, resource: Resource) -> bool:
        if "If-None-Match" in self.headers:
            return resource.etag is not None and self.headers["If-None-Match"] == resource.etag
        return resource.last_modified is not None and self.headers.get("If-Modified-Since") == resource.last_modified

    def _send(
        self, status: int, headers: dict[str, str | None] | None = None, body: bytes = b"", location: str = ""
    ) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            if value is not None:
                self.send_header(name, value)
        if location:
            self.send_header("Location", location)
        if status != 304:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    state = Server()
    httpd = _Server(("127.0.0.1", 0), type("BoundHandler", (Handler,), {"state": state}))
    state.port = httpd.server_address[1]
    with serving(httpd):
        yield state


@pytest.fixture
def fetcher(server: Server) -> Iterator[ImageFetcher]:
    with _fetcher(server) as fetcher:
        yield fetcher


def _fetcher(server: Server, **changes: object) -> ImageFetcher:
    options: dict[str, object] = {
        "label_studio_url": server.url,
        "api_key": TOKEN,
        "connect_timeout": 2.0,
        "read_timeout": 5.0,
        "max_bytes": 100_000,
        "max_pixels": 10**6,
        "local_files_root": None,
        "policy": LOOPBACK,
    }
    return ImageFetcher(FetchOptions(**{**options, **changes}))  # type: ignore[arg-type]


def _color(fetched: Fetched) -> tuple[int, ...]:
    assert fetched.image is not None
    return tuple(fetched.image.getpixel((0, 0)))  # type: ignore[arg-type]


@pytest.mark.parametrize("etag", ['"v1"', 'W/"v1"'])
def test_etag_makes_the_second_fetch_a_304_without_a_body(server: Server, fetcher: ImageFetcher, etag: str) -> None:
    url = server.put(f"/etag-{len(etag)}.png", Resource(RED, etag=etag, last_modified="Tue, 01 Dec 2026 10:00:00 GMT"))
    first = fetcher.fetch_if_changed(url)
    assert _color(first) == (255, 0, 0) and first.validator == Validator("etag", etag)  # weak kept as sent
    second = fetcher.fetch_if_changed(url, known=first.validator)
    assert second.image is None and second.validator == first.validator
    path = urlsplit(url).path
    assert (server.requests[path], server.bodies[path]) == (2, 1)
    assert server.headers[path]["If-None-Match"] == etag and "If-Modified-Since" not in server.headers[path]


def test_last_modified_makes_the_second_fetch_a_304(server: Server, fetcher: ImageFetcher) -> None:
    stamp = "Tue, 01 Dec 2026 10:00:00 GMT"
    url = server.put("/dated.png", Resource(RED, last_modified=stamp))
    first = fetcher.fetch_if_changed(url)
    assert first.validator == Validator("last-modified", stamp)
    second = fetcher.fetch_if_changed(url, known=first.validator)
    assert second.image is None and (server.requests["/dated.png"], server.bodies["/dated.png"]) == (2, 1)
    assert server.headers["/dated.png"]["If-Modified-Since"] == stamp


def test_without_server_validators_the_bytes_digest_decides(server: Server, fetcher: ImageFetcher) -> None:
    url = server.put("/plain.png", Resource(RED))
    first = fetcher.fetch_if_changed(url)
    assert first.validator == Validator("sha256", hashlib.sha256(RED).hexdigest())
    second = fetcher.fetch_if_changed(url, known=first.validator)
    assert second.image is None and second.validator == first.validator
    assert server.bodies["/plain.png"] == 2  # read again (nothing cheaper to ask), but not decoded
    assert not {"If-None-Match", "If-Modified-Since"} & set(server.headers["/plain.png"])
    server.put("/plain.png", Resource(GREEN))
    third = fetcher.fetch_if_changed(url, known=first.validator)
    assert _color(third) == (0, 255, 0) and third.validator == Validator("sha256", hashlib.sha256(GREEN).hexdigest())


def test_an_etag_no_request_header_can_carry_falls_back_to_the_bytes_digest(
    server: Server, fetcher: ImageFetcher
) -> None:
    """A non-ASCII ETag (sent as latin-1) cannot go back in If-None-Match: the bytes' digest decides instead, and
    the next fetch works (it used to fail every later fetch of that image with a UnicodeEncodeError)."""
    url = server.put("/accented.png", Resource(RED, etag='"caf\u00e9"'))
    first = fetcher.fetch_if_changed(url)
    assert first.validator == Validator("sha256", hashlib.sha256(RED).hexdigest())
    second = fetcher.fetch_if_changed(url, known=first.validator)
    assert second.image is None and "If-None-Match" not in server.headers["/accented.png"]


def test_changed_content_comes_back_with_its_new_validator(server: Server, fetcher: ImageFetcher) -> None:
    url = server.put("/changing.png", Resource(RED, etag='"red"'))
    first = fetcher.fetch_if_changed(url)
    server.put("/changing.png", Resource(GREEN, etag='"green"'))
    second = fetcher.fetch_if_changed(url, known=first.validator)
    assert _color(second) == (0, 255, 0) and second.validator == Validator("etag", '"green"')
    assert server.headers["/changing.png"]["If-None-Match"] == '"red"'


def test_a_server_that_ignores_if_none_match_but_keeps_the_etag_is_unchanged(
    server: Server, fetcher: ImageFetcher
) -> None:
    url = server.put("/ignores.png", Resource(RED, etag='"same"', honours_conditionals=False))
    first = fetcher.fetch_if_changed(url)
    second = fetcher.fetch_if_changed(url, known=first.validator)
    assert second.image is None and second.validator == first.validator


def test_a_known_digest_meets_a_server_that_now_sends_an_etag(server: Server, fetcher: ImageFetcher) -> None:
    url = server.put("/now-tagged.png", Resource(RED))
    first = fetcher.fetch_if_changed(url)
    server.put("/now-tagged.png", Resource(RED, etag='"t"'))
    second = fetcher.fetch_if_changed(url, known=first.validator)
    assert second.image is None and second.validator == Validator("etag", '"t"')  # the cheaper one, for next time


@pytest.mark.parametrize("ref", [UPLOAD, UPLOAD.removeprefix("/data/"), "/" + UPLOAD.removeprefix("/data/")])
def test_label_studio_uploads_are_immutable_no_request_the_second_time(
    server: Server, fetcher: ImageFetcher, ref: str
) -> None:
    server.put(UPLOAD, Resource(RED, etag='"ignored"', needs_token=True))
    first = fetcher.fetch_if_changed(ref)
    assert _color(first) == (255, 0, 0) and first.validator.kind == "immutable"
    second = fetcher.fetch_if_changed(ref, known=first.validator)
    assert second.image is None and second.validator == first.validator
    assert server.requests[UPLOAD] == 1


def test_absolute_upload_urls_are_immutable_on_either_label_studio_address(
    server: Server, fetcher: ImageFetcher
) -> None:
    server.put(UPLOAD, Resource(RED, needs_token=True))
    host = f"http://localhost:{server.port}"  # LABEL_STUDIO_HOST, as written into task URLs
    relative = fetcher.fetch_if_changed(UPLOAD)
    on_host = fetcher.fetch_if_changed(host + UPLOAD, label_studio_host=host, known=relative.validator)
    on_url = fetcher.fetch_if_changed(server.url + UPLOAD, known=relative.validator)
    assert on_host.image is None and on_url.image is None and server.requests[UPLOAD] == 1


@pytest.mark.parametrize(
    "path",
    [
        "/data/upload/3/cat.png",  # not a name Label Studio gives: anyone may have put it there
        "/data/upload/3/0A1B2C3D-cat.png",  # uuid4 hex is lower case
        "/data/upload/x/0a1b2c3d-cat.png",
    ],
)
def test_other_label_studio_paths_are_asked_again(server: Server, fetcher: ImageFetcher, path: str) -> None:
    server.put(path, Resource(RED, needs_token=True))
    first = fetcher.fetch_if_changed(path)
    assert first.validator.kind == "sha256"
    assert fetcher.fetch_if_changed(path, known=first.validator).image is None and server.requests[path] == 2


def test_an_upload_with_a_query_is_not_immutable(server: Server, fetcher: ImageFetcher) -> None:
    server.put(UPLOAD, Resource(RED, needs_token=True))
    assert fetcher.fetch_if_changed(UPLOAD + "?v=2").validator.kind == "sha256"


def _never(*args: object, **kwargs: object) -> None:
    raise AssertionError("called although the image is unchanged")


def test_unchanged_local_files_and_data_uris_are_not_read_again(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a.png").write_bytes(RED)
    uri = "data:image/png;base64," + base64.b64encode(RED).decode()
    with _fetcher(server, label_studio_url=None, local_files_root=str(tmp_path)) as fetcher:
        local = fetcher.fetch_if_changed("/data/local-files/?d=a.png")
        data = fetcher.fetch_if_changed(uri)
        for name in ("read_image_file", "decode_image", "decode_data_uri"):
            monkeypatch.setattr(f"backend.images.fetch.{name}", _never)
        assert fetcher.fetch_if_changed("/data/local-files/?d=a.png", known=local.validator).image is None
        assert fetcher.fetch_if_changed(uri, known=data.validator).image is None


def test_local_files_compare_their_stat(server: Server, tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(RED)
    ref = "/data/local-files/?d=a.png"
    with _fetcher(server, label_studio_url=None, local_files_root=str(tmp_path)) as fetcher:  # disk only
        first = fetcher.fetch_if_changed(ref)
        assert _color(first) == (255, 0, 0) and first.validator.kind == "stat"
        assert fetcher.fetch_if_changed(ref, known=first.validator).image is None
        stat = image.stat()
        os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # touched: same bytes
        touched = fetcher.fetch_if_changed(ref, known=first.validator)
        assert _color(touched) == (255, 0, 0) and touched.validator != first.validator
        replacement = tmp_path / "b.png"
        replacement.write_bytes(GREEN)
        os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        replacement.replace(image)  # rewritten atomically, same mtime: a new inode
        rewritten = fetcher.fetch_if_changed(ref, known=touched.validator)
        assert _color(rewritten) == (0, 255, 0) and rewritten.validator != touched.validator


def test_data_uris_compare_their_text(fetcher: ImageFetcher) -> None:
    uri = "data:image/png;base64," + base64.b64encode(RED).decode()
    first = fetcher.fetch_if_changed(uri)
    assert _color(first) == (255, 0, 0)
    assert first.validator == Validator("sha256", hashlib.sha256(uri.encode()).hexdigest())
    assert fetcher.fetch_if_changed(uri, known=first.validator).image is None
    other = "data:image/png;base64," + base64.b64encode(GREEN).decode().rstrip("=")  # padding is optional
    assert _color(fetcher.fetch_if_changed(other, known=first.validator)) == (0, 255, 0)
    assert _color(fetcher.fetch_if_changed("data:," + "".join(f"%{byte:02x}" for byte in RED))) == (255, 0, 0)
    assert fetcher.fetch(uri).size == (8, 6)


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("data:image/png;base64,!!!!", "malformed base64"),
        ("data:image/png;base64", "without the ','"),
        ("data:image/png;base64,AAAA", "not an image"),
        ("data:image/png;base64," + base64.b64encode(b"\0" * 100_001).decode(), "larger than the 100000-byte limit"),
    ],
)
def test_bad_data_uris_are_refused(fetcher: ImageFetcher, uri: str, message: str) -> None:
    with pytest.raises(ImageFetchError, match=message) as info:
        fetcher.fetch_if_changed(uri)
    assert str(info.value).startswith(uri[:100]) and not info.value.retryable


def test_redirects_carry_the_conditional_header(server: Server, fetcher: ImageFetcher) -> None:
    server.put("/moved.png", Resource(RED, etag='"m"'))
    first = fetcher.fetch_if_changed(server.url + "/redirect/moved.png")
    assert first.validator == Validator("etag", '"m"')
    second = fetcher.fetch_if_changed(server.url + "/redirect/moved.png", known=first.validator)
    assert second.image is None and server.headers["/moved.png"]["If-None-Match"] == '"m"'
    assert server.bodies["/moved.png"] == 1


def test_conditional_requests_to_label_studio_keep_its_credentials(server: Server, fetcher: ImageFetcher) -> None:
    ref = "/data/local-files/?d=served.png"  # not on this machine: Label Studio serves it
    server.put("/data/local-files/", Resource(RED, etag='"lf"', needs_token=True))
    first = fetcher.fetch_if_changed(ref)
    assert fetcher.fetch_if_changed(ref, known=first.validator).image is None
    assert server.headers["/data/local-files/"]["Authorization"] == f"Token {TOKEN}"
    assert server.bodies["/data/local-files/"] == 1


def test_conditional_requests_pass_the_outbound_policy(server: Server) -> None:
    url = server.put("/guarded.png", Resource(RED, etag='"g"'))
    with _fetcher(server, policy=OutboundPolicy()) as fetcher, pytest.raises(OutboundRefusedError):
        fetcher.fetch_if_changed(url, known=Validator("etag", '"g"'))
    assert server.requests["/guarded.png"] == 0


def test_a_304_to_a_request_without_a_validator_is_an_error(server: Server, fetcher: ImageFetcher) -> None:
    for known in (None, Validator("sha256", "0" * 64), Validator("immutable", "0" * 64)):
        with pytest.raises(ImageFetchError, match="304 Not Modified to a request that sent no validator"):
            fetcher.fetch_if_changed(server.url + "/always-304", known=known)
    with pytest.raises(ImageFetchError, match="304"):
        fetcher.fetch(server.url + "/always-304")


def test_fetch_is_fetch_if_changed_without_a_known_validator(server: Server, fetcher: ImageFetcher) -> None:
    url = server.put("/same.png", Resource(RED, etag='"s"'))
    fetched = fetcher.fetch_if_changed(url)
    assert fetched.image is not None and fetcher.fetch(url).tobytes() == fetched.image.tobytes()
    assert "If-None-Match" not in server.headers["/same.png"]


@pytest.mark.parametrize(
    "value", ['"abc"', 'W/"x:y"', "Tue, 01 Dec 2026 10:00:00 GMT", "100%:20 %zz", "é\n\t\x00日本", ""]
)
def test_validator_text_round_trips(value: str) -> None:
    validator = Validator("etag", value)
    text = validator.to_text()
    assert text.isascii() and text.isprintable() and " " not in text
    assert Validator.from_text(text) == validator


@pytest.mark.parametrize(
    "text",
    [
        "",
        "etag",
        "unknown:x",
        ":x",
        "etag:a b",
        "etag:%zz",
        "etag:%C3",  # not UTF-8
        "etag:%41",  # not to_text's encoding of "A"
        "sha256:" + "a" * 1018,
        "x" * 5000,
    ],
)
def test_validator_from_text_refuses_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="not a validator"):
        Validator.from_text(text)


def test_validators_are_checked_when_made() -> None:
    with pytest.raises(ValueError, match="unknown validator kind"):
        Validator("md5", "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="over 1024"):
        Validator("etag", "x" * 1020)
