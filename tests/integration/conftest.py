"""Fixtures for integration tests: backend processes, tiny-model environments, an image server.

redis_url, which other tiers use too, is in tests/conftest.py.

The helpers behind them live in tests/support; tests import those, never this file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.images import ImageServer, serve_images
from tests.support.processes import Processes, tiny_backend_env

# /slow/<name> images of the image_server fixture take this long (a test may change `image_server.slow_s`).
SLOW_IMAGE_S = 30.0


@pytest.fixture()
def model_env(tiny_detector_dir: Path, tiny_hf_sam_dir: Path) -> dict[str, str]:
    """Environment for backend processes: tiny random models, CPU, offline, a fresh queue per test."""
    return tiny_backend_env(tiny_detector_dir, tiny_hf_sam_dir)


@pytest.fixture()
def processes(tmp_path: Path) -> Iterator[Processes]:
    """Starts backend commands (logs in tmp_path); every one is stopped at teardown."""
    procs = Processes(tmp_path)
    yield procs
    procs.stop_all()


@pytest.fixture()
def image_server(tmp_path: Path) -> Iterator[ImageServer]:
    """Images added with `image_server.add(name, image)` over http://127.0.0.1; /slow/<name> waits SLOW_IMAGE_S."""
    with serve_images(tmp_path / "images", slow_s=SLOW_IMAGE_S) as server:
        yield server
