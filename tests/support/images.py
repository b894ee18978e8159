"""Test images and the one image server: static files over HTTP, a slow path, and gates that hold requests.

A gate holds the requests it matches (by image name and client address) until the test opens it, so a
test decides when some tasks can finish instead of racing the machine's speed.
"""

from __future__ import annotations

import http.server
import io
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from tests.support.serving import serving

EXIF_ORIENTATION = 0x0112
ROTATE_90_CW = 6  # viewers (browsers, Label Studio) show a W x H file as H x W


@dataclass(frozen=True)
class TestImage:
    """An image file and its size as displayed (EXIF orientation applied)."""

    __test__ = False  # not a pytest test class

    path: Path
    width: int
    height: int


def exif_rotated_jpeg(width: int, height: int) -> tuple[Image.Image, dict[str, object]]:
    """A width x height image and the save options that make it a JPEG with EXIF Orientation=6, which viewers
    show height x width."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATE_90_CW
    return Image.new("RGB", (width, height), (200, 60, 40)), {"exif": exif.tobytes()}


def draw_scene(width: int, height: int, background: tuple[int, int, int]) -> Image.Image:
    """A flat background with a few shapes, so the image is not a single colour."""
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    draw.rectangle((width // 8, height // 6, width // 2, height // 2), fill=(220, 40, 40))
    draw.ellipse((width // 2, height // 2, width - width // 8, height - height // 10), fill=(30, 60, 220))
    return image


def write_image(
    folder: Path,
    name: str,
    width: int,
    height: int,
    background: tuple[int, int, int] = (120, 170, 90),
    *,
    exif_rotated: bool = False,
) -> TestImage:
    """Write `name` (PNG or JPEG by suffix) of `width` x `height` pixels as stored; return it with its displayed size.

    exif_rotated: a JPEG with EXIF Orientation=6, displayed `height` x `width`.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    image = draw_scene(width, height, background)
    if exif_rotated:
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = ROTATE_90_CW
        image.save(path, format="JPEG", exif=exif.tobytes(), quality=90)
        return TestImage(path, height, width)
    image.save(path, format="PNG" if path.suffix == ".png" else "JPEG")
    return TestImage(path, width, height)


SIZES = {  # kind -> (stored width, stored height, EXIF-rotated)
    "landscape": (320, 240, False),
    "portrait": (180, 300, False),
    "wide": (400, 150, False),
    "exif6": (200, 120, True),
}


def image_set(folder: Path, prefix: str, kinds: tuple[str, ...] = tuple(SIZES)) -> list[TestImage]:
    """Images of the shapes users' images come in: landscape and portrait PNGs, a wide JPEG, an EXIF-rotated JPEG."""
    images = []
    for kind in kinds:
        width, height, rotated = SIZES[kind]
        suffix = ".jpg" if kind in ("wide", "exif6") else ".png"
        images.append(write_image(folder, f"{prefix}-{kind}{suffix}", width, height, exif_rotated=rotated))
    return images


# A gate never holds a request longer than this, even if a failed test forgot to open it.
GATE_MAX_HOLD_S = 900.0


@dataclass(frozen=True)
class Gate:
    """Holds the requests `matches(image name, client address)` selects until `open()` (or GATE_MAX_HOLD_S).

    `arrived` is set by the first request held, `clients` collects the addresses of those held.
    """

    matches: Callable[[str, str], bool]
    opened: threading.Event = field(default_factory=threading.Event)
    arrived: threading.Event = field(default_factory=threading.Event)
    clients: set[str] = field(default_factory=set)

    def hold(self, name: str, client: str) -> None:
        """Block the calling request thread while the gate is closed, if it matches."""
        if self.opened.is_set() or not self.matches(name, client):
            return
        self.clients.add(client)
        self.arrived.set()
        self.opened.wait(GATE_MAX_HOLD_S)

    def open(self) -> None:
        self.opened.set()


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET /<name> serves root/<name>; GET /slow/<name> first waits `slow_s` (a slow image host); closed
    gates hold the requests they match."""

    def do_GET(self) -> None:
        server: ImageServer = self.server.owner  # type: ignore[attr-defined]
        name = self.path.rsplit("/", 1)[-1]
        if self.path.startswith("/slow/"):
            time.sleep(server.slow_s)
        for gate in list(server.gates):
            gate.hold(name, self.client_address[0])
        path = server.root / name
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        server.served.append(name)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "image/png" if name.endswith(".png") else "image/jpeg")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up waiting, which is what the slow path is for

    def log_message(self, *args: object) -> None:
        pass


@dataclass
class ImageServer:
    """Static images from `root` over HTTP (absolute image URLs in tasks); /slow/<name> waits `slow_s` first
    (settable while serving)."""

    root: Path
    slow_s: float
    url: str = ""
    gates: list[Gate] = field(default_factory=list)
    served: list[str] = field(default_factory=list)  # the name of every image whose bytes were sent, in order

    def url_for(self, name: str, *, slow: bool = False) -> str:
        return f"{self.url}/slow/{name}" if slow else f"{self.url}/{name}"

    def add(self, name: str, image: Image.Image, **save_kwargs: object) -> str:
        """Save `image` under `name` (PNG or JPEG by suffix) and return its absolute URL."""
        buffer = io.BytesIO()
        image.save(buffer, format="PNG" if name.endswith(".png") else "JPEG", **save_kwargs)
        (self.root / name).write_bytes(buffer.getvalue())
        return self.url_for(name)

    @contextmanager
    def holding(self, matches: Callable[[str, str], bool]) -> Iterator[Gate]:
        """A closed gate for the block: it opens when the test says, and at the latest when the block exits
        (whatever way), so a held request never outlives a failed test."""
        gate = Gate(matches)
        self.gates.append(gate)
        try:
            yield gate
        finally:
            gate.open()
            self.gates.remove(gate)


@contextmanager
def serve_images(root: Path, slow_s: float, host: str = "127.0.0.1") -> Iterator[ImageServer]:
    """Serve `root` (created if missing) on `host` (a free port) until the block ends."""
    root.mkdir(parents=True, exist_ok=True)
    state = ImageServer(root, slow_s)
    httpd = http.server.ThreadingHTTPServer((host, 0), _Handler)
    httpd.owner = state  # type: ignore[attr-defined]
    httpd.daemon_threads = True
    with serving(httpd) as url:
        state.url = url
        yield state
