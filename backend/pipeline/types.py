"""Plain data that crosses the pipeline's boundary."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

from backend.class_options import ClassOptions
from backend.packed_mask import PackedMask


@dataclass(frozen=True, slots=True)
class TextClass:
    """One output class and the text phrases that prompt the detector for it.

    `name` is returned untouched (the caller's exact spelling). `phrases` are what the detector reads;
    the pipeline normalises them itself (lower case, '.' and '?' removed, whitespace collapsed).
    """

    name: str
    phrases: tuple[str, ...]
    options: ClassOptions = ClassOptions()


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
    box_score: the score in [0, 1] the box threshold (global or the class's) was applied to, strictly above it:
        Grounding DINO's box score (its best token's, any class); None where that is `score` (SAM 3 alone).
    """

    box_xyxy: tuple[float, float, float, float]
    score: float
    class_index: int
    box_score: float | None = None

    @property
    def threshold_score(self) -> float:
        """The score a per-label `threshold` cuts (kept when strictly above it): box_score, else score."""
        return self.score if self.box_score is None else self.box_score


@dataclass(frozen=True, slots=True)
class Segmented:
    """One image after the models, before cleanup: its detections and SAM's mask for each.

    masks: N PackedMasks of the image as given (H, W); scores: (N,) float32 SAM predicted IoU in [0, 1]
    (SAM 3 alone from text: its instance scores, the detections' own); both None when there are no
    detections (SAM did not run).
    """

    detections: tuple[Detection, ...]
    masks: tuple[PackedMask, ...] | None = field(repr=False)
    scores: npt.NDArray[np.float32] | None = field(repr=False)


@dataclass(frozen=True, slots=True)
class Instance:
    """A detection with its SAM mask.

    mask: PackedMask of the image as given (shape (H, W); `to_array()` for the bool array).
    mask_score: SAM's predicted IoU in [0, 1]. SAM 3 alone from text: its instance score, the same as
    detection.score (so `score` is that score too).
    """

    detection: Detection
    mask: PackedMask = field(repr=False)
    mask_score: float

    @property
    def score(self) -> float:
        """Review score in [0, 1]: geometric mean of the detection score and SAM's predicted IoU.

        Low when either model doubts; monotone in their product. Not the score thresholds cut: that is
        `detection.threshold_score`.
        """
        return math.sqrt(self.detection.score * self.mask_score)


@dataclass(frozen=True, slots=True)
class PromptedMask:
    """SAM's answer to one prompt (a box, or points with an optional box), cleaned up.

    mask: PackedMask of the image as given (H, W). score: SAM's predicted IoU in [0, 1].
    """

    mask: PackedMask = field(repr=False)
    score: float


@dataclass(frozen=True, slots=True)
class PostprocessOptions:
    """What happens between the models and the caller (see postprocess.py and masks.py).

    negative_iou: a box of a negative phrase suppresses a box of its class when their IoU exceeds this.
    dedup_iou: instances of different classes whose masks' IoU exceeds this are one object (1.0: off).
    dedup_score_margin: detection scores at most this far apart are a near tie, won by SAM's predicted IoU.
    fill_holes: holes of at most this many pixels are filled (0: off).
    min_island: mask parts smaller than this many pixels are dropped, the largest part never (0: off).
    smoothing: sigma in pixels of the Gaussian that smooths mask outlines (0: off).
    min_area, max_instances: defaults for `ClassOptions` (max_instances None: no limit).
    """

    negative_iou: float = 0.5
    dedup_iou: float = 0.5
    dedup_score_margin: float = 0.02
    fill_holes: int = 100
    min_island: int = 100
    smoothing: float = 0.0
    min_area: int = 0
    max_instances: int | None = None


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Which models to load and how.

    detector: Hugging Face id or local folder of a Grounding DINO family or SAM 3 checkpoint (architectures.py).
    sam: Hugging Face id or local folder of a transformers SAM family checkpoint; ignored when `sam_checkpoint` is
        set, and both when the detector is a full SAM 3 (its own tracker segments prompts).
    sam_checkpoint: path to an official segment-anything `.pth` state dict; `sam_model_type` names its architecture.
    device: "cpu", "cuda", "cuda:N" (resolved by the caller, never "auto").
    sam_dtype: dtype for SAM and for SAM 3 alone ("float32", "bfloat16", "float16"); a Grounding DINO family
        detector always runs in float32.
    sam_image_batch: images per SAM image-encoder forward when several come at once (transformers SAM only);
        how fast, not what is computed.
    detector_compile: torch.compile the Grounding DINO family detector's forward (DETECTOR_COMPILE); how fast,
        not what is computed.
    """

    detector: str
    sam: str
    sam_checkpoint: str | None = None
    sam_model_type: Literal["vit_h", "vit_l", "vit_b"] = "vit_h"
    device: str = "cpu"
    sam_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    sam_image_batch: int = 1
    detector_compile: bool = False
