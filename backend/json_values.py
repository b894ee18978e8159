"""Reading values out of parsed JSON (events, messages, results), where bool is an int subclass but no number."""

from __future__ import annotations


def json_int(value: object) -> int | None:
    """`value` when it is a JSON integer (an int, not a bool), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None
