"""Session-wide test setup: offline Hugging Face hub, tiny models built once per session."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

# Tests never reach the model hub. Set before anything imports huggingface_hub: it reads this once, at import.
os.environ["HF_HUB_OFFLINE"] = "1"

from tests.tiny_models import build_tiny_grounding_dino, build_tiny_hf_sam, build_tiny_sam_checkpoint


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
