"""Model parts built from the tiny random models (tests/tiny_models.py) that several test files use."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForMaskGeneration, AutoModelForZeroShotObjectDetection, AutoProcessor

from backend.pipeline.detector import GroundingDinoDetector
from backend.pipeline.segmenter import HfSamSegmenter
from backend.pipeline.types import ModelSpec


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
