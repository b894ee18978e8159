"""Bytes, files or data: URIs → RGB images as Label Studio displays them, within byte and pixel caps."""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import warnings
from urllib.parse import unquote_to_bytes

from PIL import Image, ImageOps, UnidentifiedImageError

from backend.errors import ImageFetchError

# What browsers (hence Label Studio) show, plus TIFF; Pillow's rarer decoders are never reached.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")


def decode_image(data: bytes, max_pixels: int, *, source: str = "image bytes") -> Image.Image:
    """Decode `data` into an RGB image with its EXIF orientation applied (ImageOps.exif_transpose).

    The pixel count (width*height) is checked from the header before any pixel is decoded; Pillow's own
    decompression-bomb guard is turned into the same error. `source` names the image in messages.
    Raises ImageFetchError (retryable=False): not an image, corrupt or truncated, over `max_pixels`.
    """
    try:
        # Catching Pillow's bomb *warning* needs a filter; it is scoped to this block.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=FORMATS) as image:
                _check_pixels(image.size, max_pixels, source)
                upright = ImageOps.exif_transpose(image)
        return upright if upright.mode == "RGB" else upright.convert("RGB")
    except UnidentifiedImageError as exc:
        raise ImageFetchError(f"{source}: not an image ({', '.join(FORMATS)} are read)") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageFetchError(f"{source}: too many pixels ({exc})") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageFetchError(f"{source}: corrupt or truncated image ({exc})") from exc


def load_image_file(path: str | os.PathLike[str], max_bytes: int, max_pixels: int) -> Image.Image:
    """Read and decode an image file (see decode_image); reading stops past `max_bytes` and the file is refused."""
    return decode_image(read_image_file(path, max_bytes)[0], max_pixels, source=os.fspath(path))


def read_image_file(path: str | os.PathLike[str], max_bytes: int) -> tuple[bytes, os.stat_result]:
    """The bytes of a file and its stat as of the open (fstat: the file read, even if renamed over meanwhile);
    reading stops past `max_bytes` and the file is refused."""
    try:
        with open(path, "rb") as file:
            stat = os.fstat(file.fileno())
            data = file.read(max_bytes + 1)
    except OSError as exc:
        raise ImageFetchError(f"{os.fspath(path)}: cannot read ({exc.strerror or exc})") from exc
    if len(data) > max_bytes:
        raise over_byte_cap(os.fspath(path), max_bytes)
    return data, stat


def decode_data_uri(uri: str, max_bytes: int, max_pixels: int) -> Image.Image:
    """The image a data: URI carries (see data_uri_bytes and decode_image); messages name its first 100 characters."""
    source = uri if len(uri) <= 100 else uri[:100] + "..."
    return decode_image(data_uri_bytes(uri, max_bytes, source=source), max_pixels, source=source)


def data_uri_bytes(uri: str, max_bytes: int, *, source: str = "data: URI") -> bytes:
    """The bytes a data: URI (RFC 2397) carries, decoded as browsers do: percent-decoded, then base64 when the
    media type ends in ";base64" (ASCII whitespace ignored, padding optional). Refused over `max_bytes`."""
    header, comma, payload = uri.partition(",")
    if not comma:
        raise ImageFetchError(f"{source}: a data: URI without the ',' before its data")
    body = unquote_to_bytes(payload)
    if header.rsplit(";", 1)[-1].strip().lower() == "base64":
        compact = re.sub(rb"[\t\n\f\r ]", b"", body).rstrip(b"=")
        try:
            body = base64.b64decode(compact + b"=" * (-len(compact) % 4), validate=True)
        except binascii.Error as exc:
            raise ImageFetchError(f"{source}: a data: URI with malformed base64 ({exc})") from None
    if len(body) > max_bytes:
        raise over_byte_cap(source, max_bytes)
    return body


def over_byte_cap(source: str, max_bytes: int) -> ImageFetchError:
    """The error for an image larger than `max_bytes` (not retryable: it will not shrink)."""
    return ImageFetchError(f"{source}: larger than the {max_bytes}-byte limit")


def _check_pixels(size: tuple[int, int], max_pixels: int, source: str) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageFetchError(f"{source}: {width}x{height} = {width * height} pixels is over the {max_pixels} limit")
