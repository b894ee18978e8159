"""A hook for timing the flow's stages: production passes no timer (or the worker's statistics), the benchmark
passes one that synchronises the device at stage boundaries. Nothing is patched to measure the real code.

Stage names (stable; a stage may enclose others, a timer that wants exclusive times subtracts the inner ones):

- "detector": `GroundingDinoDetector.detect_batch` as a whole (GroundedSam's detection of a group of images),
  enclosing "detector_preprocess" (the image processor's resize + normalise of one image, CPU, on
  PREPROCESS_THREADS threads) and "detector_forward" (one forward of same-size images, host→device copies
  included); the rest is scoring, NMS and boxes to pixels.
- "negatives": negative-phrase suppression of each image's boxes (box IoU, CPU).
- "sam": SAM's work for one image of a stream (the pixels handed to SAM, then every step of the segmenter until
  that image's masks are ready), or for one interactive prompt, enclosing "sam_preprocess" (the processor /
  ResizeLongestSide to SAM's input, CPU; transformers SAM: for a group of images, on a side thread one group
  ahead when PREPROCESS_THREADS > 1), "sam_encoder" (the image encoder; segment-anything: with Sam.preprocess,
  normalise + pad on the device), "sam_decoder" (prompt encoder + mask decoder for a slice of boxes) and
  "sam_upsample" (masks to the image's size and packed, device→host crops included).
- "cleanup": `GroundedSam.postprocess` of one image (clean_mask per mask, then the per-class filters), CPU.

The prediction flow (backend.flow) adds "fetch", "model" and "postprocess" around these.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Protocol


class StageTimer(Protocol):
    """Times one named stage: `with timer.stage("sam_encoder"): ...`. Must be safe to use from several threads."""

    def stage(self, name: str) -> AbstractContextManager[None]: ...


class NoTimer:
    """The timer that measures nothing (the default): one shared, stateless context manager for every stage."""

    _NOTHING: AbstractContextManager[None] = nullcontext()

    def stage(self, name: str) -> AbstractContextManager[None]:
        return self._NOTHING


NO_TIMER: StageTimer = NoTimer()
