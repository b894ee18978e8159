"""Grounding DINO detections: boxes inside the image, valid classes, caps, NMS, and one forward per image.

The tiny model has random weights, so its scores are garbage: these tests assert structure, not detections.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from backend.pipeline.detector import GroundingDinoDetector, _score, _to_pixels, class_nms
from backend.pipeline.types import Detection, DetectionThresholds, TextClass
from tests.support.synthetic import random_image

EVERYTHING = DetectionThresholds(box=0.0, text=0.0, max_detections=100, nms_iou=1.0)
CLASSES = [
    TextClass("Cat", ("cat", "kitten")),
    TextClass("Traffic light", ("traffic light",)),
    TextClass("?", ("?",)),  # normalises to nothing: never detected
    TextClass("Wheelbarrow", ("wheelbarrow",)),
]


def detect(detector: GroundingDinoDetector, image: Image.Image, thresholds: DetectionThresholds) -> list[Detection]:
    with torch.inference_mode():
        return detector.detect(image, detector.prepare(CLASSES), thresholds)


def pairwise_iou(a: np.ndarray, b: np.ndarray) -> float:
    width, height = np.minimum(a[2:], b[2:]) - np.maximum(a[:2], b[:2])
    inter = max(width, 0) * max(height, 0)
    return inter / ((a[2:] - a[:2]).prod() + (b[2:] - b[:2]).prod() - inter)


@pytest.mark.parametrize(("width", "height"), [(64, 48), (320, 240), (48, 64)])
def test_boxes_lie_inside_the_image_with_valid_classes(
    detector: GroundingDinoDetector, width: int, height: int
) -> None:
    detections = detect(detector, random_image(width, height), EVERYTHING)

    assert detections
    boxes = np.array([d.box_xyxy for d in detections])
    assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= width).all() and (boxes[:, [1, 3]] <= height).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert {d.class_index for d in detections} <= {0, 1, 3}
    scores = [d.score for d in detections]
    assert all(0 <= s <= 1 for s in scores) and scores == sorted(scores, reverse=True)


def test_at_most_max_detections(detector: GroundingDinoDetector) -> None:
    thresholds = DetectionThresholds(box=0.0, text=0.0, max_detections=7, nms_iou=1.0)

    assert len(detect(detector, random_image(64, 48), thresholds)) == 7


def test_thresholds_above_one_detect_nothing(detector: GroundingDinoDetector) -> None:
    assert detect(detector, random_image(64, 48), DetectionThresholds(box=1.01, text=1.01)) == []


def test_kept_scores_pass_the_text_threshold(detector: GroundingDinoDetector) -> None:
    thresholds = DetectionThresholds(box=0.0, text=0.5, max_detections=100, nms_iou=1.0)

    assert all(d.score > 0.5 for d in detect(detector, random_image(64, 48), thresholds))


def test_same_class_boxes_do_not_overlap_beyond_the_nms_threshold(detector: GroundingDinoDetector) -> None:
    thresholds = DetectionThresholds(box=0.0, text=0.0, max_detections=100, nms_iou=0.3)
    detections = detect(detector, random_image(320, 240), thresholds)

    for i, first in enumerate(detections):
        for second in detections[i + 1 :]:
            if first.class_index == second.class_index:
                assert pairwise_iou(np.array(first.box_xyxy), np.array(second.box_xyxy)) <= 0.3


def test_all_chunks_of_an_image_run_in_one_forward(detector: GroundingDinoDetector) -> None:
    classes = [TextClass(f"Label {i}", (f"zebra crossing number {i}",)) for i in range(60)]
    plan = detector.prepare(classes)
    batches = []
    hook = detector._model.register_forward_hook(
        lambda _module, _args, kwargs, _output: batches.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        with torch.inference_mode():
            detections = detector.detect(random_image(64, 48), plan, EVERYTHING)
    finally:
        hook.remove()

    assert plan.chunk_count > 1 and batches == [plan.chunk_count]
    assert {d.class_index for d in detections} <= set(range(60))


def test_no_classes_detect_nothing(detector: GroundingDinoDetector) -> None:
    assert detector.detect(random_image(64, 48), detector.prepare([]), EVERYTHING) == []


def test_each_query_takes_the_class_of_its_best_span(detector: GroundingDinoDetector) -> None:
    plan = detector.prepare([TextClass("Cat", ("cat",)), TextClass("Light", ("traffic light",))])
    logits = torch.full((1, 3, plan.input_ids.shape[1]), -10.0)  # tokens: [CLS] cat . traffic light . [SEP]
    logits[0, 0, 4] = 2.0  # "light" → class 1
    logits[0, 1, 1] = 1.0  # "cat" → class 0
    logits[0, 2, 0] = 3.0  # only [CLS] is high: a high box score, but no class

    box_scores, class_scores, classes = _score(logits, plan)

    assert classes[0, :2].tolist() == [1, 0]
    assert class_scores[0, :2].tolist() == pytest.approx(torch.sigmoid(torch.tensor([2.0, 1.0])).tolist())
    assert box_scores[0, 2] == pytest.approx(torch.sigmoid(torch.tensor(3.0)).item())
    assert class_scores[0, 2] < 1e-4


def test_boxes_are_clipped_to_the_image() -> None:
    cxcywh = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.9, 0.1, 0.4, 0.4]])

    pixels = _to_pixels(cxcywh, width=200, height=100)

    assert pixels.flatten().tolist() == pytest.approx([50, 25, 150, 75, 140, 0, 200, 30])


def test_nms_is_per_class_and_keeps_the_best_first() -> None:
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]], dtype=torch.float32)
    scores = torch.tensor([0.5, 0.9, 0.8, 0.7])
    classes = torch.tensor([0, 0, 1, 0])

    assert class_nms(boxes, scores, classes, iou_threshold=0.5, limit=10).tolist() == [1, 2, 3]
    assert class_nms(boxes, scores, classes, iou_threshold=0.5, limit=2).tolist() == [1, 2]
    assert class_nms(boxes[:0], scores[:0], classes[:0], iou_threshold=0.5, limit=10).tolist() == []


def test_a_batch_of_images_gives_each_image_its_single_image_detections(
    detector: GroundingDinoDetector, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batched detection finds what one forward per image finds; same-size images share one forward."""
    images = [random_image(96, 64, seed=1), random_image(48, 80, seed=2), random_image(96, 64, seed=3)]
    thresholds = DetectionThresholds(box=0.0, text=0.0, max_detections=10, nms_iou=0.5)
    plan = detector.prepare(CLASSES)
    forwards: list[int] = []
    forward = detector._forward
    monkeypatch.setattr(detector, "_forward", lambda pixels, p: (forwards.append(len(pixels)), forward(pixels, p))[1])
    with torch.inference_mode():
        batched = detector.detect_batch(images, plan, thresholds)
        assert sorted(forwards) == [1, 2]  # the two 96x64 images in one forward, the portrait alone
        single = [detector.detect(image, plan, thresholds) for image in images]
    for got, expected in zip(batched, single, strict=True):
        assert [d.class_index for d in got] == [d.class_index for d in expected]
        np.testing.assert_allclose([d.score for d in got], [d.score for d in expected], atol=1e-4)
        np.testing.assert_allclose([d.box_xyxy for d in got], [d.box_xyxy for d in expected], atol=1e-2)
