"""SAM 3 alone from text: the tiny random SAM 3 through Sam3TextDetector and GroundedSam.

Random weights give similar boxes for every query, so most tests turn NMS off (nms_iou=1.0) to keep many
instances, and assert structure (classes, masks, thresholds, equalities), never specific detections.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoProcessor, Sam3Model, Sam3Processor, Sam3TrackerModel, Sam3TrackerProcessor

from backend.class_options import ClassOptions
from backend.errors import DeviceOutOfMemoryError
from backend.packed_mask import PackedMask
from backend.pipeline import sam3_text
from backend.pipeline.detector import box_iou
from backend.pipeline.grounded_sam import GroundedSam
from backend.pipeline.sam3_text import Sam3TextDetector
from backend.pipeline.segmenter import HfSamSegmenter
from backend.pipeline.types import DetectionThresholds, Instance, PostprocessOptions, Segmented, TextClass
from tests.support.synthetic import random_image
from tests.tiny_models import build_tiny_sam3

CLASSES = (TextClass("Car", ("car", "Auto.")), TextClass("Dog", ("dog", "puppy")), TextClass("Bus", ("bus",)))
# Everything SAM 3 finds: no score cut, no NMS merge, no cap below the 20 queries x 5 phrases.
ALL = DetectionThresholds(box=0.0, nms_iou=1.0, max_detections=1000)
# No cleanup or merging across labels: the instances are SAM 3's.
RAW = PostprocessOptions(dedup_iou=1.0, fill_holes=0, min_island=0)


class NoSegmenter:
    """Text prompts never reach the segmenter with SAM 3: any call fails the test."""

    def segment(self, image: np.ndarray, boxes_xyxy: np.ndarray) -> tuple[tuple[PackedMask, ...], np.ndarray]:
        raise AssertionError("SAM ran after SAM 3")

    def segment_stream(
        self, images: Sequence[np.ndarray], boxes_xyxy: Sequence[np.ndarray]
    ) -> Iterator[tuple[tuple[PackedMask, ...], np.ndarray]]:
        raise AssertionError("SAM ran after SAM 3")

    def segment_points(
        self, image: np.ndarray, points_xy: np.ndarray, positive: np.ndarray, box_xyxy: np.ndarray | None
    ) -> tuple[PackedMask, float]:
        raise AssertionError("SAM ran after SAM 3")

    def describe(self) -> dict[str, str]:
        return {"source": "none"}


@pytest.fixture(scope="module")
def sam3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sam3(tmp_path_factory.mktemp("tiny_sam3") / "sam3")


@pytest.fixture(scope="module")
def sam3_model(sam3_dir: Path) -> Sam3Model:
    return Sam3Model.from_pretrained(sam3_dir).eval()


@pytest.fixture(scope="module")
def sam3(sam3_dir: Path, sam3_model: Sam3Model) -> Sam3TextDetector:
    return Sam3TextDetector(sam3_model, Sam3Processor.from_pretrained(sam3_dir))


def pipeline(detector: Sam3TextDetector, thresholds: DetectionThresholds = ALL) -> GroundedSam:
    return GroundedSam(detector, NoSegmenter(), thresholds, RAW)


def pairs(segmented: Segmented) -> list[tuple[tuple[float, ...], float, int, bytes]]:
    """Each detection with its mask's bits, comparable across runs."""
    masks = segmented.masks or ()
    return [
        (d.box_xyxy, d.score, d.class_index, mask.to_array().tobytes())
        for d, mask in zip(segmented.detections, masks, strict=True)
    ]


def test_the_tiny_sam3_loads_like_facebook_sam3(sam3_dir: Path) -> None:
    config = AutoConfig.from_pretrained(sam3_dir)
    _, detector_info = Sam3Model.from_pretrained(sam3_dir, output_loading_info=True)
    _, tracker_info = Sam3TrackerModel.from_pretrained(sam3_dir, output_loading_info=True)

    assert config.model_type == "sam3_video" and config.detector_config.model_type == "sam3"
    assert isinstance(AutoProcessor.from_pretrained(sam3_dir), Sam3Processor)
    for info in (detector_info, tracker_info):
        assert not info["missing_keys"] and not info["unexpected_keys"]


def test_phrases_are_normalised_and_aliases_belong_to_their_class(sam3: Sam3TextDetector) -> None:
    classes = (*CLASSES, TextClass("Again", ("CAR", "  ")))

    prompts = sam3.prepare(classes)

    assert prompts.phrases == ("car", "auto", "dog", "puppy", "bus")
    assert prompts.owners == (0, 0, 1, 1, 2)
    assert prompts.features.shape[0] == prompts.attention_mask.shape[0] == 5
    assert prompts.class_count == 4


def test_every_object_has_one_class_of_the_config_and_a_mask_of_the_image(sam3: Sam3TextDetector) -> None:
    grounded = pipeline(sam3)
    image = random_image(96, 64)

    instances = grounded.run(image, grounded.prepare(CLASSES))

    assert len(instances) > len(CLASSES)
    assert {instance.detection.class_index for instance in instances} == {0, 1, 2}
    for instance in instances:
        assert instance.mask.shape == (64, 96)
        x1, y1, x2, y2 = instance.detection.box_xyxy
        assert 0 <= x1 < x2 <= 96 and 0 <= y1 < y2 <= 64
        assert instance.mask_score == instance.detection.score
        assert instance.score == pytest.approx(instance.detection.score)


def test_an_alias_finds_what_it_finds_alone_under_its_class(sam3: Sam3TextDetector) -> None:
    image = random_image(80, 60, seed=3)
    (alone,) = sam3.segment_batch([image], sam3.prepare([TextClass("Car", ("auto",))]), ALL)
    (aliased,) = sam3.segment_batch([image], sam3.prepare([TextClass("Dog", ("dog",)), CLASSES[0]]), ALL)

    found = torch.tensor([(*d.box_xyxy, d.score) for d in aliased.detections if d.class_index == 1])
    assert alone.detections
    for detection in alone.detections:
        assert torch.isclose(found, torch.tensor((*detection.box_xyxy, detection.score)), atol=1e-4).all(1).any()


def test_scores_and_masks_are_sam3s_post_processing(
    sam3: Sam3TextDetector, sam3_model: Sam3Model, sam3_dir: Path
) -> None:
    processor = Sam3Processor.from_pretrained(sam3_dir)
    image = random_image(70, 50, seed=4)
    with torch.inference_mode():
        outputs = sam3_model(**processor(images=image, text="car", return_tensors="pt"))
    (reference,) = processor.post_process_instance_segmentation(outputs, threshold=0.0, target_sizes=[(50, 70)])

    (segmented,) = sam3.segment_batch([image], sam3.prepare([TextClass("Car", ("car",))]), ALL)

    order = reference["scores"].argsort(descending=True)
    assert segmented.scores is not None and segmented.masks is not None
    assert np.allclose(segmented.scores, reference["scores"][order].numpy(), atol=1e-5)
    # The processor's boxes, in pixels of the image, clamped to it.
    size = torch.tensor([70.0, 50.0, 70.0, 50.0])
    expected_boxes = torch.minimum(reference["boxes"][order].clamp(min=0), size)
    assert torch.allclose(torch.tensor([d.box_xyxy for d in segmented.detections]), expected_boxes, atol=1e-3)
    expected = reference["masks"][order].bool().numpy()
    # Precomputed text and vision features change the logits by float noise: a pixel at 0.5 may flip.
    assert (np.stack([mask.to_array() for mask in segmented.masks]) != expected).mean() < 1e-3


def test_a_phrase_longer_than_the_text_encoder_reads_is_cut_to_it(
    sam3: Sam3TextDetector, sam3_model: Sam3Model
) -> None:
    positions = sam3_model.config.text_config.max_position_embeddings
    long_phrase = " ".join(["red car with a small green sign"] * 3)  # one token per letter: ~80 tokens
    assert len(Sam3Processor.from_pretrained(sam3_model.name_or_path).tokenizer(long_phrase).input_ids) > positions
    image = random_image(64, 48, seed=9)
    classes = [TextClass("Long", (long_phrase,)), TextClass("Dog", ("dog",))]

    prompts = sam3.prepare(classes)
    (mixed,) = sam3.segment_batch([image], prompts, ALL)
    (short,) = sam3.segment_batch([image], sam3.prepare([TextClass("Long", ("bus",)), classes[1]]), ALL)

    assert prompts.features.shape[:2] == prompts.attention_mask.shape == (2, positions)
    assert prompts.attention_mask[0].all() and not prompts.attention_mask[1].all()
    assert {d.class_index for d in mixed.detections} == {0, 1}
    # The short phrase's objects are what they are beside any other phrase.
    dogs = [(*d.box_xyxy, d.score) for d in mixed.detections if d.class_index == 1]
    assert dogs
    np.testing.assert_allclose(
        dogs, [(*d.box_xyxy, d.score) for d in short.detections if d.class_index == 1], atol=1e-4
    )


def test_each_forward_keeps_its_best_max_detections_candidates(
    sam3: Sam3TextDetector, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = random_image(64, 48, seed=8)
    prompts = sam3.prepare(CLASSES)
    (everything,) = sam3.segment_batch([image], prompts, ALL)
    monkeypatch.setattr(sam3_text, "PHRASES_PER_FORWARD", 2)
    kept: list[int] = []
    forward = Sam3TextDetector._forward

    def counted(self: Sam3TextDetector, *args: Any) -> Any:
        found = forward(self, *args)
        kept.append(len(found.scores))
        return found

    monkeypatch.setattr(Sam3TextDetector, "_forward", counted)
    (best,) = sam3.segment_batch([image], prompts, DetectionThresholds(box=0.0, nms_iou=1.0, max_detections=3))

    assert kept == [3, 3, 3]  # 5 phrases x 20 queries, 2 phrases a forward, 3 candidates each at most
    assert [d.class_index for d in best.detections] == [d.class_index for d in everything.detections[:3]]
    np.testing.assert_allclose([d.score for d in best.detections], [d.score for d in everything.detections[:3]])


def test_candidates_that_do_not_fit_together_are_a_named_error(
    sam3: Sam3TextDetector, monkeypatch: pytest.MonkeyPatch
) -> None:
    grounded = pipeline(sam3)
    plan = grounded.prepare(CLASSES)

    def out_of_memory(parts: Sequence[Any]) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 7.00 GiB")

    monkeypatch.setattr(sam3_text, "_joined", out_of_memory)

    with pytest.raises(DeviceOutOfMemoryError, match=r"candidate masks does not fit.*7\.00 GiB"):
        grounded.run(random_image(64, 48), plan)


def test_a_label_threshold_of_one_keeps_none_of_it_and_zero_keeps_many(sam3: Sam3TextDetector) -> None:
    grounded = pipeline(sam3, DetectionThresholds(box=0.5, nms_iou=1.0, max_detections=1000))
    strict, loose = ClassOptions(threshold=1.0), ClassOptions(threshold=0.0)
    classes = [TextClass("Car", ("car",), strict), TextClass("Dog", ("dog",), loose)]

    instances = grounded.run(random_image(64, 48), grounded.prepare(classes))

    assert {instance.detection.class_index for instance in instances} == {1}
    assert len(instances) > 1


def test_the_text_threshold_does_not_apply(sam3: Sam3TextDetector) -> None:
    image = random_image(64, 48)
    prompts = sam3.prepare(CLASSES)
    above_one = DetectionThresholds(box=0.0, text=1.0, nms_iou=1.0, max_detections=1000)
    (all_found,) = sam3.segment_batch([image], prompts, ALL)

    assert all_found.detections
    assert pairs(sam3.segment_batch([image], prompts, above_one)[0]) == pairs(all_found)


def test_nothing_passing_gives_no_objects(sam3: Sam3TextDetector) -> None:
    grounded = pipeline(sam3, DetectionThresholds(box=1.0))
    plan = grounded.prepare(CLASSES)

    assert grounded.run(random_image(64, 48), plan) == []
    assert next(grounded.stream([random_image(64, 48)], plan)) == Segmented((), None, None)
    assert pipeline(sam3).run(random_image(64, 48), grounded.prepare([TextClass("Empty", (" . ",))])) == []


def test_negatives_suppress_their_class_and_are_never_returned(sam3: Sam3TextDetector) -> None:
    grounded = pipeline(sam3)
    image = random_image(64, 48, seed=5)
    plain = [TextClass("Car", ("car",)), TextClass("Dog", ("dog",))]
    negated = [TextClass("Car", ("car",), ClassOptions(negatives=("toy car",))), plain[1]]

    without = next(grounded.stream([image], grounded.prepare(plain)))
    kept = next(grounded.stream([image], grounded.prepare(negated)))
    (toys,) = sam3.segment_batch([image], sam3.prepare([TextClass("Toy", ("toy car",))]), ALL)

    assert set(pairs(kept)) < set(pairs(without))  # some cars dropped, every kept one with its own mask
    assert {d.class_index for d in kept.detections} <= {0, 1}
    toy_boxes = torch.tensor([d.box_xyxy for d in toys.detections])
    for detection in kept.detections:
        if detection.class_index == 0:
            assert not (box_iou(torch.tensor(detection.box_xyxy), toy_boxes) > RAW.negative_iou).any()


def test_min_area_and_max_instances_apply_to_sam3s_objects(sam3: Sam3TextDetector) -> None:
    grounded = pipeline(sam3)
    capped = TextClass("Car", ("car", "auto"), ClassOptions(max_instances=2))
    tiny_only = TextClass("Dog", ("dog",), ClassOptions(min_area=64 * 48 + 1))

    instances = grounded.run(random_image(64, 48), grounded.prepare([capped, tiny_only]))

    assert [instance.detection.class_index for instance in instances] == [0, 0]
    assert instances[0].detection.score >= instances[1].detection.score


def test_max_detections_and_nms_bound_the_objects(sam3: Sam3TextDetector) -> None:
    image = random_image(64, 48)
    prompts = sam3.prepare(CLASSES)

    (few,) = sam3.segment_batch([image], prompts, DetectionThresholds(box=0.0, nms_iou=1.0, max_detections=3))
    (merged,) = sam3.segment_batch([image], prompts, DetectionThresholds(box=0.0, nms_iou=0.0, max_detections=1000))

    assert len(few.detections) == 3
    assert len(merged.detections) == len(CLASSES)  # IoU > 0 merges all of a class: one each


def test_a_batch_equals_one_image_at_a_time(sam3: Sam3TextDetector) -> None:
    grounded = pipeline(sam3)
    plan = grounded.prepare(CLASSES)
    images = [random_image(64, 48, seed=1), random_image(120, 90, seed=2), random_image(50, 100, seed=3)]

    batched = grounded.run_batch(images, plan)
    alone = [grounded.run(image, plan) for image in images]

    for image, found, single in zip(images, batched, alone, strict=True):
        assert found and same_instances(found, single, flipped=0.0)
        assert all(instance.mask.shape == (image.height, image.width) for instance in found)


def test_phrases_split_across_forwards_give_the_same_objects(
    sam3: Sam3TextDetector, monkeypatch: pytest.MonkeyPatch
) -> None:
    grounded = pipeline(sam3)
    plan = grounded.prepare(CLASSES)
    image = random_image(64, 48, seed=6)
    together = grounded.run(image, plan)

    monkeypatch.setattr(sam3_text, "PHRASES_PER_FORWARD", 2)

    assert same_instances(grounded.run(image, plan), together, flipped=1e-3)


def test_phrases_that_do_not_fit_together_run_in_halves(sam3: Sam3TextDetector, sam3_model: Sam3Model) -> None:
    grounded = pipeline(sam3)
    plan = grounded.prepare(CLASSES)
    image = random_image(64, 48, seed=7)
    together = grounded.run(image, plan)
    rows: list[int] = []

    def out_of_memory_above_two(module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        rows.append(len(kwargs["decoder_queries"]))
        if rows[-1] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    hook = sam3_model.mask_decoder.register_forward_pre_hook(out_of_memory_above_two, with_kwargs=True)
    try:
        halved = grounded.run(image, plan)
    finally:
        hook.remove()

    assert rows == [5, 2, 3, 1, 2]
    assert same_instances(halved, together, flipped=1e-3)


def test_an_image_whose_encoding_does_not_fit_is_a_named_error(sam3: Sam3TextDetector, sam3_model: Sam3Model) -> None:
    grounded = pipeline(sam3)
    plan = grounded.prepare(CLASSES)

    def out_of_memory(module: torch.nn.Module, args: Any) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    hook = sam3_model.vision_encoder.register_forward_pre_hook(out_of_memory)
    try:
        with pytest.raises(DeviceOutOfMemoryError, match=r"one image does not fit.*20\.00 GiB"):
            grounded.run(random_image(64, 48), plan)
    finally:
        hook.remove()


def test_the_text_encoder_runs_once_per_class_set(sam3: Sam3TextDetector, sam3_model: Sam3Model) -> None:
    calls: list[int] = []
    hook = sam3_model.text_encoder.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        grounded = pipeline(sam3)
        plan = grounded.prepare(CLASSES)
        grounded.run_batch([random_image(64, 48), random_image(32, 32)], plan)
        grounded.run(random_image(48, 64), plan)
    finally:
        hook.remove()

    assert calls == [1]


def test_clicks_and_boxes_go_to_the_tracker_of_the_same_checkpoint(sam3: Sam3TextDetector, sam3_dir: Path) -> None:
    tracker = Sam3TrackerModel.from_pretrained(sam3_dir).eval()
    segmenter = HfSamSegmenter(tracker, Sam3TrackerProcessor.from_pretrained(sam3_dir))
    grounded = GroundedSam(sam3, segmenter, ALL, RAW)
    image = random_image(120, 90)
    click = grounded.segment_points(image, np.array([[30.0, 40.0]]), np.array([True]))
    (boxed,) = grounded.segment_boxes(image, np.array([[10.0, 10.0, 60.0, 50.0]]))

    # The tracker's backbone is the detector's (one set of weights in the checkpoint): sharing it changes nothing.
    tracker.vision_encoder.backbone = Sam3Model.from_pretrained(sam3_dir).vision_encoder.backbone
    shared = grounded.segment_points(image, np.array([[30.0, 40.0]]), np.array([True]))

    assert click.mask.shape == boxed.mask.shape == (90, 120)
    assert shared.score == click.score and np.array_equal(shared.mask.to_array(), click.mask.to_array())


def same_instances(first: Sequence[Instance], second: Sequence[Instance], flipped: float) -> bool:
    """Same classes, boxes and scores equal to float noise, masks differing in at most a `flipped` fraction of
    their pixels (phrase rows batched differently change the logits by float noise)."""
    if len(first) != len(second):
        return False
    for a, b in zip(first, second, strict=True):
        if a.detection.class_index != b.detection.class_index or a.detection.score != pytest.approx(b.detection.score):
            return False
        if not np.allclose(a.detection.box_xyxy, b.detection.box_xyxy, atol=1e-3):
            return False
        if (a.mask.to_array() != b.mask.to_array()).mean() > flipped:
            return False
    return True


def test_a_bfloat16_sam3_gives_objects_with_masks(sam3_dir: Path) -> None:
    model = Sam3Model.from_pretrained(sam3_dir, dtype=torch.bfloat16).eval()
    grounded = pipeline(Sam3TextDetector(model, Sam3Processor.from_pretrained(sam3_dir)))

    instances = grounded.run(random_image(90, 60), grounded.prepare(CLASSES))

    assert instances and all(instance.mask.shape == (60, 90) for instance in instances)
    assert {instance.detection.class_index for instance in instances} <= {0, 1, 2}
