"""SAM in low precision against float32 on the same weights: masks that agree on the same boxes, and (with
trained weights) the same objects with the same labels through the whole pipeline — the bar of issue 6: mask
IoU >= 0.98 and the same labels.

Runs on the CPU always and on CUDA wherever a GPU is present (skipped, visibly, where none is). The weights are
the tiny random test models unless EQUIVALENCE_DETECTOR and EQUIVALENCE_SAM name local checkpoints (trained
weights on a GPU box: `EQUIVALENCE_DETECTOR=/models/gdino-t EQUIVALENCE_SAM=/models/sam-vit-h pytest -k precision`).
Random weights are the harder case: their mask logits hover near zero, where rounding flips pixels.

SAM 2 and SAM 3 alone (text → masks) in bfloat16 are checked on CUDA only, on their tiny random models unless
EQUIVALENCE_SAM2 / EQUIVALENCE_SAM3 name trained checkpoints.
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
from backend.pipeline.architectures import detector_architecture
from backend.pipeline.build import build_pipeline, build_sam3, build_segmenter
from backend.pipeline.segmenter import Segmenter
from backend.pipeline.types import DetectionThresholds, Instance, ModelSpec, TextClass
from tests.tiny_models import build_tiny_sam2, build_tiny_sam3

CLASSES = (TextClass("Cat", ("cat",)), TextClass("Dog", ("dog",)), TextClass("Car", ("car",)))
THRESHOLDS = DetectionThresholds(box=0.0, text=0.0, max_detections=5)
TRAINED = bool(os.environ.get("EQUIVALENCE_SAM"))
# Issue 6's bar holds for trained weights. The tiny random ones only guard against gross breakage: their mask
# logits hover near zero, where rounding flips pixels (bfloat16 on the CPU: mean IoU 0.977, worst 0.90).
MEAN_IOU = 0.98 if TRAINED else 0.95
WORST_IOU = 0.9 if TRAINED else 0.85

CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here"))
DEVICES = ["cpu", CUDA]
# SAM 2's and SAM 3's tiny random models in bfloat16 (measured on the CPU): median mask IoU 0.99 and 0.98, but a
# few SAM 2 masks whose logits sit at zero over half the image flip wholesale (IoU 0.14): their bar is the median.
FAMILY_MEDIAN_IOU = 0.95


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


def compared_on_boxes(exact: Segmenter, low: Segmenter) -> tuple[list[float], list[float]]:
    """Per mask of `scenes(4)` x `boxes_on` them: its IoU between the two segmenters, and their scores' gap."""
    ious, score_gaps = [], []
    with torch.inference_mode():
        for seed, image in enumerate(scenes(4)):
            pixels, boxes = np.array(image), boxes_on(image, seed)
            (masks, scores), (low_masks, low_scores) = exact.segment(pixels, boxes), low.segment(pixels, boxes)
            ious += [mask_iou(m, lm) for m, lm in zip(masks, low_masks, strict=True)]
            score_gaps += [float(gap) for gap in np.abs(scores - low_scores)]
    return ious, score_gaps


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
    ious, score_gaps = compared_on_boxes(exact, low)
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


@pytest.mark.parametrize("device", [CUDA])
def test_bfloat16_sam2_masks_match_float32_on_the_same_boxes(tmp_path: Path, device: str) -> None:
    sam = os.environ.get("EQUIVALENCE_SAM2") or str(build_tiny_sam2(tmp_path / "sam2"))
    spec = ModelSpec(detector="unused", sam=sam, device=device)
    exact, low = build_segmenter(spec), build_segmenter(replace(spec, sam_dtype="bfloat16"))
    ious, score_gaps = compared_on_boxes(exact, low)
    assert_family_agrees(ious, score_gaps, trained="EQUIVALENCE_SAM2" in os.environ)


@pytest.mark.parametrize("device", [CUDA])
def test_bfloat16_sam3_alone_gives_the_float32_queries_scores_and_masks(tmp_path: Path, device: str) -> None:
    """Every query of every phrase (no threshold, no NMS), in query order: the same queries pass, with their
    scores and masks (the detector's own candidates and mask upsampling, as `segment_batch` runs them)."""
    source = os.environ.get("EQUIVALENCE_SAM3") or str(build_tiny_sam3(tmp_path / "sam3"))
    spec = ModelSpec(detector=source, sam="unused", device=device)
    architecture = detector_architecture(source)
    (exact, _), (low, _) = build_sam3(spec, architecture), build_sam3(replace(spec, sam_dtype="bfloat16"), architecture)
    ious, score_gaps = [], []
    with torch.inference_mode():
        for image in scenes(4):
            found = []
            for detector in (exact, low):
                prompts = detector.prepare(CLASSES)
                queries = detector._candidates(image, prompts, torch.zeros(len(prompts.phrases)), 10**6)
                found.append((queries, detector._masks(queries.logits, image.height, image.width)))
            (queries, masks), (low_queries, low_masks) = found
            assert torch.equal(queries.classes, low_queries.classes), "other queries than float32 have a box"
            ious += [mask_iou(m, lm) for m, lm in zip(masks, low_masks, strict=True)]
            score_gaps += (queries.scores - low_queries.scores).abs().tolist()
    assert_family_agrees(ious, score_gaps, trained="EQUIVALENCE_SAM3" in os.environ)


def assert_family_agrees(ious: list[float], score_gaps: list[float], trained: bool) -> None:
    """Issue 6's bar (mean mask IoU >= 0.98) with trained weights; the median on the tiny random ones."""
    assert ious, "nothing was segmented: the comparison would prove nothing"
    if trained:
        assert np.mean(ious) >= 0.98 and min(ious) >= WORST_IOU, f"mask IoU vs float32: {np.round(ious, 3)}"
    else:
        assert np.median(ious) >= FAMILY_MEDIAN_IOU, f"mask IoU vs float32: {np.round(ious, 3)}"
    assert max(score_gaps) <= 0.02, f"scores differ from float32 by up to {max(score_gaps):.3f}"


def run(spec: ModelSpec, images: list[Image.Image]) -> list[list[Instance]]:
    pipeline = build_pipeline(spec, THRESHOLDS)
    return pipeline.run_batch(images, pipeline.prepare(CLASSES))
