"""The whole pipeline, loaded through build_pipeline from saved tiny models, as the worker loads it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

from backend.errors import ModelLoadError
from backend.pipeline.build import build_pipeline
from backend.pipeline.detector import GroundingDinoDetector
from backend.pipeline.grounded_sam import GroundedSam
from backend.pipeline.types import DetectionThresholds, ModelSpec, TextClass

CLASSES = [TextClass("Cat", ("cat", "kitten")), TextClass("Traffic light", ("traffic light",))]
LOW = DetectionThresholds(box=0.0, text=0.0, max_detections=5)


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def assert_instances(pipeline: GroundedSam, image: Image.Image) -> None:
    instances = pipeline.run(image, pipeline.prepare(CLASSES))

    assert 0 < len(instances) <= LOW.max_detections
    for instance in instances:
        assert instance.mask.shape == (image.height, image.width) and instance.mask.dtype == np.bool_
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
    spec = ModelSpec(
        detector=str(tiny_detector_dir), sam="unused", sam_checkpoint=str(tiny_sam_checkpoint), sam_model_type="vit_b"
    )

    assert_instances(build_pipeline(spec, LOW), random_image(64, 48))


class RecordingSegmenter:
    """A Segmenter that records its calls and answers with full masks."""

    def __init__(self) -> None:
        self.box_counts: list[int] = []

    def segment(self, image: np.ndarray, boxes_xyxy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.box_counts.append(len(boxes_xyxy))
        return np.ones((len(boxes_xyxy), *image.shape[:2]), bool), np.ones(len(boxes_xyxy), np.float32)

    def describe(self) -> dict[str, str]:
        return {"source": "recording"}


@pytest.fixture(scope="module")
def detector(tiny_detector_dir: Path) -> GroundingDinoDetector:
    model = AutoModelForZeroShotObjectDetection.from_pretrained(tiny_detector_dir).eval()
    return GroundingDinoDetector(model, AutoProcessor.from_pretrained(tiny_detector_dir))


def test_nothing_detected_means_no_sam_call(detector: GroundingDinoDetector) -> None:
    segmenter = RecordingSegmenter()
    pipeline = GroundedSam(detector, segmenter, DetectionThresholds(box=1.01))

    assert pipeline.run(random_image(64, 48), pipeline.prepare(CLASSES)) == []
    assert segmenter.box_counts == []


def test_all_detections_of_an_image_go_to_sam_at_once(detector: GroundingDinoDetector) -> None:
    segmenter = RecordingSegmenter()
    pipeline = GroundedSam(detector, segmenter, LOW)
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

    with pytest.raises(ModelLoadError, match="tried as a local folder"):
        build_pipeline(spec, LOW)
