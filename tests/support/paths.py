"""Paths of the repository, for tests that start commands from its root or read its files."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
