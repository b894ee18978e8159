"""Model parts built from the tiny random models (tests/tiny_models.py) that several test files use."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForMaskGeneration, AutoModelForZeroShotObjectDetection, AutoProcessor

from backend.pipeline.detector import GroundingDinoDetector
from backend.pipeline.segmenter import HfSamSegmenter
from backend.pipeline.types import ModelSpec
from tests.tiny_models import build_tiny_edgetam, build_tiny_sam2, build_tiny_sam3_tracker, build_tiny_sam_hq

# The tiny builders of the SAM families after SAM v1 (whose tiny model is the session's `tiny_hf_sam_dir`).
SAM_FAMILY_BUILDERS: dict[str, Callable[[Path], Path]] = {
    "sam_hq": build_tiny_sam_hq,
    "sam2": build_tiny_sam2,
    "sam3_tracker": build_tiny_sam3_tracker,
    "edgetam": build_tiny_edgetam,
}


def sam_family_dir(request: pytest.FixtureRequest, tiny_models_dir: Path, family: str) -> Path:
    """The folder of one SAM family's tiny model and processor, built once per session ("sam": the session's
    tiny SamModel, through the `tiny_hf_sam_dir` fixture)."""
    if family == "sam":
        sam_dir: Path = request.getfixturevalue("tiny_hf_sam_dir")
        return sam_dir
    folder = tiny_models_dir / family
    return folder if (folder / "config.json").exists() else SAM_FAMILY_BUILDERS[family](folder)


def tiny_detector(directory: Path) -> GroundingDinoDetector:
    """A GroundingDinoDetector over the Grounding DINO saved in `directory` (eval mode, float32)."""
    model = AutoModelForZeroShotObjectDetection.from_pretrained(directory).eval()
    return GroundingDinoDetector(model, AutoProcessor.from_pretrained(directory))


def hf_segmenter(directory: Path, dtype: torch.dtype = torch.float32, **options: int) -> HfSamSegmenter:
    """An HfSamSegmenter over the SamModel saved in `directory`; `options` are HfSamSegmenter's batch sizes and
    upsample budget (box_batch, image_batch, upsample_budget)."""
    model = AutoModelForMaskGeneration.from_pretrained(directory, dtype=dtype).eval()
    return HfSamSegmenter(model, AutoProcessor.from_pretrained(directory), **options)


def checkpoint_spec(detector: Path, checkpoint: Path, model_type: str = "vit_b") -> ModelSpec:
    """A ModelSpec for the official segment-anything checkpoint path (SAM_CHECKPOINT), `sam` unused."""
    return ModelSpec(detector=str(detector), sam="unused", sam_checkpoint=str(checkpoint), sam_model_type=model_type)


def oom_above(limit: int, size_of: Callable[..., int], sizes: list[int]) -> Callable[[Callable[..., Any]], Any]:
    """Wrap a model call so that it raises CUDA's out-of-memory error when its batch exceeds `limit`;
    `sizes` records every attempted batch size. Stands in for a GPU running out of memory."""

    def wrap(call: Callable[..., Any]) -> Callable[..., Any]:
        def limited(*args: Any, **kwargs: Any) -> Any:
            size = size_of(*args, **kwargs)
            sizes.append(size)
            if size > limit:
                raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate for {size}")
            return call(*args, **kwargs)

        return limited

    return wrap
