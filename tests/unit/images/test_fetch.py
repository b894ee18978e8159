"""ImageFetcher against a real HTTP server on loopback standing in for Label Studio and image hosts."""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image

from backend.errors import ImageFetchError
from backend.images.fetch import FetchOptions, ImageFetcher, decode_image, load_image_file
from backend.images.outbound import OutboundPolicy, parse_networks
from tests.support.ports import free_port
from tests.support.serving import serving

LEGACY = "0123456789abcdef0123456789abcdef01234567"
PAT = "eyJhbGciOiJIUzI1NiJ9.eyJ0b2tlbl90eXBlIjoicmVmcmVzaCJ9.c2lnbmF0dXJl"
MAX_BYTES = 200_000
READ_TIMEOUT = 0.3
# These servers listen on loopback, which the outbound policy refuses unless allowed (see test_outbound.py).
LOOPBACK = OutboundPolicy(allow_networks=parse_networks("127.0.0.0/8,::1/128"))


def _encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG claiming width x height: what a decompression bomb looks like before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def _exif_jpeg() -> bytes:
    """40x20 pixels stored, EXIF orientation 6 (rotate 90° clockwise to display): shown 20x40."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(Image.new("RGB", (40, 20), "red"), "JPEG", exif=exif)


PNG = _encode(Image.new("RGB", (64, 48), (10, 200, 30)), "PNG")
RGBA_PNG = _encode(Image.new("RGBA", (5, 7), (1, 2, 3, 128)), "PNG")
JPEG = _encode(Image.new("RGB", (64, 48), "blue"), "JPEG", quality=90)
FILES = {
    "/img.png": PNG,
    "/rgba.png": RGBA_PNG,
    "/img.jpg": JPEG,
    "/exif.jpg": _exif_jpeg(),
    "/truncated.jpg": JPEG[: len(JPEG) // 2],
    "/text": b"<html>definitely not an image</html>",
    "/bomb.png": _png_header_only(30_000, 30_000),  # over twice Pillow's limit: DecompressionBombError
    "/warn-bomb.png": _png_header_only(10_000, 10_000),  # within twice its limit: DecompressionBombWarning
}


@dataclass
class FakeLabelStudio:
    """Server state the tests read and change."""

    port: int = 0
    refreshes: int = 0
    valid_access: set[str] = field(default_factory=set)
    auth_seen: dict[str, str | None] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def issue_access(self) -> str:
        with self.lock:
            self.refreshes += 1
            token = f"eyJaccess-{self.refreshes}"
            self.valid_access.add(token)
        time.sleep(0.05)  # widen the window for concurrent refreshes to pile up
        return token


class Handler(BaseHTTPRequestHandler):
    state: FakeLabelStudio

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/api/token/refresh/" or body.get("refresh") != PAT:
            return self._send(401, b'{"detail":"Token is invalid or expired"}')
        self._send(200, json.dumps({"access": self.state.issue_access()}).encode())

    def do_GET(self) -> None:
        path, query = urlsplit(self.path).path, parse_qs(urlsplit(self.path).query)
        auth = self.headers.get("Authorization")
        self.state.auth_seen[path] = auth
        if path in FILES:
            return self._send(200, FILES[path])
        if path == "/slow":
            time.sleep(READ_TIMEOUT * 4)
            return self._send(200, PNG)
        if path == "/big-declared":
            return self._send(200, b"\0" * 100, length=MAX_BYTES * 10)
        if path == "/big-stream":
            return self._stream_forever()
        if path == "/cut-short":  # the connection closes before the declared body is sent
            return self._send(200, PNG[:10], length=len(PNG))
        if path.startswith("/status/"):
            return self._send(int(path.rsplit("/", 1)[1]), b"nope")
        if path in ("/data/upload/1/legacy.png", "/data/local-files/"):
            return self._send(200, PNG) if auth == f"Token {LEGACY}" else self._send(401, b"")
        if path == "/data/upload/2/pat.png":
            ok = auth is not None and auth.removeprefix("Bearer ") in self.state.valid_access
            return self._send(200, PNG) if ok else self._send(401, b"")
        if path == "/tasks/7/presign/" and auth == f"Token {LEGACY}":
            assert base64.urlsafe_b64decode(query["fileuri"][0]) == b"s3://bucket/cat.png"
            # Presigned URLs live on another origin: the credentials must not follow the redirect.
            return self._send(303, b"", location=f"http://localhost:{self.state.port}/echo-auth.png")
        if path == "/echo-auth.png":
            return self._send(200, PNG)
        self._send(404, b"not found")

    def _send(self, status: int, body: bytes, *, length: int | None = None, location: str | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        if location:
            self.send_header("Location", location)
        self.end_headers()
        self.wfile.write(body)

    def _stream_forever(self) -> None:
        """No Content-Length (HTTP/1.0, ends at close): only the streamed count can stop it."""
        self.send_response(200)
        self.end_headers()
        try:
            for _ in range(MAX_BYTES // 16_384 * 4):
                self.wfile.write(b"\xff" * 16_384)
        except (BrokenPipeError, ConnectionResetError):
            pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # the default 5 drops concurrent connects (seen as connect timeouts)


@pytest.fixture(scope="module")
def server() -> Iterator[FakeLabelStudio]:
    state = FakeLabelStudio()
    handler = type("BoundHandler", (Handler,), {"state": state})
    httpd = _Server(("127.0.0.1", 0), handler)
    state.port = httpd.server_address[1]
    with serving(httpd):
        yield state


def _fetcher(server: FakeLabelStudio, api_key: str | None = LEGACY, **changes: object) -> ImageFetcher:
    options = {
        "label_studio_url": server.url,
        "api_key": api_key,
        "connect_timeout": 1.0,
        "read_timeout": READ_TIMEOUT,
        "max_bytes": MAX_BYTES,
        "max_pixels": 10_000_000,
        "local_files_root": None,
        "policy": LOOPBACK,
    }
    return ImageFetcher(FetchOptions(**{**options, **changes}))


def _error(fetcher: ImageFetcher, ref: str, task_id: int | None = None) -> ImageFetchError:
    with fetcher, pytest.raises(ImageFetchError) as info:
        fetcher.fetch(ref, task_id)
    assert LEGACY not in str(info.value) and PAT not in str(info.value)
    return info.value


@pytest.mark.parametrize(("path", "size"), [("/img.png", (64, 48)), ("/img.jpg", (64, 48)), ("/rgba.png", (5, 7))])
def test_images_come_back_rgb(server: FakeLabelStudio, path: str, size: tuple[int, int]) -> None:
    with _fetcher(server) as fetcher:
        image = fetcher.fetch(server.url + path)
    assert (image.mode, image.size) == ("RGB", size)


def test_exif_orientation_is_applied_as_label_studio_displays_it(server: FakeLabelStudio) -> None:
    with _fetcher(server) as fetcher:
        assert fetcher.fetch(server.url + "/exif.jpg").size == (20, 40)


@pytest.mark.parametrize(
    ("path", "message", "retryable"),
    [
        ("/slow", "timed out", True),
        ("/status/500", "HTTP 500", True),
        ("/status/503", "HTTP 503", True),
        ("/status/429", "HTTP 429", True),
        ("/status/502", "HTTP 502", True),
        ("/status/504", "HTTP 504", True),
        ("/status/408", "HTTP 408", True),
        ("/cut-short", "request failed (RemoteProtocolError", True),
        ("/status/404", "HTTP 404", False),
        ("/status/400", "HTTP 400", False),
        ("/status/403", "HTTP 403", False),
        ("/status/410", "HTTP 410", False),
        ("/big-declared", f"larger than the {MAX_BYTES}-byte limit", False),
        ("/big-stream", f"larger than the {MAX_BYTES}-byte limit", False),
        ("/bomb.png", "too many pixels", False),
        ("/warn-bomb.png", "too many pixels", False),
        ("/text", "not an image", False),
        ("/truncated.jpg", "corrupt or truncated", False),
    ],
)
def test_failures_name_the_url_and_say_whether_to_retry(
    server: FakeLabelStudio, path: str, message: str, retryable: bool
) -> None:
    # A pixel cap above Pillow's own bomb limits, to show those are caught too.
    error = _error(_fetcher(server, max_pixels=10**10), server.url + path)
    assert str(error).startswith(server.url + path) and message in str(error)
    assert error.retryable is retryable


def test_pixel_cap_is_checked_before_decoding(server: FakeLabelStudio) -> None:
    error = _error(_fetcher(server, max_pixels=64 * 48 - 1), server.url + "/img.png")
    assert "64x48 = 3072 pixels is over the 3071 limit" in str(error)


def test_connection_refused_is_retryable() -> None:
    port = free_port()
    options = FetchOptions(
        label_studio_url=None,
        api_key=None,
        connect_timeout=1.0,
        read_timeout=1.0,
        max_bytes=MAX_BYTES,
        max_pixels=10**6,
        local_files_root=None,
        policy=LOOPBACK,
    )
    with ImageFetcher(options) as fetcher, pytest.raises(ImageFetchError) as info:
        fetcher.fetch(f"http://127.0.0.1:{port}/x.png")
    assert info.value.retryable and "request failed (ConnectError" in str(info.value)


@pytest.mark.parametrize("ref", ["/data/upload/1/legacy.png", "upload/1/legacy.png", "/upload/1/legacy.png"])
def test_label_studio_paths_are_fetched_with_the_legacy_token(server: FakeLabelStudio, ref: str) -> None:
    with _fetcher(server) as fetcher:
        assert fetcher.fetch(ref).size == (64, 48)
    assert server.auth_seen["/data/upload/1/legacy.png"] == f"Token {LEGACY}"


def test_credentials_go_to_label_studio_media_paths_only(server: FakeLabelStudio) -> None:
    with _fetcher(server) as fetcher:
        fetcher.fetch(server.url + "/data/upload/1/legacy.png")
        assert server.auth_seen["/data/upload/1/legacy.png"] == f"Token {LEGACY}"
        fetcher.fetch(server.url + "/img.png")  # Label Studio's origin, but not one of its media paths
        assert server.auth_seen["/img.png"] is None
        fetcher.fetch(f"http://localhost:{server.port}/echo-auth.png")
        assert server.auth_seen["/echo-auth.png"] is None


def test_absolute_urls_on_label_studio_host_go_through_label_studio_url(server: FakeLabelStudio) -> None:
    """Label Studio writes LABEL_STUDIO_HOST into synced storage URLs (localhost); the worker reaches it elsewhere."""
    host = f"http://localhost:{server.port}"
    with _fetcher(server) as fetcher:
        fetched = fetcher.fetch(f"{host}/data/upload/1/legacy.png", label_studio_host=host)
        assert fetched.size == (64, 48)
        assert server.auth_seen["/data/upload/1/legacy.png"] == f"Token {LEGACY}"
        error = _error(_fetcher(server), f"{host}/data/upload/1/legacy.png")  # without the host: refused, no token
        assert "only sent to LABEL_STUDIO_URL" in str(error)


def test_rejected_legacy_token_hints_at_token_kinds(server: FakeLabelStudio) -> None:
    error = _error(_fetcher(server, api_key="f" * 40), "/data/upload/1/legacy.png")
    assert "HTTP 401" in str(error) and "legacy token" in str(error) and not error.retryable


def test_missing_api_key_is_named(server: FakeLabelStudio) -> None:
    error = _error(_fetcher(server, api_key=None), "/data/upload/1/legacy.png")
    assert "set LABEL_STUDIO_API_KEY" in str(error)


def test_personal_access_token_is_refreshed_cached_and_refreshed_again_on_401(server: FakeLabelStudio) -> None:
    before = server.refreshes
    with _fetcher(server, api_key=PAT) as fetcher:
        assert fetcher.fetch("/data/upload/2/pat.png").size == (64, 48)
        assert fetcher.fetch("/data/upload/2/pat.png").size == (64, 48)
        assert server.refreshes == before + 1
        assert server.auth_seen["/data/upload/2/pat.png"] == f"Bearer eyJaccess-{before + 1}"
        server.valid_access.clear()  # the 5-minute access token expires
        assert fetcher.fetch("/data/upload/2/pat.png").size == (64, 48)
        assert server.refreshes == before + 2


def test_concurrent_fetches_share_one_refresh(server: FakeLabelStudio) -> None:
    before = server.refreshes
    with _fetcher(server, api_key=PAT) as fetcher, ThreadPoolExecutor(8) as pool:
        sizes = list(pool.map(lambda _: fetcher.fetch("/data/upload/2/pat.png").size, range(8)))
    assert sizes == [(64, 48)] * 8 and server.refreshes == before + 1


def test_rejected_personal_access_token_says_so(server: FakeLabelStudio) -> None:
    other_pat = "eyJ" + PAT[3:-4] + "AAAA"
    error = _error(_fetcher(server, api_key=other_pat), "/data/upload/2/pat.png")
    assert "personal access token" in str(error) and "HTTP 401" in str(error) and not error.retryable
    assert other_pat not in str(error)


def test_cloud_uri_goes_through_presign_without_leaking_credentials(server: FakeLabelStudio) -> None:
    with _fetcher(server) as fetcher:
        assert fetcher.fetch("s3://bucket/cat.png", task_id=7).size == (64, 48)
    assert server.auth_seen["/tasks/7/presign/"] == f"Token {LEGACY}"
    assert server.auth_seen["/echo-auth.png"] is None


def test_cloud_uri_needs_a_task_id(server: FakeLabelStudio) -> None:
    assert "no task id" in str(_error(_fetcher(server), "gs://bucket/cat.png"))


@pytest.mark.parametrize("ref", ["ftp://host/a.png", "/etc/passwd", "image.png"])
def test_unknown_references_are_refused(server: FakeLabelStudio, ref: str) -> None:
    error = _error(_fetcher(server), ref)
    assert "not an http(s) URL" in str(error) and not error.retryable


def test_label_studio_paths_need_label_studio_url(server: FakeLabelStudio) -> None:
    assert "LABEL_STUDIO_URL is not set" in str(_error(_fetcher(server, label_studio_url=None), "/data/upload/1/a.png"))


def test_local_files_are_read_from_disk_under_the_root(server: FakeLabelStudio, tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "sub dir").mkdir(parents=True)
    (root / "sub dir" / "a.jpg").write_bytes(_exif_jpeg())
    (tmp_path / "outside.png").write_bytes(PNG)
    with _fetcher(server, label_studio_url=None, local_files_root=str(root)) as fetcher:
        assert fetcher.fetch("/data/local-files/?d=sub%20dir/a.jpg").size == (20, 40)
    for ref in ("/data/local-files/?d=../outside.png", "/data/local-files/?d=sub%20dir/../../outside.png"):
        assert "leaves the local files root" in str(_error(_fetcher(server, local_files_root=str(root)), ref))


def test_local_files_path_with_a_nul_byte_fails_its_task_only(server: FakeLabelStudio, tmp_path: Path) -> None:
    # os.path raises ValueError on an embedded NUL: it must come out as this task's ImageFetchError.
    for ref in ("/data/local-files/?d=a%00b.png", "/data/local-files/?d=%00"):
        assert "NUL byte" in str(_error(_fetcher(server, local_files_root=str(tmp_path)), ref))


def test_fetch_options_never_show_the_api_key(server: FakeLabelStudio) -> None:
    with _fetcher(server, api_key="SECRET-MARKER-7") as fetcher:
        assert "SECRET-MARKER-7" not in repr(fetcher._options)
    with pytest.raises(ValueError) as error:
        replace(fetcher._options, deadline=0)
    assert "SECRET-MARKER-7" not in str(error.value)


def test_local_files_missing_on_disk_come_from_label_studio(server: FakeLabelStudio, tmp_path: Path) -> None:
    with _fetcher(server, local_files_root=str(tmp_path)) as fetcher:
        assert fetcher.fetch("/data/local-files/?d=elsewhere/a.png").size == (64, 48)
    assert server.auth_seen["/data/local-files/"] == f"Token {LEGACY}"


def test_load_image_file_caps_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(PNG)
    assert load_image_file(path, MAX_BYTES, 10**6).size == (64, 48)
    with pytest.raises(ImageFetchError, match="larger than the 100-byte limit"):
        load_image_file(path, 100, 10**6)
    with pytest.raises(ImageFetchError, match="cannot read"):
        load_image_file(tmp_path / "missing.png", MAX_BYTES, 10**6)


def test_decode_image_names_its_source() -> None:
    with pytest.raises(ImageFetchError, match=r"^upload\.bin: not an image"):
        decode_image(b"GIF89a-but-not-really", 10**6, source="upload.bin")


def test_options_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        FetchOptions(
            label_studio_url=None,
            api_key=None,
            connect_timeout=1.0,
            read_timeout=0.0,
            max_bytes=1,
            max_pixels=1,
            local_files_root=None,
        )
