"""Fetch a task's image the way Label Studio resolves it, within the outbound policy, a deadline and size caps.

References (task data values) and where they are read from:
- http(s)://...: fetched directly, never with Label Studio credentials unless the URL is one of its media paths.
- /data/upload/..., upload/..., /data/local-files/?d=...: relative to LABEL_STUDIO_URL, with credentials;
  /data/local-files/?d=<rel> is read from disk instead when `local_files_root`/<rel> exists.
- s3://, gs://, gcs://, azure-blob://: through Label Studio's /tasks/<task id>/presign/ redirect.

Every hop (redirects are followed here, at most MAX_REDIRECTS) passes the outbound policy at connect time
(backend/images/network.py). Label Studio's origin is allowed whatever its address for its media paths
(/data/upload/, /data/local-files/, /tasks/<id>/presign/) only, and only those get the credentials; a Label Studio
URL with '.' or '..' path segments is refused. One fetch, all hops and bytes included, ends at `deadline`.
- data: URIs: the image they carry (base64 or percent-encoded), up to max_bytes.

Fetching only what changed (fetch_if_changed, given the Validator an earlier fetch returned):
- Label Studio uploads (/data/upload/<project>/<uuid8>-<name>, relative or on LABEL_STUDIO_URL or the given
  label_studio_host) are "immutable": Label Studio names every upload with a fresh uuid prefix and never rewrites
  one (label_studio/data_import/models.py upload_name_generator), and its file view sends no ETag or
  Last-Modified. The same upload reference again is unchanged without any request (a deleted upload included).
- Local files read from disk: a "stat" validator (mtime in ns, size, inode); unchanged without reading the file.
- data: URIs: the "sha256" of the URI text; unchanged without decoding when it is the same.
- Everything else over HTTP (other URLs, local-files served by Label Studio, cloud URIs through the presign
  redirect): a conditional GET, If-None-Match from an "etag" validator, If-Modified-Since from a
  "last-modified" one, sent on every hop, redirects included, under the same caps, policy, deadline and
  credential rules. 304: unchanged, no body read (a 304 to a request without a validator is an error). A 200
  carrying the known ETag / Last-Modified is unchanged too (a server that ignores If-*), without reading the
  body. Otherwise the body is read and the new validator is the server's ETag (strong or weak, as sent), else its
  Last-Modified, else the "sha256" of the bytes; bytes whose sha256 equals a known "sha256" validator are
  unchanged (nothing decoded). A server that changes an image but keeps its ETag is believed: the validator is
  the server's word.
"""

from __future__ import annotations

import base64
import os
import re
from dataclasses import dataclass, field
from types import TracebackType
from urllib.parse import parse_qs, unquote, urlsplit

import httpx
from PIL import Image

from backend.errors import ImageFetchError, OutboundRefusedError
from backend.images.auth import LabelStudioAuth, request_failure, retryable_status
from backend.images.content import ContentDecoder, OverCapError
from backend.images.decode import decode_data_uri, decode_image, load_image_file, over_byte_cap, read_image_file
from backend.images.network import FetchScope, GuardedBackend, guarded_client
from backend.images.outbound import OutboundPolicy
from backend.images.validators import (
    UPLOAD_PATH,
    Fetched,
    Validator,
    conditional_headers,
    digest_validator,
    header_validator,
    stat_validator,
    upload_validator,
)

__all__ = [
    "FetchOptions",
    "Fetched",
    "ImageFetcher",
    "OutboundPolicy",
    "Validator",
    "decode_image",
    "load_image_file",
]

CLOUD_SCHEMES = ("s3", "gs", "gcs", "azure-blob")
LABEL_STUDIO_PATHS = ("/data/upload/", "/data/local-files/")
_PRESIGN = re.compile(r"/tasks/\d+/presign/?")
MAX_REDIRECTS = 5
MAX_REFERENCE_CHARS = 16_384  # presigned cloud URLs run to a few KB; a data: URI may hold max_bytes (base64)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True, kw_only=True)
class FetchOptions:
    """How images are fetched. Timeouts in seconds (read: longest wait for the next bytes).

    label_studio_url: base URL of Label Studio (may include a path), or None.
    api_key: legacy token or personal access token (JWT), or None.
    max_bytes: cap on the bytes on the wire and on the decoded (Content-Encoding undone) bytes, each;
    max_pixels: cap on width*height.
    local_files_root: Label Studio's LOCAL_FILES_DOCUMENT_ROOT when mounted here, or None.
    policy: the addresses allowed besides public ones; deadline: seconds for one whole fetch.
    """

    label_studio_url: str | None
    api_key: str | None = field(repr=False)  # a credential: never in a message
    connect_timeout: float
    read_timeout: float
    max_bytes: int
    max_pixels: int
    local_files_root: str | None
    policy: OutboundPolicy = field(default_factory=OutboundPolicy)
    deadline: float = 60.0

    def __post_init__(self) -> None:
        timeouts = (self.connect_timeout, self.read_timeout, self.deadline)
        if min(timeouts) <= 0 or min(self.max_bytes, self.max_pixels) <= 0:
            raise ValueError(
                f"timeouts and caps must be positive: connect {self.connect_timeout}, read {self.read_timeout}, "
                f"deadline {self.deadline}, bytes {self.max_bytes}, pixels {self.max_pixels}"
            )


@dataclass(frozen=True, slots=True)
class _Target:
    """A URL to GET, the name messages use for it (the task's reference, never a credential), and its immutable
    validator when it is a Label Studio upload."""

    url: str
    source: str
    immutable: Validator | None = None


@dataclass(frozen=True, slots=True, eq=False)
class _Body:
    """A GET's body and the validator its headers carry, if any."""

    data: bytes
    validator: Validator | None


class ImageFetcher:
    """Fetches task images as RGB PIL images, EXIF orientation applied. Thread-safe; close() when done."""

    def __init__(self, options: FetchOptions) -> None:
        self._options = options
        self._base = options.label_studio_url.rstrip("/") if options.label_studio_url else None
        self._base_url = httpx.URL(self._base) if self._base else None
        self._backend = GuardedBackend(options.policy)
        timeout = httpx.Timeout(options.read_timeout, connect=options.connect_timeout)
        self._client = guarded_client(self._backend, timeout, on_response=_check_location)
        self._auth: LabelStudioAuth | None = None
        if options.api_key and self._base:
            self._auth = LabelStudioAuth(options.api_key, self._base, self._client)

    def fetch(self, ref: str, task_id: int | None = None, label_studio_host: str | None = None) -> Image.Image:
        """The image `ref` names (module docstring), decoded; `task_id` is needed for cloud URIs only.

        label_studio_host: the address Label Studio writes into absolute task URLs (its LABEL_STUDIO_HOST,
        sent in /setup). It may differ from LABEL_STUDIO_URL, the address this worker reaches it at (in
        Docker: localhost vs the service name), so its /data/ URLs are fetched through LABEL_STUDIO_URL.

        Raises ImageFetchError naming `ref` and the cause (OutboundRefusedError when the outbound policy refuses
        it); retryable for timeouts, the deadline, connection errors, 5xx, 408 and 429.
        """
        fetched = self.fetch_if_changed(ref, task_id, label_studio_host)
        if fetched.image is None:  # cannot happen: without a known validator nothing is "unchanged"
            raise ImageFetchError(f"{ref}: no image came back")
        return fetched.image

    def fetch_if_changed(
        self,
        ref: str,
        task_id: int | None = None,
        label_studio_host: str | None = None,
        known: Validator | None = None,
    ) -> Fetched:
        """Like fetch, but an image unchanged since the `known` validator (from an earlier Fetched for this same
        `ref`) comes back as image None, undecoded and often unread (module docstring). The Fetched's validator
        is the one to pass as `known` next time. Raises as fetch does."""
        limit = self._max_data_uri_chars if _is_data_uri(ref) else MAX_REFERENCE_CHARS
        ref = _checked_reference(ref, limit)
        if _is_data_uri(ref):
            return self._data_uri(ref, known)
        ref = _strip_label_studio_origin(ref, label_studio_host)
        local_path = self._local_file(ref)
        if local_path is not None:
            return self._local(local_path, known)
        target = self._resolve(ref, task_id)
        if target.immutable is not None and target.immutable == known:
            return Fetched(None, known)
        body = self._download(target, known)
        if isinstance(body, Validator):  # not modified: nothing read
            return Fetched(None, target.immutable or body)
        digest = digest_validator(body.data)
        validator = target.immutable or body.validator or digest
        if digest == known:
            return Fetched(None, validator)
        return Fetched(decode_image(body.data, self._options.max_pixels, source=target.source), validator)

    def close(self) -> None:
        self._client.close()

    @property
    def _max_data_uri_chars(self) -> int:
        """The longest data: URI that can hold max_bytes (base64), with room for its media type."""
        return max(MAX_REFERENCE_CHARS, -(-self._options.max_bytes // 3) * 4 + 1024)

    def _data_uri(self, ref: str, known: Validator | None) -> Fetched:
        validator = digest_validator(ref.encode())
        if validator == known:
            return Fetched(None, validator)
        return Fetched(decode_data_uri(ref, self._options.max_bytes, self._options.max_pixels), validator)

    def _local(self, path: str, known: Validator | None) -> Fetched:
        """A file under local_files_root; not read when its stat still equals a known "stat" validator."""
        if known is not None and known.kind == "stat":
            try:
                if stat_validator(os.stat(path)) == known:
                    return Fetched(None, known)
            except OSError:
                pass  # read_image_file names the problem
        data, stat = read_image_file(path, self._options.max_bytes)
        return Fetched(decode_image(data, self._options.max_pixels, source=path), stat_validator(stat))

    def __enter__(self) -> ImageFetcher:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _resolve(self, ref: str, task_id: int | None) -> _Target:
        scheme = _scheme(ref)
        if scheme in ("http", "https"):
            return _Target(ref, ref, self._upload_on_label_studio(ref))
        if scheme in CLOUD_SCHEMES:
            if task_id is None:
                raise ImageFetchError(f"{ref}: Label Studio presigns cloud storage URIs per task; no task id given")
            fileuri = base64.urlsafe_b64encode(ref.encode()).decode()
            return _Target(self._on_label_studio(ref, f"/tasks/{task_id}/presign/?fileuri={fileuri}"), ref)
        path = "/data/" + ref.lstrip("/") if ref.startswith(("upload/", "/upload/")) else ref
        if path.startswith(LABEL_STUDIO_PATHS):
            return _Target(self._on_label_studio(ref, path), ref, _upload(path))
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
        if "\x00" in values[-1]:  # os.path would raise ValueError: this task's error, not the chunk's
            raise ImageFetchError(f"{ref}: local-files path contains a NUL byte")
        base = os.path.realpath(root)
        path = os.path.realpath(os.path.join(base, values[-1].lstrip("/")))
        if os.path.commonpath([base, path]) != base:
            raise ImageFetchError(f"{ref}: path leaves the local files root")
        return path if os.path.isfile(path) else None

    def _upload_on_label_studio(self, url: str) -> Validator | None:
        """The immutable validator of an absolute URL naming an upload on LABEL_STUDIO_URL, else None."""
        if self._base is None or self._base_url is None:
            return None
        try:
            parts, parsed = urlsplit(url), httpx.URL(url)
        except (ValueError, httpx.InvalidURL):  # UnicodeError is a ValueError
            return None
        base_path = urlsplit(self._base).path.rstrip("/")
        if not _same_origin(parsed, self._base_url) or not parts.path.startswith(base_path + "/"):
            return None
        return _upload(parts.path[len(base_path) :] + (f"?{parts.query}" if parts.query else ""))

    def _download(self, target: _Target, known: Validator | None = None) -> _Body | Validator:
        """The body at `target`, redirects followed hop by hop, each hop checked and sent the conditional
        headers of `known` (module docstring); the validator that still holds when it is not modified."""
        with self._backend.scope(self._options.deadline) as scope:
            try:
                url, raw = _http_url(target.url, target.source), target.url
                for _ in range(MAX_REDIRECTS + 1):
                    if scope.remaining() <= 0:
                        raise self._past_deadline(target.source)
                    outcome = self._hop(target.source, url, raw, scope, known)
                    if isinstance(outcome, (_Body, Validator)):
                        return outcome
                    url, raw = outcome
            except httpx.TimeoutException as exc:
                if scope.expired:
                    raise self._past_deadline(target.source) from exc
                raise request_failure(target.source, exc) from exc
            except httpx.RequestError as exc:
                raise request_failure(target.source, exc) from exc
        raise ImageFetchError(f"{target.source}: more than {MAX_REDIRECTS} redirects")

    def _hop(
        self, source: str, url: httpx.URL, raw: str, scope: FetchScope, known: Validator | None
    ) -> _Body | Validator | tuple[httpx.URL, str]:
        """GET `url` (`raw`: the text it was parsed from), conditional on `known`: the body, the validator that
        still holds (not modified), or where it redirects to (URL, text)."""
        media = self._label_studio_media(source, url, raw)
        scope.exempt = _origin(url) if media else None
        auth = self._auth if media else None
        conditional = conditional_headers(known)
        try:
            request = self._client.build_request("GET", url, headers=conditional)
            response = self._client.send(request, auth=auth, stream=True)
        except ImageFetchError as exc:  # refused at connect time, or a malformed redirect: named without the source
            raise type(exc)(f"{source}: {exc}", retryable=exc.retryable) from None
        except httpx.InvalidURL as exc:  # a Location that parses alone but not joined to this URL
            raise ImageFetchError(f"{source}: redirect to a malformed URL ({exc})") from None
        except UnicodeError as exc:  # a validator that no header can carry (header_validator keeps none such)
            raise ImageFetchError(f"{source}: a request header could not be encoded ({exc})") from None
        try:
            if response.next_request is not None:
                location = str(response.next_request.url)
                return _http_url(location, f"{source}: redirect to {location}"), response.headers["Location"]
            if response.status_code >= 400:
                raise _status_error(source, response, auth, on_label_studio=media)
            if response.status_code == 304:
                if not conditional or known is None:
                    raise ImageFetchError(f"{source}: HTTP 304 Not Modified to a request that sent no validator")
                return known
            validator = header_validator(response.headers)
            if validator is not None and validator == known:  # a server that ignored If-*: still the same
                return validator
            return _Body(self._read_capped(source, response, scope), validator)
        finally:
            response.close()

    def _label_studio_media(self, source: str, url: httpx.URL, raw: str) -> bool:
        """Whether `url` is one of Label Studio's media paths (allowed whatever its address, with credentials).

        OutboundRefusedError for a Label Studio URL with '.' or '..' segments in `raw`: httpx would resolve them,
        so /data/upload/../../X would be sent as /X.
        """
        if self._base_url is None or not _same_origin(url, self._base_url):
            return False
        sent = url.raw_path.decode("ascii").split("?", 1)[0]  # httpx resolved literal dots, not %2e ones
        if _has_dot_segments(_path_of(raw)) or _has_dot_segments(sent):
            raise OutboundRefusedError(f"{source}: refused: '.' or '..' in the path of a Label Studio URL")
        base_path = self._base_url.path.rstrip("/")
        if not url.path.startswith(base_path + "/"):
            return False
        path = url.path[len(base_path) :]
        return path.startswith(LABEL_STUDIO_PATHS) or _PRESIGN.fullmatch(path) is not None

    def _read_capped(self, source: str, response: httpx.Response, scope: FetchScope) -> bytes:
        """The body, Content-Encoding undone, refused as soon as its declared, wire or decoded size passes max_bytes."""
        cap = self._options.max_bytes
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > cap:
            raise over_byte_cap(source, cap)
        body, wire = bytearray(), 0
        try:
            decoder = ContentDecoder(response.headers.get_list("Content-Encoding", split_commas=True), cap)
            for chunk in response.iter_raw():
                wire += len(chunk)
                if wire > cap:
                    raise OverCapError
                for piece in decoder.feed(chunk):
                    body += piece
                if scope.remaining() <= 0:  # decoding is ours to bound too, not only the waits
                    break
            else:
                for piece in decoder.flush():
                    body += piece
                return bytes(body)
        except OverCapError:
            raise over_byte_cap(source, cap) from None
        except ImageFetchError as exc:  # the decoder's, named without the source
            raise ImageFetchError(f"{source}: {exc}") from None
        raise self._past_deadline(source)

    def _past_deadline(self, source: str) -> ImageFetchError:
        return ImageFetchError(
            f"{source}: not fetched within IMAGE_FETCH_DEADLINE ({self._options.deadline:g} s)", retryable=True
        )


def _checked_reference(ref: object, max_chars: int = MAX_REFERENCE_CHARS) -> str:
    """`ref` if it can name an image at all: a string, not absurdly long, without control characters."""
    if not isinstance(ref, str):
        raise ImageFetchError(f"{str(ref)[:100]}: an image reference must be a string, not {type(ref).__name__}")
    if not ref:
        raise ImageFetchError("empty image reference")
    if len(ref) > max_chars:
        raise ImageFetchError(f"{ref[:100]}...: longer than {max_chars} characters")
    if _CONTROL.search(ref):
        raise ImageFetchError(f"{ascii(ref)[1:-1][:200]}: control character in the image reference")
    try:
        ref.encode()
    except UnicodeEncodeError:
        raise ImageFetchError(f"{ascii(ref)[1:-1][:200]}: not valid Unicode (a lone surrogate)") from None
    return ref


def _is_data_uri(ref: object) -> bool:
    return isinstance(ref, str) and ref[:5].lower() == "data:"


def _upload(path: str) -> Validator | None:
    """The immutable validator when Label Studio path `path` (maybe with a query) names one of its uploads."""
    if UPLOAD_PATH.fullmatch(path) is None or _has_dot_segments(path):
        return None
    return upload_validator(path)


def _http_url(text: str, source: str) -> httpx.URL:
    """`text` as an http(s) URL with a host and a valid port; ImageFetchError naming the problem otherwise."""
    try:
        parts = urlsplit(text)
        port = parts.port
        url = httpx.URL(text)
        host = url.host  # decodes IDNA (UnicodeError for a malformed A-label such as "xn--")
    except (ValueError, httpx.InvalidURL) as exc:  # UnicodeError is a ValueError
        raise ImageFetchError(f"{source}: malformed URL ({exc})") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise ImageFetchError(f"{source}: not an http(s) URL")
    if not host:
        raise ImageFetchError(f"{source}: malformed URL (no host)")
    if port == 0:
        raise ImageFetchError(f"{source}: malformed URL (port 0)")
    return url


def _path_of(text: str) -> str:
    """The path of URL `text` as written (all of `text` when it does not parse)."""
    try:
        return urlsplit(text).path
    except ValueError:
        return text


def _has_dot_segments(path: str) -> bool:
    """Whether `path` has '.' or '..' segments once percent-decoded (a backslash counts as a slash)."""
    segments = unquote(path).replace("\\", "/").split("/")
    return "." in segments or ".." in segments


def _check_location(response: httpx.Response) -> None:
    """httpx response hook: a redirect's Location must parse (httpx would raise a retryable protocol error, or
    a UnicodeError)."""
    if response.has_redirect_location:
        location = response.headers["Location"]
        try:
            _ = httpx.URL(location).host  # decoding the host raises for a malformed IDNA label
        except (httpx.InvalidURL, ValueError) as exc:  # UnicodeError is a ValueError
            raise ImageFetchError(f"redirect to a malformed URL {ascii(location)[:200]} ({exc})") from None


def _scheme(ref: str) -> str:
    try:
        return urlsplit(ref).scheme.lower()
    except ValueError:
        return "http" if ref.lower().startswith(("http:", "https:")) else ""


def _status_error(
    source: str, response: httpx.Response, auth: LabelStudioAuth | None, *, on_label_studio: bool
) -> ImageFetchError:
    status = response.status_code
    message = f"{source}: HTTP {status} {response.reason_phrase}"
    if status in (401, 403):
        message += "; " + _auth_hint(auth, on_label_studio=on_label_studio)
    return ImageFetchError(message, retryable=retryable_status(status))


def _auth_hint(auth: LabelStudioAuth | None, *, on_label_studio: bool) -> str:
    if auth is not None:
        return auth.rejection_hint
    if on_label_studio:
        return "set LABEL_STUDIO_API_KEY (a legacy token or a personal access token) to read Label Studio's files"
    return "Label Studio credentials are only sent to LABEL_STUDIO_URL's media paths, not to this URL"


def _strip_label_studio_origin(ref: str, label_studio_host: str | None) -> str:
    """`ref` without Label Studio's own origin when it names one of its /data/ files, else `ref`."""
    if not label_studio_host or _scheme(ref) not in ("http", "https"):
        return ref
    try:
        parts, url, host = urlsplit(ref), httpx.URL(ref), httpx.URL(label_studio_host)
    except (ValueError, httpx.InvalidURL):  # UnicodeError is a ValueError
        return ref  # a malformed ref is named by the fetch; a malformed host just rewrites nothing
    if _same_origin(url, host) and parts.path.startswith(LABEL_STUDIO_PATHS):
        return parts.path + (f"?{parts.query}" if parts.query else "")
    return ref


def _same_origin(a: httpx.URL, b: httpx.URL) -> bool:
    """Same scheme, host and port (default ports filled in)."""
    return (a.scheme, a.raw_host, _port(a)) == (b.scheme, b.raw_host, _port(b))


def _origin(url: httpx.URL) -> tuple[str, int]:
    """(host, port) as httpcore's connect_tcp receives them."""
    return url.raw_host.decode("ascii"), _port(url) or 0


def _port(url: httpx.URL) -> int | None:
    return url.port or {"http": 80, "https": 443}.get(url.scheme)
