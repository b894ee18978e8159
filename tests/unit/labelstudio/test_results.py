"""build_prediction: Label Studio result JSON that Label Studio's own schema accepts and annotators can use."""

from __future__ import annotations

import json

import numpy as np
import pytest
from label_studio_sdk.label_interface import LabelInterface

from backend.labelstudio.config import parse_label_config
from backend.labelstudio.results import (
    THRESHOLD_KEY,
    OutputOptions,
    PredictedObject,
    build_prediction,
    empty_prediction,
    interactive_id_prefix,
    mask_box,
)
from backend.labelstudio.rle import rle_to_mask
from tests.validation import assert_valid_prediction

W, H = 64, 48
LABELS = '<Label value="Traffic Light"/><Label value="a, b &amp; c?"/>'
BOTH = (
    f'<View><Image name="img" value="$image"/><BrushLabels name="mask" toName="img">{LABELS}</BrushLabels>'
    f'<RectangleLabels name="box" toName="img">{LABELS}<Label value="Sign"/></RectangleLabels></View>'
)
IMAGE = '<Image name="img" value="$image"/>'
BRUSH = f'<View>{IMAGE}<BrushLabels name="mask" toName="img">{LABELS}</BrushLabels></View>'
RECT = f'<View>{IMAGE}<RectangleLabels name="box" toName="img">{LABELS}</RectangleLabels></View>'


def _mask(x1: int, y1: int, x2: int, y2: int) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask[y1:y2, x1:x2] = True
    return mask


OBJECTS = [
    PredictedObject("Traffic Light", 0.9, (8.0, 4.0, 24.0, 20.0), _mask(8, 4, 24, 20)),
    PredictedObject("a, b & c?", np.float32(0.5), (-10.0, 30.0, 80.0, 60.0), _mask(0, 30, 64, 48)),
]


def _assert_lossless_and_valid(prediction: dict, xml: str) -> None:
    """Label Studio's own checks (SDK schema) plus what it does not check: sizes, bounds, RLE size."""
    json.dumps(prediction)  # plain JSON types only (no numpy scalars)
    assert LabelInterface(xml).validate_prediction(prediction, return_errors=True) == []
    for region in prediction["result"]:
        assert region["readonly"] is False and 0.0 <= region["score"] <= 1.0
        if region["type"] in ("choices", "taxonomy"):  # image-level: no geometry
            continue
        assert (region["original_width"], region["original_height"], region["image_rotation"]) == (W, H, 0)
        value = region["value"]
        if region["type"] == "rectanglelabels":
            assert all(0.0 <= value[k] <= 100.0 for k in ("x", "y", "width", "height"))
            assert value["x"] + value["width"] <= 100.0 and value["y"] + value["height"] <= 100.0
        elif region["type"] == "polygonlabels":
            assert len(value["points"]) >= 3 and all(0.0 <= c <= 100.0 for p in value["points"] for c in p)
        else:
            assert rle_to_mask(value["rle"], H, W).shape == (H, W)


def test_both_controls_give_a_brush_and_a_rectangle_per_object() -> None:
    config = parse_label_config(BOTH)
    prediction = build_prediction(OBJECTS, config, W, H, "gsam-x")
    _assert_lossless_and_valid(prediction, BOTH)
    result = prediction["result"]
    assert [(r["id"], r["type"], r["from_name"], r["to_name"]) for r in result] == [
        ("0-brush", "brushlabels", "mask", "img"),
        ("0-rect", "rectanglelabels", "box", "img"),
        ("1-brush", "brushlabels", "mask", "img"),
        ("1-rect", "rectanglelabels", "box", "img"),
    ]
    assert result[0]["value"]["brushlabels"] == ["Traffic Light"]
    assert result[3]["value"]["rectanglelabels"] == ["a, b & c?"]
    np.testing.assert_array_equal(rle_to_mask(result[2]["value"]["rle"], H, W), OBJECTS[1].mask)
    assert prediction["model_version"] == "gsam-x"
    assert prediction["score"] == pytest.approx(0.5)  # the lowest region score


def test_rectangle_is_percent_of_the_image_and_clamped() -> None:
    prediction = build_prediction(OBJECTS, parse_label_config(RECT), W, H, "v")
    inside, clamped = (region["value"] for region in prediction["result"])
    assert (inside["rotation"], inside["rectanglelabels"]) == (0, ["Traffic Light"])
    assert inside["x"] == pytest.approx(12.5) and inside["width"] == pytest.approx(25.0)
    assert inside["y"] == pytest.approx(100 * 4 / 48) and inside["height"] == pytest.approx(100 * 16 / 48)
    assert clamped["x"] == 0.0 and clamped["width"] == 100.0
    assert clamped["y"] == pytest.approx(62.5) and clamped["y"] + clamped["height"] == pytest.approx(100.0)


def test_random_boxes_stay_within_bounds() -> None:
    rng = np.random.default_rng(1)
    boxes = rng.uniform(-200, 300, size=(200, 4))
    objects = [PredictedObject("Traffic Light", 0.5, tuple(map(float, box))) for box in boxes]
    prediction = build_prediction(objects, parse_label_config(RECT), W, H, "v")
    _assert_lossless_and_valid(prediction, RECT)
    assert len({region["id"] for region in prediction["result"]}) == 200


def test_brush_only_config_needs_no_box_and_gives_only_brushes() -> None:
    prediction = build_prediction(OBJECTS, parse_label_config(BRUSH), W, H, "v")
    _assert_lossless_and_valid(prediction, BRUSH)
    assert [r["type"] for r in prediction["result"]] == ["brushlabels", "brushlabels"]


def test_label_on_one_control_only_gets_that_region_and_no_mask_is_needed_for_rectangles() -> None:
    sign = PredictedObject("Sign", 0.25, (0.0, 0.0, 10.0, 10.0), None)
    prediction = build_prediction([sign], parse_label_config(BOTH), W, H, "v")
    assert [r["type"] for r in prediction["result"]] == ["rectanglelabels"]
    assert prediction["score"] == 0.25


def test_same_input_gives_the_same_prediction() -> None:
    config = parse_label_config(BOTH)
    assert build_prediction(OBJECTS, config, W, H, "v") == build_prediction(OBJECTS, config, W, H, "v")


def test_interactive_answers_have_region_ids_of_their_own() -> None:
    """The editor replaces an accepted region whose id a suggestion accepted later has: each answer its own ids."""
    config = parse_label_config(BOTH)
    first, second = (interactive_id_prefix({"result": [{"x": x}]}, "/data/upload/1/a.png") for x in (10, 20))
    assert first != second and first == interactive_id_prefix({"result": [{"x": 10}]}, "/data/upload/1/a.png")
    ids = [
        {r["id"] for r in build_prediction(OBJECTS, config, W, H, "v", id_prefix=p)["result"]} for p in (first, second)
    ]
    assert not ids[0] & ids[1] and all(region_id.startswith(first) for region_id in ids[0])
    _assert_lossless_and_valid(build_prediction(OBJECTS, config, W, H, "v", id_prefix=first), BOTH)


def test_empty_predictions_score_zero() -> None:
    assert build_prediction([], parse_label_config(BOTH), W, H, "v") == empty_prediction("v")
    assert empty_prediction("v") == {"result": [], "score": 0.0, "model_version": "v"}


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        (PredictedObject("traffic light", 0.5, (0, 0, 1, 1), _mask(0, 0, 1, 1)), "not in the labeling config"),
        (PredictedObject("Traffic Light", 1.5, (0, 0, 1, 1), _mask(0, 0, 1, 1)), "score must be in"),
        (PredictedObject("Traffic Light", float("nan"), (0, 0, 1, 1), _mask(0, 0, 1, 1)), "score must be in"),
        (PredictedObject("Traffic Light", 0.5, (0, 0, 1, 1), None), "has no mask"),
        (PredictedObject("Traffic Light", 0.5, (0, 0, 1, 1), np.zeros((W, H), bool)), "mask shape"),
        (PredictedObject("Sign", 0.5, (0, float("inf"), 1, 1)), "finite"),
    ],
)
def test_objects_label_studio_would_store_silently_are_refused(obj: PredictedObject, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_prediction([obj], parse_label_config(BOTH), W, H, "v")


def test_sdk_check_used_above_does_catch_a_wrong_label() -> None:
    prediction = build_prediction(OBJECTS[:1], parse_label_config(BOTH), W, H, "v")
    prediction["result"][1]["value"]["rectanglelabels"] = ["elephant"]
    assert LabelInterface(BOTH).validate_prediction(prediction, return_errors=True) != []


# Polygons, rectangles from masks, image tags, task score.

POLY = (
    f'<View>{IMAGE}<PolygonLabels name="poly" toName="img">{LABELS}</PolygonLabels>'
    f'<RectangleLabels name="box" toName="img">{LABELS}</RectangleLabels>'
    '<Choices name="seen" toName="img" choice="multiple"><Choice value="Traffic Light"/><Choice value="a, b &amp; c?"/>'
    "</Choices></View>"
)


def _two_parts() -> np.ndarray:
    return _mask(2, 2, 10, 10) | _mask(40, 20, 60, 40)


def test_polygons_one_region_per_part_with_valid_points() -> None:
    objects = [PredictedObject("Traffic Light", 0.7, (2.0, 2.0, 60.0, 40.0), _two_parts())]
    prediction = build_prediction(objects, parse_label_config(POLY), W, H, "v")
    assert_valid_prediction(prediction, POLY, W, H)
    _assert_lossless_and_valid(prediction, POLY)
    polygons = [r for r in prediction["result"] if r["type"] == "polygonlabels"]
    assert [r["id"] for r in polygons] == ["0-poly-0", "0-poly-1"]
    assert all(r["value"]["polygonlabels"] == ["Traffic Light"] and r["value"]["closed"] for r in polygons)


def test_polygon_labels_need_a_mask() -> None:
    with pytest.raises(ValueError, match="has no mask"):
        build_prediction([PredictedObject("Traffic Light", 0.5, (0, 0, 1, 1))], parse_label_config(POLY), W, H, "v")


def test_rectangle_from_the_mask_or_from_the_detector() -> None:
    obj = PredictedObject("Traffic Light", 0.5, (0.0, 0.0, 64.0, 48.0), _mask(8, 12, 24, 36))
    config = parse_label_config(RECT)
    from_mask = build_prediction([obj], config, W, H, "v", OutputOptions(rectangle_source="mask"))
    value = from_mask["result"][0]["value"]
    assert (value["x"], value["width"]) == pytest.approx((12.5, 25.0))
    assert (value["y"], value["height"]) == pytest.approx((25.0, 50.0))
    from_detector = build_prediction([obj], config, W, H, "v")["result"][0]["value"]
    assert (from_detector["x"], from_detector["width"]) == (0.0, 100.0)
    empty = PredictedObject("Traffic Light", 0.5, (0.0, 0.0, 32.0, 48.0), np.zeros((H, W), bool))
    fallback = build_prediction([empty], config, W, H, "v", OutputOptions(rectangle_source="mask"))
    assert fallback["result"][0]["value"]["width"] == 50.0


def test_mask_box_covers_the_pixels() -> None:
    assert mask_box(_mask(3, 4, 10, 20)) == (3.0, 4.0, 10.0, 20.0)
    assert mask_box(np.zeros((H, W), bool)) is None


def _tag(prediction: dict) -> dict:
    (region,) = [r for r in prediction["result"] if r["id"] == "image-tag"]
    return region


def test_choices_name_the_present_labels_with_the_lowest_presence_score() -> None:
    objects = [
        PredictedObject("a, b & c?", 0.4, (0, 0, 5, 5), _mask(0, 0, 5, 5)),
        PredictedObject("Traffic Light", 0.9, (0, 0, 5, 5), _mask(0, 0, 5, 5)),
        PredictedObject("a, b & c?", 0.6, (0, 0, 5, 5), _mask(10, 10, 20, 20)),
    ]
    prediction = build_prediction(objects, parse_label_config(POLY), W, H, "v")
    assert_valid_prediction(prediction, POLY, W, H)
    _assert_lossless_and_valid(prediction, POLY)
    tag = _tag(prediction)
    assert (tag["type"], tag["from_name"], tag["to_name"]) == ("choices", "seen", "img")
    assert tag["value"] == {"choices": ["Traffic Light", "a, b & c?"]}
    assert tag["score"] == 0.6  # "a, b & c?" is present with its best object's score


def test_single_choice_gets_the_best_label_and_no_objects_no_tag() -> None:
    xml = POLY.replace(' choice="multiple"', "")
    objects = [
        PredictedObject("a, b & c?", 0.8, (0, 0, 5, 5), _mask(0, 0, 5, 5)),
        PredictedObject("Traffic Light", 0.7, (0, 0, 5, 5), _mask(0, 0, 5, 5)),
    ]
    prediction = build_prediction(objects, parse_label_config(xml), W, H, "v")
    assert _tag(prediction)["value"] == {"choices": ["a, b & c?"]}
    assert build_prediction([], parse_label_config(xml), W, H, "v") == empty_prediction("v")


def test_taxonomy_gets_paths() -> None:
    xml = (
        f'<View>{BRUSH[6:-7]}<Taxonomy name="tax" toName="img"><Choice value="Road">'
        '<Choice value="Traffic Light"/></Choice><Choice value="Other"/></Taxonomy></View>'
    )
    objects = [PredictedObject("Traffic Light", 0.7, (0, 0, 5, 5), _mask(0, 0, 5, 5))]
    prediction = build_prediction(objects, parse_label_config(xml), W, H, "v")
    assert_valid_prediction(prediction, xml, W, H)
    _assert_lossless_and_valid(prediction, xml)
    assert _tag(prediction)["value"] == {"taxonomy": [["Road", "Traffic Light"]]}


def test_task_score_is_the_lowest_region_score_so_doubtful_tasks_sort_first() -> None:
    config = parse_label_config(BOTH)
    confident = build_prediction([OBJECTS[0]] * 5, config, W, H, "v")
    one_doubt = build_prediction([OBJECTS[0]] * 4 + [PredictedObject("Sign", 0.1, (0, 0, 5, 5))], config, W, H, "v")
    assert one_doubt["score"] == 0.1 < confident["score"] == 0.9


def test_an_objects_regions_carry_its_threshold_score_as_an_extra_key() -> None:
    config = parse_label_config(BOTH)
    objects = [PredictedObject("Traffic Light", 0.9, (8.0, 4.0, 24.0, 20.0), _mask(8, 4, 24, 20), np.float32(0.75))]
    prediction = build_prediction([*objects, OBJECTS[1]], config, W, H, "gsam-x")
    _assert_lossless_and_valid(prediction, BOTH)  # Label Studio's schema takes the extra key
    scored = {region["id"]: region.get(THRESHOLD_KEY) for region in prediction["result"]}
    assert scored == {"0-brush": 0.75, "0-rect": 0.75, "1-brush": None, "1-rect": None}  # None: no threshold applies
    assert type(scored["0-brush"]) is float and prediction["score"] == 0.5  # the task's score stays the review score
    with pytest.raises(ValueError, match="threshold_score must be in"):
        build_prediction([PredictedObject("Sign", 0.5, (0, 0, 1, 1), None, 1.5)], config, W, H, "v")
