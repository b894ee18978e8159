"""Grounding DINO boxes, then a SAM mask on every box."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

import numpy as np
import torch
from PIL import Image

from backend.pipeline.detector import GroundingDinoDetector
from backend.pipeline.prompts import PromptPlan
from backend.pipeline.segmenter import Segmenter
from backend.pipeline.types import DetectionThresholds, Instance, TextClass


class GroundedSam:
    """The model pipeline: `prepare` once per class set, then `run` per image."""

    def __init__(self, detector: GroundingDinoDetector, segmenter: Segmenter, thresholds: DetectionThresholds) -> None:
        self._detector = detector
        self._segmenter = segmenter
        self._thresholds = thresholds

    def prepare(self, classes: Sequence[TextClass]) -> PromptPlan:
        """Prompt chunks for `classes`; reuse the plan for every image of that class set."""
        return self._detector.prepare(classes)

    def run(self, image: Image.Image, plan: PromptPlan) -> list[Instance]:
        """Instances on `image` (RGB, EXIF already applied), best detection score first.

        Boxes are xyxy pixels of `image`; masks are (H, W) bool; class indexes point into the classes of
        `plan`. SAM does not run when nothing is detected.
        """
        with torch.inference_mode():
            detections = self._detector.detect(image, plan, self._thresholds)
            if not detections:
                return []
            boxes = np.array([detection.box_xyxy for detection in detections], dtype=np.float32)
            masks, scores = self._segmenter.segment(np.asarray(image), boxes)
        return [
            Instance(detection=detection, mask=mask, mask_score=float(score))
            for detection, mask, score in zip(detections, masks, scores, strict=True)
        ]

    def describe(self) -> dict[str, object]:
        """Plain values (str, float, int) that change whenever the models or thresholds change."""
        return {
            "detector": self._detector.describe(),
            "segmenter": self._segmenter.describe(),
            "thresholds": asdict(self._thresholds),
        }
