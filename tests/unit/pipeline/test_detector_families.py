"""The Grounding DINO family as detectors: Grounding DINO, MM-Grounding-DINO (and LLMDet, the same class), and the
large checkpoints' five-level layout, each loaded by the production loader from a tiny random model.

Random weights give garbage scores, so the token-span label mapping is proven by lighting chosen queries: a hook
on the real model's forward sets every real token's logit low except one phrase span's tokens for one query.
That query's box must come back, with exactly the class the span belongs to, and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor, GroundingDinoProcessor

from backend.class_options import ClassOptions
from backend.pipeline.build import build_detector
from backend.pipeline.detector import GroundingDinoDetector, _to_pixels
from backend.pipeline.negatives import build_class_plan, suppress_negatives
from backend.pipeline.prompts import PhraseSpan, PromptPlan
from backend.pipeline.types import Detection, DetectionThresholds, ModelSpec, TextClass
from tests.support.synthetic import random_image
from tests.tiny_models import build_tiny_mm_grounding_dino, build_tiny_mm_grounding_dino_large

EVERYTHING = DetectionThresholds(box=0.0, text=0.0, max_detections=100, nms_iou=1.0)
# Lit spans score sigmoid(4) ~ 0.98, everything else sigmoid(-20): only lit queries pass these; no NMS.
LIT_ONLY = DetectionThresholds(box=0.5, text=0.5, max_detections=1000, nms_iou=1.0)
HIGH, LOW = 4.0, -20.0
ALIASES = [
    TextClass("Cat", ("cat", "kitten", "tabby cat")),
    TextClass("Traffic light", ("traffic light", "stoplight")),
    TextClass("?", ("?",)),  # normalises to nothing: never detected
    TextClass("Wheelbarrow", ("wheelbarrow",)),
]


@dataclass(frozen=True)
class Family:
    """One tiny family member: its folder, the class and model_type it must load as, and the loaded detector."""

    name: str
    directory: Path
    architecture: str
    model_type: str
    detector: GroundingDinoDetector


_BUILDERS: dict[str, tuple[Callable[[Path], Path] | None, str, str]] = {
    # None: the session's tiny Grounding DINO (tests/conftest.py), the one the other detector tests use.
    "grounding-dino": (None, "GroundingDinoForObjectDetection", "grounding-dino"),
    "mm-grounding-dino": (build_tiny_mm_grounding_dino, "MMGroundingDinoForObjectDetection", "mm-grounding-dino"),
    "mm-grounding-dino-large-layout": (
        build_tiny_mm_grounding_dino_large,
        "MMGroundingDinoForObjectDetection",
        "mm-grounding-dino",
    ),
}


@pytest.fixture(scope="module", params=list(_BUILDERS))
def family(request: pytest.FixtureRequest, tiny_models_dir: Path) -> Family:
    """Each family member, loaded through build_detector (the production loader) from its saved folder."""
    name: str = request.param
    builder, architecture, model_type = _BUILDERS[name]
    directory = (
        request.getfixturevalue("tiny_detector_dir") if builder is None else builder(tiny_models_dir / f"family_{name}")
    )
    detector = build_detector(ModelSpec(detector=str(directory), sam="unused"))
    return Family(name, directory, architecture, model_type, detector)


@dataclass(frozen=True)
class Lit:
    """Query `query` of prompt chunk `span.chunk` lit on the tokens of `span`."""

    span: PhraseSpan
    query: int


def light_one_query_per_span(spans: Sequence[PhraseSpan]) -> list[Lit]:
    """A distinct query for every span of each chunk, numbered in span order within the chunk."""
    used: dict[int, int] = {}
    lit = []
    for span in spans:
        lit.append(Lit(span, used.get(span.chunk, 0)))
        used[span.chunk] = used.get(span.chunk, 0) + 1
    return lit


@contextmanager
def lit_queries(
    detector: GroundingDinoDetector, plan: PromptPlan, lit: Sequence[Lit], same_box: dict[int, int] | None = None
) -> Iterator[list[torch.Tensor]]:
    """While open, each forward's logits (rows: image x chunk of `plan`) are LOW on every real token and HIGH on
    each lit query's span; -inf (padding) stays. same_box: query → query whose box it takes (in every row).

    Yields the list the forwards' pred_boxes (rows, Q, 4) are appended to.
    """
    boxes: list[torch.Tensor] = []

    def hook(_module: torch.nn.Module, _args: object, output: Any) -> Any:
        logits = output.logits.clone()
        logits[torch.isfinite(logits)] = LOW
        for row in range(logits.shape[0]):
            for item in lit:
                if row % plan.chunk_count == item.span.chunk:
                    logits[row, item.query, item.span.start : item.span.stop] = HIGH
        pred_boxes = output.pred_boxes.clone()
        for query, source in (same_box or {}).items():
            pred_boxes[:, query] = pred_boxes[:, source]
        output.logits, output.pred_boxes = logits, pred_boxes
        boxes.append(pred_boxes)
        return output

    handle = detector._model.register_forward_hook(hook)
    try:
        yield boxes
    finally:
        handle.remove()


def expected(lit: Sequence[Lit], boxes: torch.Tensor, image: Image.Image) -> list[tuple[int, tuple[float, ...]]]:
    """(class index, pixel xyxy box) of every lit query, from the forward's boxes (C, Q, 4) of one image."""
    width, height = image.size
    rows = [
        (item.span.class_index, _to_pixels(boxes[item.span.chunk, item.query][None], width, height)[0]) for item in lit
    ]
    return sorted((index, tuple(box.tolist())) for index, box in rows)


def found(detections: Sequence[Detection]) -> list[tuple[int, tuple[float, ...]]]:
    return sorted((d.class_index, d.box_xyxy) for d in detections)


def assert_same(got: list[tuple[int, tuple[float, ...]]], want: list[tuple[int, tuple[float, ...]]]) -> None:
    assert [index for index, _ in got] == [index for index, _ in want]
    np.testing.assert_allclose([box for _, box in got], [box for _, box in want], atol=1e-3)


def detect_lit(
    detector: GroundingDinoDetector,
    images: Sequence[Image.Image],
    plan: PromptPlan,
    lit: Sequence[Lit],
    same_box: dict[int, int] | None = None,
) -> tuple[list[list[Detection]], torch.Tensor]:
    """The detections of same-size `images` with `lit` queries lit, and the boxes (B, C, Q, 4) the model gave."""
    with lit_queries(detector, plan, lit, same_box) as boxes, torch.inference_mode():
        detections = detector.detect_batch(images, plan, LIT_ONLY)
    assert len(boxes) == 1  # all chunks of all the images in one forward
    return detections, boxes[0].unflatten(0, (len(images), plan.chunk_count))


def test_the_auto_classes_load_each_family(family: Family) -> None:
    model = AutoModelForZeroShotObjectDetection.from_pretrained(family.directory)
    processor = AutoProcessor.from_pretrained(family.directory)

    assert type(model).__name__ == family.architecture and model.config.model_type == family.model_type
    assert isinstance(processor, GroundingDinoProcessor)
    assert family.detector.describe()["architecture"] == family.architecture
    assert family.detector.describe()["dtype"] == "torch.float32"


def test_the_tokenizer_gives_the_ids_the_model_delimits_phrases_by(family: Family) -> None:
    """The model splits the text self-attention at bert-base-uncased's [CLS], [SEP], '.', '?' ids (a buffer)."""
    tokenizer = family.detector._processor.tokenizer
    ids = [tokenizer.cls_token_id, tokenizer.sep_token_id, *tokenizer.convert_tokens_to_ids([".", "?"])]

    assert family.detector._model.model.special_tokens.tolist() == ids


@pytest.mark.parametrize(("width", "height"), [(1920, 1080), (64, 48), (48, 640)])
def test_real_outputs_give_boxes_inside_the_image_of_prompted_classes(family: Family, width: int, height: int) -> None:
    detector = family.detector
    with torch.inference_mode():
        detections = detector.detect(random_image(width, height), detector.prepare(ALIASES), EVERYTHING)

    assert 0 < len(detections) <= EVERYTHING.max_detections  # boxes left in the padding of a tall image: dropped
    for detection in detections:
        left, top, right, bottom = detection.box_xyxy
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        assert detection.class_index in {0, 1, 3} and 0 <= detection.score <= 1
    assert [d.score for d in detections] == sorted((d.score for d in detections), reverse=True)


def test_every_alias_span_gives_its_own_class_and_its_querys_box(family: Family) -> None:
    image = random_image(320, 240)
    plan = family.detector.prepare(ALIASES)
    lit = light_one_query_per_span(plan.spans)

    [detections], boxes = detect_lit(family.detector, [image], plan, lit)

    assert sorted(span.class_index for span in plan.spans) == [0, 0, 0, 1, 1, 3]
    assert_same(found(detections), expected(lit, boxes[0], image))


def test_150_labels_over_several_chunks_each_come_back_as_their_own_class(family: Family) -> None:
    """Two images x several chunks in one forward: each image's boxes come from its own rows, each class once."""
    classes = [TextClass(f"Label {i}", (f"car {i}",)) for i in range(150)]
    images = [random_image(320, 240, seed=1), random_image(320, 240, seed=2)]
    plan = family.detector.prepare(classes)
    lit = light_one_query_per_span(plan.spans)

    detections, boxes = detect_lit(family.detector, images, plan, lit)

    assert plan.chunk_count > 2 and not torch.allclose(boxes[0], boxes[1])
    for image, image_detections, image_boxes in zip(images, detections, boxes, strict=True):
        assert sorted(d.class_index for d in image_detections) == list(range(150))
        assert_same(found(image_detections), expected(lit, image_boxes, image))


def test_a_negative_phrase_is_its_own_class_and_suppresses_its_owners_box(family: Family) -> None:
    car = TextClass("Car", ("car",), ClassOptions(negatives=("toy car", "truck")))
    classes = [car, TextClass("Truck", ("truck",)), TextClass("Dog", ("dog",), ClassOptions(negatives=("toy car",)))]
    class_plan = build_class_plan(classes, family.detector.prepare, default_box=LIT_ONLY.box)
    spans = {span.class_index: span for span in class_plan.prompt.spans}
    lit = [Lit(spans[0], 0), Lit(spans[1], 1), Lit(spans[3], 2)]  # Car, Truck, the negative "toy car"
    image = random_image(320, 240)

    [detections], boxes = detect_lit(family.detector, [image], class_plan.prompt, lit, same_box={2: 0})

    assert class_plan.prompt.class_count == 4  # the negative "toy car" became class 3
    assert_same(found(detections), expected(lit, boxes[0], image))
    truck = [d for d in detections if d.class_index == 1]
    assert suppress_negatives(detections, class_plan, iou=0.5) == truck  # Car under "toy car": dropped


def test_a_batch_gives_each_image_its_single_image_detections(family: Family) -> None:
    detector = family.detector
    images = [random_image(96, 64, seed=1), random_image(48, 80, seed=2), random_image(96, 64, seed=3)]
    thresholds = DetectionThresholds(box=0.0, text=0.0, max_detections=10, nms_iou=0.5)
    plan = detector.prepare(ALIASES)
    with torch.inference_mode():
        batched = detector.detect_batch(images, plan, thresholds)
        single = [detector.detect(image, plan, thresholds) for image in images]

    for got, want in zip(batched, single, strict=True):
        assert [d.class_index for d in got] == [d.class_index for d in want]
        np.testing.assert_allclose([d.score for d in got], [d.score for d in want], atol=1e-4)
        np.testing.assert_allclose([d.box_xyxy for d in got], [d.box_xyxy for d in want], atol=1e-2)
