"""SAM masks for boxes: one image embedding per image, then all of that image's boxes decoded together.

Interactive prompts (`segment_points`): points labelled positive/negative, optionally with one box, give
one mask, decoded on an image's `ImageEmbedding` (`encode`, backend.pipeline.embeddings), so that the image
encoder runs once per image however many prompts follow; `segment_stream` takes the embeddings already at hand
(`known`: those images skip the encoder) and hands out the ones it computes (`keep`). A single point with no
box is ambiguous, so SAM proposes three masks and the one with the highest predicted IoU is returned (as
segment-anything recommends); other prompts ask for one mask.

Memory: SAM's masks come out of the decoder at 256x256 (SAM 3's tracker: 288x288); upsampling them to the
image makes float32 masks of the full resolution (192 MB each at 48 MP). They are upsampled `masks_per_call`
at a time (at most UPSAMPLE_BUDGET bytes of floats, at least one mask), with the models' own post-processing (so
the masks are the same as in one call), and each is packed (`PackedMask`) before the next slice is upsampled:
only each bool mask's painted crop is copied to the host (`pack_masks`), never a float mask.

Preprocessing (transformers SAM families) runs on the model's device: the image goes there as uint8 pixels
(pinned, non-blocking on CUDA) and the torchvision-backed processor resizes, normalises and pads it there
(backend.pipeline.sam_device); the CPU makes no float image.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt
import torch
from transformers import BatchFeature, PreTrainedModel, ProcessorMixin

from backend.packed_mask import PackedMask
from backend.pipeline.architectures import model_identity
from backend.pipeline.embeddings import ImageEmbedding, flat_tensors, nested_tensors
from backend.pipeline.halving import run_halving
from backend.pipeline.sam_device import device_processor, pixels_on
from backend.pipeline.sam_precision import in_dtype
from backend.pipeline.threads import prefetched
from backend.pipeline.timing import NO_TIMER, StageTimer

if TYPE_CHECKING:
    from segment_anything import SamPredictor
    from segment_anything.modeling import Sam

# Boxes decoded per call. Each box runs the 64x64 embedding through the decoder (~3.6 GFLOP), so very
# many boxes are split to bound memory; below this count every box goes in one call.
BOX_BATCH = 64

# Most bytes of float32 full-resolution masks one upsampling call may make (see the module docstring).
UPSAMPLE_BUDGET = 256 * 2**20

# The processor's per-image sizes; SAM 2 stretches to a square instead of padding, so it has no reshaped sizes.
_SIZE_KEYS = ("original_sizes", "reshaped_input_sizes")

# decode(boxes slice) -> low-resolution mask logits (n, 1, h, w) and predicted IoU (n,), on the model's device.
Decode = Callable[[slice], tuple[torch.Tensor, torch.Tensor]]
# upsample(logits (k, 1, h, w)) -> masks (k, H, W) bool at the image's size, on the model's device.
Upsample = Callable[[torch.Tensor], torch.Tensor]
Masks = tuple[PackedMask, ...]
# An image encoder's output as forward kwargs: one tensor (B, ...) or a list of them (multi-scale features).
Embeddings = dict[str, torch.Tensor | list[torch.Tensor]]
Pixels = npt.NDArray[np.uint8]  # an RGB image (H, W, 3)
Floats = npt.NDArray[np.floating[Any]]  # boxes (N, 4) or points (N, 2), in pixels
Flags = npt.NDArray[np.bool_]  # per point: positive
Scores = npt.NDArray[np.float32]  # predicted IoU per mask (N,)
# Embeddings already computed, one per image or None (encode that one); and who is handed each new embedding.
Known = Sequence[ImageEmbedding | None] | None
Keep = Callable[[int, ImageEmbedding], None] | None


class Segmenter(Protocol):
    """Anything that turns boxes on an image into one mask per box."""

    def segment(self, image: Pixels, boxes_xyxy: Floats) -> tuple[Masks, Scores]:
        """image: (H, W, 3) uint8 RGB; boxes_xyxy: (N, 4) float, xyxy pixels of that image.

        Returns N masks (PackedMask of H x W) and predicted IoU scores (N,) float32 in [0, 1], in box order.
        """
        ...

    def segment_stream(
        self, images: Sequence[Pixels], boxes_xyxy: Sequence[Floats], known: Known = None, keep: Keep = None
    ) -> Iterator[tuple[Masks, Scores]]:
        """`segment` for several images, each with its own boxes: one (masks, scores) pair per image, in
        order, each yielded as soon as it is ready.

        known: per image, its embedding (`encode` of that image: the encoder is skipped for it) or None.
        keep: called as keep(index into `images`, embedding) with every embedding the encoder computes here
        (images with boxes only), once each, in image order, before that image's masks are yielded.
        """
        ...

    def encode(self, image: Pixels) -> ImageEmbedding:
        """The image encoder's output for `image` ((H, W, 3) uint8 RGB); its input_hw and image_hw are (H, W)."""
        ...

    def segment_points(
        self,
        embedding: ImageEmbedding,
        points_xy: Floats,
        positive: Flags,
        box_xyxy: Floats | None,
    ) -> tuple[PackedMask, float]:
        """One mask for one prompt on the image `embedding` was encoded from, the decoder alone: points_xy
        (N, 2) float pixels, positive (N,) bool (False: background), box_xyxy (4,) pixels or None; at least one
        point or the box.

        Returns the mask (PackedMask of the embedding's input_hw) and its predicted IoU in [0, 1].
        """
        ...

    @property
    def device(self) -> torch.device:
        """Where the model, and so its embeddings, live."""
        ...

    @property
    def embedding_dtype(self) -> torch.dtype:
        """The dtype of the floating tensors `encode` gives (what a cast embedding must be brought back to)."""
        ...

    def describe(self) -> dict[str, str]:
        """Plain values that identify the model (for the model version)."""
        ...


class HfSamSegmenter:
    """Any transformers SAM family model with its processor, in any dtype it was loaded in: SamModel (with
    SamProcessor), SamHQModel (SamHQProcessor), Sam2Model (SAM 2 / 2.1, any Hiera size) and EdgeTamModel
    (Sam2Processor), Sam3TrackerModel (Sam3TrackerProcessor; also loaded from a full SAM 3 checkpoint).

    All of them share the SAM interface used here: `get_image_embeddings(pixel_values)`, a forward taking those
    embeddings with input_boxes / input_points / input_labels and giving pred_masks (B, N, C, h, w) and
    iou_scores (B, N, C), and the processor's `post_process_masks`. They differ in what the encoder gives
    (see `_embed`) and in the processor's sizes (SAM 2's stretches to a square: no reshaped_input_sizes).

    `decoder`: what decodes boxes and clicks on the model's embeddings (cast to its dtype), `model` itself when
    None; for a model in low precision, the float32 copy `sam_precision.lowered` makes of all but its encoder.
    `timer` times "sam_preprocess", "sam_encoder", "sam_decoder" and "sam_upsample" (backend.pipeline.timing).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        processor: ProcessorMixin,
        box_batch: int = BOX_BATCH,
        image_batch: int = 1,
        upsample_budget: int = UPSAMPLE_BUDGET,
        timer: StageTimer = NO_TIMER,
        decoder: PreTrainedModel | None = None,
    ) -> None:
        self._model = model
        self._decoder = model if decoder is None else decoder
        self._processor = device_processor(processor)  # torchvision-backed: it runs on the pixels' device
        self._box_batch = box_batch
        self.image_batch = image_batch
        self._upsample_budget = upsample_budget
        self._timer = timer
        # SAM 2's and SAM 3 tracker's processors map prompts given the image's size alone (see `_prompts`).
        self._takes_sizes = "original_sizes" in inspect.signature(processor.__call__).parameters

    def describe(self) -> dict[str, str]:
        return model_identity(self._model)

    def segment(self, image: Pixels, boxes_xyxy: Floats) -> tuple[Masks, Scores]:
        """See `Segmenter.segment`."""
        return self.segment_batch([image], [boxes_xyxy])[0]

    def segment_batch(self, images: Sequence[Pixels], boxes_xyxy: Sequence[Floats]) -> list[tuple[Masks, Scores]]:
        """`segment_stream`, all at once."""
        return list(self.segment_stream(images, boxes_xyxy))

    def segment_stream(
        self, images: Sequence[Pixels], boxes_xyxy: Sequence[Floats], known: Known = None, keep: Keep = None
    ) -> Iterator[tuple[Masks, Scores]]:
        """See `Segmenter.segment_stream`. The images that have boxes and no known embedding go through the
        image encoder `image_batch` at a time (halved where the device runs out of memory), each image's boxes
        decoded on its own embedding; the processor prepares the next group on a side thread meanwhile."""
        given = _known(known, len(images))
        todo = [i for i, boxes in enumerate(boxes_xyxy) if len(boxes) and given[i] is None]
        groups = [todo[start : start + self.image_batch] for start in range(0, len(todo), self.image_batch)]
        prepared = zip(groups, prefetched(partial(self._group_inputs, images, boxes_xyxy), groups), strict=True)
        ready: dict[int, tuple[Masks, Scores]] = {}
        for index in range(len(images)):
            embedding = given[index]
            if not len(boxes_xyxy[index]):
                yield _no_masks()
                continue
            if embedding is not None:
                with torch.inference_mode():  # a generator cannot count on its consumer's mode
                    found = self._segment_embedding(embedding, boxes_xyxy[index])
                yield found
                continue
            if index not in ready:
                group, inputs = next(prepared)
                run = partial(self._encode_and_decode, images, boxes_xyxy, group, inputs, keep is not None)
                with torch.inference_mode():
                    for image_index, (found, computed) in zip(group, run_halving(run, group, "image"), strict=True):
                        ready[image_index] = found
                        if keep is not None and computed is not None:
                            keep(image_index, computed)
            yield ready.pop(index)

    def encode(self, image: Pixels) -> ImageEmbedding:
        """See `Segmenter.encode`: the processor's resize and normalise on the model's device, then the image
        encoder."""
        with self._timer.stage("sam_preprocess"):
            inputs = self._processor(images=[self._pixels(image)], **self._on_device())
        with torch.inference_mode():
            return self._embedding(self._embed(inputs), inputs, 0, image.shape[:2])  # a batch of one: its row

    def segment_points(
        self,
        embedding: ImageEmbedding,
        points_xy: Floats,
        positive: Flags,
        box_xyxy: Floats | None,
    ) -> tuple[PackedMask, float]:
        """See `Segmenter.segment_points`. Only the best proposal is upsampled."""
        multimask = _check_prompt(points_xy, positive, box_xyxy)
        given: dict[str, Any] = {}
        if len(points_xy):
            given |= {"input_points": [[points_xy.tolist()]], "input_labels": [[positive.astype(int).tolist()]]}
        if box_xyxy is not None:
            given["input_boxes"] = [[box_xyxy.tolist()]]
        with torch.inference_mode():
            with self._timer.stage("sam_preprocess"):
                prompts = self._prompts(embedding, given)
            with self._timer.stage("sam_decoder"):
                embeddings = in_dtype(nested_tensors(embedding.tensors), self._decoder.dtype)
                out = self._decoder(**embeddings, **prompts, multimask_output=multimask)
            best, score = _best(out.iou_scores[0, 0])
            with self._timer.stage("sam_upsample"):
                logits = out.pred_masks[0, :, best : best + 1]
                return pack_masks(self._upsample(logits, _size_tensors(embedding)))[0], score

    @property
    def device(self) -> torch.device:
        """See `Segmenter.device`."""
        return self._model.device

    @property
    def embedding_dtype(self) -> torch.dtype:
        """See `Segmenter.embedding_dtype`: the model's dtype (its encoder's outputs are in it)."""
        return self._model.dtype

    def _prompts(self, embedding: ImageEmbedding, given: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Prompts in pixels of the encoded image (the processor's nested lists) → the model's input frame on its
        device, as the processor maps them along with the image: labels int64, coordinates float32."""
        original = [list(embedding.sizes["original_sizes"])]
        if self._takes_sizes:  # SAM 2's and SAM 3 tracker's processors take the size in place of the image
            inputs = self._processor(original_sizes=original, **given, return_tensors="pt")
        else:  # SAM's and SAM-HQ's read it from the image: their own steps after the image processor
            processor: Any = self._processor
            points, labels, boxes = processor._check_and_preprocess_points(**given)
            inputs = processor._normalize_and_convert(
                {}, np.array(original), points, labels, boxes, return_tensors="pt"
            )
        return {
            key: inputs[key].to(self._model.device, torch.int64 if key == "input_labels" else torch.float32)
            for key in given
        }

    def _segment_embedding(self, embedding: ImageEmbedding, boxes_xyxy: Floats) -> tuple[Masks, Scores]:
        """One image's boxes (N, 4) xyxy pixels decoded on its known embedding."""
        boxes = self._prompts(embedding, {"input_boxes": [boxes_xyxy.tolist()]})["input_boxes"]
        embeddings = nested_tensors(embedding.tensors)
        return self._decode_boxes(embeddings, boxes, _size_tensors(embedding), embedding.input_hw)

    def _group_inputs(
        self,
        images: Sequence[Pixels],
        boxes_xyxy: Sequence[Floats],
        indices: Sequence[int],
    ) -> BatchFeature:
        """The processor's output for the images at `indices` with their boxes: the pixels copied to the model's
        device as uint8 and resized, normalised and padded there (pixel_values on the device; sizes and boxes on
        the CPU)."""
        # The processor wants as many boxes for every image: shorter lists are padded with their last box.
        boxes = [boxes_xyxy[i] for i in indices]
        most = max(len(image_boxes) for image_boxes in boxes)
        padded = [b.tolist() + [b[-1].tolist()] * (most - len(b)) for b in boxes]
        with self._timer.stage("sam_preprocess"):
            pixels = [self._pixels(images[i]) for i in indices]
            prepared: BatchFeature = self._processor(images=pixels, input_boxes=padded, **self._on_device())
        return prepared

    def _pixels(self, image: Pixels) -> torch.Tensor:
        """An (H, W, 3) uint8 image as an (H, W, 3) uint8 tensor on the model's device (`pixels_on`)."""
        return pixels_on(image, self._model.device)

    def _on_device(self) -> dict[str, Any]:
        """The processor's keywords for channels-last uint8 tensors on the model's device, processed there."""
        return {"input_data_format": "channels_last", "device": self._model.device, "return_tensors": "pt"}

    def _encode_and_decode(
        self,
        images: Sequence[Pixels],
        boxes_xyxy: Sequence[Floats],
        group: Sequence[int],
        group_inputs: BatchFeature,
        keeping: bool,
        indices: Sequence[int],
    ) -> list[tuple[tuple[Masks, Scores], ImageEmbedding | None]]:
        """One encoder forward for the images at `indices` (the prepared `group`, or a part of it after an
        out-of-memory split), then each image's boxes decoded on its embedding; with `keeping`, each image's
        embedding too (copied out of the batch), else None."""
        same = list(indices) == list(group)
        inputs = group_inputs if same else self._group_inputs(images, boxes_xyxy, indices)
        embeddings = self._embed(inputs)
        # Prompts are in the model's 1024-px input frame, float32 (the processor gives float64).
        all_boxes = inputs["input_boxes"].to(self._model.device, torch.float32)
        results = []
        for row, index in enumerate(indices):
            own = {key: _rows(value, row) for key, value in embeddings.items()}
            sizes = {key: inputs[key][row : row + 1] for key in _SIZE_KEYS if key in inputs}
            image_boxes = all_boxes[row : row + 1, : len(boxes_xyxy[index])]
            height, width = images[index].shape[:2]
            found = self._decode_boxes(own, image_boxes, sizes, (height, width))
            kept = self._embedding(own, inputs, row, (height, width)) if keeping else None
            results.append((found, kept))
        return results

    @staticmethod
    def _embedding(
        own: Embeddings, inputs: Mapping[str, torch.Tensor], row: int, shape: tuple[int, ...]
    ) -> ImageEmbedding:
        """Image `row`'s encoder output (`_rows` of the batch's) with its processor sizes from `inputs`, as an
        ImageEmbedding of tensors of its own; `shape`: the image's (H, W)."""
        sizes = {key: _pair(inputs[key][row].tolist()) for key in _SIZE_KEYS if key in inputs}
        hw = _pair(shape[:2])
        return ImageEmbedding(flat_tensors(own), sizes, hw, hw)

    def _decode_boxes(
        self,
        embeddings: Embeddings,
        boxes: torch.Tensor,
        sizes: Mapping[str, torch.Tensor],
        shape: tuple[int, int],
    ) -> tuple[Masks, Scores]:
        """One image's boxes (1, N, 4), in the model's input frame, decoded on its embedding (1, ...);
        `shape`: the image's (H, W)."""

        exact = in_dtype(embeddings, self._decoder.dtype)

        def decode(part: slice) -> tuple[torch.Tensor, torch.Tensor]:
            out = self._decoder(**exact, input_boxes=boxes[:, part], multimask_output=False)
            return out.pred_masks[0], out.iou_scores[0, :, 0]

        per_call = masks_per_call(*shape, self._upsample_budget)
        upsample = partial(self._upsample, sizes=sizes)
        return _decode_all(decode, upsample, boxes.shape[1], self._box_batch, per_call, self._timer)

    def _embed(self, inputs: Mapping[str, torch.Tensor]) -> Embeddings:
        """The image encoder's output for the processed images (B, ...), as forward kwargs: SAM's
        image_embeddings (B, C, 64, 64); SAM-HQ's also with its ViT's intermediate_embeddings (a list of
        (B, 64, 64, D)); SAM 2, SAM 3's tracker and EdgeTAM give a list of feature maps (B, C_l, h_l, w_l),
        high resolution first, whose last one the decoder attends to."""
        with self._timer.stage("sam_encoder"):
            pixels = inputs["pixel_values"].to(self._model.device, self._model.dtype)
            # nn.Module.__getattr__ is typed Tensor | Module; every SAM model class defines get_image_embeddings.
            embeddings = self._model.get_image_embeddings(pixels)  # type: ignore[operator]
        if isinstance(embeddings, tuple):  # SamHQ also returns the ViT's intermediate features
            return {"image_embeddings": embeddings[0], "intermediate_embeddings": list(embeddings[1])}
        return {"image_embeddings": embeddings}

    def _upsample(self, logits: torch.Tensor, sizes: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Low-res logits (k, 1, h, w) of one image → (k, H, W) bool at its original size, on the model's
        device, by the processor's post_process_masks.

        sizes: the processor's original_sizes (and reshaped_input_sizes) of that one image, (1, 2) each.
        """
        reshaped = {key: sizes[key] for key in _SIZE_KEYS[1:] if key in sizes}
        # ProcessorMixin does not declare it; every SAM processor class (SAM, SAM-HQ, SAM 2) defines it.
        masks: list[torch.Tensor] = self._processor.post_process_masks(  # type: ignore[attr-defined]
            logits[None].float(), sizes["original_sizes"], **reshaped
        )
        return masks[0][:, 0]


class SegmentAnythingSegmenter:
    """Meta's segment-anything `Sam` (official .pth weights) behind `SamPredictor`.

    Low precision runs under torch.autocast: the package's prompt encoder casts to float32 itself, so
    casting the weights fails. `timer` times the stages HfSamSegmenter does (backend.pipeline.timing).
    """

    def __init__(
        self,
        sam: Sam,
        source: str,
        dtype: torch.dtype,
        box_batch: int = BOX_BATCH,
        upsample_budget: int = UPSAMPLE_BUDGET,
        timer: StageTimer = NO_TIMER,
    ) -> None:
        # The package's __init__ imports torchvision; importing here keeps the transformers path free of it.
        from segment_anything import SamPredictor

        self._predictor = SamPredictor(sam)
        self._source = source
        self._dtype = dtype
        self._box_batch = box_batch
        self._upsample_budget = upsample_budget
        self._timer = timer

    def describe(self) -> dict[str, str]:
        return {"source": self._source, "architecture": "segment_anything.Sam", "dtype": str(self._dtype)}

    def segment(self, image: Pixels, boxes_xyxy: Floats) -> tuple[Masks, Scores]:
        """See `Segmenter.segment`."""
        if len(boxes_xyxy) == 0:
            return _no_masks()
        return self._segment_embedding(self.encode(image), boxes_xyxy)

    def segment_stream(
        self, images: Sequence[Pixels], boxes_xyxy: Sequence[Floats], known: Known = None, keep: Keep = None
    ) -> Iterator[tuple[Masks, Scores]]:
        """See `Segmenter.segment_stream`: image by image, since SamPredictor holds one image's embedding."""
        given = _known(known, len(images))
        for index, (image, boxes) in enumerate(zip(images, boxes_xyxy, strict=True)):
            if len(boxes) == 0:
                yield _no_masks()
                continue
            embedding = given[index]
            if embedding is None:
                embedding = self.encode(image)
                if keep is not None:
                    keep(index, embedding)
            yield self._segment_embedding(embedding, boxes)

    def encode(self, image: Pixels) -> ImageEmbedding:
        """See `Segmenter.encode`: what SamPredictor.set_image does, in two timed stages: the resize to SAM's
        input (and the copy to the device), then set_torch_image (normalise, pad, image encoder). In inference
        mode, under autocast when SAM runs in low precision; the predictor is left without an image."""
        predictor = self._predictor
        with self._modes():
            with self._timer.stage("sam_preprocess"):
                given = image if predictor.model.image_format == "RGB" else image[..., ::-1]
                resized = torch.as_tensor(predictor.transform.apply_image(given), device=predictor.device)
                resized = resized.permute(2, 0, 1).contiguous()[None, :, :, :]
            with self._timer.stage("sam_encoder"):
                predictor.set_torch_image(resized, image.shape[:2])
            try:
                hw = _pair(image.shape[:2])
                sizes = {"input_size": _pair(predictor.input_size), "original_size": _pair(predictor.original_size)}
                return ImageEmbedding(flat_tensors({"features": predictor.features}), sizes, hw, hw)
            finally:
                predictor.reset_image()

    def segment_points(
        self,
        embedding: ImageEmbedding,
        points_xy: Floats,
        positive: Flags,
        box_xyxy: Floats | None,
    ) -> tuple[PackedMask, float]:
        """See `Segmenter.segment_points`. Only the best proposal is upsampled."""
        multimask = _check_prompt(points_xy, positive, box_xyxy)
        with self._image_set(embedding) as predictor:
            device = predictor.device
            coords = labels = boxes = None
            if len(points_xy):
                points = torch.as_tensor(points_xy[None], dtype=torch.float32, device=device)
                coords = predictor.transform.apply_coords_torch(points, predictor.original_size)
                labels = torch.as_tensor(positive[None].astype(np.int64), device=device)
            if box_xyxy is not None:
                boxes = self._boxes(box_xyxy[None])
            with self._timer.stage("sam_decoder"):
                logits, iou = self._decode(coords, labels, boxes, multimask)
            best, score = _best(iou[0])
            with self._timer.stage("sam_upsample"):
                return pack_masks(self._upsample(logits[:, best : best + 1]))[0], score

    @property
    def device(self) -> torch.device:
        """See `Segmenter.device`."""
        device: torch.device = self._predictor.device
        return device

    @property
    def embedding_dtype(self) -> torch.dtype:
        """See `Segmenter.embedding_dtype`: float32 in any precision (under autocast the encoder's neck ends in
        LayerNorm2d, whose float32 weight and bias bring its output back to float32)."""
        return torch.float32

    def _segment_embedding(self, embedding: ImageEmbedding, boxes_xyxy: Floats) -> tuple[Masks, Scores]:
        """One image's boxes (N, 4) xyxy pixels, N > 0, decoded on its embedding."""
        with self._image_set(embedding):
            boxes = self._boxes(boxes_xyxy)

            def decode(part: slice) -> tuple[torch.Tensor, torch.Tensor]:
                logits, iou = self._decode(None, None, boxes[part], multimask=False)
                return logits, iou[:, 0]

            per_call = masks_per_call(*embedding.input_hw, self._upsample_budget)
            return _decode_all(decode, self._upsample, len(boxes_xyxy), self._box_batch, per_call, self._timer)

    def _decode(
        self, coords: torch.Tensor | None, labels: torch.Tensor | None, boxes: torch.Tensor | None, multimask: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SamPredictor.predict_torch up to its upsampling: low-res logits (B, C, 256, 256), predicted IoU (B, C)."""
        predictor = self._predictor
        model = predictor.model
        points = None if coords is None else (coords, labels)
        sparse, dense = model.prompt_encoder(points=points, boxes=boxes, masks=None)
        decoded: tuple[torch.Tensor, torch.Tensor] = model.mask_decoder(
            image_embeddings=predictor.features,
            image_pe=model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )
        return decoded

    def _upsample(self, logits: torch.Tensor) -> torch.Tensor:
        """Low-res logits (k, 1, 256, 256) → (k, H, W) bool at the set image's size: the rest of predict_torch."""
        predictor = self._predictor
        masks: torch.Tensor = predictor.model.postprocess_masks(logits, predictor.input_size, predictor.original_size)
        threshold: float = predictor.model.mask_threshold
        return masks[:, 0] > threshold

    @contextmanager
    def _image_set(self, embedding: ImageEmbedding) -> Iterator[SamPredictor]:
        """The predictor holding `embedding` as its image's (what set_torch_image would have set; the encoder
        does not run), in `_modes`; left without an image afterwards."""
        predictor = self._predictor
        with self._modes():
            predictor.features = embedding.tensors["features"]
            predictor.input_size = embedding.sizes["input_size"]
            predictor.original_size = embedding.sizes["original_size"]
            predictor.is_image_set = True
            try:
                yield predictor
            finally:
                predictor.reset_image()  # drop the image's features until the next call

    @contextmanager
    def _modes(self) -> Iterator[None]:
        """Inference mode (the models are called directly, not through the package's no_grad predict_torch), and
        autocast when SAM runs in low precision."""
        device_type = self._predictor.device.type
        with torch.inference_mode(), torch.autocast(device_type, self._dtype, enabled=self._dtype != torch.float32):
            yield

    def _boxes(self, boxes_xyxy: Floats) -> torch.Tensor:
        """(N, 4) xyxy pixels of the set image → the model's input frame, float32 on its device."""
        predictor = self._predictor
        boxes = torch.as_tensor(boxes_xyxy, dtype=torch.float32, device=predictor.device)
        transformed: torch.Tensor = predictor.transform.apply_boxes_torch(boxes, predictor.original_size)
        return transformed


def masks_per_call(height: int, width: int, budget: int = UPSAMPLE_BUDGET) -> int:
    """How many (height, width) float32 masks fit in `budget` bytes; at least 1."""
    return max(1, budget // (4 * height * width))


def _decode_all(
    decode: Decode, upsample: Upsample, count: int, box_batch: int, per_call: int, timer: StageTimer
) -> tuple[Masks, Scores]:
    """Run `decode` over boxes in slices of `box_batch` (halved where the device runs out of memory), each
    slice's logits upsampled `per_call` at a time and packed; `count` masks, scores (count,) float32.
    `timer` times each decode ("sam_decoder") and its upsampling and packing ("sam_upsample").
    """

    def decode_part(boxes: Sequence[int]) -> list[tuple[list[PackedMask], torch.Tensor]]:
        with timer.stage("sam_decoder"):
            logits, scores = decode(slice(boxes[0], boxes[-1] + 1))
        with timer.stage("sam_upsample"):
            masks = [
                mask
                for start in range(0, len(logits), per_call)
                for mask in pack_masks(upsample(logits[start : start + per_call]))
            ]
        return [(masks, scores)]

    slices = [range(start, min(start + box_batch, count)) for start in range(0, count, box_batch)]
    parts = [part for boxes in slices for part in run_halving(decode_part, boxes, "box")]
    masks = tuple(mask for part_masks, _ in parts for mask in part_masks)
    # The IoU head is an unbounded regression; clamp it to the range of an IoU.
    scores = torch.cat([scores for _, scores in parts]).float().clamp(0, 1).cpu().numpy()
    return masks, scores


def pack_masks(masks: torch.Tensor) -> list[PackedMask]:
    """Bool masks (k, H, W) on any device → k PackedMasks; each mask's bounding box is found on the device
    and only its crop is copied to the host."""
    _, height, width = masks.shape
    rows, cols = masks.any(dim=2), masks.any(dim=1)  # (k, H), (k, W)
    first_row, first_col = rows.int().argmax(dim=1), cols.int().argmax(dim=1)
    last_row, last_col = height - rows.flip(1).int().argmax(dim=1), width - cols.flip(1).int().argmax(dim=1)
    bounds = torch.stack([rows.any(dim=1).int(), first_row, last_row, first_col, last_col], dim=1).tolist()
    packed = []
    for mask, (painted, top, bottom, left, right) in zip(masks, bounds, strict=True):
        crop = mask[top:bottom, left:right].cpu().numpy() if painted else np.zeros((0, 0), bool)
        packed.append(PackedMask.from_window(crop, top, left, (height, width)))
    return packed


def _check_prompt(
    points_xy: Floats,
    positive: Flags,
    box_xyxy: Floats | None,
) -> bool:
    """Validate an interactive prompt's shapes; True when it is one lone point (ask for three masks)."""
    if points_xy.ndim != 2 or points_xy.shape[1] != 2 or positive.shape != (len(points_xy),):
        raise ValueError(f"points must be (N, 2) with (N,) labels, got {points_xy.shape} and {positive.shape}")
    if box_xyxy is not None and box_xyxy.shape != (4,):
        raise ValueError(f"the box must be (4,) xyxy, got shape {box_xyxy.shape}")
    if len(points_xy) == 0 and box_xyxy is None:
        raise ValueError("a SAM prompt needs at least one point or a box")
    return len(points_xy) == 1 and box_xyxy is None


def _best(scores: torch.Tensor) -> tuple[int, float]:
    """Of k proposals' predicted IoU (k,): the best one's index and its score, clamped to [0, 1]."""
    best = int(scores.argmax())
    return best, float(scores[best].float().clamp(0, 1))


def _known(known: Known, count: int) -> Sequence[ImageEmbedding | None]:
    """`segment_stream`'s known embeddings, one per image (None: none given)."""
    if known is None:
        return [None] * count
    if len(known) != count:
        raise ValueError(f"{len(known)} known embeddings for {count} images")
    return known


def _pair(values: Sequence[int]) -> tuple[int, int]:
    """An (H, W) pair of plain ints."""
    height, width = values
    return int(height), int(width)


def _size_tensors(embedding: ImageEmbedding) -> dict[str, torch.Tensor]:
    """An embedding's processor sizes as the processor gave them: (1, 2) int64 tensors."""
    return {key: torch.tensor([size]) for key, size in embedding.sizes.items()}


def _rows(value: torch.Tensor | list[torch.Tensor], row: int) -> torch.Tensor | list[torch.Tensor]:
    """Image `row` of a batched encoder output, keeping its batch axis: (1, ...), or each level's."""
    if isinstance(value, list):
        return [level[row : row + 1] for level in value]
    return value[row : row + 1]


def _no_masks() -> tuple[Masks, Scores]:
    """The answer for zero boxes, without running SAM: no masks, scores (0,)."""
    return (), np.zeros(0, dtype=np.float32)
