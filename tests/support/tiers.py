"""Test tiers by folder: a test under tests/<folder>/ of a tier carries that tier's marker (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
# Folder directly under tests/ → the marker its tests carry; `-m "not integration and not e2e"` runs what needs
# no processes of its own.
TIER_MARKERS = {"integration": "integration", "e2e": "e2e", "inprocess": "inprocess"}


def tier_marker(path: Path) -> str | None:
    """The marker of the tier folder `path` lies in; None outside the tier folders (and outside tests/)."""
    try:
        parts = path.resolve().relative_to(TESTS).parts
    except ValueError:
        return None
    return TIER_MARKERS.get(parts[0]) if len(parts) > 1 else None
