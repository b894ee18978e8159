"""Label Studio's smart tools in a real browser: an annotator turns on Auto-Annotation and clicks, drags and types.

One session of Label Studio 1.23's editor in Debian's Chromium (tests/e2e/smart_tools.py, in the tool environment)
on a task of label_config/interactive.xml, with the backend connected as interactive ("Interactive preannotations"
on) through a relay that keeps what Label Studio sent it (tests/e2e/recorder.py). The session's steps: a smart
keypoint click on the object (label Car), an alt+click negative point, accept; a smart rectangle, accept; the
prompt "Car: car" typed in the TextArea and submitted, accept. Each test below checks one step from the session's
record: what the editor sent, what the backend got, what Label Studio answered and what the page shows (the
suggestions, the regions panel, the mask's pixels on the canvas).

Screenshots of every step stay in the session's folder under pytest's basetemp, and are copied to
$E2E_SCREENSHOTS/interactive when that is set; with E2E_UPDATE_PREVIEW=1 the click's page becomes
docs/interactive_click.png (README).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.e2e.backends import BackendPool
from tests.e2e.canvas import assert_region_painted, display_zoom, image_area
from tests.e2e.labelstudio import LabelStudio
from tests.e2e.recorder import recording_relay
from tests.support.images import TestImage, write_image
from tests.support.paths import REPO
from tests.validation import assert_valid_prediction

CONFIG = REPO / "label_config" / "interactive.xml"
DRIVER = Path(__file__).with_name("smart_tools.py")
README_SHOT = REPO / "docs" / "interactive_click.png"
README_SHOT_BOX = (240, 45, 1400, 900)  # the editor, without the Data Manager's task list (page pixels)
README_SHOT_MAX_BYTES = 300_000
DRIVER_TIMEOUT_S = 1200  # four answers from a backend on a loaded 2-core machine, each waited for in the driver
LABEL = "Car"
CAR = (255, 51, 51)  # the Car label's background in interactive.xml: the colour its regions are painted in
CLICK, NEGATIVE = [31.0, 33.0], [80.0, 80.0]  # percent of the image: on the red "car" / on the blue ellipse
BOX = [[10.0, 10.0], [55.0, 55.0]]
PROMPT = f"{LABEL}: car"
NEAR_PCT = 4.0  # a point Label Studio sends is where it was clicked, give or take the image's display zoom


@dataclass(frozen=True)
class Session:
    """What one browser session recorded (smart_tools.py's result), what the backend got, and where its PNGs are."""

    result: dict[str, Any]
    backend_contexts: list[Any]  # params.context of each /predict the backend got, in order
    out: Path
    image: TestImage
    driver_output: str

    def step(self, name: str) -> dict[str, Any]:
        """The recorded step `name`; fails with the driver's error when the session stopped before it."""
        for step in self.result["steps"]:
            if step["name"] == name:
                return dict(step)
        pytest.fail(f"the browser session has no step {name!r}: {self.result['error']}\n{self.driver_output[-4000:]}")

    def png(self, name: str) -> np.ndarray:
        """The image area of a stage screenshot of the session, as RGB."""
        stage = np.asarray(Image.open(self.out / name).convert("RGB"))
        return image_area(stage, self.image.width, self.image.height)


@pytest.fixture(scope="module")
def session(
    label_studio: LabelStudio,
    backends: BackendPool,
    tool_env: Path,
    chromium: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Session]:
    """One annotator's session on a fresh project (see the module's docstring), run once for the tests below.

    The project's "Use predictions to prelabel tasks" is off, as Label Studio's interactive setups have it:
    otherwise opening the task asks the backend for a whole prediction and shows its regions, which then take the
    clicks meant for the image.
    """
    work = tmp_path_factory.mktemp("smart-tools")
    image = write_image(work, "street.png", 480, 320, background=(128, 128, 128))
    project = label_studio.create_project("smart-tools-in-the-browser", CONFIG.read_text())
    label_studio.call("PATCH", f"/api/projects/{project}", json={"show_collab_predictions": False})
    label_studio.import_uploads(project, [image.path])
    [task] = label_studio.tasks(project)
    with recording_relay(backends.get("legacy").url) as (relay_url, recorder):
        label_studio.connect_ml(project, relay_url, interactive=True)
        out, result_path = work / "shots", work / "result.json"
        args = {
            "chromium": chromium,
            "url": label_studio.url,
            "email": label_studio.credentials.email,
            "password": label_studio.credentials.password,
            "project": project,
            "task": int(task["id"]),
            "image": {"width": image.width, "height": image.height},
            "label": LABEL,
            "click": CLICK,
            "negative": NEGATIVE,
            "box": BOX,
            "prompt": PROMPT,
            "out": str(out),
            "result": str(result_path),
        }
        run = subprocess.run(
            [str(tool_env / "bin" / "python"), str(DRIVER), json.dumps(args)],
            capture_output=True,
            text=True,
            timeout=DRIVER_TIMEOUT_S,
        )
        contexts = [context for context in recorder.contexts() if context is not None]
    result = json.loads(result_path.read_text()) if result_path.exists() else {"steps": [], "error": "no result"}
    result["annotations"] = label_studio.call("GET", f"/api/tasks/{task['id']}/annotations")
    _keep_screenshots(out)
    yield Session(result, contexts, out, image, f"{run.stdout}\n{run.stderr}")


def test_a_smart_click_shows_the_predicted_mask(session: Session) -> None:
    """Auto-Annotation on, the smart keypoint tool with Car, one click on the car: Label Studio sends that one
    positive keypoint, the answer comes back as suggestions (all its regions, labelled Car) and its mask is painted
    where it is; the regions panel lists the clicked keypoint with its label."""
    step = session.step("click")
    [point] = step["request"]["result"]
    assert (point["type"], point["from_name"], point["value"]["keypointlabels"]) == ("keypointlabels", "click", [LABEL])
    assert point["is_positive"] is True
    assert _near(point["value"], CLICK), point["value"]
    regions = _answer_regions(step, session.image)
    assert regions and {label for _, label in regions} == {LABEL}, regions
    assert step["suggestions"] == f"{len(regions)} suggestions"
    assert [(r["type"], r["label"]) for r in step["regions"]] == [("keypointregion", LABEL)]
    _assert_mask_painted(session, "click", step)


def test_a_negative_point_replaces_the_suggestion(session: Session) -> None:
    """Car again, alt+click on the background: Label Studio sends both keypoints, the new one negative; the new
    answer replaces the suggestions (one object's regions, not two), with its mask painted. Accepting them lists
    that object's regions with the label, and the smart keypoints are gone."""
    first, step = session.step("click"), session.step("negative")
    positive, negative = step["request"]["result"]
    assert positive == first["request"]["result"][0]
    assert negative["is_positive"] is False and negative["value"]["keypointlabels"] == [LABEL]
    assert _near(negative["value"], NEGATIVE), negative["value"]
    regions = _answer_regions(step, session.image)
    assert regions and {label for _, label in regions} == {LABEL}, regions
    assert step["suggestions"] == f"{len(regions)} suggestions" == first["suggestions"]
    assert [r["type"] for r in step["regions"]] == ["keypointregion", "keypointregion"]
    _assert_mask_painted(session, "negative", step, before="click")
    assert [(r["type"], r["label"]) for r in step["accepted"]] == [(_listed(kind), label) for kind, label in regions]


def test_the_backend_gets_what_the_editor_sent(session: Session) -> None:
    """Each smart-tool use reached the backend as one /predict whose context is exactly what the editor sent Label
    Studio: the second one with two keypoints, one of them negative."""
    sent = [step["request"] for step in session.result["steps"]]
    assert sent, session.result["error"]
    assert session.backend_contexts == sent
    clicks = session.backend_contexts[1]["result"]
    assert [region["is_positive"] for region in clicks] == [True, False]


def test_a_smart_rectangle_gets_its_region(session: Session) -> None:
    """The smart rectangle tool with Car, a drag over the car: the box drawn is the last rectangle Label Studio
    sends, the answer's regions are Car suggestions, and accepting them lists them."""
    step = session.step("box")
    drawn = step["request"]["result"][-1]
    assert (drawn["type"], drawn["from_name"], drawn["value"]["rectanglelabels"]) == ("rectanglelabels", "box", [LABEL])
    (x1, y1), (x2, y2) = BOX
    value = drawn["value"]
    corners = (
        {"x": value["x"], "y": value["y"]},
        {"x": value["x"] + value["width"], "y": value["y"] + value["height"]},
    )
    assert _near(corners[0], [x1, y1]) and _near(corners[1], [x2, y2]), value
    regions = _answer_regions(step, session.image)
    assert regions and {label for _, label in regions} == {LABEL}, regions
    assert step["suggestions"] == f"{len(regions)} suggestions"
    accepted = [(r["type"], r["label"]) for r in step["accepted"]]
    assert all(accepted.count(region) >= regions.count(region) for region in map(_listed_region, regions)), accepted


def test_a_typed_prompt_gets_regions_for_the_named_label(session: Session) -> None:
    """ "Car: car" typed in the TextArea and added: Label Studio sends that text, the backend detects Car only, and
    its regions are shown as suggestions with their masks painted, then listed once accepted."""
    step = session.step("prompt")
    [typed] = step["request"]["result"]
    assert (typed["type"], typed["from_name"], typed["value"]["text"]) == ("textarea", "prompt", [PROMPT])
    regions = _answer_regions(step, session.image)
    assert regions, "the tiny random models at threshold 0.05 always detect something"
    assert {label for _, label in regions} == {LABEL}, regions
    assert step["suggestions"] == f"{len(regions)} suggestions"
    _assert_mask_painted(session, "prompt", step)
    accepted = [(r["type"], r["label"]) for r in step["accepted"]]
    assert all(accepted.count(region) >= regions.count(region) for region in map(_listed_region, regions)), accepted


def test_accepting_another_answer_keeps_the_regions_accepted_before(session: Session) -> None:
    """The click's object, the box's and the prompt's are all in the annotation submitted at the end: each
    interactive answer has region ids of its own (Label Studio accepts a suggestion whose id an earlier region has
    by overwriting that region)."""
    answers = [session.step(name)["answer"]["data"]["result"] for name in ("negative", "box", "prompt")]
    [annotation] = session.result["annotations"]
    kept = [region for region in annotation["result"] if region["type"] in ("brushlabels", "rectanglelabels")]
    assert sorted(region["id"] for region in kept) == sorted(region["id"] for answer in answers for region in answer)


def _answer_regions(step: dict[str, Any], image: TestImage) -> list[tuple[str, str]]:
    """(type, label) of each region of the step's answer, after checking the answer is a valid prediction."""
    answer = step["answer"]
    assert "errors" not in answer, answer
    assert_valid_prediction(answer["data"], CONFIG.read_text(), image.width, image.height)
    return [(region["type"], region["value"][region["type"]][0]) for region in answer["data"]["result"]]


def _listed(kind: str) -> str:
    """The regions panel's type of a region of this result type."""
    return {"brushlabels": "brushregion", "rectanglelabels": "rectangleregion"}[kind]


def _listed_region(region: tuple[str, str]) -> tuple[str, str]:
    return _listed(region[0]), region[1]


def _near(value: dict[str, Any], point: list[float]) -> bool:
    return abs(value["x"] - point[0]) < NEAR_PCT and abs(value["y"] - point[1]) < NEAR_PCT


def _assert_mask_painted(session: Session, name: str, step: dict[str, Any], before: str | None = None) -> None:
    """The step's answer masks are painted in Car's colour on the canvas, where they are and nowhere else: the
    canvas before step `before` (default: this one), regions hidden, against the settled canvas after this step
    (see tests/e2e/canvas.py). Suggestions cannot be hidden, so a step that replaces suggestions is compared with
    the canvas from before the ones it replaces."""
    masks = assert_valid_prediction(
        step["answer"]["data"], CONFIG.read_text(), session.image.width, session.image.height
    )
    hidden, shown = session.png(f"{before or name}-before.png"), session.png(f"{name}-stage.png")
    zoom = display_zoom(hidden, np.asarray(Image.open(session.image.path).convert("RGB")))
    judged = assert_region_painted(shown, hidden, np.any(masks, axis=0), CAR, zoom)
    assert judged, f"{name}: the masks ({[int(m.sum()) for m in masks]} pixels) are too small on screen to judge"


def _keep_screenshots(out: Path) -> None:
    """Copy the session's PNGs to $E2E_SCREENSHOTS/interactive; on E2E_UPDATE_PREVIEW=1 also refresh the README's
    screenshot from the click's page (cropped to the editor, at most README_SHOT_MAX_BYTES)."""
    folder = os.environ.get("E2E_SCREENSHOTS")
    if folder and out.is_dir():
        shutil.copytree(out, Path(folder) / "interactive", dirs_exist_ok=True)
    if os.environ.get("E2E_UPDATE_PREVIEW") == "1" and (out / "click-page.png").exists():
        shot = Image.open(out / "click-page.png").convert("RGB").crop(README_SHOT_BOX)
        shot.save(README_SHOT, optimize=True)
        assert README_SHOT.stat().st_size <= README_SHOT_MAX_BYTES, README_SHOT.stat().st_size
