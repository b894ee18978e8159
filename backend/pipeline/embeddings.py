"""One image's SAM image-encoder output, kept to answer later prompts on that image with the decoder alone.

The encoder is the costly part of a click (SAM ViT-H: ~159 ms on an H100 in fp32; the prompt decoder a few ms),
so a segmenter's `encode` gives an `ImageEmbedding` that its `segment_points` / `segment_stream` take back
instead of the pixels. Its tensors have flat names, so that one embedding is one safetensors file:

- transformers SAM: "image_embeddings" (1, C, 64, 64); SAM-HQ also "intermediate_embeddings.<i>" (1, 64, 64, D),
  one per ViT global-attention block; SAM 2 / 2.1, SAM 3's tracker and EdgeTAM "image_embeddings.<level>"
  (1, C_l, h_l, w_l), high resolution first;
- segment-anything's SamPredictor: "features" (1, C, 64, 64).

`sizes` holds the segmenter's own per-image sizes, (H, W) each: transformers' processor "original_sizes" (and
"reshaped_input_sizes" where it pads rather than stretches), segment-anything's "input_size" and
"original_size". Every tensor is contiguous in a storage of its own: a row of a batched encoder output does not
keep the whole batch alive, and safetensors takes it as it is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch

# A forward keyword of the encoder's output: one tensor, or a list of them (multi-scale features).
Nested = Mapping[str, torch.Tensor | Sequence[torch.Tensor]]


# Changes whenever the tensors' names, shapes or meaning change for the same model: kept embeddings (the on-disk
# cache) of another layout are never decoded on.
LAYOUT = "1"


@dataclass(frozen=True, slots=True, eq=False)
class ImageEmbedding:
    """One image's SAM image-encoder output: what the prompt decoder needs to answer clicks and boxes on that
    image without running the encoder again.

    tensors: flat names (e.g. "image_embeddings", "image_embeddings.0") -> (1, ...) tensors, on the model's device.
    sizes: the segmenter's own per-image sizes, (H, W) each (see the module docstring).
    input_hw: (H, W) of the pixels SAM encoded (after sam_input padding); the segmenter's masks have this size.
    image_hw: (H, W) of the image itself (masks are cut back to it).
    """

    tensors: Mapping[str, torch.Tensor]
    sizes: Mapping[str, tuple[int, int]]
    input_hw: tuple[int, int]
    image_hw: tuple[int, int]

    @property
    def nbytes(self) -> int:
        """Summed bytes of the tensors."""
        return sum(tensor.numel() * tensor.element_size() for tensor in self.tensors.values())

    def to(self, device: torch.device | str, dtype: torch.dtype) -> ImageEmbedding:
        """This embedding on `device`, its floating tensors cast to `dtype` (others keep theirs)."""
        moved = {
            name: tensor.to(device, dtype) if tensor.is_floating_point() else tensor.to(device)
            for name, tensor in self.tensors.items()
        }
        return replace(self, tensors=moved)


def flat_tensors(outputs: Nested) -> dict[str, torch.Tensor]:
    """Forward keywords → flat names: a list's items become "<name>.<i>"; each tensor made `owned`."""
    flat: dict[str, torch.Tensor] = {}
    for name, value in outputs.items():
        if isinstance(value, torch.Tensor):
            flat[name] = owned(value)
        else:
            flat |= {f"{name}.{index}": owned(level) for index, level in enumerate(value)}
    return flat


def nested_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """Flat names → forward keywords, `flat_tensors` undone: "<name>.<i>" gathered into a list by index.

    Raises ValueError when a list's indexes are not 0..n-1 (an embedding of another model or a damaged file).
    """
    plain: dict[str, torch.Tensor | list[torch.Tensor]] = {}
    levels: dict[str, dict[int, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        stem, dot, index = name.rpartition(".")
        if dot and index.isdigit():
            levels.setdefault(stem, {})[int(index)] = tensor
        else:
            plain[name] = tensor
    for stem, by_index in levels.items():
        if sorted(by_index) != list(range(len(by_index))) or stem in plain:
            raise ValueError(f"embedding tensors {stem!r}.<i> have indexes {sorted(by_index)}, not 0..n-1")
        plain[stem] = [by_index[index] for index in range(len(by_index))]
    return plain


def owned(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` itself when it is contiguous and alone in its storage, else a contiguous copy of it (a view of
    one image's row would keep the whole batch's storage alive)."""
    alone = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    if tensor.is_contiguous() and alone:
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)
