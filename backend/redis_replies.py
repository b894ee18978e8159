"""Redis replies as Python values: this project's clients do not decode responses, so strings come as bytes."""

from __future__ import annotations


def text(value: object) -> str:
    """A string reply (bytes, decoded as UTF-8; or str) as str; TypeError for any other reply."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, str):
        return value
    raise TypeError(f"expected a Redis string reply, got {type(value).__name__}")
