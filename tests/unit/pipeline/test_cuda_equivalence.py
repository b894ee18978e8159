"""The GPU path's precision, on CUDA only (skipped without a GPU; bench/gpu_run.sh runs it first): what lets
SAM_DTYPE=auto pick bfloat16 on CUDA, and whether TF32 would change the detector.

- SAM in bfloat16 (its image encoder; the prompt decoder stays float32, backend.pipeline.sam_precision) against
  float32 on the same weights, at 1080p, on the tiny random SamModel (loaded through
  build_segmenter) and on full-size SAM ViT-H built from its config with random weights (as bench/pipeline.py
  `_full_segmenter` builds it; no download): per-box mask IoU, the mean >= 0.98 (the minimum is printed).
- SAM's preprocessing on the device (CUDA's torchvision resize of the uint8 pixels) against the processor on the
  numpy image on the CPU, both float32, full-size ViT-H weights: mean mask IoU >= 0.99.
- Grounding DINO-T (GroundingDinoConfig() defaults: Swin-T + BERT-base, random weights, 800x1066) in float32
  against TF32 matmuls and convolutions: the same top queries, labels and boxes (within 1 px). The tiny test
  model's TF32 check through the production detector is test_detector_fast_path.py's.

Random weights are the hard case for low precision (their mask logits hover near zero, where rounding flips
pixels), so a pass here is conservative. Under a minute on an H100 (two full-size models built on the GPU).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers as hf

from backend.packed_mask import stacked
from backend.pipeline.build import build_segmenter
from backend.pipeline.sam_precision import lowered
from backend.pipeline.segmenter import HfSamSegmenter
from backend.pipeline.types import ModelSpec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here (bench/gpu_run.sh runs it)")

DEVICE = "cuda"
HEIGHT, WIDTH = 1080, 1920
MEAN_IOU = 0.98
DEVICE_PATH_IOU = 0.99
# SAM ViT-H (bench/pipeline.py SAM_SIZES["vit_h"]).
VIT_H = dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, global_attn_indexes=[7, 15, 23, 31])
TOP = 5  # detector queries compared (of 900)


def scene(seed: int, height: int = HEIGHT, width: int = WIDTH) -> tuple[np.ndarray, np.ndarray]:
    """An (H, W, 3) uint8 image of a gradient with five filled rectangles, and boxes (6, 4) xyxy: each rectangle's
    and the whole image's."""
    rng = np.random.default_rng(seed)
    pixels = np.linspace(0, 255, width, dtype=np.float32)[None, :, None].repeat(height, 0).repeat(3, 2)
    boxes = []
    for _ in range(5):
        h, w = int(rng.integers(80, 400)), int(rng.integers(80, 600))
        y, x = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
        pixels[y : y + h, x : x + w] = rng.integers(0, 256, 3)
        boxes.append([x, y, x + w, y + h])
    boxes.append([0, 0, width, height])
    return pixels.astype(np.uint8), np.array(boxes, np.float32)


def masks_of(segmenter: HfSamSegmenter, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """The segmenter's masks (N, H, W) bool for `boxes` on `image`."""
    with torch.inference_mode():
        masks, _ = segmenter.segment(image, boxes)
    return stacked(masks, image.shape[:2])


def ious(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Per mask IoU of two (N, H, W) bool stacks (1 where both are empty)."""
    inter = (first & second).sum(axis=(1, 2))
    union = (first | second).sum(axis=(1, 2))
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def compared(first: HfSamSegmenter, second: HfSamSegmenter, seeds: range = range(2)) -> np.ndarray:
    """Per-box mask IoU of the two segmenters over the scenes of `seeds`, all boxes together."""
    found = []
    for seed in seeds:
        image, boxes = scene(seed)
        found.append(ious(masks_of(first, image, boxes), masks_of(second, image, boxes)))
    return np.concatenate(found)


@pytest.fixture(scope="module")
def vit_h() -> Iterator[HfSamSegmenter]:
    """Full-size SAM ViT-H, random weights (seeded), float32 on CUDA, with the processor a hub checkpoint loads."""
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = hf.SamModel(hf.SamConfig(vision_config=hf.SamVisionConfig(**VIT_H))).eval()
    yield HfSamSegmenter(model, hf.SamProcessor(image_processor=hf.SamImageProcessor()))
    del model
    torch.cuda.empty_cache()


def in_bfloat16(segmenter: HfSamSegmenter) -> HfSamSegmenter:
    """The same weights as build_segmenter makes them for SAM_DTYPE=bfloat16 (`lowered`: the encoder in bfloat16,
    the prompt decoder a float32 copy), the same processor."""
    model, decoder = lowered(copy.deepcopy(segmenter._model), torch.bfloat16)
    return HfSamSegmenter(model, segmenter._processor, decoder=decoder)


def test_tiny_sam_in_bfloat16_gives_float32_masks_at_1080p(tiny_hf_sam_dir: Path) -> None:
    spec = ModelSpec(detector="unused", sam=str(tiny_hf_sam_dir), device=DEVICE)
    exact, low = build_segmenter(spec), build_segmenter(replace(spec, sam_dtype="bfloat16"))
    assert isinstance(exact, HfSamSegmenter) and isinstance(low, HfSamSegmenter)

    found = compared(exact, low)

    print(f"tiny SAM bf16 vs fp32, 1080p: mask IoU mean {found.mean():.4f} min {found.min():.4f} ({len(found)} boxes)")
    assert found.mean() >= MEAN_IOU


def test_sam_vit_h_in_bfloat16_gives_float32_masks_at_1080p(vit_h: HfSamSegmenter) -> None:
    low = in_bfloat16(vit_h)

    found = compared(vit_h, low)

    print(f"SAM ViT-H bf16 vs fp32, 1080p: mask IoU mean {found.mean():.4f} min {found.min():.4f} ({len(found)} boxes)")
    assert found.mean() >= MEAN_IOU


def test_sam_vit_h_preprocessed_on_cuda_gives_the_cpu_processors_masks(vit_h: HfSamSegmenter) -> None:
    """The device path (uint8 to CUDA, resized there) against the processor on the numpy image (CPU)."""
    model: Any = vit_h._model
    processor: Any = vit_h._processor
    found = []
    for seed in range(2):
        image, boxes = scene(seed)
        inputs = processor(
            images=image, input_boxes=[boxes.tolist()], input_data_format="channels_last", return_tensors="pt"
        )
        with torch.inference_mode():
            embeddings = model.get_image_embeddings(inputs["pixel_values"].to(DEVICE))
            out = model(
                image_embeddings=embeddings,
                input_boxes=inputs["input_boxes"].float().to(DEVICE),
                multimask_output=False,
            )
            masks = processor.post_process_masks(
                out.pred_masks, inputs["original_sizes"], reshaped_input_sizes=inputs["reshaped_input_sizes"]
            )[0][:, 0]
        found.append(ious(masks_of(vit_h, image, boxes), masks.cpu().numpy()))
    ious_found = np.concatenate(found)

    print(f"SAM ViT-H device vs CPU preprocessing: mask IoU mean {ious_found.mean():.4f} min {ious_found.min():.4f}")
    assert ious_found.mean() >= DEVICE_PATH_IOU


@contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 matmuls and cuDNN convolutions on or off, restored afterwards."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def dino_top(model: Any, inputs: dict[str, torch.Tensor], tokens: int) -> tuple[list[int], np.ndarray, np.ndarray]:
    """The TOP best queries of one image (by their best token's sigmoid), their best tokens and boxes (TOP, 4) cxcywh
    normalised."""
    with torch.inference_mode():
        out = model(**inputs)
    scores, labels = out.logits[0, :, :tokens].sigmoid().max(dim=-1)
    order = scores.argsort(descending=True)[:TOP]
    return order.tolist(), labels[order].cpu().numpy(), out.pred_boxes[0, order].float().cpu().numpy()


def test_grounding_dino_t_with_tf32_finds_the_float32_top_boxes_and_labels() -> None:
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = hf.GroundingDinoForObjectDetection(hf.GroundingDinoConfig()).eval()
    image, _ = scene(0, 800, 1066)
    mean = torch.tensor([0.485, 0.456, 0.406], device=DEVICE)[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225], device=DEVICE)[:, None, None]
    pixels = ((torch.from_numpy(image).to(DEVICE).permute(2, 0, 1).float() / 255 - mean) / std)[None]
    generator = torch.Generator().manual_seed(0)
    tokens = 12
    input_ids = torch.randint(1000, 30000, (1, tokens), generator=generator).to(DEVICE)
    input_ids[0, 0], input_ids[0, -1] = 101, 102  # [CLS] ... [SEP]
    inputs = {"pixel_values": pixels, "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    with tf32(False):
        exact = dino_top(model, inputs, tokens)
    with tf32(True):
        fast = dino_top(model, inputs, tokens)

    print(f"DINO-T TF32 vs fp32: top-{TOP} queries {fast[0]} vs {exact[0]}")
    assert sorted(fast[0]) == sorted(exact[0])
    by_query = {query: row for row, query in enumerate(fast[0])}
    rows = [by_query[query] for query in exact[0]]
    np.testing.assert_array_equal(fast[1][rows], exact[1])
    scale = np.array([1066, 800, 1066, 800], np.float32)
    np.testing.assert_allclose(fast[2][rows] * scale, exact[2] * scale, atol=1.0, rtol=0)  # within 1 px
