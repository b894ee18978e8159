"""with_thresholds writes the per-label threshold the backend reads, and nothing else."""

from __future__ import annotations

import pytest

from backend.errors import LabelConfigError
from backend.labelstudio.config import parse_label_config
from backend.labelstudio.thresholds_xml import threshold_text, with_thresholds
from backend.labelstudio.version import model_version
from tests.support.paths import REPO

CONFIG = (REPO / "label_config" / "brush_and_rectangle.xml").read_text()
FINGERPRINT = {"detector": "tiny", "box_threshold": 0.3}


def _view(*controls: str) -> str:
    """A config of an Image "i" and `controls` (XML text) after it."""
    return '<View><Image name="i" value="$image"/>' + "".join(controls) + "</View>"


def _thresholds(xml: str) -> dict[str, float | None]:
    return {spec.value: spec.options.threshold for spec in parse_label_config(xml).labels}


def test_round_trip_sets_the_named_labels_and_leaves_the_others() -> None:
    written = with_thresholds(CONFIG, {"Car": 0.41, "Bicycle": 0.123456789})

    assert _thresholds(written) == {"Car": 0.41, "Person": None, "Bicycle": 0.123457}
    # Both served controls carry it (label_attrs refuses two different thresholds of one label).
    assert written.count('threshold="0.41"') == 2


def test_model_version_changes_and_the_rest_of_the_xml_is_kept() -> None:
    written = with_thresholds(CONFIG, {"Person": 0.25})

    before = model_version(FINGERPRINT, parse_label_config(CONFIG))
    assert model_version(FINGERPRINT, parse_label_config(written)) != before
    assert written.replace(' threshold="0.25"', "") == CONFIG.rstrip("\n")


def test_an_existing_threshold_is_replaced_and_an_untouched_one_kept() -> None:
    labels = '<Label value="cat" threshold="0.3"/><Label value="Dog" alias="dog" threshold="0.5"/>'
    written = with_thresholds(
        _view("<!-- reviewers: see wiki -->", f'<BrushLabels name="b" toName="i">{labels}</BrushLabels>'), {"dog": 0.35}
    )

    assert _thresholds(written) == {"cat": 0.3, "dog": 0.35}
    assert "<!-- reviewers: see wiki -->" in written


def test_labels_of_controls_the_backend_does_not_serve_are_left_alone() -> None:
    served, second = (f'<BrushLabels name="{name}" toName="i"><Label value="cat"/></BrushLabels>' for name in "bs")
    written = with_thresholds(_view(served, second), {"cat": 0.6})

    assert written.count('threshold="0.6"') == 1
    assert second in written


def test_a_label_the_config_lacks_is_refused_naming_it() -> None:
    with pytest.raises(LabelConfigError, match=r"'Truck'.*labels: Bicycle, Car, Person"):
        with_thresholds(CONFIG, {"Truck": 0.5})


def test_hostile_xml_is_refused_as_everywhere_in_the_backend() -> None:
    xml = (
        '<!DOCTYPE View [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        '<View><Image name="i" value="$image"/><Header value="&x;"/>'
        '<BrushLabels name="b" toName="i"><Label value="cat"/></BrushLabels></View>'
    )
    with pytest.raises(LabelConfigError, match="not valid XML"):
        with_thresholds(xml, {"cat": 0.5})


@pytest.mark.parametrize(("value", "text"), [(0.4, "0.4"), (1.0, "1"), (0.0, "0"), (0.1234564, "0.123456")])
def test_threshold_text(value: float, text: str) -> None:
    assert threshold_text(value) == text


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_a_threshold_outside_zero_one_is_a_value_error(value: float) -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        with_thresholds(CONFIG, {"Car": value})
