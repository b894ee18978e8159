"""Batches through the models: SAM's encoder on several images gives each image its own masks, and a batch
that runs out of device memory is split in halves and still gives every result (one item that never fits
is a named error)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from backend.errors import DeviceOutOfMemoryError, ImageFetchError
from backend.flow import PredictionFlow
from backend.labelstudio.config import parse_label_config
from backend.labelstudio.templates import config_for_labels
from backend.packed_mask import stacked
from backend.pipeline import threads as preprocess_threads
from backend.pipeline.detector import GroundingDinoDetector
from backend.pipeline.grounded_sam import GroundedSam
from backend.pipeline.halving import run_halving
from backend.pipeline.types import DetectionThresholds, Segmented, TextClass
from tests.support.models import hf_segmenter, oom_above
from tests.support.synthetic import boxes_for, random_rgb

EVERYTHING = DetectionThresholds(box=0.0, text=0.0, max_detections=5, nms_iou=1.0)
CLASSES = (TextClass("Cat", ("cat",)), TextClass("Dog", ("dog",)))


# run_halving itself


def test_halving_keeps_order_and_every_result() -> None:
    attempts: list[int] = []

    def doubled(items: Sequence[int]) -> list[int]:
        attempts.append(len(items))
        if len(items) > 2:
            raise torch.OutOfMemoryError("out of memory")
        return [2 * item for item in items]

    assert run_halving(doubled, list(range(7)), "item") == [0, 2, 4, 6, 8, 10, 12]
    assert attempts == [7, 3, 1, 2, 4, 2, 2]


def test_one_item_that_never_fits_is_a_named_error_and_nothing_runs_for_no_items() -> None:
    def never(items: Sequence[int]) -> list[int]:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    with pytest.raises(DeviceOutOfMemoryError, match=r"one image does not fit.*Tried to allocate 20.00 GiB"):
        run_halving(never, [1, 2], "image")
    assert run_halving(never, [], "image") == []


def test_other_errors_are_not_taken_for_memory() -> None:
    def broken(items: Sequence[int]) -> list[int]:
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_halving(broken, [1, 2, 3], "image")


# SAM: several images through the encoder at once


@pytest.mark.parametrize(("image_batch", "forwards"), [(1, [1, 1, 1, 1, 1]), (2, [2, 2, 1]), (8, [5])])
def test_sam_encoder_takes_image_batch_images_at_a_time(
    tiny_hf_sam_dir: Path, image_batch: int, forwards: list[int]
) -> None:
    segmenter = hf_segmenter(tiny_hf_sam_dir, image_batch=image_batch)
    encoded: list[int] = []
    model = segmenter._model
    model.get_image_embeddings = oom_above(99, lambda pixels: len(pixels), encoded)(model.get_image_embeddings)
    with torch.inference_mode():
        segmenter.segment_batch([random_rgb(48, 64, seed) for seed in range(5)], [boxes_for(48, 64, 2, 0)] * 5)
    assert encoded == forwards


# Grounding DINO: a same-size group that does not fit


def test_detector_out_of_memory_splits_the_group_and_gives_the_same_detections(
    detector: GroundingDinoDetector,
) -> None:
    images = [Image.fromarray(random_rgb(48, 64, seed)) for seed in range(5)]
    plan = detector.prepare(CLASSES)
    with torch.inference_mode():
        expected = detector.detect_batch(images, plan, EVERYTHING)
        rows: list[int] = []
        detector._forward = oom_above(2, lambda pixels, _plan: len(pixels), rows)(detector._forward)  # type: ignore[method-assign]
        split = detector.detect_batch(images, plan, EVERYTHING)
    assert rows == [5, 2, 3, 1, 2]
    assert [[d.class_index for d in found] for found in split] == [[d.class_index for d in e] for e in expected]
    for found, wanted in zip(split, expected, strict=True):
        np.testing.assert_allclose([d.box_xyxy for d in found], [d.box_xyxy for d in wanted], atol=1e-3)
        np.testing.assert_allclose([d.score for d in found], [d.score for d in wanted], atol=1e-5)


def test_detector_image_that_never_fits_is_a_named_error(detector: GroundingDinoDetector) -> None:
    plan = detector.prepare(CLASSES)
    rows: list[int] = []
    detector_call = detector._forward
    detector._forward = oom_above(0, lambda pixels, _plan: len(pixels), rows)(detector_call)  # type: ignore[method-assign]
    try:
        with torch.inference_mode(), pytest.raises(DeviceOutOfMemoryError, match="one image does not fit"):
            detector.detect_batch([Image.fromarray(random_rgb(48, 64, 0))] * 2, plan, EVERYTHING)
    finally:
        del detector._forward  # back to the class's method for the module's other tests
    assert rows == [2, 1]


def test_a_streamed_image_that_never_fits_fails_alone(detector: GroundingDinoDetector, tiny_hf_sam_dir: Path) -> None:
    """One image too large for the device even alone: its item in the flow's stream is the error, the images
    streamed with it get their instances (a bulk chunk's task fails alone)."""
    segmenter = hf_segmenter(tiny_hf_sam_dir, image_batch=8)
    model = segmenter._model

    def with_the_flat_image(pixels: torch.Tensor) -> int:
        # The flat (one-colour) image stands in for one that does not fit: any batch holding it fails.
        flat = pixels[:, 0, :512, :512].flatten(1).std(dim=1) == 0
        return 1000 if bool(flat.any()) else len(pixels)

    model.get_image_embeddings = oom_above(999, with_the_flat_image, [])(model.get_image_embeddings)
    flow = PredictionFlow(GroundedSam(detector, segmenter, EVERYTHING))
    flat = Image.new("RGB", (64, 48), (200, 200, 200))
    fetch_failed = ImageFetchError("HTTP 404")
    images = [Image.fromarray(random_rgb(48, 64, 0)), fetch_failed, flat, Image.fromarray(random_rgb(48, 64, 2))]

    results = list(flow.stream(images, parse_label_config(config_for_labels([c.name for c in CLASSES]))))

    assert results[1] is fetch_failed and isinstance(results[2], DeviceOutOfMemoryError)
    for found in (results[0], results[3]):
        assert isinstance(found, Segmented) and found.detections and len(found.masks) == len(found.detections)


# CPU preprocessing off the model's thread


@pytest.mark.parametrize("threads", [1, 4])
def test_processors_run_beside_the_models_and_change_nothing(
    detector: GroundingDinoDetector, tiny_hf_sam_dir: Path, monkeypatch: pytest.MonkeyPatch, threads: int
) -> None:
    """With PREPROCESS_THREADS > 1 the detector's image processor runs on worker threads and SAM's processor
    prepares the next image on a side thread; the results are those of the single-threaded run."""
    segmenter = hf_segmenter(tiny_hf_sam_dir)
    images = [random_rgb(48, 64, seed) for seed in range(4)]
    boxes = [boxes_for(48, 64, 2, seed) for seed in range(4)]
    plan = detector.prepare(CLASSES)
    with torch.inference_mode():
        expected_masks = segmenter.segment_batch(images, boxes)
        expected_detections = detector.detect_batch([Image.fromarray(i) for i in images], plan, EVERYTHING)

    monkeypatch.setattr(preprocess_threads, "PREPROCESS_THREADS", threads)
    callers: list[str] = []

    def recording(call: Callable[..., Any]) -> Callable[..., Any]:
        def recorded(*args: Any, **kwargs: Any) -> Any:
            callers.append(threading.current_thread().name)
            return call(*args, **kwargs)

        return recorded

    for owner, attribute in ((segmenter, "_processor"), (detector._processor, "image_processor")):
        processor = getattr(owner, attribute)
        monkeypatch.setattr(owner, attribute, RecordingProxy(processor, recording(processor)))
    with torch.inference_mode():
        masks = segmenter.segment_batch(images, boxes)
        detections = detector.detect_batch([Image.fromarray(i) for i in images], plan, EVERYTHING)

    assert len(callers) == 8
    on_main = [name == threading.main_thread().name for name in callers]
    assert all(on_main) if threads == 1 else not any(on_main), callers
    assert detections == expected_detections
    for (packed, scores), (packed_wanted, wanted_scores) in zip(masks, expected_masks, strict=True):
        found, wanted = stacked(packed, (48, 64)), stacked(packed_wanted, (48, 64))
        assert np.array_equal(found, wanted) and np.array_equal(scores, wanted_scores)


class RecordingProxy:
    """Calls go to `call`; attributes to the wrapped processor."""

    def __init__(self, wrapped: Any, call: Callable[..., Any]) -> None:
        self._wrapped = wrapped
        self._call = call

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped, name)


def test_sam_stream_runs_without_gradients_whoever_consumes_it(tiny_hf_sam_dir: Path) -> None:
    segmenter = hf_segmenter(tiny_hf_sam_dir)
    [(packed, scores)] = list(
        segmenter.segment_stream([random_rgb(48, 64, 0)], [boxes_for(48, 64, 2, 0)])
    )  # no inference_mode
    masks = stacked(packed, (48, 64))
    assert masks.shape == (2, 48, 64) and scores.shape == (2,)
