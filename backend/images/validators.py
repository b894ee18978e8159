"""Validators: how to tell later, cheaply, whether the image behind a reference changed (policy in fetch.py).

Pure functions and data: HTTP headers in and out, file stats and digests; no I/O.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, cast, get_args
from urllib.parse import quote, unquote

from PIL import Image

ValidatorKind = Literal["immutable", "etag", "last-modified", "stat", "sha256"]
KINDS: tuple[str, ...] = get_args(ValidatorKind)
MAX_VALIDATOR_CHARS = 1024  # of to_text(): longer ETag / Last-Modified headers are not used (sha256 instead)
# Label Studio names every upload <project>/<first 8 hex digits of a uuid4>-<file name> and never rewrites one.
UPLOAD_PATH = re.compile(r"/data/upload/\d+/[0-9a-f]{8}-[^/?#\\]+")


@dataclass(frozen=True, slots=True)
class Validator:
    """How to tell later, cheaply, whether the image behind a reference changed.

    immutable: sha256 hex of the Label Studio upload path (never rewritten: no request needed);
    etag / last-modified: the server's ETag (strong or weak, quotes kept) or Last-Modified header, as sent;
    stat: "<st_mtime_ns>:<st_size>:<st_ino>" of a local file; sha256: hex digest of the image bytes (of the URI
    text for a data: URI). ValueError for an unknown kind, a non-string value, or a to_text() over
    MAX_VALIDATOR_CHARS.
    """

    kind: ValidatorKind
    value: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown validator kind {str(self.kind)[:40]!r} (one of {', '.join(KINDS)})")
        if not isinstance(self.value, str):
            raise ValueError(f"a validator's value is a string, not {type(self.value).__name__}")
        if len(self.to_text()) > MAX_VALIDATOR_CHARS:
            raise ValueError(f"validator text over {MAX_VALIDATOR_CHARS} characters")

    def to_text(self) -> str:
        """ "<kind>:<value percent-encoded>": printable ASCII without spaces, ':' only after the kind."""
        return f"{self.kind}:{quote(self.value, safe='')}"

    @classmethod
    def from_text(cls, text: str) -> Validator:
        """The validator to_text() wrote; ValueError for anything else (garbage, unknown kind, over 1024 chars)."""
        if not isinstance(text, str) or len(text) > MAX_VALIDATOR_CHARS:
            raise ValueError(f"not a validator: not a string of at most {MAX_VALIDATOR_CHARS} characters")
        kind, colon, quoted = text.partition(":")
        if not colon or kind not in KINDS:
            raise ValueError(f"not a validator: {text[:60]!r} (expected <kind>:<value>, kinds {', '.join(KINDS)})")
        try:
            value = unquote(quoted, errors="strict")
        except UnicodeDecodeError:
            raise ValueError(f"not a validator: {text[:60]!r} (value is not UTF-8)") from None
        if quote(value, safe="") != quoted:  # only to_text()'s own encoding is accepted
            raise ValueError(f"not a validator: {text[:60]!r} (value not written by to_text)")
        return cls(cast(ValidatorKind, kind), value)


@dataclass(frozen=True, slots=True, eq=False)
class Fetched:
    """What fetch_if_changed found behind a reference.

    image: the decoded RGB image, or None when it is unchanged since the `known` validator (nothing decoded);
    validator: the validator of what is now behind the reference (to pass as `known` next time).
    """

    image: Image.Image | None
    validator: Validator


def digest_validator(data: bytes) -> Validator:
    """The sha256 validator of `data` (image bytes, or a data: URI's text encoded as UTF-8)."""
    return Validator("sha256", hashlib.sha256(data).hexdigest())


def upload_validator(path: str) -> Validator:
    """The immutable validator of Label Studio upload `path` (/data/upload/..., as UPLOAD_PATH matches)."""
    return Validator("immutable", hashlib.sha256(path.encode()).hexdigest())


def stat_validator(stat: os.stat_result) -> Validator:
    """The stat validator of a local file: modification time (ns), size and inode."""
    return Validator("stat", f"{stat.st_mtime_ns}:{stat.st_size}:{stat.st_ino}")


def conditional_headers(known: Validator | None) -> dict[str, str]:
    """The If-* request headers that ask a server to answer 304 when `known` still holds ({} for other kinds)."""
    if known is None:
        return {}
    if known.kind == "etag":
        return {"If-None-Match": known.value}
    if known.kind == "last-modified":
        return {"If-Modified-Since": known.value}
    return {}


def header_validator(headers: Mapping[str, str]) -> Validator | None:
    """The response's ETag (strong or weak, as sent), else its Last-Modified, else None (also for values too
    long for a validator, empty, or not printable ASCII: a header sent back must encode, and httpx refuses other
    text in a request header)."""
    for name, kind in (("ETag", "etag"), ("Last-Modified", "last-modified")):
        value = headers.get(name, "").strip()
        sendable = value.isascii() and value.isprintable()
        if value and sendable and len(quote(value, safe="")) + len(kind) + 1 <= MAX_VALIDATOR_CHARS:
            return Validator(cast(ValidatorKind, kind), value)
    return None
