"""model_version changes exactly when predictions would."""

from __future__ import annotations

import re

import pytest

from backend.labelstudio.config import parse_label_config
from backend.labelstudio.version import model_version
from backend.settings import Settings

FINGERPRINT = {"detector": "IDEA-Research/grounding-dino-tiny", "sam": "facebook/sam-vit-base", "box_threshold": 0.3}
BASE = (
    '<View><Image name="i" value="$image"/><BrushLabels name="b" toName="i"><Label value="cat"/>'
    '<Label value="dog" predicted_values="dog,puppy"/></BrushLabels></View>'
)


def _version(xml: str = BASE, **changes: object) -> str:
    return model_version({**FINGERPRINT, **changes}, parse_label_config(xml))


def test_format_and_stability() -> None:
    assert re.fullmatch(r"gsam-[0-9a-f]{12}", _version())
    assert _version() == _version()
    assert model_version(dict(reversed(FINGERPRINT.items())), parse_label_config(BASE)) == _version()


def test_layout_whitespace_and_unrelated_tags_do_not_change_it() -> None:
    relaid = (
        '<View>\n  <Header value="Paint them"/>\n  <Image name="i" value="$image" zoom="true"/>\n'
        '  <Choices name="q" toName="i"><Choice value="ok"/></Choices>\n'
        '  <BrushLabels name="b" toName="i">\n    <Label value="cat" background="#f00"/>\n'
        '    <Label value="dog" predicted_values="dog,puppy"/>\n  </BrushLabels>\n</View>\n'
    )
    assert _version(relaid) == _version()


@pytest.mark.parametrize(
    "xml",
    [
        BASE.replace('value="cat"', 'value="Cat"'),
        BASE.replace("dog,puppy", "dog,pup"),
        BASE.replace('<Label value="cat"/>', ""),
        BASE.replace(
            '<Label value="cat"/><Label value="dog" predicted_values="dog,puppy"/>',
            '<Label value="dog" predicted_values="dog,puppy"/><Label value="cat"/>',
        ),
        BASE.replace('name="b"', 'name="mask"'),
        BASE.replace("BrushLabels", "RectangleLabels"),
        BASE.replace("</View>", '<RectangleLabels name="r" toName="i"><Label value="cat"/></RectangleLabels></View>'),
    ],
    ids=["label case", "phrases", "label removed", "label order", "control name", "control kind", "control added"],
)
def test_label_set_changes_change_it(xml: str) -> None:
    assert _version(xml) != _version()


@pytest.mark.parametrize("change", [{"box_threshold": 0.35}, {"sam": "facebook/sam-vit-huge"}, {"nms_iou": 0.5}])
def test_model_changes_change_it(change: dict[str, object]) -> None:
    assert _version(**change) != _version()


def test_fingerprint_must_be_json() -> None:
    with pytest.raises(TypeError):
        _version(device=object())


@pytest.mark.parametrize(
    "attrs",
    ['negative="toy dog"', 'threshold="0.4"', 'min_area="10"', 'max_instances="2"', 'prompt="hound"'],
)
def test_per_label_attributes_change_it(attrs: str) -> None:
    assert _version(BASE.replace('<Label value="dog"', f'<Label value="dog" {attrs}')) != _version()


@pytest.mark.parametrize(
    "added",
    [
        '<PolygonLabels name="p" toName="i"><Label value="cat"/></PolygonLabels>',
        '<Choices name="c" toName="i"><Choice value="cat"/></Choices>',
        '<Taxonomy name="t" toName="i"><Choice value="cat"/></Taxonomy>',
    ],
    ids=["polygon", "choices", "taxonomy"],
)
def test_new_outputs_change_it(added: str) -> None:
    assert _version(BASE.replace("</View>", f"{added}</View>")) != _version()


def test_interactive_only_controls_do_not_change_it() -> None:
    added = (
        '<TextArea name="prompt" toName="i"/>'
        '<KeyPointLabels name="k" toName="i" smart="true"><Label value="cat"/></KeyPointLabels>'
    )
    assert _version(BASE.replace("</View>", f"{added}</View>")) == _version()


NEW_SETTINGS = {
    "min_area": 5,
    "max_instances": 3,
    "negative_iou": 0.6,
    "dedup_iou": 0.8,
    "dedup_score_margin": 0.1,
    "mask_fill_holes": 7,
    "mask_min_island": 7,
    "mask_smoothing": 1.5,
    "rectangle_source": "mask",
    "polygon_tolerance": 2.0,
}


def test_every_post_processing_and_output_setting_enters_the_fingerprint() -> None:
    base = Settings()
    for name, value in NEW_SETTINGS.items():
        assert getattr(base, name) != value, name
        changed = base.model_copy(update={name: value})
        assert model_version(changed.model_fingerprint(), parse_label_config(BASE)) != model_version(
            base.model_fingerprint(), parse_label_config(BASE)
        ), name
