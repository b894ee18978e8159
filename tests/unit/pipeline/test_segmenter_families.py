"""HfSamSegmenter over every transformers SAM family: SAM (the reference), SAM-HQ, SAM 2, SAM 3's tracker and
EdgeTAM, each a tiny random model (tests/tiny_models.py) saved and loaded back through production's loader
(backend.pipeline.build.build_segmenter, as SAM_MODEL).

Per family: one mask per box at the image's size, in box order, RLE-able; scores in [0, 1]; one encoder forward
per image; several images per encoder forward and box slices giving what one image and one call give;
point prompts; bfloat16 weights; the out-of-memory halving of images and boxes; and the whole pipeline after
the tiny Grounding DINO (build_pipeline), down to a Label Studio prediction of a label config's labels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import torch

from backend.flow import text_classes
from backend.labelstudio.config import parse_label_config
from backend.labelstudio.results import PredictedObject, build_prediction
from backend.labelstudio.rle import mask_to_rle, rle_to_mask
from backend.packed_mask import PackedMask, stacked
from backend.pipeline.build import build_pipeline, build_segmenter
from backend.pipeline.segmenter import HfSamSegmenter, Masks, Scores
from backend.pipeline.types import DetectionThresholds, ModelSpec
from tests.support.models import oom_above, sam_family_dir
from tests.support.synthetic import boxes_for, random_image, random_rgb

ARCHITECTURES = {
    "sam": "SamModel",
    "sam_hq": "SamHQModel",
    "sam2": "Sam2Model",
    "sam3_tracker": "Sam3TrackerModel",
    "edgetam": "EdgeTamModel",
}
HEIGHT, WIDTH = 48, 64
BRUSH_CONFIG = Path(__file__).parents[3] / "label_config" / "brush.xml"
BOXES = np.array([[1, 2, 30, 40], [5, 5, 60, 44], [0, 0, 64, 48], [10, 20, 12, 22], [40, 1, 63, 9]], np.float32)


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def family_dir(request: pytest.FixtureRequest, tiny_models_dir: Path) -> Path:
    """The folder of one family's tiny model and processor (SAM v1: the session's tiny SamModel)."""
    return sam_family_dir(request, tiny_models_dir, request.param)


def segmenter_of(directory: Path, dtype: Literal["float32", "bfloat16"] = "float32", **options: int) -> HfSamSegmenter:
    """What production builds for SAM_MODEL=`directory` (build_segmenter); with `options` (box_batch, image_batch),
    an HfSamSegmenter of those batch sizes around the model and processor it loaded."""
    built = build_segmenter(ModelSpec(detector="unused", sam=str(directory), sam_dtype=dtype))
    assert isinstance(built, HfSamSegmenter)
    return HfSamSegmenter(built._model, built._processor, **options) if options else built


def segment(segmenter: HfSamSegmenter, image: np.ndarray, boxes: np.ndarray) -> tuple[Masks, Scores]:
    with torch.inference_mode():
        return segmenter.segment(image, boxes)


def assert_same(first: tuple[Masks, Scores], second: tuple[Masks, Scores], shape: tuple[int, int]) -> None:
    """Equal scores and masks, but for rounding: a pixel whose logit is ~0 may flip."""
    masks, masks_1 = stacked(first[0], shape), stacked(second[0], shape)
    assert masks.shape == masks_1.shape
    np.testing.assert_allclose(first[1], second[1], atol=1e-5)
    assert np.count_nonzero(masks != masks_1) <= 1e-3 * masks.size


def assert_valid(masks: Masks, scores: Scores, count: int, shape: tuple[int, int]) -> None:
    assert len(masks) == count and all(isinstance(mask, PackedMask) and mask.shape == shape for mask in masks)
    assert scores.shape == (count,) and scores.dtype == np.float32
    assert ((scores >= 0) & (scores <= 1)).all()


def count_encodes(segmenter: HfSamSegmenter) -> list[int]:
    """Images per get_image_embeddings call, recorded as the segmenter runs."""
    sizes: list[int] = []
    model = segmenter._model
    model.get_image_embeddings = oom_above(10**6, lambda pixels: len(pixels), sizes)(model.get_image_embeddings)
    return sizes


def record_decodes(segmenter: HfSamSegmenter) -> list[dict[str, Any]]:
    """The keyword arguments (but the image embeddings) of every decoder forward of the segmenter's model."""
    calls: list[dict[str, Any]] = []
    model = segmenter._model
    forward = model.forward

    def recorded(**kwargs: Any) -> Any:
        calls.append({key: value for key, value in kwargs.items() if "embeddings" not in key})
        return forward(**kwargs)

    model.forward = recorded
    return calls


def test_builders_save_what_the_production_loader_loads(family_dir: Path) -> None:
    segmenter = segmenter_of(family_dir)

    assert segmenter.describe()["architecture"] == ARCHITECTURES[segmenter._model.config.model_type]
    assert segmenter.describe()["source"] == str(family_dir)


def test_one_mask_per_box_at_a_1080p_image_size_and_rle_able(family_dir: Path) -> None:
    segmenter = segmenter_of(family_dir)
    image = random_rgb(1080, 1920)
    boxes = np.array([[0, 0, 1920, 1080], [100, 200, 900, 1000], [1500, 10, 1910, 300]], np.float32)
    encodes = count_encodes(segmenter)

    masks, scores = segment(segmenter, image, boxes)

    assert encodes == [1]
    assert_valid(masks, scores, 3, (1080, 1920))
    for mask in masks:
        np.testing.assert_array_equal(rle_to_mask(mask_to_rle(mask), 1080, 1920), mask.to_array())


def test_masks_come_in_box_order_each_as_its_box_alone_gives(family_dir: Path) -> None:
    segmenter = segmenter_of(family_dir)
    image = random_rgb(HEIGHT, WIDTH)
    encodes = count_encodes(segmenter)
    decodes = record_decodes(segmenter)

    boxes = BOXES[:3]

    masks, scores = segment(segmenter, image, boxes)

    assert encodes == [1] and len(decodes) == 1  # one image encoding, all boxes in one decoder call
    assert_valid(masks, scores, len(boxes), (HEIGHT, WIDTH))
    for index, box in enumerate(boxes):
        alone = segment(segmenter, image, box[None])
        assert_same(((masks[index],), scores[index : index + 1]), alone, (HEIGHT, WIDTH))


def test_box_slices_give_what_one_call_gives(family_dir: Path) -> None:
    image = random_rgb(HEIGHT, WIDTH, 1)
    whole = segment(segmenter_of(family_dir), image, BOXES)
    sliced = segmenter_of(family_dir, box_batch=2)
    decodes = record_decodes(sliced)

    assert_same(segment(sliced, image, BOXES), whole, (HEIGHT, WIDTH))
    assert [call["input_boxes"].shape[1] for call in decodes] == [2, 2, 1]


def test_images_batched_through_the_encoder_give_their_one_at_a_time_masks(family_dir: Path) -> None:
    segmenter = segmenter_of(family_dir, image_batch=2)
    images = [random_rgb(48, 64, 1), random_rgb(90, 40, 2), random_rgb(30, 30, 3), random_rgb(64, 64, 4)]
    boxes = [boxes_for(48, 64, 3, 1), boxes_for(90, 40, 1, 2), np.zeros((0, 4), np.float32), boxes_for(64, 64, 5, 4)]
    encodes = count_encodes(segmenter)

    with torch.inference_mode():
        together = segmenter.segment_batch(images, boxes)
    alone = [segment(segmenter, image, image_boxes) for image, image_boxes in zip(images, boxes, strict=True)]

    assert encodes[:2] == [2, 1]  # the image without boxes is never encoded
    for result, expected, image, image_boxes in zip(together, alone, images, boxes, strict=True):
        assert_valid(*result, len(image_boxes), image.shape[:2])
        assert_same(result, expected, image.shape[:2])


def test_out_of_memory_splits_images_then_boxes_and_gives_the_same_masks(family_dir: Path) -> None:
    segmenter = segmenter_of(family_dir, box_batch=8, image_batch=8)
    images = [random_rgb(48, 64, seed) for seed in range(3)]
    boxes = [boxes_for(48, 64, 6, seed) for seed in range(3)]
    with torch.inference_mode():
        expected = segmenter.segment_batch(images, boxes)
    model = segmenter._model  # limited as a small GPU would be
    encoded: list[int] = []
    decoded: list[int] = []
    model.get_image_embeddings = oom_above(1, lambda pixels: len(pixels), encoded)(model.get_image_embeddings)
    model.forward = oom_above(2, lambda **kw: kw["input_boxes"].shape[1], decoded)(model.forward)

    with torch.inference_mode():
        split = segmenter.segment_batch(images, boxes)

    assert encoded == [3, 1, 2, 1, 1]
    assert decoded == [6, 3, 1, 2, 3, 1, 2] * 3  # per image: 6 boxes fail, then halves of halves
    for result, wanted in zip(split, expected, strict=True):
        assert_same(result, wanted, (48, 64))


@pytest.mark.parametrize(
    ("points", "positive", "box", "multimask"),
    [
        ([[20.0, 30.0]], [True], None, True),  # a lone click: three proposals, the best one kept
        ([[20.0, 30.0], [50.0, 10.0]], [True, False], None, False),
        ([[20.0, 30.0], [8.0, 8.0]], [True, False], [2.0, 4.0, 40.0, 44.0], False),
        ([], [], [2.0, 4.0, 40.0, 44.0], False),
    ],
)
def test_point_prompts_give_one_mask(
    family_dir: Path, points: list[list[float]], positive: list[bool], box: list[float] | None, multimask: bool
) -> None:
    segmenter = segmenter_of(family_dir)
    decodes = record_decodes(segmenter)
    box_xyxy = None if box is None else np.array(box, np.float32)

    with torch.inference_mode():
        embedding = segmenter.encode(random_rgb(HEIGHT, WIDTH))
        mask, score = segmenter.segment_points(
            embedding, np.array(points, np.float32).reshape(-1, 2), np.array(positive, bool), box_xyxy
        )

    assert isinstance(mask, PackedMask) and mask.shape == (HEIGHT, WIDTH) and 0 <= score <= 1
    assert len(decodes) == 1 and decodes[0]["multimask_output"] is multimask
    if points:
        assert decodes[0]["input_labels"].tolist() == [[[int(flag) for flag in positive]]]


def test_bfloat16_weights_stay_bfloat16_and_segment(family_dir: Path) -> None:
    segmenter = segmenter_of(family_dir, "bfloat16")
    image = random_rgb(HEIGHT, WIDTH)

    masks, scores = segment(segmenter, image, BOXES)
    with torch.inference_mode():
        embedding = segmenter.encode(image)
        mask, score = segmenter.segment_points(embedding, np.array([[20.0, 30.0]]), np.array([True]), None)

    assert segmenter._model.dtype == torch.bfloat16 and segmenter.describe()["dtype"] == "torch.bfloat16"
    assert_valid(masks, scores, len(BOXES), (HEIGHT, WIDTH))
    assert mask.shape == (HEIGHT, WIDTH) and 0 <= score <= 1


def test_the_pipeline_after_grounding_dino_predicts_the_configs_labels_at_1080p(
    family_dir: Path, tiny_detector_dir: Path
) -> None:
    config = parse_label_config(BRUSH_CONFIG.read_text())
    classes = text_classes(config)
    spec = ModelSpec(detector=str(tiny_detector_dir), sam=str(family_dir))
    pipeline = build_pipeline(spec, DetectionThresholds(box=0.0, text=0.0, max_detections=4))
    image = random_image(1920, 1080)

    instances = pipeline.run(image, pipeline.prepare(classes))
    objects = [
        PredictedObject(
            label=classes[i.detection.class_index].name,
            score=i.score,
            box_xyxy=i.detection.box_xyxy,
            mask=i.mask,
            threshold_score=i.detection.threshold_score,
        )
        for i in instances
    ]
    prediction = build_prediction(objects, config, 1920, 1080, "tiny")

    assert instances and len(prediction["result"]) == len(instances)
    for region, instance in zip(prediction["result"], instances, strict=True):
        assert region["type"] == "brushlabels"
        assert region["value"]["brushlabels"] in ([label.value] for label in config.labels)
        np.testing.assert_array_equal(rle_to_mask(region["value"]["rle"], 1080, 1920), instance.mask.to_array())
