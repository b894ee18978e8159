"""model_version changes exactly when predictions would."""

from __future__ import annotations

import re

import pytest

from backend.labelstudio.config import parse_label_config
from backend.labelstudio.version import model_version

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
