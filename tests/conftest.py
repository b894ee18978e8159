"""Session-wide test setup: offline Hugging Face hub, markers by folder, tiny models and a Redis once per session."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Tests never reach the model hub. Set before anything imports huggingface_hub: it reads this once, at import.
os.environ["HF_HUB_OFFLINE"] = "1"

from tests.support.redis import redis_for_tests
from tests.support.tiers import tier_marker
from tests.tiny_models import build_tiny_grounding_dino, build_tiny_hf_sam, build_tiny_sam_checkpoint


@pytest.hookimpl(tryfirst=True)  # before tests/e2e/conftest.py reads the e2e marker to skip on request
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test by the tier folder (directly under tests/) it lives in."""
    for item in items:
        marker = tier_marker(item.path)
        if marker is not None:
            item.add_marker(marker)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """REDIS_URL when set, else one embedded valkey for the session (each test uses its own queue name)."""
    with redis_for_tests() as url:
        yield url


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="session")
def tiny_detector_dir(tiny_models_dir: Path) -> Path:
    """Folder of a tiny random Grounding DINO and its processor (save_pretrained layout)."""
    return build_tiny_grounding_dino(tiny_models_dir / "grounding_dino")


@pytest.fixture(scope="session")
def tiny_hf_sam_dir(tiny_models_dir: Path) -> Path:
    """Folder of a tiny random transformers SamModel and its SamProcessor."""
    return build_tiny_hf_sam(tiny_models_dir / "sam")


@pytest.fixture(scope="session")
def tiny_sam_checkpoint(tiny_models_dir: Path) -> Path:
    """A tiny segment-anything state dict saved with torch.save.

    segment-anything imports torchvision; without it these tests fail, unless ALLOW_NO_TORCHVISION=1
    turns them into visible skips (the official .pth path is then untested on this machine).
    """
    if importlib.util.find_spec("torchvision") is None:
        if os.environ.get("ALLOW_NO_TORCHVISION") == "1":
            pytest.skip("torchvision not installed (ALLOW_NO_TORCHVISION=1): SAM .pth path untested")
        pytest.fail("torchvision is required by segment-anything: pip install -e '.[test]' (see README)")
    return build_tiny_sam_checkpoint(tiny_models_dir / "sam_tiny.pth")
