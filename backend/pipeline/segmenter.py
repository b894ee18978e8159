"""SAM masks for boxes: one image embedding per image, then all of that image's boxes decoded together."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from transformers import BatchFeature, PreTrainedModel, ProcessorMixin

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

# Boxes decoded per call. Each box runs the 64x64 embedding through the decoder (~3.6 GFLOP), so very
# many boxes are split to bound memory; below this count every box goes in one call.
BOX_BATCH = 64

# decode(boxes slice) -> masks (n, H, W) bool, predicted IoU (n,), both on the model's device.
Decode = Callable[[slice], tuple[torch.Tensor, torch.Tensor]]


class Segmenter(Protocol):
    """Anything that turns boxes on an image into one mask per box."""

    def segment(self, image: np.ndarray, boxes_xyxy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """image: (H, W, 3) uint8 RGB; boxes_xyxy: (N, 4) float, xyxy pixels of that image.

        Returns masks (N, H, W) bool and predicted IoU scores (N,) float32 in [0, 1], in box order.
        """
        ...

    def describe(self) -> dict[str, str]:
        """Plain values that identify the model (for the model version)."""
        ...


class HfSamSegmenter:
    """transformers SamModel (also SamHQModel, Sam2Model) with its processor; any dtype the model was loaded in."""

    def __init__(self, model: PreTrainedModel, processor: ProcessorMixin, box_batch: int = BOX_BATCH) -> None:
        self._model = model
        self._processor = processor
        self._box_batch = box_batch

    def describe(self) -> dict[str, str]:
        return {
            "source": self._model.name_or_path,
            "architecture": type(self._model).__name__,
            "dtype": str(self._model.dtype),
        }

    def segment(self, image: np.ndarray, boxes_xyxy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """See `Segmenter.segment`."""
        if len(boxes_xyxy) == 0:
            return _no_masks(image)
        device = self._model.device
        inputs = self._processor(images=image, input_boxes=[boxes_xyxy.tolist()], return_tensors="pt")
        embeddings = self._embed(inputs["pixel_values"].to(device, self._model.dtype))
        # Boxes stay float32 (1, N, 4) in the model's 1024-px input frame; the processor gives float64.
        boxes = inputs["input_boxes"].to(device, torch.float32)

        def decode(part: slice) -> tuple[torch.Tensor, torch.Tensor]:
            out = self._model(**embeddings, input_boxes=boxes[:, part], multimask_output=False)
            return self._original_size_masks(out.pred_masks, inputs), out.iou_scores[0, :, 0]

        return _decode_all(decode, len(boxes_xyxy), self._box_batch)

    def _embed(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """The image embedding, as keyword arguments of the model's forward."""
        embeddings = self._model.get_image_embeddings(pixel_values)
        if isinstance(embeddings, tuple):  # SamHQ also returns the ViT's intermediate features
            return {"image_embeddings": embeddings[0], "intermediate_embeddings": embeddings[1]}
        return {"image_embeddings": embeddings}

    def _original_size_masks(self, pred_masks: torch.Tensor, inputs: BatchFeature) -> torch.Tensor:
        """Low-res logits (1, n, 1, h, w) → (n, H, W) bool at the original size, on the model's device."""
        # SAM 2 stretches to a square instead of padding, so its processor has no reshaped sizes.
        sizes = {key: inputs[key] for key in ("reshaped_input_sizes",) if key in inputs}
        masks = self._processor.post_process_masks(pred_masks.float(), inputs["original_sizes"], **sizes)
        return masks[0][:, 0]


class SegmentAnythingSegmenter:
    """Meta's segment-anything `Sam` (official .pth weights) behind `SamPredictor`.

    Low precision runs under torch.autocast: the package's prompt encoder casts to float32 itself, so
    casting the weights fails.
    """

    def __init__(self, sam: Sam, source: str, dtype: torch.dtype, box_batch: int = BOX_BATCH) -> None:
        # The package's __init__ imports torchvision; importing here keeps the transformers path free of it.
        from segment_anything import SamPredictor

        self._predictor = SamPredictor(sam)
        self._source = source
        self._dtype = dtype
        self._box_batch = box_batch

    def describe(self) -> dict[str, str]:
        return {"source": self._source, "architecture": "segment_anything.Sam", "dtype": str(self._dtype)}

    def segment(self, image: np.ndarray, boxes_xyxy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """See `Segmenter.segment`."""
        if len(boxes_xyxy) == 0:
            return _no_masks(image)
        predictor = self._predictor
        device = predictor.device
        with torch.autocast(device.type, dtype=self._dtype, enabled=self._dtype != torch.float32):
            predictor.set_image(image)
            boxes = predictor.transform.apply_boxes_torch(
                torch.as_tensor(boxes_xyxy, dtype=torch.float32, device=device), image.shape[:2]
            )

            def decode(part: slice) -> tuple[torch.Tensor, torch.Tensor]:
                masks, iou, _ = predictor.predict_torch(None, None, boxes=boxes[part], multimask_output=False)
                return masks[:, 0], iou[:, 0]

            result = _decode_all(decode, len(boxes_xyxy), self._box_batch)
        predictor.reset_image()  # drop the image's features until the next call
        return result


def _decode_all(decode: Decode, count: int, box_batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Run `decode` over boxes in slices of `box_batch`; masks (count, H, W) bool, scores (count,) float32."""
    parts = [decode(slice(start, start + box_batch)) for start in range(0, count, box_batch)]
    masks = torch.cat([masks for masks, _ in parts]).cpu().numpy()
    # The IoU head is an unbounded regression; clamp it to the range of an IoU.
    scores = torch.cat([scores for _, scores in parts]).float().clamp(0, 1).cpu().numpy()
    return masks, scores


def _no_masks(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The answer for zero boxes, without running SAM: masks (0, H, W), scores (0,)."""
    return np.zeros((0, *image.shape[:2]), dtype=bool), np.zeros(0, dtype=np.float32)
