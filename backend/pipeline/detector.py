"""Grounding DINO family boxes for text classes; each box's class comes from the token spans of the prompt plan."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers import PreTrainedModel, ProcessorMixin

from backend.pipeline import device_preprocess
from backend.pipeline.architectures import model_identity
from backend.pipeline.compile import CompiledForward
from backend.pipeline.halving import run_halving
from backend.pipeline.prompts import PromptPlan, build_prompt_plan
from backend.pipeline.shapes import detector_input
from backend.pipeline.text_cache import TextFeatureCache, install_text_cache
from backend.pipeline.threads import parallel_map
from backend.pipeline.timing import NO_TIMER, StageTimer
from backend.pipeline.types import Detection, DetectionThresholds, TextClass


@dataclass(frozen=True, slots=True)
class DetectorOptions:
    """How the detector runs; none of these changes what it finds (tests/unit/pipeline/test_detector_fast_path.py).

    text_cache: the text backbone runs once per prompt plan, its output reused for every image (text_cache.py).
    device_preprocess: images go to the model's device as uint8 and are resized and normalised there
        (device_preprocess.py); off: the checkpoint's processor on the CPU, per image.
    compile: the model's forward through torch.compile, static shapes (DETECTOR_COMPILE; compile.py), with
        torch.compile's `compile_backend`.
    """

    text_cache: bool = True
    device_preprocess: bool = True
    compile: bool = False
    compile_backend: str = "inductor"


STRAIGHTFORWARD = DetectorOptions(text_cache=False, device_preprocess=False, compile=False)


def device_options(device: str, compile: bool = False) -> DetectorOptions:
    """What production runs on `device`: text features once everywhere; preprocessing on the device on CUDA only
    (on the CPU there is no transfer to save, and on the shared 2-core CPU it measured 0.86x to 1.19x the
    processor path in three runs: bench/results/cpu_tiny_detector_fast.json); compiled when DETECTOR_COMPILE."""
    return DetectorOptions(device_preprocess=torch.device(device).type == "cuda", compile=compile)


class GroundingDinoDetector:
    """A transformers Grounding DINO family model and its processor: GroundingDinoForObjectDetection
    (model_type "grounding-dino", tiny and base) or MMGroundingDinoForObjectDetection ("mm-grounding-dino":
    MM-Grounding-DINO and LLMDet checkpoints, tiny to large).

    The family reads prompts alike: a bert-base-uncased tokenizer, phrases delimited by its fixed [CLS]/[SEP]/'.'/'?'
    ids, logits (B, Q, max_text_len) that are -inf past the prompt and on its padding (MM-Grounding-DINO adds a
    learned bias to the finite ones). So one token-span mapping (backend.pipeline.prompts) serves every member.

    The model runs in float32 always: in bfloat16/float16 it gave NaNs on CPU, and on a GPU autocast changed its
    outputs substantially (on the same weights most of its top queries differed from float32's).
    `timer` times the stages "detector", "detector_preprocess" and "detector_forward" (backend.pipeline.timing).
    `options` (DetectorOptions) choose the fast path's parts: text features once, preprocessing on the device,
    a compiled forward; default: what production runs on the model's device (device_options). STRAIGHTFORWARD is
    the plain path (each image through the processor on the CPU, the whole model per row).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        processor: ProcessorMixin,
        timer: StageTimer = NO_TIMER,
        options: DetectorOptions | None = None,
    ) -> None:
        options = options or device_options(str(model.device))
        self._model = model
        self._processor = processor
        self._timer = timer
        self.options = options
        self._text: TextFeatureCache | None = install_text_cache(model) if options.text_cache else None
        self._device_processor = (
            device_preprocess.device_processor(processor.image_processor) if options.device_preprocess else None
        )
        self._run: Callable[..., Any] = (
            CompiledForward(model.forward, backend=options.compile_backend) if options.compile else model
        )

    def describe(self) -> dict[str, str]:
        """Plain values that identify the detector (for the model version)."""
        return model_identity(self._model)

    def prepare(self, classes: Sequence[TextClass]) -> PromptPlan:
        """Tokenize the classes into prompt chunks that fit the model's text length."""
        return build_prompt_plan(classes, self._processor.tokenizer, self._model.config.max_text_len)

    def detect(
        self,
        image: Image.Image,
        plan: PromptPlan,
        thresholds: DetectionThresholds,
        class_box_thresholds: Sequence[float] | None = None,
    ) -> list[Detection]:
        """Boxes in xyxy pixels of `image` (RGB), best score first; [] when none passes the thresholds.

        class_box_thresholds: one box threshold per class of `plan`, used instead of `thresholds.box`
        for the boxes of that class (the text threshold applies to all).
        """
        return self.detect_batch([image], plan, thresholds, class_box_thresholds)[0]

    def detect_batch(
        self,
        images: Sequence[Image.Image],
        plan: PromptPlan,
        thresholds: DetectionThresholds,
        class_box_thresholds: Sequence[float] | None = None,
    ) -> list[list[Detection]]:
        """`detect` for several images, a list per image: one forward per group of same-size inputs.

        Only images whose preprocessed size is equal share a forward (rows: image x prompt chunk). Padding
        smaller images to the largest would change what the Swin backbone sees near the padding, so a
        batch would no longer give each image its single-image detections. A group that does not fit in
        device memory is split in halves (DeviceOutOfMemoryError when one image alone does not fit).
        Images of any aspect ratio are taken (shapes.detector_input pads the very wide or tall ones).
        """
        if plan.chunk_count == 0 or not images:
            return [[] for _ in images]
        with self._timer.stage("detector"):
            return self._detect_groups(images, plan, thresholds, class_box_thresholds)

    def _detect_groups(
        self,
        images: Sequence[Image.Image],
        plan: PromptPlan,
        thresholds: DetectionThresholds,
        class_box_thresholds: Sequence[float] | None,
    ) -> list[list[Detection]]:
        """`detect_batch` for a non-empty plan and images."""
        prepared = parallel_map(self._preprocess, images)
        pixels = [features for features, _ in prepared]
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, item in enumerate(pixels):
            groups.setdefault(tuple(item["pixel_values"].shape), []).append(index)

        def detect_group(members: Sequence[int]) -> list[list[Detection]]:
            logits, boxes = self._forward([pixels[i] for i in members], plan)
            return [
                self._select(
                    logits[row],
                    boxes[row],
                    images[index].size,
                    prepared[index][1],
                    plan,
                    thresholds,
                    class_box_thresholds,
                )
                for row, index in enumerate(members)
            ]

        results: list[list[Detection]] = [[] for _ in images]
        for members in groups.values():
            for index, detections in zip(members, run_halving(detect_group, members, "image"), strict=True):
                results[index] = detections
        return results

    def _preprocess(self, image: Image.Image) -> tuple[Mapping[str, torch.Tensor], tuple[float, float]]:
        """The image processor's resize + normalise of one image: pixel_values and pixel_mask (1, ...), on the CPU
        or (device_preprocess) on the model's device, and the (width, height) in pixels of `image` that the
        model's boxes will be normalised to."""
        with self._timer.stage("detector_preprocess"):
            if self._device_processor is not None:
                on_device = device_preprocess.to_device(image, self._model.device)
                given_pixels, frame = device_preprocess.aspect_padded(self._device_processor, on_device)
                return device_preprocess.preprocess(self._device_processor, given_pixels), frame
            given, frame = detector_input(image)
            return self._processor.image_processor(images=given, return_tensors="pt"), frame

    def _select(
        self,
        logits: torch.Tensor,
        boxes: torch.Tensor,
        size: tuple[int, int],
        frame: tuple[float, float],
        plan: PromptPlan,
        thresholds: DetectionThresholds,
        class_box_thresholds: Sequence[float] | None,
    ) -> list[Detection]:
        """One image's detections from its logits (C, Q, L) and cxcywh boxes (C, Q, 4) normalised to `frame`
        (width, height in pixels); boxes clipped to the image's `size` (width, height)."""
        box_scores, class_scores, classes = _score(logits, plan)
        box_cut: float | torch.Tensor = thresholds.box
        if class_box_thresholds is not None:
            box_cut = box_scores.new_tensor(class_box_thresholds)[classes]
        keep = (box_scores > box_cut) & (class_scores > thresholds.text)
        pixel_boxes = _to_pixels(boxes[keep].cpu(), *size, frame)
        scores, classes, cut_scores = class_scores[keep].cpu(), classes[keep].cpu(), box_scores[keep].cpu()
        sized = (pixel_boxes[:, 2] > pixel_boxes[:, 0]) & (pixel_boxes[:, 3] > pixel_boxes[:, 1])
        pixel_boxes, scores, classes, cut_scores = pixel_boxes[sized], scores[sized], classes[sized], cut_scores[sized]
        kept = class_nms(pixel_boxes, scores, classes, thresholds.nms_iou, thresholds.max_detections)
        return [
            Detection(
                box_xyxy=tuple(pixel_boxes[i].tolist()),
                score=float(scores[i]),
                class_index=int(classes[i]),
                box_score=float(cut_scores[i]),
            )
            for i in kept.tolist()
        ]

    def _forward(
        self, pixels: Sequence[Mapping[str, torch.Tensor]], plan: PromptPlan
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward for same-size preprocessed images, each repeated once per prompt chunk (image-major).

        Returns logits (B, C, Q, L) over the plan's L tokens and boxes (B, C, Q, 4) as normalised cxcywh.
        """
        device = self._model.device
        batch, chunks = len(pixels), plan.chunk_count
        serving = nullcontext() if self._text is None else self._text.serving(plan.input_ids)
        with self._timer.stage("detector_forward"), serving:
            pixel_values = torch.cat([p["pixel_values"] for p in pixels]).to(device)
            pixel_mask = torch.cat([p["pixel_mask"] for p in pixels]).to(device)
            outputs = self._run(
                pixel_values=pixel_values.repeat_interleave(chunks, dim=0),
                pixel_mask=pixel_mask.repeat_interleave(chunks, dim=0),
                input_ids=plan.input_ids.to(device).repeat(batch, 1),
                attention_mask=plan.attention_mask.to(device).repeat(batch, 1),
            )
        logits = outputs.logits[..., : plan.input_ids.shape[1]]
        return logits.unflatten(0, (batch, chunks)), outputs.pred_boxes.unflatten(0, (batch, chunks))


def _score(logits: torch.Tensor, plan: PromptPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per query: box score, best class score, best class index; each (C, Q).

    Box score: max sigmoid over the chunk's real (non-padding) tokens, as in the reference post-processing.
    Class score: max sigmoid over that class's span tokens; a class outside the chunk scores 0.
    """
    chunks, queries, length = logits.shape
    probs = logits.sigmoid() * plan.attention_mask.to(logits.device)[:, None, :]
    # Tokens of no class are sent to an extra column, dropped after the reduction.
    owner = plan.token_class.to(logits.device)
    owner = torch.where(owner < 0, plan.class_count, owner)[:, None, :].expand(chunks, queries, length)
    per_class = probs.new_zeros(chunks, queries, plan.class_count + 1)
    per_class.scatter_reduce_(2, owner, probs, reduce="amax")
    class_scores, classes = per_class[..., : plan.class_count].max(dim=-1)
    return probs.amax(dim=-1), class_scores, classes


def _to_pixels(cxcywh: torch.Tensor, width: int, height: int, frame: tuple[float, float] | None = None) -> torch.Tensor:
    """(N, 4) cxcywh normalised to `frame` (width, height in pixels; default: the image's) → (N, 4) xyxy
    pixels, clipped to the width x height image (the frame is larger where the image was padded)."""
    centre, extent = cxcywh[:, :2], cxcywh[:, 2:]
    scale = cxcywh.new_tensor([*(frame or (width, height))] * 2)
    xyxy = torch.cat([centre - extent / 2, centre + extent / 2], dim=1) * scale
    return torch.minimum(xyxy.clamp(min=0), xyxy.new_tensor([width, height] * 2))


def class_nms(
    boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou_threshold: float, limit: int
) -> torch.Tensor:
    """Greedy NMS within each class; indexes of at most `limit` kept boxes, best score first.

    boxes: (N, 4) xyxy; scores, classes: (N,). A box is dropped when its IoU with a better box of its
    class exceeds `iou_threshold`. The loop runs once per kept box, so `limit` bounds it.
    """
    remaining = scores.argsort(descending=True)
    kept: list[torch.Tensor] = []
    while remaining.numel() and len(kept) < limit:
        best, rest = remaining[0], remaining[1:]
        kept.append(best)
        overlap = box_iou(boxes[best], boxes[rest]) > iou_threshold
        remaining = rest[~(overlap & (classes[rest] == classes[best]))]
    return torch.stack(kept) if kept else torch.zeros(0, dtype=torch.int64)


def box_iou(box: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """IoU of one xyxy box (4,) with each of `boxes` (N, 4); (N,)."""
    top_left = torch.maximum(box[:2], boxes[:, :2])
    bottom_right = torch.minimum(box[2:], boxes[:, 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(dim=1)
    area = (box[2:] - box[:2]).prod()
    areas = (boxes[:, 2:] - boxes[:, :2]).prod(dim=1)
    return intersection / (area + areas - intersection)
