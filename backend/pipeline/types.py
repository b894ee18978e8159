"""Plain data that crosses the pipeline's boundary."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np


@dataclass(frozen=True, slots=True)
class TextClass:
    """One output class and the text phrases that prompt the detector for it.

    `name` is returned untouched (the caller's exact spelling). `phrases` are what the detector reads;
    the pipeline normalises them itself (lower case, '.' and '?' removed, whitespace collapsed).
    """

    name: str
    phrases: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DetectionThresholds:
    """Detector cut-offs. `box` applies to the box's best class score, `text` to its chosen class's score."""

    box: float = 0.3
    text: float = 0.25
    max_detections: int = 100
    nms_iou: float = 0.7


@dataclass(frozen=True, slots=True)
class Detection:
    """One detector box.

    box_xyxy: (x1, y1, x2, y2) in pixels of the image as given (EXIF already applied), clipped to it.
    score: the chosen class's score in [0, 1].
    class_index: index into the `TextClass` sequence the detector was prompted with.
    """

    box_xyxy: tuple[float, float, float, float]
    score: float
    class_index: int


@dataclass(frozen=True, slots=True)
class Instance:
    """A detection with its SAM mask.

    mask: bool array, shape (H, W) of the image as given.
    mask_score: SAM's predicted IoU in [0, 1].
    """

    detection: Detection
    mask: np.ndarray = field(repr=False)
    mask_score: float


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Which models to load and how.

    detector: Hugging Face id or local folder of a Grounding DINO checkpoint (transformers Auto classes).
    sam: Hugging Face id or local folder of a transformers SAM checkpoint; ignored when `sam_checkpoint` is set.
    sam_checkpoint: path to an official segment-anything `.pth` state dict; `sam_model_type` names its architecture.
    device: "cpu", "cuda", "cuda:N" (resolved by the caller, never "auto").
    sam_dtype: dtype for SAM ("float32", "bfloat16", "float16"); the detector always runs in float32.
    """

    detector: str
    sam: str
    sam_checkpoint: str | None = None
    sam_model_type: Literal["vit_h", "vit_l", "vit_b"] = "vit_h"
    device: str = "cpu"
    sam_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
