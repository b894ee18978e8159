"""Interactive context: the editor's keypoint/rectangle/brush clicks in /predict's `params.context`, as Label Studio
sends them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from backend.errors import InteractiveContextError
from backend.labelstudio.config import parse_label_config
from backend.labelstudio.interactive import Click, SamPrompt, TextPrompt, parse_context, text_prompt

XML = """
<View>
  <TextArea name="prompt" toName="image" editable="true" rows="2" maxSubmissions="1" showSubmitButton="true"/>
  <Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image">
    <Label value="Banana" prompt="banana, plantain" threshold="0.4"/><Label value="Orange"/>
  </BrushLabels>
  <KeyPointLabels name="tag2" toName="image" smart="true">
    <Label value="Banana"/><Label value="Orange"/>
  </KeyPointLabels>
  <RectangleLabels name="tag3" toName="image" smart="true">
    <Label value="Banana"/><Label value="Orange"/>
  </RectangleLabels>
</View>
"""
CONFIG = parse_label_config(XML)


def keypoint(x: float, y: float, label: str = "Banana", **extra: object) -> dict:
    """The smart keypoint of segment_anything_model/test_predict.py."""
    return {
        "original_width": 1080, "original_height": 1080, "image_rotation": 0,
        "value": {"x": x, "y": y, "width": 0.319, "labels": [label], "keypointlabels": [label]},
        "is_positive": True, "id": "fBWv1t0S2L", "from_name": "tag2", "to_name": "image",
        "type": "keypointlabels", "origin": "manual", **extra,
    }  # fmt: skip


def rectangle(x: float, y: float, width: float, height: float, label: str = "Orange") -> dict:
    return {
        "original_width": 200, "original_height": 100, "image_rotation": 0, "from_name": "tag3", "to_name": "image",
        "type": "rectanglelabels", "value": {"x": x, "y": y, "width": width, "height": height, "rotation": 0,
                                             "rectanglelabels": [label]},
    }  # fmt: skip


def textarea(*texts: str) -> dict:
    return {"from_name": "prompt", "to_name": "image", "type": "textarea", "value": {"text": list(texts)}}


@pytest.mark.parametrize("context", [None, {}, {"result": []}, {"result": None}])
def test_no_context_is_no_interactive_request(context: object) -> None:
    assert parse_context(context, CONFIG) is None


def test_keypoints_become_clicks_in_percent_and_pixels() -> None:
    negative = keypoint(10.0, 20.0, is_positive=False)
    request = parse_context({"result": [keypoint(49.44, 59.97), negative]}, CONFIG)
    assert request == SamPrompt("Banana", (Click(49.44, 59.97, True), Click(10.0, 20.0, False)), None)
    points, positive = request.points_px(1080, 1080)
    np.testing.assert_allclose(points, [[533.952, 647.676], [108.0, 216.0]], rtol=1e-5)
    assert positive.tolist() == [True, False] and request.box_px(1080, 1080) is None


def test_a_missing_is_positive_is_a_foreground_click() -> None:
    region = keypoint(5.0, 5.0)
    del region["is_positive"]
    assert parse_context({"result": [region]}, CONFIG).clicks == (Click(5.0, 5.0, True),)


def test_a_rectangle_becomes_a_box_and_the_last_one_wins() -> None:
    request = parse_context({"result": [rectangle(1, 1, 5, 5), rectangle(10.0, 20.0, 30.0, 40.0)]}, CONFIG)
    assert request == SamPrompt("Orange", (), (10.0, 20.0, 40.0, 60.0))
    assert request.box_px(200, 100) == pytest.approx((20.0, 20.0, 80.0, 60.0))
    points, positive = request.points_px(200, 100)
    assert points.shape == (0, 2) and positive.shape == (0,)


def test_a_box_past_the_edge_is_clamped_to_the_image() -> None:
    request = parse_context({"result": [rectangle(90.0, -0.5, 20.0, 50.0)]}, CONFIG)
    assert request.box == (90.0, 0.0, 100.0, 50.0)


def test_clicks_and_box_together_take_the_last_regions_label() -> None:
    request = parse_context({"result": [rectangle(10, 10, 50, 50, "Banana"), keypoint(30, 30, "Orange")]}, CONFIG)
    assert (request.label, request.box, len(request.clicks)) == ("Orange", (10, 10, 60, 60), 1)


def test_smart_regions_win_over_text() -> None:
    assert isinstance(parse_context({"result": [textarea("orange"), keypoint(1, 1)]}, CONFIG), SamPrompt)


def test_text_replaces_the_prompts_of_the_labels_it_names() -> None:
    single = parse_label_config(
        '<View><Image name="image" value="$image"/><TextArea name="prompt" toName="image"/>'
        '<BrushLabels name="mask" toName="image"><Label value="Orange"/></BrushLabels></View>'
    )
    request = parse_context({"result": [textarea("ripe orange")]}, single)
    assert isinstance(request, TextPrompt) and [(s.value, s.phrases) for s in request.labels] == [
        ("Orange", ("ripe orange",))
    ]
    banana, orange = CONFIG.labels
    named = text_prompt("Orange: tangerine, plantain\nbanana: green banana,ORANGE", CONFIG)
    assert named.labels == (
        dataclasses.replace(banana, phrases=("plantain", "green banana")),
        dataclasses.replace(orange, phrases=("tangerine", "ORANGE")),
    )
    assert named.labels[0].options.threshold == 0.4  # other settings stay
    applied = named.apply(CONFIG)
    assert applied.labels == named.labels and applied.brush == CONFIG.brush


def test_text_that_names_no_label_says_how_to_write_it() -> None:
    with pytest.raises(InteractiveContextError, match=r'"Label: red car".*Banana, Orange'):
        parse_context({"result": [textarea("red car")]}, CONFIG)


@pytest.mark.parametrize(
    ("context", "message"),
    [
        ("text", "must be"),
        ({"result": "x"}, "must be"),
        ({"result": [42]}, r"result\[0\] must be a region"),
        ({"result": [{"type": "keypointlabels", "from_name": "tag2"}]}, "value object"),
        ({"result": [keypoint("49", 1)]}, r"value.x must be a finite number"),
        ({"result": [keypoint(float("nan"), 1)]}, "finite"),
        ({"result": [keypoint(1, 1, is_positive="yes")]}, "is_positive"),
        ({"result": [{**keypoint(1, 1), "value": {"x": 1, "y": 1, "keypointlabels": []}}]}, "chosen label"),
        ({"result": [keypoint(1, 1, label="Apple")]}, "'Apple'.*not a label"),
        ({"result": [rectangle(10, 10, 0, 5)]}, "no area"),
        ({"result": [textarea(" ", "")]}, "empty"),
        ({"result": [{**textarea(), "value": {"text": 5}}]}, "list of strings"),
        ({"result": [{**keypoint(1, 1), "from_name": "not-smart"}]}, "no smart keypoint"),
        ({"result": [keypoint(100.5, 50)]}, r"click at x=100.5% is outside the image"),
        ({"result": [keypoint(50, -3)]}, r"click at y=-3% is outside the image"),
        ({"result": [{**keypoint(1, 1), "to_name": "image", "from_name": "tag9"}]}, "no smart keypoint"),
    ],
)
def test_malformed_context_raises_a_clear_error(context: object, message: str) -> None:
    with pytest.raises(InteractiveContextError, match=message):
        parse_context(context, CONFIG)


def test_to_object_returns_the_label_score_and_box_of_the_mask() -> None:
    mask = np.zeros((10, 20), dtype=bool)
    mask[2:5, 3:9] = True
    obj = SamPrompt("Banana", (Click(1, 1, True),), None).to_object(mask, 0.75)
    assert (obj.label, obj.score, obj.box_xyxy) == ("Banana", 0.75, (3.0, 2.0, 9.0, 5.0))
    assert SamPrompt("Banana", (), (1, 1, 2, 2)).to_object(np.zeros((10, 20), bool), 0.5) is None
