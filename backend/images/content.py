"""Content-Encoding decoded incrementally within a byte cap (no decompression bombs).

Image fetches ask for `Accept-Encoding: identity`; a server that encodes anyway gets its gzip / deflate layers
(any stack of them, e.g. "gzip, gzip", up to MAX_LAYERS) undone here, piece by piece: no layer ever holds or
produces more than CHUNK bytes at once, and each layer's total output is capped, so a few kilobytes that would
inflate to gigabytes stop at the cap. Other encodings (br, zstd, compress, unknown) are refused.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence

from backend.errors import ImageFetchError

CHUNK = 64 * 1024
MAX_LAYERS = 3
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


class OverCapError(Exception):
    """A layer's output passed the cap (the caller turns it into its over-the-limit error)."""


class _Layer:
    """One gzip or deflate layer. HTTP's "deflate" is zlib-wrapped, but some servers send raw deflate: like
    browsers (and httpx), a stream that is not zlib from its first byte is read as raw deflate."""

    def __init__(self, coding: str, cap: int) -> None:
        self._coding = coding
        self._inflate = zlib.decompressobj(_WBITS[coding])
        self._cap = cap
        self._produced = 0
        self._fed = False

    def feed(self, data: bytes) -> Iterator[bytes]:
        """The output for `data` (b"" drains what is left), in pieces of at most CHUNK bytes."""
        while not self._inflate.eof:
            piece = self._inflate_piece(data)
            data = self._inflate.unconsumed_tail
            self._produced += len(piece)
            if self._produced > self._cap:
                raise OverCapError
            if piece:
                yield piece
            if not data and len(piece) < CHUNK:
                return

    def _inflate_piece(self, data: bytes) -> bytes:
        first, self._fed = not self._fed, True
        try:
            return self._inflate.decompress(data, CHUNK)
        except zlib.error as exc:
            if first and self._coding == "deflate":
                self._inflate = zlib.decompressobj(-zlib.MAX_WBITS)
                return self._inflate_piece(data)
            raise ImageFetchError(f"corrupt {self._coding} Content-Encoding ({exc})") from None


class ContentDecoder:
    """Undoes a response's Content-Encoding (the header's codings in the order they were applied)."""

    def __init__(self, codings: Sequence[str], cap: int) -> None:
        names = [coding.strip().lower() for coding in codings]
        names = [name for name in names if name and name != "identity"]
        unknown = [name for name in names if name not in _WBITS]
        if unknown:
            raise ImageFetchError(f"unsupported Content-Encoding {unknown[0]!r} (gzip and deflate are decoded)")
        if len(names) > MAX_LAYERS:
            raise ImageFetchError(f"Content-Encoding has {len(names)} layers; at most {MAX_LAYERS} are decoded")
        self._layers = [_Layer(name, cap) for name in reversed(names)]  # the last applied is undone first

    def feed(self, data: bytes) -> Iterator[bytes]:
        """Decoded bytes of the next `data` from the wire, as they come."""
        return self._through(0, data)

    def flush(self) -> Iterator[bytes]:
        """What the layers still hold once the wire is done."""
        for index in range(len(self._layers)):
            for piece in self._layers[index].feed(b""):
                yield from self._through(index + 1, piece)

    def _through(self, index: int, data: bytes) -> Iterator[bytes]:
        if index == len(self._layers):
            yield data
            return
        for piece in self._layers[index].feed(data):
            yield from self._through(index + 1, piece)
