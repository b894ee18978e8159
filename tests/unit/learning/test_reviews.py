"""compare_review: what a reviewer kept, relabelled, deleted and added, against predictions build_prediction wrote."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest

from backend.errors import ReviewFormatError
from backend.labelstudio.config import LabelConfig, parse_label_config
from backend.labelstudio.results import THRESHOLD_KEY, PredictedObject, build_prediction
from backend.labelstudio.rle import mask_to_rle
from backend.learning.reviews import ReviewedObject, compare_review
from backend.learning.shapes import Canvas

W, H = 80, 60
LABELS = '<Label value="cat"/><Label value="dog"/><Label value="bird"/>'
IMAGE = '<Image name="img" value="$image"/>'
BRUSH = f'<BrushLabels name="mask" toName="img">{LABELS}</BrushLabels>'
RECT = f'<RectangleLabels name="box" toName="img">{LABELS}</RectangleLabels>'
POLY = f'<PolygonLabels name="poly" toName="img">{LABELS}</PolygonLabels>'
CHOICES = '<Choices name="seen" toName="img"{}><Choice value="cat"/><Choice value="dog"/><Choice value="bird"/>'
OTHER = '<RectangleLabels name="other" toName="img"><Label value="cat"/></RectangleLabels>'
NOTE = '<TextArea name="note" toName="img"/>'
KEEP_IOU = 0.5


def _config(*controls: str) -> LabelConfig:
    return parse_label_config(f"<View>{IMAGE}{''.join(controls)}</View>")


def _box_mask(x1: int, y1: int, x2: int, y2: int, width: int = W, height: int = H) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[y1:y2, x1:x2] = True
    return mask


def _object(label: str, threshold_score: float, box: tuple[int, int, int, int], mask: np.ndarray) -> PredictedObject:
    """An object whose review score differs from its threshold score (what reviews are scored by)."""
    review_score = threshold_score**0.5
    return PredictedObject(label, review_score, tuple(map(float, box)), mask, threshold_score=threshold_score)


# Three objects far apart, and a fourth place where only the reviewer draws.
CAT = _object("cat", 0.9, (2, 2, 22, 22), _box_mask(2, 2, 22, 22))
DOG = _object("dog", 0.6, (40, 2, 60, 22), _box_mask(40, 2, 60, 22))
BIRD = _object("bird", 0.3, (2, 35, 22, 55), _box_mask(2, 35, 22, 55))
ADDED = _box_mask(45, 35, 70, 55)


def _predicted(config: LabelConfig, objects: list[PredictedObject] | None = None) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = build_prediction(objects or [CAT, DOG, BIRD], config, W, H, "v1")["result"]
    return result


def _relabel(region: dict[str, Any], label: str) -> dict[str, Any]:
    changed = copy.deepcopy(region)
    changed["value"][region["type"]] = [label]
    changed.pop("score", None)
    return changed


def _brush(label: str, mask: np.ndarray, region_id: str = "Xy7_q") -> dict[str, Any]:
    height, width = mask.shape
    value = {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]}
    return {"id": region_id, "from_name": "mask", "to_name": "img", "type": "brushlabels", "value": value} | {
        "original_width": width,
        "original_height": height,
    }


def _rect(label: str, x: float, y: float, w: float, h: float, region_id: str = "Rr9", **extra: Any) -> dict[str, Any]:
    value = {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": [label]} | extra
    return {"id": region_id, "from_name": "box", "to_name": "img", "type": "rectanglelabels", "value": value}


def _poly(label: str, points: list[list[float]], region_id: str = "Pp3") -> dict[str, Any]:
    value = {"points": points, "closed": True, "polygonlabels": [label]}
    return {"id": region_id, "from_name": "poly", "to_name": "img", "type": "polygonlabels", "value": value}


def _percent_box(x1: int, y1: int, x2: int, y2: int) -> list[list[float]]:
    """The corners of a pixel box, in percent of the W x H image."""
    return [[x * 100 / W, y * 100 / H] for x, y in ((x1, y1), (x2, y1), (x2, y2), (x1, y2))]


EXPECTED = (
    ReviewedObject("cat", "kept", 0.9),
    ReviewedObject("dog", "relabelled", 0.6, "cat"),
    ReviewedObject("bird", "deleted", 0.3),
    ReviewedObject("dog", "missed", None),
)


def test_brush_regions_kept_relabelled_deleted_and_missed() -> None:
    config = _config(BRUSH)
    cat, dog, _ = predicted = _predicted(config)
    annotated = [cat, _relabel(dog, "cat"), _brush("dog", ADDED)]
    assert compare_review(predicted, annotated, config, KEEP_IOU) == EXPECTED


def test_rectangle_regions_compare_by_exact_box_iou_and_a_rotated_box_by_its_unrotated_box() -> None:
    config = _config(RECT)
    cat, dog, _ = predicted = _predicted(config)
    moved = copy.deepcopy(cat)
    moved["value"]["x"] += moved["value"]["width"] / 4  # IoU (3/4) / (5/4) = 0.6: still kept at keep_iou 0.5
    moved["value"]["rotation"] = 30
    annotated = [moved, _relabel(dog, "cat"), _rect("dog", 56.25, 58.3, 31.25, 33.3)]
    assert compare_review(predicted, annotated, config, KEEP_IOU) == EXPECTED
    moved["value"]["x"] += moved["value"]["width"] / 4  # IoU (1/2) / (3/2): the cat was deleted, another drawn
    assert compare_review(predicted, annotated, config, KEEP_IOU)[0] == ReviewedObject("cat", "deleted", 0.9)


def test_polygon_regions_are_rasterised_and_compared() -> None:
    config = _config(POLY)
    cat, dog, _ = predicted = _predicted(config)
    assert [region["id"] for region in predicted] == ["0-poly-0", "1-poly-0", "2-poly-0"]
    annotated = [cat, _relabel(dog, "cat"), _poly("dog", _percent_box(45, 35, 70, 55))]
    assert compare_review(predicted, annotated, config, KEEP_IOU) == EXPECTED


def test_the_parts_of_one_predicted_polygon_are_one_object() -> None:
    config = _config(POLY)
    two_parts = _object("cat", 0.9, (2, 2, 60, 22), _box_mask(2, 2, 30, 22) | _box_mask(45, 2, 60, 22))
    predicted = _predicted(config, [two_parts])
    assert [region["id"] for region in predicted] == ["0-poly-0", "0-poly-1"]
    assert compare_review(predicted, predicted, config, KEEP_IOU) == (ReviewedObject("cat", "kept", 0.9),)
    assert compare_review(predicted, predicted[:1], config, KEEP_IOU) == (ReviewedObject("cat", "kept", 0.9),)
    assert compare_review(predicted, predicted[1:], config, KEEP_IOU) == (
        ReviewedObject("cat", "deleted", 0.9),  # the smaller part alone overlaps too little
        ReviewedObject("cat", "missed", None),
    )


def test_a_brush_and_its_rectangle_are_one_object_however_the_reviewer_keeps_them() -> None:
    config = _config(BRUSH, RECT)
    predicted = _predicted(config)
    assert [region["id"] for region in predicted][:2] == ["0-brush", "0-rect"]
    cat_brush, cat_rect, _, dog_rect, _, _ = predicted
    reviewer_pair = [_brush("dog", ADDED, "n1"), _rect("dog", 56.25, 58.3, 31.25, 33.3, "n2")]
    annotated = [cat_brush, cat_rect, _relabel(dog_rect, "cat"), *reviewer_pair]  # the dog's brush deleted
    assert compare_review(predicted, annotated, config, KEEP_IOU) == EXPECTED
    only_boxes = [cat_rect, _relabel(dog_rect, "cat"), reviewer_pair[1]]
    assert compare_review(predicted, only_boxes, config, KEEP_IOU) == EXPECTED


def test_regions_of_different_kinds_are_compared_by_their_masks() -> None:
    config = _config(BRUSH, POLY)
    predicted = _predicted(config, [CAT])
    brush = next(region for region in predicted if region["type"] == "brushlabels")
    annotated = [_poly("cat", _percent_box(2, 2, 22, 22))]  # the reviewer redrew the brush as a polygon
    assert compare_review([brush], annotated, config, KEEP_IOU) == (ReviewedObject("cat", "kept", 0.9),)


def test_large_images_are_compared_on_a_reduced_canvas() -> None:
    width, height = 3000, 2000
    assert Canvas.for_image(width, height) == Canvas(1024, 683)
    config = _config(BRUSH)
    big = _object("cat", 0.8, (100, 100, 1600, 900), _box_mask(100, 100, 1600, 900, width, height))
    predicted = build_prediction([big], config, width, height, "v1")["result"]
    annotated = [_brush("cat", _box_mask(150, 100, 1600, 950, width, height))]
    assert compare_review(predicted, annotated, config, KEEP_IOU) == (ReviewedObject("cat", "kept", 0.8),)


@pytest.mark.parametrize("single", ["", ' choice="single"'])
def test_the_image_tag_is_not_compared_its_objects_are(single: str) -> None:
    config = _config(RECT, CHOICES.format(single or ' choice="multiple"') + "</Choices>")
    predicted = _predicted(config, [CAT, DOG])
    tag = predicted[-1]
    assert tag["id"] == "image-tag"
    annotated = [*predicted[:-1], tag | {"value": {"choices": ["bird"]}}]
    boxes = (ReviewedObject("cat", "kept", 0.9), ReviewedObject("dog", "kept", 0.6))
    assert compare_review(predicted, annotated, config, KEEP_IOU) == boxes  # each object counted once
    assert compare_review(predicted, predicted[:1], config, KEEP_IOU) == (
        ReviewedObject("cat", "kept", 0.9),
        ReviewedObject("dog", "deleted", 0.6),
    )


def test_a_taxonomy_tag_is_skipped_unread() -> None:
    pets = '<Choice value="Pets"><Choice value="cat"/><Choice value="dog"/></Choice>'
    taxonomy = f'<Taxonomy name="tax" toName="img">{pets}</Taxonomy>'
    config = _config(RECT, taxonomy)
    predicted = _predicted(config, [CAT, DOG])
    assert predicted[-1]["value"]["taxonomy"] == [["Pets", "cat"], ["Pets", "dog"]]
    annotated = [*predicted[:2], predicted[-1] | {"value": {"taxonomy": "not a list"}}]
    assert compare_review(predicted, annotated, config, KEEP_IOU) == (
        ReviewedObject("cat", "kept", 0.9),
        ReviewedObject("dog", "kept", 0.6),
    )


def test_other_controls_and_unserved_labels_are_ignored() -> None:
    config = _config(RECT, OTHER, NOTE)
    cat, dog, bird = predicted = _predicted(config)
    foreign = [
        {"id": "o1", "from_name": "other", "to_name": "img", "type": "rectanglelabels", "value": {"broken": True}},
        {"id": "t1", "from_name": "note", "to_name": "img", "type": "textarea", "value": {"text": ["hi"]}},
        _rect("horse", 56.25, 58.3, 31.25, 33.3),  # a label the config does not serve (edited since)
    ]
    annotated = [cat, dog, bird, *foreign]
    assert compare_review(predicted + foreign[:2], annotated, config, KEEP_IOU) == (
        ReviewedObject("cat", "kept", 0.9),
        ReviewedObject("dog", "kept", 0.6),
        ReviewedObject("bird", "kept", 0.3),
    )


def _broken(change: str) -> tuple[list[Any], list[Any]]:
    config = _config(BRUSH, RECT)
    predicted = _predicted(config, [CAT])
    brush, rect = copy.deepcopy(predicted)
    annotated: list[Any] = [brush, rect]
    if change == "not a list":
        return predicted, {"result": []}  # type: ignore[return-value]
    if change == "item not an object":
        annotated.append("0-brush")
    elif change == "no value":
        del rect["value"]
    elif change == "no labels":
        rect["value"]["rectanglelabels"] = []
    elif change == "nan box":
        rect["value"]["x"] = float("nan")
    elif change == "negative width":
        rect["value"]["width"] = -3
    elif change == "rle of other bytes":
        brush["value"]["rle"] = [0, 0, 0, 16, 300]
    elif change == "rle cut short":
        brush["value"]["rle"] = brush["value"]["rle"][:6]
    elif change == "rle of 32-bit words":
        bits = f"{W * H * 4:032b}{31:05b}{'0010' * 4}1{0:02b}{7:03b}{'1' * 32}"  # a repeated word of 2**32 - 1
        bits += "0" * (8 - len(bits) % 8)
        brush["value"]["rle"] = [int(bits[i : i + 8], 2) for i in range(0, len(bits), 8)]
    elif change == "brush without size":
        del brush["original_width"]
    elif change == "rle not bytes":
        brush["value"]["rle"] = [0.5] * 8
    elif change == "no threshold score":
        del predicted[0][THRESHOLD_KEY]  # its "score" is on another scale: no fallback to it
        return predicted, annotated
    return predicted, annotated


@pytest.mark.parametrize(
    "change",
    [
        "not a list",
        "item not an object",
        "no value",
        "no labels",
        "nan box",
        "negative width",
        "rle of other bytes",
        "rle cut short",
        "rle of 32-bit words",
        "brush without size",
        "rle not bytes",
        "no threshold score",
    ],
)
def test_malformed_items_raise_review_format_error(change: str) -> None:
    predicted, annotated = _broken(change)
    with pytest.raises(ReviewFormatError):
        compare_review(predicted, annotated, _config(BRUSH, RECT), KEEP_IOU)


def test_a_polygon_with_too_few_points_says_so() -> None:
    config = _config(POLY)
    with pytest.raises(ReviewFormatError, match="3 to"):
        compare_review([], [_poly("cat", [[1, 1], [2, 2]])], config, KEEP_IOU)


@pytest.mark.parametrize(
    ("size", "header"),
    [((40_000, 40_000), None), ((W, H), [255, 255, 255, 255])],
    ids=["declared image too large", "rle header too large"],
)
def test_a_huge_declared_rle_is_refused_before_decoding(
    size: tuple[int, int], header: list[int] | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    region = _brush("cat", ADDED)
    region["original_width"], region["original_height"] = size
    if header is not None:
        region["value"]["rle"][:4] = header  # would make the decoder allocate 4 GiB

    def must_not_decode(*args: object) -> None:
        raise AssertionError("decoded")

    monkeypatch.setattr("backend.learning.regions.rle_to_mask", must_not_decode)
    with pytest.raises(ReviewFormatError, match="not decoded"):
        compare_review([], [region], _config(BRUSH), KEEP_IOU)


def test_keep_iou_must_be_a_fraction() -> None:
    with pytest.raises(ValueError, match="keep_iou"):
        compare_review([], [], _config(RECT), 0.0)


def test_reviewed_objects_round_trip_through_json() -> None:
    for obj in EXPECTED:
        assert ReviewedObject.from_json(obj.to_json()) == obj


@pytest.mark.parametrize(
    "data",
    [
        {"label": "", "outcome": "kept", "score": 0.5, "new_label": None},
        {"label": "cat", "outcome": "lost", "score": 0.5, "new_label": None},
        {"label": "cat", "outcome": "kept", "score": None, "new_label": None},
        {"label": "cat", "outcome": "kept", "score": 1.5, "new_label": None},
        {"label": "cat", "outcome": "kept", "score": True, "new_label": None},
        {"label": "cat", "outcome": "relabelled", "score": 0.5, "new_label": None},
        {"label": "cat", "outcome": "kept", "score": 0.5, "new_label": "dog"},
        {"label": "cat", "outcome": "missed", "score": 0.5, "new_label": None},
        {"label": "cat", "outcome": "relabelled", "score": 0.5, "new_label": ""},
        {"label": "cat", "outcome": "kept", "score": "0.5", "new_label": None},
    ],
)
def test_bad_reviewed_object_json_raises_value_error(data: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ReviewedObject.from_json(data)


def test_reviews_are_scored_by_the_threshold_score_not_the_review_score() -> None:
    config = _config(RECT)
    (region,) = _predicted(config, [CAT])
    assert (region["score"], region[THRESHOLD_KEY]) == (pytest.approx(0.9**0.5), 0.9)
    assert compare_review([region], [region], config, KEEP_IOU) == (ReviewedObject("cat", "kept", 0.9),)


def _thin_l(width: int = W, height: int = H) -> np.ndarray:
    """An L of 2-pixel strokes inside the box (2, 2, 22, 22): its box IoU with that box is 1, its mask IoU 0.19."""
    return _box_mask(2, 2, 4, 22, width, height) | _box_mask(2, 20, 22, 22, width, height)


def test_a_rectangle_and_a_mask_are_compared_by_their_boxes() -> None:
    config = _config(BRUSH, RECT)
    thin = _object("cat", 0.9, (2, 2, 22, 22), _thin_l())
    predicted = _predicted(config, [thin])
    own_brush, own_box = _brush("cat", _thin_l(), "n1"), _rect("cat", 2.5, 3.33, 25.0, 33.33, "n2")
    # The reviewer's own brush and box of the thin object are one object, not a kept cat and a missed one.
    assert compare_review(predicted, [own_brush, own_box], config, KEEP_IOU) == (ReviewedObject("cat", "kept", 0.9),)
    brush_only = [region for region in predicted if region["type"] == "brushlabels"]
    assert compare_review(brush_only, [own_box], config, KEEP_IOU) == (ReviewedObject("cat", "kept", 0.9),)


def test_a_prediction_pairs_first_with_the_annotation_object_holding_its_region_id() -> None:
    config = _config(RECT)
    car = _object("cat", 0.7, (10, 10, 50, 50), _box_mask(10, 10, 50, 50))
    truck = _object("dog", 0.8, (12, 10, 52, 50), _box_mask(12, 10, 52, 50))
    _, truck_rect = predicted = _predicted(config, [car, truck])
    nudged = copy.deepcopy(truck_rect)
    nudged["value"]["x"] -= 2 * 100 / W  # now exactly the car's box: the reviewer kept the truck, deleted the car
    assert compare_review(predicted, [nudged], config, KEEP_IOU) == (
        ReviewedObject("cat", "deleted", 0.7),
        ReviewedObject("dog", "kept", 0.8),
    )


def test_without_region_ids_same_label_pairs_match_before_relabelling_ones() -> None:
    config = _config(RECT)
    predicted = _predicted(config, [_object("cat", 0.7, (10, 10, 50, 50), _box_mask(10, 10, 50, 50))])
    dog = _rect("dog", 12.5, 16.67, 50.0, 66.67, "n1")  # the cat's box: IoU 1
    cat = _rect("cat", 12.5, 16.67, 30.0, 66.67, "n2")  # IoU 0.6
    assert compare_review(predicted, [dog, cat], config, KEEP_IOU) == (
        ReviewedObject("cat", "kept", 0.7),
        ReviewedObject("dog", "missed", None),
    )


def test_too_many_objects_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("backend.learning.reviews.MAX_OBJECTS", 2)
    config = _config(RECT)
    with pytest.raises(ReviewFormatError, match="3 objects, more than 2"):
        compare_review(_predicted(config), [], config, KEEP_IOU)


def test_mask_comparisons_past_the_work_budget_are_refused_before_any(monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config(BRUSH)
    full = _box_mask(0, 0, W, H)
    predicted = _predicted(config, [_object("cat", 0.5, (0, 0, W, H), full)] * 3)
    annotated = [_brush("cat", full, f"n{i}") for i in range(3)]
    assert len(compare_review(predicted, annotated, config, KEEP_IOU)) == 3  # 9 + 3 pairs of W * H * 2 pixels

    def must_not_compare(*args: object) -> None:
        raise AssertionError("compared")

    monkeypatch.setattr("backend.learning.reviews.MAX_COMPARED_PIXELS", 12 * W * H * 2 - 1)
    monkeypatch.setattr("backend.learning.reviews.iou", must_not_compare)
    with pytest.raises(ReviewFormatError, match="more than"):
        compare_review(predicted, annotated, config, KEEP_IOU)


@pytest.mark.parametrize(
    ("bound", "value", "message"),
    [("MAX_RESULT_RLE_VALUES", 10, "RLE values"), ("MAX_RASTER_PIXELS", W * H, "canvas pixels")],
)
def test_a_result_past_its_rle_or_mask_bound_is_refused(
    bound: str, value: int, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(f"backend.learning.regions.{bound}", value)
    config = _config(BRUSH)
    annotated = [_brush("cat", _box_mask(0, 0, W, H), "n1"), _brush("cat", _box_mask(0, 0, W, H), "n2")]
    with pytest.raises(ReviewFormatError, match=message):
        compare_review([], annotated, config, KEEP_IOU)
