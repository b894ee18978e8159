"""SAM in low precision against float32 on the same weights: masks that agree on the same boxes, and (with
trained weights) the same objects with the same labels through the whole pipeline — the bar of issue 6: mask
IoU >= 0.98 and the same labels.

Runs on the CPU always and on CUDA wherever a GPU is present (skipped, visibly, where none is). The weights are
the tiny random test models unless EQUIVALENCE_DETECTOR and EQUIVALENCE_SAM name local checkpoints (trained
weights on a GPU box: `EQUIVALENCE_DETECTOR=/models/gdino-t EQUIVALENCE_SAM=/models/sam-vit-h pytest -k precision`).
Random weights are the harder case: their mask logits hover near zero, where rounding flips pixels.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backend.packed_mask import PackedMask
from backend.pipeline.build import build_pipeline, build_segmenter
from backend.pipeline.types import DetectionThresholds, Instance, ModelSpec, TextClass

CLASSES = (TextClass("Cat", ("cat",)), TextClass("Dog", ("dog",)), TextClass("Car", ("car",)))
THRESHOLDS = DetectionThresholds(box=0.0, text=0.0, max_detections=5)
TRAINED = bool(os.environ.get("EQUIVALENCE_SAM"))
# Issue 6's bar holds for trained weights. The tiny random ones only guard against gross breakage: their mask
# logits hover near zero, where rounding flips pixels (bfloat16 on the CPU: mean IoU 0.977, worst 0.90).
MEAN_IOU = 0.98 if TRAINED else 0.95
WORST_IOU = 0.9 if TRAINED else 0.85

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")),
]


def scenes(count: int) -> list[Image.Image]:
    """Images with a few filled shapes on a gradient, 640x480 and 480x640."""
    images = []
    for seed in range(count):
        rng = np.random.default_rng(seed)
        height, width = (480, 640) if seed % 2 == 0 else (640, 480)
        pixels = np.linspace(0, 255, width, dtype=np.float32)[None, :, None].repeat(height, 0).repeat(3, 2)
        for _ in range(4):
            y, x = rng.integers(0, height - 60), rng.integers(0, width - 60)
            pixels[y : y + rng.integers(30, 120), x : x + rng.integers(30, 120)] = rng.integers(0, 256, 3)
        images.append(Image.fromarray(pixels.clip(0, 255).astype(np.uint8)))
    return images


def mask_iou(first: PackedMask, second: PackedMask) -> float:
    first, second = first.to_array(), second.to_array()
    union = np.count_nonzero(first | second)
    return np.count_nonzero(first & second) / union if union else 1.0


def boxes_on(image: Image.Image, seed: int) -> np.ndarray:
    """Five xyxy pixel boxes of 40..300 px on `image`."""
    rng = np.random.default_rng(seed)
    x0, y0 = rng.uniform(0, image.width - 300, 5), rng.uniform(0, image.height - 300, 5)
    width, height = rng.uniform(40, 300, 5), rng.uniform(40, 300, 5)
    return np.stack([x0, y0, x0 + width, y0 + height], axis=1).astype(np.float32)


def lowered_dtype(device: str, dtype: str) -> None:
    if device == "cpu" and dtype == "float16":
        pytest.skip("float16 SAM is a GPU setting")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_sam_masks_match_float32_on_the_same_boxes(
    tiny_hf_sam_dir: Path, device: str, dtype: str
) -> None:
    lowered_dtype(device, dtype)
    sam = os.environ.get("EQUIVALENCE_SAM", str(tiny_hf_sam_dir))
    spec = ModelSpec(detector="unused", sam=sam, device=device)
    exact = build_segmenter(spec)
    low = build_segmenter(replace(spec, sam_dtype=dtype))
    ious, score_gaps = [], []
    with torch.inference_mode():
        for seed, image in enumerate(scenes(4)):
            pixels, boxes = np.array(image), boxes_on(image, seed)
            (masks, scores), (low_masks, low_scores) = exact.segment(pixels, boxes), low.segment(pixels, boxes)
            ious += [mask_iou(m, lm) for m, lm in zip(masks, low_masks, strict=True)]
            score_gaps += list(np.abs(scores - low_scores))
    assert np.mean(ious) >= MEAN_IOU and min(ious) >= WORST_IOU, f"mask IoU vs float32: {np.round(ious, 3)}"
    assert max(score_gaps) <= 0.02, f"predicted IoU differs from float32 by up to {max(score_gaps):.3f}"


@pytest.mark.skipif(
    not (os.environ.get("EQUIVALENCE_DETECTOR") and os.environ.get("EQUIVALENCE_SAM")),
    reason="needs trained weights (EQUIVALENCE_DETECTOR, EQUIVALENCE_SAM): on random weights every box scores ~1 "
    "and overlaps the others, so one-label-per-object decisions are ties that any rounding flips",
)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_pipeline_gives_the_float32_objects_and_labels(device: str, dtype: str) -> None:
    lowered_dtype(device, dtype)
    spec = ModelSpec(detector=os.environ["EQUIVALENCE_DETECTOR"], sam=os.environ["EQUIVALENCE_SAM"], device=device)
    images = scenes(4)
    reference, lowered = run(spec, images), run(replace(spec, sam_dtype=dtype), images)
    ious = []
    for exact, low in zip(reference, lowered, strict=True):
        assert [i.detection for i in low] == [i.detection for i in exact], "other objects or labels than float32"
        ious += [mask_iou(e.mask, lo.mask) for e, lo in zip(exact, low, strict=True)]
    assert ious, "nothing was segmented: the comparison would prove nothing"
    assert np.mean(ious) >= 0.98, f"mask IoU vs float32: {np.round(ious, 3)}"


def run(spec: ModelSpec, images: list[Image.Image]) -> list[list[Instance]]:
    pipeline = build_pipeline(spec, THRESHOLDS)
    return pipeline.run_batch(images, pipeline.prepare(CLASSES))
