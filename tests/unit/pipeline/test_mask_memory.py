"""Bounded memory per image: SAM's masks are upsampled to the image a few at a time (at most UPSAMPLE_BUDGET bytes
of floats per call) and packed at once; they are the masks that one post-processing call over every box gives
(what the segmenters did before), for both segmenters and the interactive path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from backend.packed_mask import stacked
from backend.pipeline.build import _load_sam_checkpoint
from backend.pipeline.segmenter import (
    UPSAMPLE_BUDGET,
    HfSamSegmenter,
    SegmentAnythingSegmenter,
    masks_per_call,
)
from tests.support.models import hf_segmenter
from tests.support.synthetic import random_rgb

HEIGHT, WIDTH = 90, 130
ONE_MASK = 4 * HEIGHT * WIDTH  # bytes of one float32 mask of the test image


def boxes(count: int, height: int = HEIGHT, width: int = WIDTH, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x0, y0 = rng.uniform(0, width * 0.7, count), rng.uniform(0, height * 0.7, count)
    x1, y1 = x0 + rng.uniform(2, width * 0.3, count), y0 + rng.uniform(2, height * 0.3, count)
    return np.stack([x0, y0, x1, y1], axis=1).astype(np.float32)


def official_segmenter(checkpoint: Path, budget: int = UPSAMPLE_BUDGET) -> SegmentAnythingSegmenter:
    sam = _load_sam_checkpoint(checkpoint, "vit_h")
    return SegmentAnythingSegmenter(sam, "tiny", torch.float32, upsample_budget=budget)


def hf_reference(segmenter: HfSamSegmenter, pixels: np.ndarray, prompts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every box's mask from one post_process_masks call, as the segmenter made them before."""
    processor, model = segmenter._processor, segmenter._model
    inputs = processor(images=pixels, input_boxes=[prompts.tolist()], return_tensors="pt")
    embeddings = model.get_image_embeddings(inputs["pixel_values"])
    out = model(image_embeddings=embeddings, input_boxes=inputs["input_boxes"].float(), multimask_output=False)
    sizes = inputs["original_sizes"], inputs["reshaped_input_sizes"]
    masks = processor.post_process_masks(out.pred_masks.float(), *sizes)[0][:, 0]
    return masks.numpy(), out.iou_scores[0, :, 0].clamp(0, 1).numpy()


def official_reference(
    segmenter: SegmentAnythingSegmenter, pixels: np.ndarray, prompts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Every box's mask from one SamPredictor.predict_torch call, as the segmenter made them before."""
    predictor = segmenter._predictor
    predictor.set_image(pixels)
    transformed = predictor.transform.apply_boxes_torch(torch.as_tensor(prompts), pixels.shape[:2])
    masks, iou, _ = predictor.predict_torch(None, None, boxes=transformed, multimask_output=False)
    predictor.reset_image()
    return masks[:, 0].numpy(), iou[:, 0].clamp(0, 1).numpy()


@pytest.mark.parametrize("which", ["hf", "official"])
@pytest.mark.parametrize("budget", [ONE_MASK, 3 * ONE_MASK + 1, UPSAMPLE_BUDGET], ids=["1", "3", "all"])
def test_masks_upsampled_in_slices_are_the_masks_of_one_call(
    request: pytest.FixtureRequest, which: str, budget: int
) -> None:
    """1, 3 or all 12 masks per upsampling call: the same masks, bit for bit, as before, and the same scores."""
    if which == "hf":
        segmenter, reference = (
            hf_segmenter(request.getfixturevalue("tiny_hf_sam_dir"), upsample_budget=budget),
            hf_reference,
        )
    else:
        checkpoint = request.getfixturevalue("tiny_sam_checkpoint")
        segmenter, reference = official_segmenter(checkpoint, budget), official_reference
    pixels, prompts = random_rgb(HEIGHT, WIDTH), boxes(12)
    with torch.inference_mode():
        masks, scores = segmenter.segment(pixels, prompts)
        expected, expected_scores = reference(segmenter, pixels, prompts)

    np.testing.assert_array_equal(stacked(masks, (HEIGHT, WIDTH)), expected)
    np.testing.assert_array_equal(scores, expected_scores)


class CountingProxy:
    """The wrapped object, except that `method` records the mask count (dim `axis`) of its first argument."""

    def __init__(self, wrapped: Any, method: str, axis: int) -> None:
        self._wrapped, self._method, self._axis = wrapped, method, axis
        self.counts: list[int] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._wrapped(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._wrapped, name)
        if name != self._method:
            return attribute

        def counted(masks: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.counts.append(masks.shape[self._axis])
            return attribute(masks, *args, **kwargs)

        return counted


def assert_bounded(counts: list[int], masks: tuple, height: int, width: int, total: int) -> None:
    """At most UPSAMPLE_BUDGET bytes of float32 masks per upsampling call; what is kept is packed."""
    assert sum(counts) == total and len(masks) == total
    assert max(counts) * 4 * height * width <= UPSAMPLE_BUDGET, counts
    assert max(counts) == masks_per_call(height, width) > 1
    assert all(mask.nbytes <= height * (width + 7) // 8 for mask in masks)


def test_hf_sam_upsamples_at_most_the_budget_at_a_time_on_a_large_image(tiny_hf_sam_dir: Path) -> None:
    """4000x3000 with 64 boxes: 64 float masks would be 3 GB; each call holds at most 256 MB of them (5 masks)."""
    height, width = 3000, 4000
    segmenter = hf_segmenter(tiny_hf_sam_dir)
    segmenter._processor = proxy = CountingProxy(segmenter._processor, "post_process_masks", axis=1)
    with torch.inference_mode():
        masks, _ = segmenter.segment(random_rgb(height, width), boxes(64, height, width))

    assert_bounded(proxy.counts, masks, height, width, 64)


def test_segment_anything_upsamples_at_most_the_budget_at_a_time_on_a_large_image(tiny_sam_checkpoint: Path) -> None:
    height, width = 3000, 4000
    segmenter = official_segmenter(tiny_sam_checkpoint)
    counts: list[int] = []
    sam = segmenter._predictor.model
    upsample = sam.postprocess_masks
    sam.postprocess_masks = lambda masks, *args: counts.append(len(masks)) or upsample(masks, *args)
    with torch.inference_mode():
        masks, _ = segmenter.segment(random_rgb(height, width), boxes(64, height, width))

    assert_bounded(counts, masks, height, width, 64)


PROMPTS = [
    (np.array([[30.0, 40.0]]), np.array([True]), None),  # one click: three proposals, the best one kept
    (np.array([[30.0, 40.0], [90.0, 20.0]]), np.array([True, False]), np.array([10.0, 10.0, 100.0, 80.0])),
]


@pytest.mark.parametrize(("points", "positive", "box"), PROMPTS, ids=["click", "clicks+box"])
def test_interactive_prompts_upsample_only_the_best_proposal(
    tiny_hf_sam_dir: Path, tiny_sam_checkpoint: Path, points: np.ndarray, positive: np.ndarray, box: Any
) -> None:
    hf = hf_segmenter(tiny_hf_sam_dir)
    hf._processor = proxy = CountingProxy(hf._processor, "post_process_masks", axis=2)
    official = official_segmenter(tiny_sam_checkpoint)
    counts: list[int] = []
    sam = official._predictor.model
    upsample: Callable[..., torch.Tensor] = sam.postprocess_masks
    sam.postprocess_masks = lambda masks, *args: counts.append(masks.shape[1]) or upsample(masks, *args)
    pixels = random_rgb(HEIGHT, WIDTH)
    with torch.inference_mode():
        for segmenter in (hf, official):
            mask, score = segmenter.segment_points(segmenter.encode(pixels), points, positive, box)
            assert mask.shape == (HEIGHT, WIDTH) and 0 <= score <= 1

    assert proxy.counts == [1] and counts == [1]


def test_segment_anything_runs_without_gradients_whoever_calls_it(tiny_sam_checkpoint: Path) -> None:
    """Its models are called directly now (not through the package's no_grad predict_torch): outside inference
    mode too, nothing asks for gradients."""
    segmenter = official_segmenter(tiny_sam_checkpoint)
    [(masks, scores)] = list(
        segmenter.segment_stream([random_rgb(HEIGHT, WIDTH)], [boxes(3)])
    )  # no inference_mode here
    embedding = segmenter.encode(random_rgb(HEIGHT, WIDTH))
    mask, _ = segmenter.segment_points(embedding, np.array([[30.0, 40.0]]), np.array([True]), None)
    assert len(masks) == 3 and scores.shape == (3,) and mask.shape == (HEIGHT, WIDTH)
