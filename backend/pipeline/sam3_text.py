"""SAM 3 alone from text: every phrase of a class set is a SAM 3 text prompt, and its instances come with masks.

Each image goes through SAM 3's vision encoder once; its features are then run against the phrases,
PHRASES_PER_FORWARD phrases per forward (halved where the device runs out of memory). The text encoder runs
once per class set (`prepare`), never per image.

Score of an instance: what Sam3Processor.post_process_instance_segmentation keeps, sigmoid(pred_logits) x
sigmoid(presence_logits). The first says how well a query matches the phrase, the second (the presence head)
whether the phrase is in the image at all, so a phrase absent from the image scores low everywhere. Per-class
box thresholds apply to that score; DetectionThresholds.text does not apply (SAM 3 has no token scores).
max_detections and the per-class NMS apply as for Grounding DINO; before NMS each forward keeps at most
max_detections of its candidates (the best scores), so their masks stay bounded however low the thresholds.
Phrases are cut to the text encoder's positions (SAM 3: 32 tokens). Masks: the processor's post-processing
(sigmoid, bilinear to the image's size, > MASK_THRESHOLD), a few at a time, packed on the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import PreTrainedModel, ProcessorMixin
from transformers.modeling_outputs import BaseModelOutputWithPooling

from backend.packed_mask import PackedMask
from backend.pipeline.architectures import model_identity
from backend.pipeline.detector import class_nms
from backend.pipeline.halving import run_halving
from backend.pipeline.prompts import normalize_phrase
from backend.pipeline.segmenter import UPSAMPLE_BUDGET, masks_per_call, pack_masks
from backend.pipeline.timing import NO_TIMER, StageTimer
from backend.pipeline.types import Detection, DetectionThresholds, Segmented, TextClass

# Phrases run against one image's features per forward. Each phrase makes a row of the DETR encoder, decoder
# and mask decoder (the pixel decoder at 288x288 included), so rows cost memory like images do.
PHRASES_PER_FORWARD = 16

# The processor's default binarisation of the sigmoid of the mask logits.
MASK_THRESHOLD = 0.5


@dataclass(frozen=True, slots=True)
class Sam3Prompts:
    """A class set's text prompts, encoded once.

    phrases: normalised phrases, no empties or repeats (the first class keeps a phrase), P of them.
    owners: (P,) the class index of each phrase.
    features: (P, T, D) the text encoder's projected features, on the model's device, in its dtype.
    attention_mask: (P, T) int64 on the model's device (1: a real token).
    class_count: length of the `TextClass` sequence the prompts were built from.
    """

    phrases: tuple[str, ...]
    owners: tuple[int, ...]
    features: torch.Tensor = field(repr=False)
    attention_mask: torch.Tensor = field(repr=False)
    class_count: int


@dataclass(frozen=True, slots=True)
class _Candidates:
    """One image's queries that passed their class's threshold, before NMS, on the model's device.

    boxes: (N, 4) xyxy pixels of the image; scores, classes: (N,); logits: (N, h, w) low-resolution mask logits.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    classes: torch.Tensor
    logits: torch.Tensor


class Sam3TextDetector:
    """A transformers Sam3Model and its Sam3Processor, prompted with text only; any dtype the model was loaded in.

    `timer` times "detector" (one image's whole detection), inside it "detector_preprocess" (the processor's
    resize + normalise), "detector_forward" (the vision encoder, and each forward over a slice of phrases)
    and "sam_upsample" (masks to the image's size and packed).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        processor: ProcessorMixin,
        timer: StageTimer = NO_TIMER,
        upsample_budget: int = UPSAMPLE_BUDGET,
    ) -> None:
        self._model = model
        self._processor = processor
        self._timer = timer
        self._upsample_budget = upsample_budget

    def describe(self) -> dict[str, str]:
        """Plain values that identify the model (for the model version)."""
        return model_identity(self._model)

    def prepare(self, classes: Sequence[TextClass]) -> Sam3Prompts:
        """Normalise and encode the classes' phrases (one text-encoder forward for all of them)."""
        owner: dict[str, int] = {}
        for index, text_class in enumerate(classes):
            for phrase in map(normalize_phrase, text_class.phrases):
                if phrase:
                    owner.setdefault(phrase, index)
        phrases = tuple(owner)
        device = self._model.device
        if not phrases:
            empty = torch.zeros((0, 0), dtype=torch.int64, device=device)
            return Sam3Prompts((), (), empty.to(self._model.dtype), empty, len(classes))
        # Every phrase padded to the text encoder's positions (SAM 3: 32), a longer one cut to them: CLIP has no more.
        tokens = self._processor.tokenizer(
            list(phrases),
            padding="max_length",
            max_length=self._model.config.text_config.max_position_embeddings,
            truncation=True,
            return_tensors="pt",
        )
        input_ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        with torch.inference_mode():
            # nn.Module.__getattr__ is typed Tensor | Module; Sam3Model defines get_text_features.
            text = self._model.get_text_features(input_ids=input_ids, attention_mask=mask)  # type: ignore[operator]
        features: torch.Tensor = text.pooler_output
        return Sam3Prompts(phrases, tuple(owner.values()), features, mask, len(classes))

    def segment_batch(
        self,
        images: Sequence[Image.Image],
        prompts: Sam3Prompts,
        thresholds: DetectionThresholds,
        class_box_thresholds: Sequence[float] | None = None,
    ) -> list[Segmented]:
        """Per image (RGB, any size): its detections, best score first, with their masks and scores.

        Detections: boxes xyxy pixels of the image, score = SAM 3's score (module docstring), class_index into
        the classes of `prompts`. Masks: PackedMasks of (H, W); scores: (N,) float32, the same scores.
        class_box_thresholds: one threshold per class, used instead of `thresholds.box` for its instances.
        An image with no instance passing gives Segmented((), None, None).
        """
        results = []
        for image in images:
            with torch.inference_mode(), self._timer.stage("detector"):
                results.append(self._segment(image, prompts, thresholds, class_box_thresholds))
        return results

    def _segment(
        self,
        image: Image.Image,
        prompts: Sam3Prompts,
        thresholds: DetectionThresholds,
        class_box_thresholds: Sequence[float] | None,
    ) -> Segmented:
        """`segment_batch` for one image."""
        if not prompts.phrases:
            return Segmented((), None, None)
        cuts = class_box_thresholds or [thresholds.box] * prompts.class_count
        phrase_cuts = torch.tensor([cuts[i] for i in prompts.owners])
        candidates = self._candidates(image, prompts, phrase_cuts, thresholds.max_detections)
        boxes, scores, classes = candidates.boxes.cpu(), candidates.scores.cpu(), candidates.classes.cpu()
        kept = class_nms(boxes, scores, classes, thresholds.nms_iou, thresholds.max_detections)
        if not len(kept):
            return Segmented((), None, None)
        detections = tuple(
            Detection(box_xyxy=tuple(box), score=score, class_index=index, box_score=score)
            for box, score, index in zip(
                boxes[kept].tolist(), scores[kept].tolist(), classes[kept].tolist(), strict=True
            )
        )
        with self._timer.stage("sam_upsample"):
            masks = self._masks(candidates.logits[kept.to(candidates.logits.device)], image.height, image.width)
        return Segmented(detections, masks, scores[kept].numpy().astype(np.float32))

    def _candidates(
        self, image: Image.Image, prompts: Sam3Prompts, phrase_cuts: torch.Tensor, limit: int
    ) -> _Candidates:
        """The image encoded once, then every phrase against it; the queries with a box of some area whose score
        beats their phrase's class threshold (`phrase_cuts`, (P,)), at most the `limit` best of each forward's
        slice of phrases (what NMS then keeps at most of the image): the candidates' masks stay bounded however
        low the thresholds. DeviceOutOfMemoryError when even those do not fit together."""
        with self._timer.stage("detector_preprocess"):
            pixels = self._processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self._model.device, self._model.dtype)

        def encode(_: Sequence[Image.Image]) -> list[Any]:
            with self._timer.stage("detector_forward"):
                # nn.Module.__getattr__ is typed Tensor | Module; Sam3Model defines get_vision_features.
                return [self._model.get_vision_features(pixel_values=pixels)]  # type: ignore[operator]

        (vision,) = run_halving(encode, [image], "image")  # DeviceOutOfMemoryError when it does not fit
        scale = torch.tensor([image.width, image.height] * 2, dtype=torch.float32, device=self._model.device)
        cuts = phrase_cuts.to(self._model.device)

        def run(rows: Sequence[int]) -> list[_Candidates]:
            return [self._forward(vision, prompts, rows, scale, cuts, limit)]

        total = len(prompts.phrases)
        slices = [range(s, min(s + PHRASES_PER_FORWARD, total)) for s in range(0, total, PHRASES_PER_FORWARD)]
        parts = [part for rows in slices for part in run_halving(run, rows, "phrase")]
        # One image's candidates at once: when they do not fit, a DeviceOutOfMemoryError, as for its encoding.
        (joined,) = run_halving(lambda _: [_joined(parts)], [image], "image's set of candidate masks")
        return joined

    def _forward(
        self,
        vision: Any,
        prompts: Sam3Prompts,
        rows: Sequence[int],
        scale: torch.Tensor,
        cuts: torch.Tensor,
        limit: int,
    ) -> _Candidates:
        """One forward of the phrases at `rows` (consecutive) against one image's vision features (batch 1); its
        candidates (see `_candidates`), at most `limit`, in query order."""
        part = slice(rows[0], rows[-1] + 1)
        count = len(rows)
        with self._timer.stage("detector_forward"):
            out = self._model(
                vision_embeds=_repeated(vision, count),
                text_embeds=BaseModelOutputWithPooling(pooler_output=prompts.features[part]),
                attention_mask=prompts.attention_mask[part],
            )
        scores = (out.pred_logits.float().sigmoid() * out.presence_logits.float().sigmoid()).flatten()  # (P*Q,)
        queries = out.pred_logits.shape[1]
        owners = torch.tensor(prompts.owners[part], device=scores.device).repeat_interleave(queries)
        boxes = torch.minimum((out.pred_boxes.float().flatten(0, 1) * scale).clamp(min=0), scale)  # (P*Q, 4)
        sized = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        keep = (sized & (scores > cuts[part].repeat_interleave(queries))).nonzero().flatten()
        if len(keep) > limit:
            keep = keep[scores[keep].topk(limit).indices.sort().values]
        return _Candidates(boxes[keep], scores[keep], owners[keep], out.pred_masks.flatten(0, 1)[keep])

    def _masks(self, logits: torch.Tensor, height: int, width: int) -> tuple[PackedMask, ...]:
        """Low-resolution logits (N, h, w) → N PackedMasks of (height, width), `masks_per_call` at a time."""
        per_call = masks_per_call(height, width, self._upsample_budget)

        def upsample(indices: Sequence[int]) -> list[PackedMask]:
            probabilities = logits[indices[0] : indices[-1] + 1].float().sigmoid()[None]
            resized = F.interpolate(probabilities, size=(height, width), mode="bilinear", align_corners=False)[0]
            return pack_masks(resized > MASK_THRESHOLD)

        chunks = [range(start, min(start + per_call, len(logits))) for start in range(0, len(logits), per_call)]
        return tuple(mask for chunk in chunks for mask in run_halving(upsample, chunk, "mask"))


def _joined(parts: Sequence[_Candidates]) -> _Candidates:
    """The candidates of several forwards as one, in order."""
    return _Candidates(*(torch.cat([getattr(p, name) for p in parts]) for name in _Candidates.__slots__))


def _repeated(vision: Any, count: int) -> Any:
    """One image's Sam3VisionEncoderOutput with its batch dimension expanded to `count` rows (views, no copies)."""
    return type(vision)(
        last_hidden_state=vision.last_hidden_state.expand(count, *vision.last_hidden_state.shape[1:]),
        fpn_hidden_states=tuple(t.expand(count, *t.shape[1:]) for t in vision.fpn_hidden_states),
        fpn_position_encoding=tuple(t.expand(count, *t.shape[1:]) for t in vision.fpn_position_encoding),
    )
