"""parse_label_config: which image, controls and labels a labeling config gives the backend."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from backend.class_options import ClassOptions
from backend.errors import LabelConfigError
from backend.labelstudio.config import ControlRef, LabelSpec, parse_label_config
from backend.labelstudio.image_tags import ImageTagControl
from tests.support.paths import REPO

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
            "no <BrushLabels>, <RectangleLabels> or <PolygonLabels>",
        ),
        (
            "<View><Image name='i' value='$image'/><Text name='t' value='$t'/>"
            "<RectangleLabels name='r' toName='t'><Label value='a'/></RectangleLabels></View>",
            "no <BrushLabels>, <RectangleLabels> or <PolygonLabels>",
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


# Per-label attributes, polygon, image tags, interactive controls.

REPO_CONFIGS = sorted((REPO / "label_config").glob("*.xml"))
IMG = '<Image name="i" value="$image"/>'


def _one_label(attrs: str, control: str = "BrushLabels") -> LabelSpec:
    xml = f'<View>{IMG}<{control} name="c" toName="i"><Label value="Car" {attrs}/></{control}></View>'
    return parse_label_config(xml).labels[0]


@pytest.mark.parametrize("path", REPO_CONFIGS, ids=lambda path: path.name)
def test_every_shipped_config_parses(path: Path) -> None:
    assert parse_label_config(path.read_text()).labels


def test_label_attributes_become_phrases_and_options() -> None:
    spec = _one_label(
        'prompt="car, automobile" negative="toy car,, poster" threshold="0.4" min_area="50" max_instances="3"'
    )
    assert spec.phrases == ("car", "automobile")
    assert spec.options == ClassOptions(negatives=("toy car", "poster"), threshold=0.4, min_area=50, max_instances=3)
    assert _one_label("").options == ClassOptions()


def test_prompt_wins_over_predicted_values() -> None:
    assert _one_label('prompt="sedan" predicted_values="car,auto"').phrases == ("sedan",)
    assert _one_label('predicted_values="car,auto"').phrases == ("car", "auto")


@pytest.mark.parametrize(
    ("attrs", "attribute"),
    [
        ('threshold="high"', "threshold"),
        ('threshold="1.5"', "threshold"),
        ('threshold="nan"', "threshold"),
        ('min_area="-1"', "min_area"),
        ('min_area="2.5"', "min_area"),
        ('max_instances="0"', "max_instances"),
        ('negative="CAR"', "negative"),
    ],
)
def test_invalid_attributes_name_the_label_and_attribute(attrs: str, attribute: str) -> None:
    with pytest.raises(LabelConfigError, match=rf'<Label value="Car">.*{attribute}='):
        _one_label(attrs)


def test_a_label_on_two_controls_merges_options_and_refuses_conflicts() -> None:
    def config(brush: str, rect: str) -> LabelSpec:
        return parse_label_config(
            f'<View>{IMG}<BrushLabels name="b" toName="i"><Label value="Car" {brush}/></BrushLabels>'
            f'<PolygonLabels name="p" toName="i"><Label value="Car" {rect}/></PolygonLabels></View>'
        ).labels[0]

    merged = config('negative="toy" threshold="0.4"', 'negative="poster" threshold="0.4" min_area="9"')
    assert merged.controls == ("brush", "polygon")
    assert merged.options == ClassOptions(negatives=("toy", "poster"), threshold=0.4, min_area=9)
    with pytest.raises(LabelConfigError, match=r'Car.*threshold="0.4".*"0.5"'):
        config('threshold="0.4"', 'threshold="0.5"')


def test_polygon_only_config_is_served() -> None:
    config = parse_label_config(
        f'<View>{IMG}<PolygonLabels name="p" toName="i"><Label value="a"/></PolygonLabels></View>'
    )
    assert config.polygon == ControlRef("p", "i") and config.brush is None and config.rectangle is None
    assert config.labels[0].controls == ("polygon",)


def test_choices_map_labels_by_exact_value_and_unrelated_choices_are_not_served() -> None:
    config = parse_label_config(
        f'<View>{IMG}<Choices name="quality" toName="i"><Choice value="good"/></Choices>'
        '<Choices name="seen" toName="i"><Choice value="cat"/><Choice value="Dog"/><Choice value="other"/></Choices>'
        '<BrushLabels name="b" toName="i"><Label value="Cat"/><Label value="Dog"/></BrushLabels></View>'
    )
    assert config.image_tag == ImageTagControl("seen", "i", "choices", (("Dog", ("Dog",)),), single=True)
    assert parse_label_config(BOTH).image_tag is None  # its Choices names no label


def test_taxonomy_maps_labels_to_the_path_of_the_first_matching_node() -> None:
    config = parse_label_config(
        f'<View>{IMG}<BrushLabels name="b" toName="i"><Label value="Cat"/><Label value="Car"/>'
        '<Label value="Animal"/></BrushLabels><Taxonomy name="t" toName="i">'
        '<Choice value="Animal"><Choice value="Pet"><Choice value="Cat"/></Choice></Choice>'
        '<Choice value="Cat"/><Choice value="Car"/></Taxonomy></View>'
    )
    tag = config.image_tag
    assert tag is not None and (tag.kind, tag.single) == ("taxonomy", False)
    assert dict(tag.paths) == {"Cat": ("Animal", "Pet", "Cat"), "Car": ("Car",), "Animal": ("Animal",)}


def test_interactive_controls() -> None:
    config = parse_label_config((REPO_CONFIGS[0].parent / "interactive.xml").read_text())
    assert config.prompt == ControlRef("prompt", "image")
    assert config.smart == (ControlRef("click", "image"), ControlRef("box", "image"))
    assert parse_label_config(BOTH).prompt is None and parse_label_config(BOTH).smart == ()


def test_smart_control_labels_must_be_served() -> None:
    with pytest.raises(LabelConfigError, match=r'smart <KeyPointLabels name="k">.*\'Tree\''):
        parse_label_config(
            f'<View>{IMG}<BrushLabels name="b" toName="i"><Label value="Car"/></BrushLabels>'
            '<KeyPointLabels name="k" toName="i" smart="true"><Label value="Tree"/></KeyPointLabels></View>'
        )
