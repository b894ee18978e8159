"""SAM in low precision where it pays: the image encoder in the loaded dtype, the prompt decoder in float32.

The image encoder is nearly all of SAM's compute (ViT-H: ~6 TFLOP per image; the decoder ~3.6 GFLOP per box), and
it is what bfloat16 speeds up (159 -> 36 ms per image on an H100). The decoder's mask logits are sums of many
products that largely cancel (with random weights their median magnitude is ~0.003): in bfloat16 their rounding
flips whole regions of a mask (measured on the CPU with a random ViT: mask IoU 0.54-0.89 against float32), while a
bfloat16 encoder followed by a float32 decoder gave the float32 masks (IoU 1.0). So a model loaded in a low
precision keeps its encoder (and the embeddings it gives, which caches hold) in that dtype, and its boxes and
clicks are decoded by a float32 copy of the rest of the model (prompt encoder, mask decoder: a few MB), copied
from the float32 weights before the cast: a decoder cast to bfloat16 and back keeps the rounding of its weights,
which alone flipped as much as the bfloat16 decoder did.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from transformers import PreTrainedModel

# An image encoder's output as forward kwargs: one tensor (B, ...) or a list of them (multi-scale features).
Embeddings = Mapping[str, torch.Tensor | list[torch.Tensor]]


def lowered(model: PreTrainedModel, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedModel]:
    """`model` (as loaded, in float32) in `dtype`, and what decodes its prompts: `model` itself when `dtype` is
    float32, else a float32 copy of all of `model` but its image encoder (`vision_encoder`, left out of the copy:
    the copy decodes given embeddings and never encodes), made before the cast, so from the loaded weights."""
    if dtype == torch.float32:
        return model, model
    encoder = model.vision_encoder
    model.vision_encoder = torch.nn.Identity()
    try:
        decoder = copy.deepcopy(model)
    finally:
        model.vision_encoder = encoder
    model.to(dtype)  # type: ignore[arg-type]  # nn.Module.to casts in place; transformers' stubs wrap it oddly
    return model, decoder.eval()


def in_dtype(embeddings: Embeddings, dtype: torch.dtype) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """Encoder outputs (one tensor or a list of them per keyword) with their tensors in `dtype` (the decoder's)."""
    return {
        name: [level.to(dtype) for level in value] if isinstance(value, list) else value.to(dtype)
        for name, value in embeddings.items()
    }
