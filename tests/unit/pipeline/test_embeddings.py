"""SAM image embeddings kept and reused (backend.pipeline.embeddings), for every segmenter family: transformers SAM,
SAM-HQ, SAM 2, SAM 3's tracker, EdgeTAM (tiny random models through production's loader) and the official
segment-anything checkpoint.

Per family: a click or a box decoded on `encode`'s embedding is bit for bit what the models give on the image
(the model's own forward on the pixels; SamPredictor.predict for segment-anything) and what GroundedSam gives on
the image; an embedding cast to float16 and back decodes nearly the same mask; `segment_stream` hands each image's
embedding to `keep` (equal to `encode`'s, in its own storage) and skips the encoder for `known` ones; nbytes and
the flat tensor names. GroundedSam: image_hw of an image that sam_input pads, the stream's indexes, and SAM 3
alone (a mask detector) ignoring both.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from backend.packed_mask import PackedMask
from backend.pipeline.build import build_segmenter
from backend.pipeline.embeddings import ImageEmbedding, flat_tensors, nested_tensors, owned
from backend.pipeline.grounded_sam import GroundedSam
from backend.pipeline.segmenter import HfSamSegmenter, SegmentAnythingSegmenter, Segmenter
from backend.pipeline.types import (
    Detection,
    DetectionThresholds,
    ModelSpec,
    PostprocessOptions,
    Segmented,
    TextClass,
)
from tests.support.models import checkpoint_spec, oom_above
from tests.support.synthetic import boxes_for, random_image, random_rgb
from tests.tiny_models import build_tiny_edgetam, build_tiny_sam2, build_tiny_sam3_tracker, build_tiny_sam_hq

BUILDERS: dict[str, Callable[[Path], Path]] = {
    "sam_hq": build_tiny_sam_hq,
    "sam2": build_tiny_sam2,
    "sam3_tracker": build_tiny_sam3_tracker,
    "edgetam": build_tiny_edgetam,
}
FAMILIES = ["sam", *BUILDERS, "official"]
# The flat tensor names each family's embedding has (SAM-HQ: one intermediate embedding per global-attention block).
NAMES = {
    "sam": {"image_embeddings"},
    "sam_hq": {"image_embeddings", "intermediate_embeddings.0"},
    "sam2": {"image_embeddings.0", "image_embeddings.1", "image_embeddings.2"},
    "sam3_tracker": {"image_embeddings.0", "image_embeddings.1", "image_embeddings.2"},
    "edgetam": {"image_embeddings.0", "image_embeddings.1", "image_embeddings.2"},
    "official": {"features"},
}
HEIGHT, WIDTH = 48, 64
CLICK = (np.array([[20.0, 30.0]], np.float32), np.array([True]), None)
BOX = (np.zeros((0, 2), np.float32), np.zeros(0, bool), np.array([2.0, 4.0, 40.0, 44.0], np.float32))
PROMPTS = {
    "click": CLICK,
    "box": BOX,
    "clicks+box": (np.array([[20.0, 30.0], [5.0, 40.0]]), np.array([1, 0], bool), BOX[2]),
}
CAT = [TextClass("Cat", ("cat",))]
# No cleanup: GroundedSam's masks are SAM's own.
RAW = PostprocessOptions(dedup_iou=1.0, fill_holes=0, min_island=0)
Prompt = tuple[np.ndarray, np.ndarray, np.ndarray | None]


class EncoderCount:
    """A StageTimer counting the segmenter's "sam_encoder" stages (one per image-encoder forward)."""

    def __init__(self) -> None:
        self.entered: Counter[str] = Counter()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.entered[name] += 1
        yield

    @property
    def encodes(self) -> int:
        return self.entered["sam_encoder"]


class WholeImageBoxes:
    """A BoxDetector double: one box of class 0 over every image whose width is not in `empty_widths`."""

    def __init__(self, empty_widths: Sequence[int] = ()) -> None:
        self.empty_widths = set(empty_widths)

    def prepare(self, classes: Sequence[TextClass]) -> None:
        return None

    def detect_batch(self, images: Sequence[Image.Image], plan: None, *args: Any) -> list[list[Detection]]:
        return [
            [] if i.width in self.empty_widths else [Detection((0.0, 0.0, float(i.width), float(i.height)), 0.9, 0)]
            for i in images
        ]

    def describe(self) -> dict[str, str]:
        return {"source": "whole-image boxes"}


class FullMasks:
    """A MaskDetector double (as SAM 3 alone is): one full-image instance per image."""

    def prepare(self, classes: Sequence[TextClass]) -> None:
        return None

    def segment_batch(self, images: Sequence[Image.Image], plan: None, *args: Any) -> list[Segmented]:
        return [
            Segmented(
                (Detection((0.0, 0.0, float(i.width), float(i.height)), 0.9, 0),),
                (PackedMask.of(np.ones((i.height, i.width), bool)),),
                np.array([0.9], np.float32),
            )
            for i in images
        ]

    def describe(self) -> dict[str, str]:
        return {"source": "full masks"}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture(scope="module")
def spec(family: str, tiny_models_dir: Path, request: pytest.FixtureRequest) -> ModelSpec:
    """What production loads for the family (SAM_MODEL, or SAM_CHECKPOINT for segment-anything)."""
    if family == "official":
        return checkpoint_spec(Path("unused"), request.getfixturevalue("tiny_sam_checkpoint"))
    if family == "sam":
        folder: Path = request.getfixturevalue("tiny_hf_sam_dir")
    else:
        folder = tiny_models_dir / family
        if not (folder / "config.json").exists():
            BUILDERS[family](folder)
    return ModelSpec(detector="unused", sam=str(folder))


@pytest.fixture(scope="module")
def timed(spec: ModelSpec) -> tuple[Segmenter, EncoderCount]:
    timer = EncoderCount()
    return build_segmenter(spec, timer), timer


@pytest.fixture
def segmenter(timed: tuple[Segmenter, EncoderCount]) -> Segmenter:
    return timed[0]


@pytest.fixture
def counter(timed: tuple[Segmenter, EncoderCount]) -> EncoderCount:
    timed[1].entered.clear()
    return timed[1]


def pipeline(segmenter: Segmenter, detector: Any = None) -> GroundedSam:
    return GroundedSam(detector or WholeImageBoxes(), segmenter, DetectionThresholds(), RAW)


def reference(segmenter: Segmenter, pixels: np.ndarray, prompt: Prompt) -> tuple[np.ndarray, float]:
    """The models' own answer to `prompt` on `pixels`, image encoder included, by the libraries' own calls:
    transformers' processor on the image with the prompt, the model's forward on the pixel values and
    post_process_masks; segment-anything's SamPredictor.set_image and predict. The best proposal's mask (H, W)
    and its predicted IoU clamped to [0, 1]."""
    points, positive, box = prompt
    multimask = len(points) == 1 and box is None
    if isinstance(segmenter, SegmentAnythingSegmenter):
        predictor = segmenter._predictor
        predictor.set_image(pixels)
        given = (points, positive.astype(int)) if len(points) else (None, None)
        masks, scores, _ = predictor.predict(*given, box=box, multimask_output=multimask)
        predictor.reset_image()
        best = int(scores.argmax())
        return masks[best], float(np.clip(scores[best], 0, 1))
    assert isinstance(segmenter, HfSamSegmenter)
    processor, model = segmenter._processor, segmenter._model
    kwargs: dict[str, Any] = {}
    if len(points):
        kwargs |= {"input_points": [[points.tolist()]], "input_labels": [[positive.astype(int).tolist()]]}
    if box is not None:
        kwargs["input_boxes"] = [[box.tolist()]]
    inputs = processor(images=pixels, **kwargs, input_data_format="channels_last", return_tensors="pt")
    prompts = {key: inputs[key].to(torch.int64 if key == "input_labels" else torch.float32) for key in kwargs}
    with torch.inference_mode():
        out = model(pixel_values=inputs["pixel_values"], **prompts, multimask_output=multimask)
    best = int(out.iou_scores[0, 0].argmax())
    sizes = {key: inputs[key] for key in ("original_sizes", "reshaped_input_sizes") if key in inputs}
    masks = processor.post_process_masks(out.pred_masks[:, :, best : best + 1], **sizes)[0]
    return masks[0, 0].numpy(), float(out.iou_scores[0, 0, best].clamp(0, 1))


def batching(spec: ModelSpec) -> HfSamSegmenter:
    """A new segmenter of `spec` encoding three images per forward; skips segment-anything (one at a time)."""
    if spec.sam_checkpoint is not None:
        pytest.skip("segment-anything encodes one image at a time")
    segmenter = build_segmenter(spec)
    assert isinstance(segmenter, HfSamSegmenter)
    segmenter.image_batch = 3
    return segmenter


def iou(first: PackedMask, second: PackedMask) -> float:
    a, b = first.to_array(), second.to_array()
    return float((a & b).sum() / (a | b).sum())


def same_tensors(first: ImageEmbedding, second: ImageEmbedding, exact: bool = True) -> bool:
    if first.tensors.keys() != second.tensors.keys():
        return False
    pairs = [(first.tensors[name], second.tensors[name]) for name in first.tensors]
    if exact:
        return all(torch.equal(a, b) for a, b in pairs)
    return all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in pairs)


@pytest.mark.parametrize("prompt", PROMPTS.values(), ids=PROMPTS.keys())
def test_a_prompt_on_the_kept_embedding_is_what_the_image_gives(segmenter: Segmenter, prompt: Prompt) -> None:
    pixels = random_rgb(HEIGHT, WIDTH)
    image = Image.fromarray(pixels)
    grounded = pipeline(segmenter)
    wanted, wanted_score = reference(segmenter, pixels, prompt)

    embedding = segmenter.encode(pixels)
    mask, score = segmenter.segment_points(embedding, *prompt)
    on_image = grounded.segment_points(image, *prompt)
    on_embedding = grounded.segment_points(grounded.encode(image), *prompt)

    assert mask.to_array().tobytes() == wanted.tobytes() and score == wanted_score
    assert on_image.mask.to_array().tobytes() == on_embedding.mask.to_array().tobytes() == wanted.tobytes()
    assert on_image.score == on_embedding.score == wanted_score


def test_an_embedding_cast_to_float16_and_back_decodes_nearly_the_same_mask(
    segmenter: Segmenter, family: str, record_property: Callable[[str, object], None]
) -> None:
    embedding = segmenter.encode(random_rgb(HEIGHT, WIDTH))
    half = embedding.to("cpu", torch.float16)
    back = half.to(segmenter.device, segmenter.embedding_dtype)

    mask, _ = segmenter.segment_points(embedding, *BOX)
    cast, _ = segmenter.segment_points(back, *BOX)

    assert {t.dtype for t in half.tensors.values()} == {torch.float16} and half.nbytes * 2 == embedding.nbytes
    assert mask.to_array().any()  # an IoU of two empty masks would prove nothing
    record_property(f"fp16_iou_{family}", iou(mask, cast))
    assert iou(mask, cast) >= 0.99


def test_keep_gets_each_encoded_image_once_in_order_equal_to_encode(segmenter: Segmenter) -> None:
    images = [random_rgb(HEIGHT, WIDTH, 1), random_rgb(30, 30, 2), random_rgb(90, 40, 3), random_rgb(HEIGHT, WIDTH, 4)]
    boxes = [boxes_for(HEIGHT, WIDTH, 2, 1), np.zeros((0, 4), np.float32), boxes_for(90, 40, 1, 3)]
    boxes.append(boxes_for(HEIGHT, WIDTH, 3, 4))
    kept: list[tuple[int, ImageEmbedding]] = []
    yielded_after: list[int] = []

    for _ in segmenter.segment_stream(images, boxes, keep=lambda index, embedding: kept.append((index, embedding))):
        yielded_after.append(len(kept))

    assert [index for index, _ in kept] == [0, 2, 3]  # the image without boxes is never encoded
    assert yielded_after == [1, 1, 2, 3]  # each embedding is handed out before its image's masks
    for index, embedding in kept:
        alone = segmenter.encode(images[index])
        assert same_tensors(embedding, alone) and embedding.sizes == alone.sizes
        assert embedding.input_hw == embedding.image_hw == images[index].shape[:2]


def test_a_batched_encoder_keeps_each_image_in_a_storage_of_its_own(spec: ModelSpec) -> None:
    segmenter = batching(spec)
    images = [random_rgb(HEIGHT, WIDTH, seed) for seed in range(3)]
    kept: dict[int, ImageEmbedding] = {}

    list(segmenter.segment_stream(images, [boxes_for(HEIGHT, WIDTH, 2, 0)] * 3, keep=kept.__setitem__))

    assert list(kept) == [0, 1, 2]
    for index, embedding in kept.items():
        assert same_tensors(embedding, segmenter.encode(images[index]), exact=False)  # batched: float noise
        for tensor in embedding.tensors.values():
            assert (
                tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
            )


def test_known_embeddings_skip_the_encoder_and_give_their_images_masks(
    segmenter: Segmenter, counter: EncoderCount
) -> None:
    images = [random_rgb(HEIGHT, WIDTH, seed) for seed in range(3)]
    boxes = [boxes_for(HEIGHT, WIDTH, 3, seed) for seed in range(3)]
    expected = [segmenter.segment(image, image_boxes) for image, image_boxes in zip(images, boxes, strict=True)]
    embeddings = [segmenter.encode(image) for image in images]
    other = segmenter.encode(random_rgb(HEIGHT, WIDTH, 9))
    counter.entered.clear()
    kept: list[int] = []

    found = list(
        segmenter.segment_stream(images, boxes, [embeddings[0], None, other], lambda index, _: kept.append(index))
    )

    assert counter.encodes == 1 and kept == [1]  # only the image without a known embedding
    for index in (0, 1):
        assert [m.to_array().tobytes() for m in found[index][0]] == [m.to_array().tobytes() for m in expected[index][0]]
        np.testing.assert_array_equal(found[index][1], expected[index][1])
    # Image 2 was given another image's embedding: the masks are that image's, its pixels were never read.
    other_masks, other_scores = segmenter.segment(random_rgb(HEIGHT, WIDTH, 9), boxes[2])
    assert [m.to_array().tobytes() for m in found[2][0]] == [m.to_array().tobytes() for m in other_masks]
    np.testing.assert_array_equal(found[2][1], other_scores)


def test_nbytes_is_the_summed_tensor_bytes_under_flat_names(segmenter: Segmenter, family: str) -> None:
    embedding = segmenter.encode(random_rgb(HEIGHT, WIDTH))

    assert set(embedding.tensors) == NAMES[family]
    assert embedding.nbytes == sum(t.numel() * t.element_size() for t in embedding.tensors.values()) > 0
    assert all(t.shape[0] == 1 and t.is_contiguous() for t in embedding.tensors.values())
    assert set(nested_tensors(embedding.tensors)) == {name.split(".")[0] for name in NAMES[family]}


def test_a_padded_image_gives_its_own_size_and_masks_of_it(segmenter: Segmenter) -> None:
    grounded = pipeline(segmenter)
    image = random_image(2000, 4)  # sam_input pads it to 2000 x 8
    kept: list[ImageEmbedding] = []

    embedding = grounded.encode(image)
    clicked = grounded.segment_points(embedding, np.array([[10.0, 1.0]]), np.array([True]))
    (segmented,) = grounded.stream([image], grounded.prepare(CAT), keep=lambda _, e: kept.append(e))
    on_kept = grounded.segment_points(kept[0], *BOX)

    assert embedding.image_hw == (4, 2000) and embedding.input_hw == (8, 2000)
    assert clicked.mask.shape == (4, 2000) and on_kept.mask.shape == (4, 2000)
    assert segmented.masks is not None and [m.shape for m in segmented.masks] == [(4, 2000)]
    assert kept[0].image_hw == (4, 2000) and kept[0].input_hw == (8, 2000) and same_tensors(kept[0], embedding)


def test_the_pipelines_stream_indexes_into_its_images(segmenter: Segmenter, counter: EncoderCount) -> None:
    grounded = pipeline(segmenter, WholeImageBoxes(empty_widths=[30]))
    images = [random_image(30, 30, 0), random_image(WIDTH, HEIGHT, 1), random_image(30, 30, 2), random_image(50, 40, 3)]
    plan = grounded.prepare(CAT)
    known = grounded.encode(images[1])
    counter.entered.clear()
    kept: dict[int, ImageEmbedding] = {}

    found = list(grounded.stream(images, plan, known=[None, known, None, None], keep=kept.__setitem__))

    assert list(kept) == [3] and counter.encodes == 1  # no box on 0 and 2; 1 was known
    assert kept[3].image_hw == (40, 50) and same_tensors(kept[3], grounded.encode(images[3]))
    assert [s.masks[0].shape if s.masks else None for s in found] == [None, (HEIGHT, WIDTH), None, (40, 50)]


def test_the_pipeline_refuses_an_embedding_of_another_size(segmenter: Segmenter) -> None:
    grounded = pipeline(segmenter)
    plan = grounded.prepare(CAT)
    embedding = grounded.encode(random_image(WIDTH, HEIGHT))

    with pytest.raises(ValueError, match="image given for"):
        list(grounded.stream([random_image(50, 40)], plan, known=[embedding]))
    with pytest.raises(ValueError, match="1 known embeddings for 2 images"):
        list(grounded.stream([random_image(50, 40)] * 2, plan, known=[embedding]))


def test_a_mask_detector_ignores_known_and_keep(segmenter: Segmenter, counter: EncoderCount) -> None:
    grounded = pipeline(segmenter, FullMasks())
    wrong = segmenter.encode(random_rgb(10, 10))  # of another size: never looked at
    kept: list[int] = []

    (segmented,) = grounded.stream([random_image(50, 40)], grounded.prepare(CAT), [wrong], lambda i, _: kept.append(i))

    assert kept == [] and counter.encodes == 1 and segmented.masks is not None  # the one encode above
    assert segmented.masks[0].shape == (40, 50)


def test_the_pipeline_says_where_and_in_what_dtype_its_embeddings_are(spec: ModelSpec, family: str) -> None:
    low = build_segmenter(replace(spec, sam_dtype="bfloat16"))
    grounded = pipeline(low)
    embedding = grounded.encode(random_image(WIDTH, HEIGHT))
    stored = embedding.to("cpu", torch.float16)

    back = stored.to(grounded.segmenter_device, grounded.segmenter_dtype)
    answer = grounded.segment_points(back, *BOX)

    # segment-anything runs low precision under autocast: its features come out in float32 anyway.
    wanted = torch.float32 if family == "official" else torch.bfloat16
    assert grounded.segmenter_dtype == wanted and grounded.segmenter_device == torch.device("cpu")
    assert {t.dtype for t in embedding.tensors.values()} == {wanted} == {t.dtype for t in back.tensors.values()}
    assert answer.mask.shape == (HEIGHT, WIDTH)


def test_to_casts_floating_tensors_only_and_flat_names_round_trip() -> None:
    nested = {"image_embeddings": [torch.ones(1, 2, 4, 4), torch.ones(1, 3, 2, 2)], "ids": torch.arange(3)[None]}
    flat = flat_tensors(nested)
    embedding = ImageEmbedding(flat, {"original_sizes": (4, 4)}, (4, 4), (4, 4))

    half = embedding.to("cpu", torch.float16)

    assert set(flat) == {"image_embeddings.0", "image_embeddings.1", "ids"}
    assert half.tensors["image_embeddings.0"].dtype == torch.float16 and half.tensors["ids"].dtype == torch.int64
    assert half.nbytes == 2 * (32 + 12) + 8 * 3 and half.sizes == embedding.sizes and half.image_hw == (4, 4)
    back = nested_tensors(flat)
    assert [t.shape for t in back["image_embeddings"]] == [(1, 2, 4, 4), (1, 3, 2, 2)]  # type: ignore[union-attr]
    with pytest.raises(ValueError, match=r"not 0\.\.n-1"):
        nested_tensors({"image_embeddings.0": torch.ones(1), "image_embeddings.2": torch.ones(1)})


def test_owned_copies_a_row_of_a_batch_but_not_a_tensor_of_its_own() -> None:
    batch = torch.ones(4, 8, 8, 2).permute(0, 3, 1, 2)  # channels-last, as SAM's encoders give
    alone = torch.ones(1, 2, 8, 8)

    row = owned(batch[1:2])

    assert row.is_contiguous() and row.untyped_storage().nbytes() == 2 * 8 * 8 * 4 and torch.equal(row, batch[1:2])
    assert owned(alone) is alone


def test_an_out_of_memory_split_hands_out_each_embedding_once(spec: ModelSpec) -> None:
    segmenter = batching(spec)
    model = segmenter._model  # limited as a small GPU would be: one image per encoder forward
    tried: list[int] = []
    model.get_image_embeddings = oom_above(1, len, tried)(model.get_image_embeddings)
    kept: list[int] = []

    list(
        segmenter.segment_stream(
            [random_rgb(HEIGHT, WIDTH, s) for s in range(3)], [BOX[2][None]] * 3, keep=lambda i, _: kept.append(i)
        )
    )

    assert tried == [3, 1, 2, 1, 1] and kept == [0, 1, 2]
