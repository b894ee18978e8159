"""Fixtures several unit test files share (helpers they import are in tests/support)."""

from __future__ import annotations

from pathlib import Path

import pytest

from backend.pipeline.detector import GroundingDinoDetector
from tests.support.models import tiny_detector


@pytest.fixture(scope="module")
def detector(tiny_detector_dir: Path) -> GroundingDinoDetector:
    """The tiny random Grounding DINO as a detector, one per test module."""
    return tiny_detector(tiny_detector_dir)
