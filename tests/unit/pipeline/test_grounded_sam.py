"""The whole pipeline, loaded through build_pipeline from saved tiny models, as the worker loads it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.class_options import ClassOptions
from backend.errors import ModelLoadError
from backend.packed_mask import PackedMask
from backend.pipeline.build import build_pipeline
from backend.pipeline.detector import GroundingDinoDetector
from backend.pipeline.grounded_sam import GroundedSam
from backend.pipeline.types import (
    Detection,
    DetectionThresholds,
    Instance,
    ModelSpec,
    PostprocessOptions,
    TextClass,
)
from tests.support.models import checkpoint_spec
from tests.support.synthetic import random_image

CLASSES = [TextClass("Cat", ("cat", "kitten")), TextClass("Traffic light", ("traffic light",))]
LOW = DetectionThresholds(box=0.0, text=0.0, max_detections=5)


def assert_instances(pipeline: GroundedSam, image: Image.Image) -> None:
    instances = pipeline.run(image, pipeline.prepare(CLASSES))

    assert 0 < len(instances) <= LOW.max_detections
    for instance in instances:
        assert instance.mask.shape == (image.height, image.width) and instance.mask.to_array().dtype == np.bool_
        assert 0 <= instance.mask_score <= 1
        assert instance.detection.class_index in (0, 1)


@pytest.mark.parametrize("sam_dtype", ["float32", "bfloat16"])
def test_hf_sam_pipeline_gives_a_mask_per_detection(
    tiny_detector_dir: Path, tiny_hf_sam_dir: Path, sam_dtype: str
) -> None:
    spec = ModelSpec(detector=str(tiny_detector_dir), sam=str(tiny_hf_sam_dir), sam_dtype=sam_dtype)
    pipeline = build_pipeline(spec, LOW)

    for width, height in [(64, 48), (320, 240)]:
        assert_instances(pipeline, random_image(width, height))


def test_segment_anything_pipeline_gives_a_mask_per_detection(
    tiny_detector_dir: Path, tiny_sam_checkpoint: Path
) -> None:
    spec = checkpoint_spec(tiny_detector_dir, tiny_sam_checkpoint)

    assert_instances(build_pipeline(spec, LOW), random_image(64, 48))


class RecordingSegmenter:
    """A Segmenter that records its calls and answers with full masks."""

    def __init__(self) -> None:
        self.box_counts: list[int] = []

    def full_masks(self, image: np.ndarray, boxes_xyxy: np.ndarray) -> np.ndarray:
        self.box_counts.append(len(boxes_xyxy))
        return np.ones((len(boxes_xyxy), *image.shape[:2]), bool)

    def segment(self, image: np.ndarray, boxes_xyxy: np.ndarray) -> tuple[tuple[PackedMask, ...], np.ndarray]:
        masks = self.full_masks(image, boxes_xyxy)
        return tuple(PackedMask.of(mask) for mask in masks), np.ones(len(boxes_xyxy), np.float32)

    def segment_stream(
        self, images: list[np.ndarray], boxes_xyxy: list[np.ndarray], known: object = None, keep: object = None
    ) -> Iterator[tuple[tuple[PackedMask, ...], np.ndarray]]:
        return (self.segment(image, boxes) for image, boxes in zip(images, boxes_xyxy, strict=True))

    def describe(self) -> dict[str, str]:
        return {"source": "recording"}


def test_nothing_detected_means_no_sam_call(detector: GroundingDinoDetector) -> None:
    segmenter = RecordingSegmenter()
    pipeline = GroundedSam(detector, segmenter, DetectionThresholds(box=1.01))

    assert pipeline.run(random_image(64, 48), pipeline.prepare(CLASSES)) == []
    assert segmenter.box_counts == []


def test_all_detections_of_an_image_go_to_sam_at_once(detector: GroundingDinoDetector) -> None:
    segmenter = RecordingSegmenter()
    # Full masks all overlap: with dedup off every detection comes back.
    pipeline = GroundedSam(detector, segmenter, LOW, PostprocessOptions(dedup_iou=1.0))
    plan = pipeline.prepare(CLASSES)

    first, second = pipeline.run(random_image(64, 48, seed=1), plan), pipeline.run(random_image(80, 60, seed=2), plan)

    assert segmenter.box_counts == [len(first), len(second)] == [LOW.max_detections] * 2


def test_describe_is_plain_values_naming_models_dtype_and_thresholds(
    tiny_detector_dir: Path, tiny_hf_sam_dir: Path
) -> None:
    spec = ModelSpec(detector=str(tiny_detector_dir), sam=str(tiny_hf_sam_dir), sam_dtype="bfloat16")

    described = build_pipeline(spec, LOW).describe()

    assert json.loads(json.dumps(described)) == described
    assert described["detector"]["source"] == str(tiny_detector_dir)
    assert described["detector"]["dtype"] == "torch.float32"
    assert described["segmenter"] == {
        "source": str(tiny_hf_sam_dir),
        "architecture": "SamModel",
        "dtype": "torch.bfloat16",
    }
    assert described["thresholds"] == {"box": 0.0, "text": 0.0, "max_detections": 5, "nms_iou": 0.7}


@pytest.mark.parametrize("which", ["detector", "sam"])
@pytest.mark.parametrize(
    ("source", "message"),
    [("/nonexistent/grounding-dino", "no local folder"), ("nobody/no-such-model", "hub id")],
)
def test_missing_models_raise_model_load_error(
    tiny_detector_dir: Path, tiny_hf_sam_dir: Path, which: str, source: str, message: str
) -> None:
    sources = {"detector": str(tiny_detector_dir), "sam": str(tiny_hf_sam_dir), which: source}

    with pytest.raises(ModelLoadError, match=rf"{which if which == 'detector' else 'SAM'}.*{source}.*{message}"):
        build_pipeline(ModelSpec(**sources), LOW)


def test_a_folder_of_the_wrong_model_raises_model_load_error(tiny_hf_sam_dir: Path) -> None:
    spec = ModelSpec(detector=str(tiny_hf_sam_dir), sam=str(tiny_hf_sam_dir))

    with pytest.raises(ModelLoadError, match=r"is SAM \(model_type 'sam'\), which is no detector"):
        build_pipeline(spec, LOW)


# SAM alone (interactive), per-class thresholds, negatives, cleanup.


@pytest.fixture(scope="module")
def hf_pipeline(tiny_detector_dir: Path, tiny_hf_sam_dir: Path) -> GroundedSam:
    return build_pipeline(ModelSpec(detector=str(tiny_detector_dir), sam=str(tiny_hf_sam_dir)), LOW)


@pytest.fixture(scope="module")
def official_pipeline(tiny_detector_dir: Path, tiny_sam_checkpoint: Path) -> GroundedSam:
    spec = checkpoint_spec(tiny_detector_dir, tiny_sam_checkpoint)
    return build_pipeline(spec, LOW)


PROMPTS = [
    (np.array([[10.0, 20.0]]), np.array([True]), None),  # one click: best of three proposals
    (np.array([[10.0, 20.0], [40.0, 5.0]]), np.array([True, False]), None),
    (np.zeros((0, 2)), np.zeros(0, bool), (2.0, 3.0, 50.0, 40.0)),
    (np.array([[30.0, 30.0]]), np.array([True]), (2.0, 3.0, 50.0, 40.0)),
]


@pytest.mark.parametrize("which", ["hf_pipeline", "official_pipeline"])
@pytest.mark.parametrize(("points", "positive", "box"), PROMPTS, ids=["click", "clicks", "box", "click+box"])
def test_sam_alone_gives_one_mask_for_clicks_or_a_box(
    request: pytest.FixtureRequest, which: str, points: np.ndarray, positive: np.ndarray, box: tuple | None
) -> None:
    pipeline: GroundedSam = request.getfixturevalue(which)
    answer = pipeline.segment_points(random_image(64, 48), points, positive, box)
    assert answer.mask.shape == (48, 64) and answer.mask.to_array().dtype == np.bool_
    assert 0.0 <= answer.score <= 1.0


@pytest.mark.parametrize("which", ["hf_pipeline", "official_pipeline"])
def test_sam_alone_on_boxes_gives_one_mask_per_box(request: pytest.FixtureRequest, which: str) -> None:
    pipeline: GroundedSam = request.getfixturevalue(which)
    answers = pipeline.segment_boxes(random_image(64, 48), np.array([[1, 2, 30, 40], [5, 5, 60, 44]], np.float32))
    assert [(a.mask.shape, a.mask.to_array().dtype) for a in answers] == [((48, 64), np.bool_)] * 2


@pytest.mark.parametrize(
    ("points", "positive", "box"),
    [(np.zeros((0, 2)), np.zeros(0, bool), None), (np.array([[1.0, 2.0]]), np.array([True, False]), None)],
)
def test_an_empty_or_mismatched_prompt_is_refused(
    hf_pipeline: GroundedSam, points: np.ndarray, positive: np.ndarray, box: None
) -> None:
    with pytest.raises(ValueError):
        hf_pipeline.segment_points(random_image(64, 48), points, positive, box)


def test_a_class_threshold_above_one_keeps_that_class_out(detector: GroundingDinoDetector) -> None:
    pipeline = GroundedSam(detector, RecordingSegmenter(), LOW, PostprocessOptions(dedup_iou=1.0))
    strict = [CLASSES[0], TextClass("Traffic light", ("traffic light",), ClassOptions(threshold=1.01))]
    instances = pipeline.run(random_image(64, 48), pipeline.prepare(strict))
    assert instances and {i.detection.class_index for i in instances} == {0}


def test_negatives_are_never_returned_and_suppress_their_class(detector: GroundingDinoDetector) -> None:
    # Full-image boxes overlap everything: with a negative that the random model detects, Cat disappears.
    segmenter = RecordingSegmenter()
    pipeline = GroundedSam(detector, segmenter, LOW, PostprocessOptions(dedup_iou=1.0, negative_iou=0.0))
    with_negative = [TextClass("Cat", ("cat", "kitten"), ClassOptions(negatives=("traffic light",)))]
    plan = pipeline.prepare(with_negative)
    assert len(plan.prompt.spans) == 3  # cat, kitten, and the negative phrase
    instances = pipeline.run(random_image(64, 48), plan)
    assert all(i.detection.class_index == 0 for i in instances)
    assert len(instances) < LOW.max_detections


def test_run_cleans_masks_and_applies_class_limits(detector: GroundingDinoDetector) -> None:
    class Holey(RecordingSegmenter):
        def full_masks(self, image: np.ndarray, boxes_xyxy: np.ndarray) -> np.ndarray:
            masks = super().full_masks(image, boxes_xyxy)
            masks[:, 10:12, 10:12] = False
            return masks

    options = PostprocessOptions(dedup_iou=1.0, fill_holes=10, max_instances=2)
    pipeline = GroundedSam(detector, Holey(), LOW, options)
    instances = pipeline.run(random_image(64, 48), pipeline.prepare(CLASSES))
    assert all(i.mask.to_array().all() for i in instances)
    counts = [sum(i.detection.class_index == c for i in instances) for c in (0, 1)]
    assert max(counts) <= 2 and instances


def test_instance_score_is_the_geometric_mean() -> None:
    detection = Detection(box_xyxy=(0, 0, 1, 1), score=0.36, class_index=0)
    assert Instance(detection, PackedMask.of(np.ones((1, 1), bool)), mask_score=1.0).score == pytest.approx(0.6)
