"""Grounding DINO's preprocessing on the model's device: the CPU only decodes, the pixels travel as uint8.

An image goes to the device as its (H, W, 3) uint8 pixels (from pinned memory, non-blocking, on CUDA), and there
it is padded to the aspect ratio the detector takes (backend.pipeline.shapes: past DETECTOR_MAX_ASPECT it is
shrunk to DETECTOR_LONGEST px and padded with black), resized, normalised and given its pixel mask by transformers'
torchvision-backed GroundingDinoImageProcessor, which runs on the tensor's device. transformers 5's AutoProcessor
loads that class for Grounding DINO checkpoints, so on the CPU this path computes what the processor computes, but
for the shrink of very wide or tall images (torchvision's antialiased bilinear here, PIL's in shapes.py; the tests:
same detections, boxes within 1 px). A processor of the PIL backend (GroundingDinoImageProcessorPil) is replaced
by the torchvision class with the same settings.
"""

from __future__ import annotations

import math
from typing import cast

import numpy as np
import torch
from PIL import Image
from transformers import GroundingDinoImageProcessor
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_utils import SizeDict

from backend.pipeline.shapes import DETECTOR_LONGEST, DETECTOR_MAX_ASPECT


def device_processor(processor: BaseImageProcessor) -> GroundingDinoImageProcessor:
    """`processor` itself when it is the torchvision-backed GroundingDinoImageProcessor, else that class with
    `processor`'s settings (size, resample, mean, std, padding)."""
    if isinstance(processor, GroundingDinoImageProcessor):
        return processor
    return cast(GroundingDinoImageProcessor, GroundingDinoImageProcessor.from_dict(processor.to_dict()))


def to_device(image: Image.Image, device: torch.device) -> torch.Tensor:
    """`image`'s RGB pixels as a (3, H, W) uint8 tensor on `device`: on CUDA copied from pinned memory without
    blocking the host (the caching host allocator keeps the staging buffer until the copy is done); on the CPU
    a plain copy (as the processor's own np.array of a PIL image)."""
    array = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    pinned = device.type == "cuda"
    pixels = torch.empty(array.shape, dtype=torch.uint8, pin_memory=pinned)
    pixels.numpy()[...] = array  # one copy: PIL's buffer is read-only, torch wants a writable one
    if pinned:
        pixels = pixels.to(device, non_blocking=True)
    return pixels.permute(2, 0, 1)


def aspect_padded(
    processor: GroundingDinoImageProcessor, pixels: torch.Tensor
) -> tuple[torch.Tensor, tuple[float, float]]:
    """shapes.detector_input on a (3, H, W) uint8 tensor, on its device (with `processor`'s torchvision resize,
    antialiased bilinear, and pad): the tensor to give the processor, and the size (width, height), in pixels of
    the image, that the model's normalised boxes are relative to."""
    height, width = pixels.shape[-2:]
    if max(width, height) <= DETECTOR_MAX_ASPECT * min(width, height):
        return pixels, (float(width), float(height))
    scale = min(1.0, DETECTOR_LONGEST / max(width, height))
    small_w, small_h = max(1, round(width * scale)), max(1, round(height * scale))
    small = processor.resize(pixels, SizeDict(height=small_h, width=small_w)) if scale < 1 else pixels
    padded_w = max(small_w, math.ceil(small_h / DETECTOR_MAX_ASPECT))
    padded_h = max(small_h, math.ceil(small_w / DETECTOR_MAX_ASPECT))
    canvas, _mask, _ = processor.pad(small, (padded_h, padded_w))
    return canvas, (padded_w * width / small_w, padded_h * height / small_h)


def preprocess(processor: GroundingDinoImageProcessor, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The processor's resize + normalise of one (3, H, W) uint8 image on its device: pixel_values (1, 3, h, w)
    float32 and pixel_mask (1, h, w), on that device."""
    features = processor(images=[pixels], return_tensors="pt", input_data_format="channels_first")
    return {"pixel_values": features["pixel_values"], "pixel_mask": features["pixel_mask"]}
