"""Fetch a task's image the way Label Studio resolves it, within timeouts and size caps.

References (task data values) and where they are read from:
- http(s)://...: fetched directly; Label Studio credentials only when the origin is LABEL_STUDIO_URL's.
- /data/upload/..., upload/..., /data/local-files/?d=...: relative to LABEL_STUDIO_URL, with credentials;
  /data/local-files/?d=<rel> is read from disk instead when `local_files_root`/<rel> exists.
- s3://, gs://, gcs://, azure-blob://: through Label Studio's /tasks/<task id>/presign/ redirect.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from types import TracebackType
from urllib.parse import parse_qs, urlsplit

import httpx
from PIL import Image

from backend.errors import ImageFetchError
from backend.images.auth import LabelStudioAuth, request_failure
from backend.images.decode import decode_image, load_image_file, over_byte_cap

__all__ = ["FetchOptions", "ImageFetcher", "decode_image", "load_image_file"]

CLOUD_SCHEMES = ("s3", "gs", "gcs", "azure-blob")
LABEL_STUDIO_PATHS = ("/data/upload/", "/data/local-files/")
# Worth retrying besides 5xx: Label Studio or a proxy asking to come back later.
_RETRYABLE_STATUS = frozenset({408, 429})


@dataclass(frozen=True, slots=True, kw_only=True)
class FetchOptions:
    """How images are fetched. Timeouts in seconds (read: longest wait for the next bytes).

    label_studio_url: base URL of Label Studio (may include a path), or None.
    api_key: legacy token or personal access token (JWT), or None.
    max_bytes: cap on the downloaded (decoded transfer) size; max_pixels: cap on width*height.
    local_files_root: Label Studio's LOCAL_FILES_DOCUMENT_ROOT when mounted here, or None.
    """

    label_studio_url: str | None
    api_key: str | None
    connect_timeout: float
    read_timeout: float
    max_bytes: int
    max_pixels: int
    local_files_root: str | None

    def __post_init__(self) -> None:
        if min(self.connect_timeout, self.read_timeout) <= 0 or min(self.max_bytes, self.max_pixels) <= 0:
            raise ValueError(f"timeouts and caps must be positive: {self}")


@dataclass(frozen=True, slots=True)
class _Target:
    """A URL to GET and the name messages use for it (the task's reference, never a credential)."""

    url: str
    source: str


class ImageFetcher:
    """Fetches task images as RGB PIL images, EXIF orientation applied. Thread-safe; close() when done."""

    def __init__(self, options: FetchOptions) -> None:
        self._options = options
        self._base = options.label_studio_url.rstrip("/") if options.label_studio_url else None
        timeout = httpx.Timeout(options.read_timeout, connect=options.connect_timeout)
        # Presigned cloud URLs arrive as redirects; httpx drops Authorization on cross-origin redirects.
        self._client = httpx.Client(timeout=timeout, follow_redirects=True)
        self._auth: LabelStudioAuth | None = None
        if options.api_key and self._base:
            self._auth = LabelStudioAuth(options.api_key, self._base, self._client)

    def fetch(self, ref: str, task_id: int | None = None, label_studio_host: str | None = None) -> Image.Image:
        """The image `ref` names (module docstring), decoded; `task_id` is needed for cloud URIs only.

        label_studio_host: the address Label Studio writes into absolute task URLs (its LABEL_STUDIO_HOST,
        sent in /setup). It may differ from LABEL_STUDIO_URL, the address this worker reaches it at (in
        Docker: localhost vs the service name), so its /data/ URLs are fetched through LABEL_STUDIO_URL.

        Raises ImageFetchError naming `ref` and the cause; retryable for timeouts, connection errors,
        5xx, 408 and 429.
        """
        ref = _strip_label_studio_origin(ref, label_studio_host)
        local_path = self._local_file(ref)
        if local_path is not None:
            return load_image_file(local_path, self._options.max_bytes, self._options.max_pixels)
        target = self._resolve(ref, task_id)
        return decode_image(self._download(target), self._options.max_pixels, source=target.source)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ImageFetcher:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _resolve(self, ref: str, task_id: int | None) -> _Target:
        scheme = urlsplit(ref).scheme.lower()
        if scheme in ("http", "https"):
            return _Target(ref, ref)
        if scheme in CLOUD_SCHEMES:
            if task_id is None:
                raise ImageFetchError(f"{ref}: Label Studio presigns cloud storage URIs per task; no task id given")
            fileuri = base64.urlsafe_b64encode(ref.encode()).decode()
            return _Target(self._on_label_studio(ref, f"/tasks/{task_id}/presign/?fileuri={fileuri}"), ref)
        path = "/data/" + ref.lstrip("/") if ref.startswith(("upload/", "/upload/")) else ref
        if path.startswith(LABEL_STUDIO_PATHS):
            return _Target(self._on_label_studio(ref, path), ref)
        raise ImageFetchError(
            f"{ref}: not an http(s) URL, a Label Studio path ({', '.join(LABEL_STUDIO_PATHS)}, upload/) "
            f"or a cloud storage URI ({', '.join(s + '://' for s in CLOUD_SCHEMES)})"
        )

    def _on_label_studio(self, ref: str, path: str) -> str:
        if self._base is None:
            raise ImageFetchError(f"{ref}: a Label Studio file, but LABEL_STUDIO_URL is not set")
        return self._base + path

    def _local_file(self, ref: str) -> str | None:
        """The file a /data/local-files/?d= reference names under local_files_root, if it exists there."""
        root = self._options.local_files_root
        if root is None or not ref.startswith("/data/local-files/"):
            return None
        # Like Label Studio's view: the last `d` wins and is always relative to the root.
        values = parse_qs(urlsplit(ref).query).get("d")
        if not values:
            raise ImageFetchError(f"{ref}: local-files URL without a ?d= path")
        base = os.path.realpath(root)
        path = os.path.realpath(os.path.join(base, values[-1].lstrip("/")))
        if os.path.commonpath([base, path]) != base:
            raise ImageFetchError(f"{ref}: path leaves the local files root")
        return path if os.path.isfile(path) else None

    def _download(self, target: _Target) -> bytes:
        try:
            on_label_studio = self._base is not None and _same_origin(target.url, self._base)
            auth = self._auth if on_label_studio else None
            with self._client.stream("GET", target.url, auth=auth) as response:
                if response.status_code >= 400:
                    raise _status_error(target.source, response, auth, on_label_studio=on_label_studio)
                return self._read_capped(target, response)
        except httpx.RequestError as exc:
            raise request_failure(target.source, exc) from exc
        except httpx.InvalidURL as exc:
            raise ImageFetchError(f"{target.source}: invalid URL ({exc})") from exc

    def _read_capped(self, target: _Target, response: httpx.Response) -> bytes:
        """The body, refused as soon as its declared or streamed size passes max_bytes."""
        cap = self._options.max_bytes
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > cap:
            raise over_byte_cap(target.source, cap)
        body = bytearray()
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) > cap:
                raise over_byte_cap(target.source, cap)
        return bytes(body)


def _status_error(
    source: str, response: httpx.Response, auth: LabelStudioAuth | None, *, on_label_studio: bool
) -> ImageFetchError:
    status = response.status_code
    message = f"{source}: HTTP {status} {response.reason_phrase}"
    if status in (401, 403):
        message += "; " + _auth_hint(auth, on_label_studio=on_label_studio)
    return ImageFetchError(message, retryable=status >= 500 or status in _RETRYABLE_STATUS)


def _auth_hint(auth: LabelStudioAuth | None, *, on_label_studio: bool) -> str:
    if auth is not None:
        return auth.rejection_hint
    if on_label_studio:
        return "set LABEL_STUDIO_API_KEY (a legacy token or a personal access token) to read Label Studio's files"
    return "Label Studio credentials are only sent to LABEL_STUDIO_URL's host, not to this one"


def _strip_label_studio_origin(ref: str, label_studio_host: str | None) -> str:
    """`ref` without Label Studio's own origin when it names one of its /data/ files, else `ref`."""
    if not label_studio_host or urlsplit(ref).scheme.lower() not in ("http", "https"):
        return ref
    parts = urlsplit(ref)
    if _same_origin(ref, label_studio_host) and parts.path.startswith(LABEL_STUDIO_PATHS):
        return parts.path + (f"?{parts.query}" if parts.query else "")
    return ref


def _same_origin(url: str, base: str) -> bool:
    """Same scheme, host and port (default ports filled in)."""
    a, b = httpx.URL(url), httpx.URL(base)
    return (a.scheme, a.host, _port(a)) == (b.scheme, b.host, _port(b))


def _port(url: httpx.URL) -> int | None:
    return url.port or {"http": 80, "https": 443}.get(url.scheme)
