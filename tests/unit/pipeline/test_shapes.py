"""Any aspect ratio and size: very wide, very tall and tiny images go through the real pipeline (tiny models, both
segmenters) to a Label Studio prediction with masks of the image's size. Before padding, Grounding DINO raised
`selected index k out of range` on them (too few feature cells for its query selection), and a 1x1 image got
a 1x3 mask from the transformers SAM processor (it took the image's width for its channels)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.labelstudio.config import parse_label_config
from backend.labelstudio.results import OutputOptions, PredictedObject, build_prediction
from backend.labelstudio.rle import rle_to_mask
from backend.pipeline.build import build_pipeline
from backend.pipeline.detector import GroundingDinoDetector
from backend.pipeline.grounded_sam import GroundedSam
from backend.pipeline.shapes import (
    DETECTOR_MAX_ASPECT,
    SAM_MAX_ASPECT,
    detector_input,
    sam_input,
)
from backend.pipeline.types import (
    Detection,
    DetectionThresholds,
    Instance,
    ModelSpec,
    PostprocessOptions,
    TextClass,
)
from tests.support.models import checkpoint_spec

CLASSES = [TextClass("Cat", ("cat",)), TextClass("Traffic light", ("traffic light",))]
EVERYTHING = DetectionThresholds(box=0.0, text=0.0, max_detections=3)
CONFIG = parse_label_config(
    '<View><Image name="image" value="$image"/>'
    '<BrushLabels name="brush" toName="image"><Label value="Cat"/><Label value="Traffic light"/></BrushLabels>'
    '<RectangleLabels name="box" toName="image"><Label value="Cat"/><Label value="Traffic light"/></RectangleLabels>'
    '<PolygonLabels name="poly" toName="image"><Label value="Cat"/><Label value="Traffic light"/></PolygonLabels>'
    "</View>"
)
SIZES = [(4000, 16), (16, 4000), (20000, 50), (50, 20000), (1, 1), (3, 200), (200, 3), (2, 1), (1000, 249)]


@pytest.fixture(scope="module", params=["hf", "official"])
def pipeline(request: pytest.FixtureRequest, tiny_detector_dir: Path) -> GroundedSam:
    if request.param == "hf":
        spec = ModelSpec(detector=str(tiny_detector_dir), sam=str(request.getfixturevalue("tiny_hf_sam_dir")))
    else:
        spec = checkpoint_spec(tiny_detector_dir, request.getfixturevalue("tiny_sam_checkpoint"))
    return build_pipeline(spec, EVERYTHING, PostprocessOptions(dedup_iou=1.0))


def striped(width: int, height: int) -> Image.Image:
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[..., 0] = np.arange(width, dtype=np.uint8)[None, :] * 7
    pixels[..., 1] = np.arange(height, dtype=np.uint8)[:, None] * 5
    return Image.fromarray(pixels)


def predict(pipeline: GroundedSam, image: Image.Image) -> list[Instance]:
    """The pipeline's instances on `image`, checked, and checked again through a Label Studio prediction."""
    instances = pipeline.run(image, pipeline.prepare(CLASSES))
    for instance in instances:
        x1, y1, x2, y2 = instance.detection.box_xyxy
        assert 0 <= x1 < x2 <= image.width and 0 <= y1 < y2 <= image.height
        assert instance.mask.shape == (image.height, image.width)
    objects = [
        PredictedObject(CLASSES[i.detection.class_index].name, i.score, i.detection.box_xyxy, i.mask) for i in instances
    ]
    prediction = build_prediction(objects, CONFIG, image.width, image.height, "v", OutputOptions("mask"))
    brushes = [region for region in prediction["result"] if region["type"] == "brushlabels"]
    assert len(brushes) == len(instances)
    for region, instance in zip(brushes, instances, strict=True):
        assert (region["original_width"], region["original_height"]) == image.size
        decoded = rle_to_mask(region["value"]["rle"], image.height, image.width)
        np.testing.assert_array_equal(decoded, instance.mask.to_array())
    return instances


@pytest.mark.parametrize(("width", "height"), SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_any_shape_goes_through_the_real_models_to_a_prediction(pipeline: GroundedSam, width: int, height: int) -> None:
    """Before: RuntimeError `selected index k out of range` for the long ones. The random detector's boxes on a
    4000x16 strip all lie in the padding below it, so there may be none left; the tiny images have some."""
    instances = predict(pipeline, striped(width, height))

    assert instances or max(width, height) > 1000


class WholeImageBoxes(GroundingDinoDetector):
    """The real tiny detector's prompts, but boxes on each image (all of it, its bottom-right quarter): SAM then
    runs on the images whose real detections the random weights put into the padding."""

    def detect_batch(self, images: Sequence[Image.Image], *args: object) -> list[list[Detection]]:
        return [
            [
                Detection((0.0, 0.0, float(i.width), float(i.height)), 0.9, 0),
                Detection((i.width / 2, i.height / 2, float(i.width), float(i.height)), 0.8, 1),
            ]
            for i in images
        ]


@pytest.mark.parametrize(("width", "height"), SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_sam_masks_of_any_shape_come_back_at_the_image_size(pipeline: GroundedSam, width: int, height: int) -> None:
    real = pipeline._detector
    boxes = GroundedSam(
        WholeImageBoxes(real._model, real._processor),
        pipeline._segmenter,
        EVERYTHING,
        PostprocessOptions(dedup_iou=1.0),
    )

    assert len(predict(boxes, striped(width, height))) == 2


@pytest.mark.parametrize(("width", "height"), [(5000, 3), (3, 5000)])
def test_sam_alone_takes_any_shape(pipeline: GroundedSam, width: int, height: int) -> None:
    image = striped(width, height)

    clicked = pipeline.segment_points(image, np.array([[1.0, 1.0]]), np.array([True]))
    boxed = pipeline.segment_boxes(image, np.array([[0, 0, width, height]], np.float32))

    assert clicked.mask.shape == (height, width) and [b.mask.shape for b in boxed] == [(height, width)]


def test_detector_input_is_padded_at_the_bottom_or_right_only_when_too_long() -> None:
    ordinary = striped(640, 160)
    assert detector_input(ordinary) == (ordinary, (640.0, 160.0))

    wide, frame = detector_input(striped(4000, 16))
    assert wide.width <= DETECTOR_MAX_ASPECT * wide.height and wide.width == 1333
    assert frame == pytest.approx((4000.0, wide.height * 16 / 5))  # 16 px became 5 px, then padded
    tall, frame = detector_input(striped(3, 200))
    assert (tall.width, tall.height) == (50, 200) and frame == (50.0, 200.0)
    np.testing.assert_array_equal(np.array(tall)[:, :3], np.array(striped(3, 200)))
    assert not np.array(tall)[:, 3:].any()


def test_sam_input_is_padded_only_past_its_aspect_limit() -> None:
    pixels = np.array(striped(20000, 50))
    padded = sam_input(pixels)
    assert padded.shape == (int(np.ceil(20000 / SAM_MAX_ASPECT)), 20000, 3)
    np.testing.assert_array_equal(padded[:50], pixels)
    assert not padded[50:].any()
    ordinary = np.array(striped(4000, 16))
    assert sam_input(ordinary) is ordinary
