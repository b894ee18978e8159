"""SAM's preprocessing on the model's device: the CPU hands over uint8 pixels, the device resizes, normalises, pads.

transformers 5's SAM image processors (SamImageProcessor for SAM and SAM-HQ, Sam2ImageProcessor for SAM 2 / 2.1
and EdgeTAM, Sam3ImageProcessor for SAM 3's tracker) are torchvision-backed: given torch tensors they run on the
tensors' device (and take a `device` argument). So an image goes to the device as its (H, W, 3) uint8 pixels
(copied from pinned memory without blocking the host, on CUDA) and the processor does the rest there; no float
image is ever made on the CPU. On the CPU the device is the CPU: the same code, and the same values as the
processor given the numpy array. A processor of the PIL backend (SamImageProcessorPil: numpy on the CPU) is
replaced by its torchvision-backed class with the same settings.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import transformers
from transformers import ProcessorMixin
from transformers.image_processing_backends import TorchvisionBackend


def device_processor(processor: ProcessorMixin) -> ProcessorMixin:
    """`processor` itself when its image processor is torchvision-backed (what transformers 5 loads when torchvision
    is installed), else a shallow copy of it whose image processor is the torchvision-backed class of the same
    family (its name without "Pil") with the same settings. A family with no such class keeps its processor."""
    image_processor: Any = processor.image_processor
    if isinstance(image_processor, TorchvisionBackend):
        return processor
    fast = getattr(transformers, type(image_processor).__name__.removesuffix("Pil"), None)
    if not (isinstance(fast, type) and issubclass(fast, TorchvisionBackend)):
        return processor
    replaced = copy.copy(processor)
    replaced.image_processor = fast.from_dict(image_processor.to_dict())
    return replaced


def pixels_on(image: npt.NDArray[np.uint8], device: torch.device) -> torch.Tensor:
    """An (H, W, 3) uint8 RGB image as an (H, W, 3) uint8 tensor on `device`.

    CUDA: one copy into pinned memory, then a non-blocking copy to the device (the caching host allocator keeps
    the pinned buffer until the copy is done; the processor's kernels follow it on the same stream). CPU: the
    array's own memory (copied only when it is not contiguous, e.g. a flipped view).
    """
    if device.type != "cuda":
        return torch.from_numpy(np.ascontiguousarray(image))
    staged = torch.empty(image.shape, dtype=torch.uint8, pin_memory=True)
    staged.numpy()[...] = image
    return staged.to(device, non_blocking=True)
