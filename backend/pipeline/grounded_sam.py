"""Detection from text, a mask per object, then cleanup; and SAM alone for interactive prompts.

Two kinds of detector: a box detector (Grounding DINO: boxes, then SAM decodes a mask on every box) or a mask
detector (SAM 3 from text: its instances come with their masks, no second SAM pass; the segmenter then only
answers interactive prompts). Everything after the models (negatives, cleanup, per-class filters) is the same.

SAM's image embeddings can be kept and reused (backend.pipeline.embeddings): `encode` gives one image's,
`segment_points` takes it (or the image), `stream` takes those at hand (`known`) and hands out those it computes
(`keep`); `segmenter_device` / `segmenter_dtype` say where and in what dtype a stored one must be brought back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, replace
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

from backend.packed_mask import PackedMask
from backend.pipeline.embeddings import ImageEmbedding
from backend.pipeline.masks import clean_mask
from backend.pipeline.negatives import ClassPlan, build_class_plan, suppress_negatives, unsuppressed
from backend.pipeline.postprocess import apply_filters
from backend.pipeline.segmenter import Masks, Segmenter
from backend.pipeline.shapes import sam_input
from backend.pipeline.timing import NO_TIMER, StageTimer
from backend.pipeline.types import (
    Detection,
    DetectionThresholds,
    Instance,
    PostprocessOptions,
    PromptedMask,
    Segmented,
    TextClass,
)

Plan = TypeVar("Plan")
# Per image: its kept SAM embedding or None; and who is handed each embedding SAM computes (index into the images).
Known = Sequence[ImageEmbedding | None] | None
Keep = Callable[[int, ImageEmbedding], None] | None


class BoxDetector(Protocol[Plan]):
    """Boxes from text (GroundingDinoDetector): `prepare` once per class set, then `detect_batch`."""

    def prepare(self, classes: Sequence[TextClass]) -> Plan:
        """The prompt plan of `classes` (reused for every image)."""
        ...

    def detect_batch(
        self,
        images: Sequence[Image.Image],
        plan: Plan,
        thresholds: DetectionThresholds,
        class_box_thresholds: Sequence[float] | None = None,
    ) -> list[list[Detection]]:
        """Per image: boxes in xyxy pixels of it, best score first, class indexes into the plan's classes."""
        ...

    def describe(self) -> dict[str, str]:
        """Plain values that identify the detector (for the model version)."""
        ...


@runtime_checkable
class MaskDetector(Protocol[Plan]):
    """Instances with their masks from text (sam3_text.Sam3TextDetector): `prepare`, then `segment_batch`."""

    def prepare(self, classes: Sequence[TextClass]) -> Plan:
        """The encoded prompts of `classes` (reused for every image)."""
        ...

    def segment_batch(
        self,
        images: Sequence[Image.Image],
        plan: Plan,
        thresholds: DetectionThresholds,
        class_box_thresholds: Sequence[float] | None = None,
    ) -> list[Segmented]:
        """Per image: detections as `BoxDetector.detect_batch`'s with a mask (H, W) and a score for each."""
        ...

    def describe(self) -> dict[str, str]:
        """Plain values that identify the detector (for the model version)."""
        ...


class GroundedSam:
    """The model pipeline: `prepare` once per class set, then `run` per image; `segment_*` for SAM alone.

    detector: a BoxDetector (its boxes go to `segmenter`) or a MaskDetector (its masks are the objects' masks;
    `segmenter` only answers `segment_boxes` / `segment_points`).
    `timer` times the stages "negatives", "sam" and "cleanup" (backend.pipeline.timing); give the detector and
    segmenter the same timer for their inner stages (build_pipeline does).
    """

    def __init__(
        self,
        detector: BoxDetector[Any] | MaskDetector[Any],
        segmenter: Segmenter,
        thresholds: DetectionThresholds,
        postprocess: PostprocessOptions = PostprocessOptions(),
        timer: StageTimer = NO_TIMER,
    ) -> None:
        self._detector = detector
        self._segmenter = segmenter
        self._thresholds = thresholds
        self._postprocess = postprocess
        self._timer = timer

    def prepare(self, classes: Sequence[TextClass]) -> ClassPlan:
        """Prompt chunks for `classes` and their negative phrases; reuse the plan for every image of that set."""
        return build_class_plan(classes, self._detector.prepare, self._thresholds.box)

    def run(self, image: Image.Image, plan: ClassPlan) -> list[Instance]:
        """Instances on `image` (RGB, EXIF already applied), best detection score first.

        Order of work: detection with per-class box thresholds → negative suppression (box IoU) → SAM on
        the remaining boxes (a mask detector's own masks instead) → mask cleanup → per-class min_area → one
        label per object → per-class max_instances. Boxes are xyxy pixels of `image`; masks are PackedMasks of
        (H, W); class indexes point into `plan.classes`. SAM does not run when nothing is left to segment. Any
        size and aspect ratio.
        """
        return self.run_batch([image], plan)[0]

    def run_batch(self, images: Sequence[Image.Image], plan: ClassPlan) -> list[list[Instance]]:
        """`run` for several images: `stream` then `postprocess` for each. A list of instances per image."""
        return [self.postprocess(segmented, plan) for segmented in self.stream(images, plan)]

    def stream(
        self, images: Sequence[Image.Image], plan: ClassPlan, known: Known = None, keep: Keep = None
    ) -> Iterator[Segmented]:
        """The model work for `images` (RGB), one Segmented per image in order, each as soon as SAM has it.

        Box detector: one detector forward per group of same-size images first; then the images that have
        boxes go through SAM as the segmenter streams them (HF SAM: SAM_IMAGE_BATCH images per encoder
        forward, each image's boxes decoded together). Mask detector: image by image, each yielded when its
        masks are ready. `postprocess` (CPU only) may run on another thread while this goes on with the next.

        known: per image, its SAM embedding (`encode` of that image: SAM's encoder is skipped for it) or None.
        keep: called as keep(index into `images`, embedding) with each embedding SAM's encoder computes here
        (for the images with boxes), before that image's Segmented is yielded. A mask detector (SAM 3 alone)
        runs no SAM image encoder: it ignores both. Raises ValueError for a known embedding of another size.
        """
        if isinstance(self._detector, MaskDetector):
            return self._stream_masks(self._detector, images, plan)
        return self._stream_boxes(self._detector, images, plan, _checked(known, images), keep)

    def _stream_masks(
        self, detector: MaskDetector[Any], images: Sequence[Image.Image], plan: ClassPlan
    ) -> Iterator[Segmented]:
        """`stream` with a mask detector: its instances, less the negatives' and those they suppress."""
        for image in images:
            (segmented,) = detector.segment_batch([image], plan.prompt, self._thresholds, plan.box_thresholds)
            with self._timer.stage("negatives"):
                kept = unsuppressed(segmented.detections, plan, self._postprocess.negative_iou)
            if not kept or segmented.masks is None or segmented.scores is None:
                yield Segmented((), None, None)
                continue
            masks = tuple(segmented.masks[i] for i in kept)
            yield Segmented(tuple(segmented.detections[i] for i in kept), masks, segmented.scores[kept])

    def _stream_boxes(
        self,
        detector: BoxDetector[Any],
        images: Sequence[Image.Image],
        plan: ClassPlan,
        known: Sequence[ImageEmbedding | None],
        keep: Keep,
    ) -> Iterator[Segmented]:
        """`stream` with a box detector: its boxes (less the suppressed ones) through SAM."""
        with torch.inference_mode():
            batch = detector.detect_batch(images, plan.prompt, self._thresholds, plan.box_thresholds)
        with self._timer.stage("negatives"):
            kept = [suppress_negatives(detections, plan, self._postprocess.negative_iou) for detections in batch]
        todo = [i for i, detections in enumerate(kept) if detections]
        with self._timer.stage("sam"):
            # Writable copies: the processor turns them into tensors, which torch refuses to share read-only.
            pixels = [sam_input(np.array(images[i])) for i in todo]
            boxes = [np.array([d.box_xyxy for d in kept[i]], dtype=np.float32) for i in todo]
            given = [known[i] for i in todo]
            masks_per_image = self._segmenter.segment_stream(pixels, boxes, given, _reindexed(keep, images, todo))
        for image, detections in zip(images, kept, strict=True):
            if not detections:
                yield Segmented((), None, None)
                continue
            with torch.inference_mode(), self._timer.stage("sam"):
                masks, scores = next(masks_per_image)
                masks = _unpadded(masks, (image.height, image.width))
            yield Segmented(tuple(detections), masks, scores)

    def postprocess(self, segmented: Segmented, plan: ClassPlan) -> list[Instance]:
        """One image's instances from its Segmented: masks cleaned, then per-class min_area, one label per
        object, per-class max_instances; best detection score first. CPU only (numpy/OpenCV)."""
        if not segmented.detections:
            return []
        if segmented.masks is None or segmented.scores is None:
            raise ValueError("a Segmented with detections must have their masks and scores")
        with self._timer.stage("cleanup"):
            instances = [
                Instance(detection=detection, mask=clean_mask(mask, self._postprocess), mask_score=float(score))
                for detection, mask, score in zip(segmented.detections, segmented.masks, segmented.scores, strict=True)
            ]
            return apply_filters(instances, plan.classes, self._postprocess)

    def segment_boxes(self, image: Image.Image, boxes_xyxy: npt.NDArray[np.floating[Any]]) -> list[PromptedMask]:
        """SAM alone, one cleaned mask per box: boxes_xyxy (N, 4) float, xyxy pixels of `image` (RGB)."""
        with torch.inference_mode(), self._timer.stage("sam"):
            masks, scores = self._segmenter.segment(sam_input(np.array(image)), np.asarray(boxes_xyxy, np.float32))
        unpadded = _unpadded(masks, (image.height, image.width))
        return [self._cleaned(mask, score) for mask, score in zip(unpadded, scores, strict=True)]

    def encode(self, image: Image.Image) -> ImageEmbedding:
        """SAM's image embedding of `image` (RGB), to give `segment_points` or `stream` instead of the image:
        encoded from `sam_input` of it (input_hw: that padded size), image_hw the image's own (H, W)."""
        with torch.inference_mode(), self._timer.stage("sam"):
            return self._encode(image)

    def segment_points(
        self,
        target: Image.Image | ImageEmbedding,
        points_xy: npt.NDArray[np.floating[Any]],
        positive: npt.NDArray[np.bool_],
        box_xyxy: tuple[float, float, float, float] | None = None,
    ) -> PromptedMask:
        """SAM alone, one cleaned mask for clicked points: points_xy (N, 2) float pixels of the image (RGB),
        positive (N,) bool (False: a background click), optionally one xyxy pixel box; N may be 0 with a box.

        target: the image (encoded first), or its embedding (`encode`: the decoder alone runs). The mask is
        (H, W) of the image. Raises ValueError for other shapes or an empty prompt.
        """
        points = np.asarray(points_xy, dtype=np.float32)
        points = points.reshape(0, 2) if points.size == 0 else points
        box = None if box_xyxy is None else np.asarray(box_xyxy, dtype=np.float32)
        with torch.inference_mode(), self._timer.stage("sam"):
            embedding = self._encode(target) if isinstance(target, Image.Image) else target
            mask, score = self._segmenter.segment_points(embedding, points, np.asarray(positive, bool), box)
        return self._cleaned(_unpadded((mask,), embedding.image_hw)[0], score)

    @property
    def segmenter_device(self) -> torch.device:
        """The device SAM, and so its embeddings, live on."""
        return self._segmenter.device

    @property
    def segmenter_dtype(self) -> torch.dtype:
        """The dtype of the floating tensors of SAM's embeddings (`ImageEmbedding.to` a stored one to it)."""
        return self._segmenter.embedding_dtype

    def describe(self) -> dict[str, object]:
        """Plain values (str, float, int) that change whenever the models, thresholds or cleanup change."""
        return {
            "detector": self._detector.describe(),
            "segmenter": self._segmenter.describe(),
            "thresholds": asdict(self._thresholds),
            "postprocess": asdict(self._postprocess),
        }

    def _encode(self, image: Image.Image) -> ImageEmbedding:
        """`encode` without its stage and mode (the caller's)."""
        embedding = self._segmenter.encode(sam_input(np.array(image)))
        return replace(embedding, image_hw=(image.height, image.width))

    def _cleaned(self, mask: PackedMask, score: float) -> PromptedMask:
        with self._timer.stage("cleanup"):
            return PromptedMask(mask=clean_mask(mask, self._postprocess), score=float(score))


def _unpadded(masks: Masks, image_hw: tuple[int, int]) -> Masks:
    """SAM's masks of an image of (H, W) `image_hw`, cut to that size where `sam_input` padded it."""
    return tuple(mask if mask.shape == image_hw else mask.clipped(*image_hw) for mask in masks)


def _reindexed(keep: Keep, images: Sequence[Image.Image], todo: Sequence[int]) -> Keep:
    """`keep` for the segmenter, which streams the images at `todo` only: its index mapped back into `images`,
    the embedding's image_hw made the image's own (the segmenter saw it padded by `sam_input`)."""
    if keep is None:
        return None
    told = keep

    def kept(index: int, embedding: ImageEmbedding) -> None:
        image = images[todo[index]]
        told(todo[index], replace(embedding, image_hw=(image.height, image.width)))

    return kept


def _checked(known: Known, images: Sequence[Image.Image]) -> Sequence[ImageEmbedding | None]:
    """`stream`'s known embeddings, one per image (None: none given); ValueError where one was encoded from an
    image of another size than its own (it would give masks of that size)."""
    if known is None:
        return [None] * len(images)
    if len(known) != len(images):
        raise ValueError(f"{len(known)} known embeddings for {len(images)} images")
    for embedding, image in zip(known, images, strict=True):
        if embedding is not None and embedding.image_hw != (image.height, image.width):
            raise ValueError(f"an embedding of a {embedding.image_hw} image given for a {image.size[::-1]} image")
    return known
