"""parse_label_config: which image, controls and labels a labeling config gives the backend."""

from __future__ import annotations

import dataclasses

import pytest

from backend.errors import LabelConfigError
from backend.labelstudio.config import ControlRef, LabelSpec, parse_label_config

BOTH = """
<View>
  <Header value="Label everything"/>
  <Image name="photo" value="$img" zoom="true"/>
  <BrushLabels name="mask" toName="photo">
    <Label value="Traffic light" background="red"/>
    <Label value="car" predicted_values="car, truck ,, van"/>
  </BrushLabels>
  <RectangleLabels name="box" toName="photo">
    <Label value="car" predicted_values="automobile"/>
    <Label value="Person (adult)"/>
  </RectangleLabels>
  <Choices name="quality" toName="photo"><Choice value="good"/></Choices>
</View>
"""


def test_both_controls_give_refs_and_merged_labels_in_config_order() -> None:
    config = parse_label_config(BOTH)
    assert (config.image_name, config.image_key) == ("photo", "img")
    assert config.brush == ControlRef(from_name="mask", to_name="photo")
    assert config.rectangle == ControlRef(from_name="box", to_name="photo")
    assert config.labels == (
        LabelSpec("Traffic light", ("Traffic light",), ("brush",)),
        LabelSpec("car", ("car", "truck", "van", "automobile"), ("brush", "rectangle")),
        LabelSpec("Person (adult)", ("Person (adult)",), ("rectangle",)),
    )


def test_brush_only() -> None:
    config = parse_label_config(
        '<View><Image name="i" value="$image"/>'
        '<BrushLabels name="b" toName="i"><Label value="cat"/></BrushLabels></View>'
    )
    assert config.brush == ControlRef("b", "i") and config.rectangle is None
    assert config.labels == (LabelSpec("cat", ("cat",), ("brush",)),)


def test_rectangle_only() -> None:
    config = parse_label_config(
        '<View><Image name="i" value="$image"/>'
        '<RectangleLabels name="r" toName="i"><Label value="cat"/></RectangleLabels></View>'
    )
    assert config.brush is None and config.rectangle == ControlRef("r", "i")
    assert config.labels[0].controls == ("rectangle",)


@pytest.mark.parametrize(
    ("xml_value", "exact"),
    [
        ("Traffic Light", "Traffic Light"),
        ("  padded  ", "  padded  "),
        ("T-shirt (red), size: XL!", "T-shirt (red), size: XL!"),
        ("a &amp; b &lt;c&gt; &quot;d&quot;", 'a & b <c> "d"'),
        ("Straße ✓", "Straße ✓"),
        ("what? yes. no", "what? yes. no"),
    ],
)
def test_label_values_survive_exactly(xml_value: str, exact: str) -> None:
    config = parse_label_config(
        f'<View><Image name="i" value="$image"/><BrushLabels name="b" toName="i"><Label value="{xml_value}"/>'
        "</BrushLabels></View>"
    )
    assert config.labels[0].value == exact
    assert config.labels[0].phrases == (exact,)


def test_alias_is_the_result_value_and_the_visible_value_is_the_phrase() -> None:
    config = parse_label_config(
        '<View><Image name="i" value="$image"/><BrushLabels name="b" toName="i">'
        '<Label value="Dog" alias="dog-1"/></BrushLabels></View>'
    )
    assert config.labels == (LabelSpec("dog-1", ("Dog",), ("brush",)),)


def test_first_image_with_a_supported_control_is_served() -> None:
    config = parse_label_config(
        '<View><Image name="ref" value="$reference"/><Choices name="c" toName="ref"><Choice value="x"/></Choices>'
        '<Image name="main" value="$main"/><RectangleLabels name="r" toName="main"><Label value="a"/></RectangleLabels>'
        '<BrushLabels name="b2" toName="ref,main"><Label value="b"/></BrushLabels></View>'
    )
    assert (config.image_name, config.image_key) == ("ref", "reference")
    assert config.brush == ControlRef("b2", "ref") and config.rectangle is None


def test_parsing_is_cached_and_results_are_frozen() -> None:
    config = parse_label_config(BOTH)
    assert parse_label_config(BOTH) is config
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.image_key = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("xml", "reason"),
    [
        ("", "empty"),
        ("<View><Image name='i' value='$image'>", "not valid XML"),
        ("not xml at all", "not valid XML"),
        ('<?xml version="1.0" encoding="utf-8"?><View/>', "not valid XML"),
        ("<View><Text name='t' value='$text'/></View>", "no <Image>"),
        (
            "<View><Image name='i' value='$image'/><Choices name='c' toName='i'><Choice value='x'/></Choices>"
            "<Brush name='plain' toName='i'/><Rectangle name='r' toName='i'/></View>",
            "no <BrushLabels> or <RectangleLabels>",
        ),
        (
            "<View><Image name='i' value='$image'/><Text name='t' value='$t'/>"
            "<RectangleLabels name='r' toName='t'><Label value='a'/></RectangleLabels></View>",
            "no <BrushLabels> or <RectangleLabels>",
        ),
        ("<View><Image name='i' value='$image'/><BrushLabels name='b' toName='i'/></View>", "has no <Label>"),
        (
            "<View><Image name='i' value='$image'/><BrushLabels name='b' toName='i'><Label value='a'/></BrushLabels>"
            "<RectangleLabels name='r' toName='i'></RectangleLabels></View>",
            'RectangleLabels name="r"> has no <Label>',
        ),
        (
            "<View><Image name='i' value='https://x/a.png'/>"
            "<BrushLabels name='b' toName='i'><Label value='a'/></BrushLabels></View>",
            "must take its value from the task",
        ),
        (
            "<View><Image name='i' valueList='$images'/>"
            "<BrushLabels name='b' toName='i'><Label value='a'/></BrushLabels></View>",
            "image lists are not supported",
        ),
    ],
)
def test_unservable_configs_raise_label_config_error(xml: str, reason: str) -> None:
    with pytest.raises(LabelConfigError) as info:
        parse_label_config(xml)
    assert reason in str(info.value)


def test_external_entities_are_not_read(tmp_path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET")
    xml = (
        f'<!DOCTYPE v [<!ENTITY s SYSTEM "file://{secret}">]><View><Image name="i" value="$image"/>'
        '<BrushLabels name="b" toName="i"><Label value="&s;"/></BrushLabels></View>'
    )
    with pytest.raises(LabelConfigError) as info:
        parse_label_config(xml)
    assert "TOP-SECRET" not in str(info.value)
