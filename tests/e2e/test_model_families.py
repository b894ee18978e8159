"""Issue 12's model families behind a real Label Studio: the models named in model_version, SAM 3's smart tools.

Each family's labeling view (predictions retrieved, valid, masks painted in the browser) is
test_label_studio.py::test_labeling_view_paints_predicted_masks, parametrized over MODEL_FAMILIES.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.backends import MODEL_FAMILIES, BackendPool, models_of_family, setup_model_version
from tests.e2e.labelstudio import LabelStudio
from tests.support.images import TestImage, write_image
from tests.support.paths import REPO
from tests.validation import assert_valid_prediction

BRUSH = REPO / "label_config" / "brush.xml"
SMART = REPO / "label_config" / "interactive.xml"


def test_each_family_names_its_models_in_model_version(
    label_studio: LabelStudio, backends: BackendPool, request: pytest.FixtureRequest
) -> None:
    """One labeling config, every family: each backend's /health names its DETECTOR_MODEL and the SAM that segments
    (what model_version is computed from: SAM_MODEL, or for SAM 3 alone its own tracker, the detector's checkpoint,
    since SAM_MODEL is unused), and no two families share a model_version, so Label Studio re-predicts tasks when
    a project switches families."""
    config = BRUSH.read_text()
    versions = {}
    for family in MODEL_FAMILIES:
        models = models_of_family(family, request.getfixturevalue)
        backend = backends.get("legacy", models)
        [group] = httpx.get(f"{backend.url}/health", timeout=10).json()["fingerprints"]
        detector, sam = map(str, models)
        segmenting = detector if family == "sam3" else sam
        assert (group["fingerprint"]["detector"], group["fingerprint"]["sam"]) == (detector, segmenting), family
        versions[family] = setup_model_version(backend, "1.families", config)
    assert len(set(versions.values())) == len(MODEL_FAMILIES), versions


@pytest.mark.parametrize(
    ("tool", "label"),
    [("click", "Person"), ("box", "Car"), ("prompt", "Car")],
    ids=["smart-keypoints", "smart-rectangle", "typed-text"],
)
def test_sam3_alone_answers_the_labeling_tools(
    label_studio: LabelStudio,
    backends: BackendPool,
    request: pytest.FixtureRequest,
    tool: str,
    label: str,
    tmp_path: Path,
) -> None:
    """An annotator uses a tool of label_config/interactive.xml on a SAM 3-alone backend, through Label Studio's
    interactive-annotating call (what its UI sends): the answer is a valid prediction with the tool's label.

    Clicks and boxes go to SAM 3's own tracker (the backend's SAM_MODEL names no folder, so no other SAM could
    answer): one object, its mask and box. Typed text is a SAM 3 text prompt, for the Labels it names.
    """
    backend = backends.get("legacy", models_of_family("sam3", request.getfixturevalue))
    config = SMART.read_text()
    image = write_image(tmp_path, "street.png", 160, 120, background=(128, 128, 128))
    project = label_studio.create_project(f"sam3-{tool}", config)
    label_studio.import_uploads(project, [image.path])
    [task] = label_studio.tasks(project)
    ml = label_studio.connect_ml(project, backend.url, interactive=True)

    answer = label_studio.interactive_annotating(int(ml["id"]), int(task["id"]), _context(tool, label, image))

    assert "errors" not in answer, answer
    prediction = answer["data"]
    assert_valid_prediction(prediction, config, image.width, image.height)
    regions = [(region["type"], region["value"][region["type"]]) for region in prediction["result"]]
    if tool == "prompt":
        assert regions, "the tiny random SAM 3 at threshold 0.05 always finds something"
        assert {labels[0] for _, labels in regions} == {label}, regions
    else:
        assert regions == [("brushlabels", [label]), ("rectanglelabels", [label])]  # one object: mask and its box
    assert label_studio.predictions(project) == [], "an interactive answer is no stored prediction"


def _context(tool: str, label: str, image: TestImage) -> dict[str, Any]:
    """Label Studio's `context` for one use of `tool` (a control name of interactive.xml) on `image`."""
    size = (image.width, image.height)
    if tool == "prompt":
        regions = [_region("textarea", tool, {"text": [f"{label}: red car"]}, size)]
    elif tool == "click":
        regions = [
            _region("keypointlabels", tool, {"x": 50, "y": 50, "width": 0.5, "keypointlabels": [label]}, size),
            _region("keypointlabels", tool, {"x": 10, "y": 10, "width": 0.5, "keypointlabels": [label]}, size, False),
        ]
    else:
        box = {"x": 25, "y": 20, "width": 50, "height": 60, "rotation": 0, "rectanglelabels": [label]}
        regions = [_region("rectanglelabels", tool, box, size)]
    return {"result": regions}


def _region(
    kind: str, from_name: str, value: dict[str, Any], size: tuple[int, int], positive: bool = True
) -> dict[str, Any]:
    """One region as Label Studio's UI sends it (coordinates in percent of the displayed image)."""
    width, height = size
    return {
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "is_positive": positive,
        "value": value,
        "from_name": from_name,
        "to_name": "image",
        "type": kind,
        "origin": "manual",
    }
