"""Checks a stored or returned Label Studio prediction the way Label Studio itself does not.

Label Studio accepts unknown labels, wrong-size masks and x=150 silently, so every test that sees a
prediction runs it through here: control names, labels, RLE size, rectangle and polygon bounds, sizes,
and image-level Choices/Taxonomy values.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from label_studio_sdk.converter.brush import decode_rle
from label_studio_sdk.label_interface import LabelInterface

REGION_TYPES = {"BrushLabels": "brushlabels", "RectangleLabels": "rectanglelabels", "PolygonLabels": "polygonlabels"}
TAG_TYPES = {"Choices": "choices", "Taxonomy": "taxonomy"}
CONTROL_TYPES = REGION_TYPES | TAG_TYPES


def assert_valid_prediction(prediction: dict[str, Any], label_config: str, width: int, height: int) -> list[np.ndarray]:
    """Assert `prediction` is valid for an image shown at width x height; return its decoded masks (bool HxW)."""
    interface = LabelInterface(label_config)
    controls = {c.name: c for c in interface.controls if c.tag in CONTROL_TYPES}
    assert set(prediction) >= {"result", "score", "model_version"}
    assert 0.0 <= prediction["score"] <= 1.0
    masks = []
    for region in prediction["result"]:
        control = controls[region["from_name"]]
        kind = CONTROL_TYPES[control.tag]
        assert region["type"] == kind
        assert region["to_name"] in control.to_name
        assert 0.0 <= region["score"] <= 1.0
        value = region["value"]
        if kind in TAG_TYPES.values():
            _assert_tag(kind, value[kind], control.labels)
            continue
        assert (region["original_width"], region["original_height"]) == (width, height)
        assert len(value[kind]) == 1 and value[kind][0] in control.labels, value[kind]
        if kind == "brushlabels":
            assert value["format"] == "rle"
            flat = decode_rle(value["rle"])
            assert flat.size == width * height * 4
            masks.append(flat.reshape(height, width, 4)[:, :, 3] > 0)
        elif kind == "polygonlabels":
            points = np.asarray(value["points"], dtype=float)
            assert points.ndim == 2 and points.shape[1] == 2 and len(points) >= 3, points.shape
            assert ((points >= 0.0) & (points <= 100.0)).all(), points
        else:
            for key in ("x", "y", "width", "height"):
                assert 0.0 <= value[key] <= 100.0, (key, value[key])
            assert value["x"] + value["width"] <= 100.0 + 1e-6
            assert value["y"] + value["height"] <= 100.0 + 1e-6
    return masks


def _assert_tag(kind: str, chosen: list[Any], choices: list[str]) -> None:
    """Choices: a non-empty list of distinct choice values; Taxonomy: non-empty paths of choice values."""
    assert chosen, "an image tag region must choose something"
    if kind == "choices":
        assert len(set(chosen)) == len(chosen) and set(chosen) <= set(choices), chosen
    else:
        assert all(isinstance(path, list) and path and set(path) <= set(choices) for path in chosen), chosen
