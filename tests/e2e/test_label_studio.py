"""A real Label Studio 1.23 drives the backend the way users do: connect, "Retrieve predictions", review.

Everything goes through Label Studio's own REST API (the calls its UI makes) and, for the review, its UI
in headless Chromium. Predictions are read back from Label Studio's store (GET /api/predictions), so what
is checked is what annotators get, after Label Studio's own handling.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image, ImageOps

from tests.e2e.backends import MODEL_FAMILIES, BackendPool, setup_model_version
from tests.e2e.canvas import assert_region_painted, display_zoom, image_area
from tests.e2e.flows import (
    EXAMPLE_CONFIGS,
    REPO,
    Project,
    assert_predictions_valid,
    create_project_with_images,
    match_tasks,
    predictions_by_task,
)
from tests.e2e.labelstudio import LabelStudio
from tests.support.images import ImageServer, TestImage, image_set, write_image

BRUSH = REPO / "label_config" / "brush.xml"
BRUSH_AND_RECT = REPO / "label_config" / "brush_and_rectangle.xml"
PREVIEW = REPO / "label_config" / "preview.png"
BROWSER_VIEW = Path(__file__).with_name("browser_view.py")


def connect(ls: LabelStudio, project: Project, backend_url: str) -> str:
    """Connect the backend to the project; the model_version Label Studio took from the backend's /setup."""
    ml = ls.connect_ml(project.id, backend_url)
    state = ls.ml_backend(int(ml["id"]))
    assert state["state"] == "CO", state  # Connected
    return str(state["model_version"])


def retrieve_all(ls: LabelStudio, project: Project, expected_tasks: int) -> None:
    """Retrieve predictions for every task; Label Studio's answer is what the user sees in the UI."""
    response = ls.retrieve_predictions(project.id)
    assert response.status_code == 200, response.text
    assert response.json()["detail"] == f"Retrieved {expected_tasks} predictions"


@pytest.mark.parametrize("key_kind", ["legacy", "pat"], ids=["legacy-token", "personal-access-token"])
def test_every_example_config_gets_one_valid_prediction_per_task(
    label_studio: LabelStudio, backends: BackendPool, key_kind: str, tmp_path: Path
) -> None:
    """Uploads, a synced Local Files storage and a /data/local-files task, for each label_config/*.xml.

    The backend reads every image from Label Studio with LABEL_STUDIO_API_KEY of this kind; a refused
    key would leave predictions empty and fail here.
    """
    backend = backends.get(key_kind)
    assert EXAMPLE_CONFIGS, "no label_config/*.xml"
    for config_path in EXAMPLE_CONFIGS:
        project = create_project_with_images(label_studio, f"{key_kind}-{config_path.stem}", config_path, tmp_path)
        version = connect(label_studio, project, backend.url)
        assert version == setup_model_version(backend, f"{project.id}.check", project.label_config)
        retrieve_all(label_studio, project, len(project.images))
        assert_predictions_valid(label_studio, project, version)

        # Same models, same labels: Label Studio skips tasks that already hold this model_version.
        retrieve_all(label_studio, project, len(project.images))
        assert len(label_studio.predictions(project.id)) == len(project.images)

    if key_kind == "pat":  # the personal access token really went through the refresh exchange
        assert 'POST /api/token/refresh/ HTTP/1.1" 200' in label_studio.log_text()


@pytest.mark.parametrize("family", MODEL_FAMILIES)
def test_labeling_view_paints_predicted_masks(
    label_studio: LabelStudio,
    backends: BackendPool,
    family: str,
    family_models: tuple[Path, Path],
    tool_env: Path,
    chromium: str,
    tmp_path: Path,
) -> None:
    """An annotator opens each task: the predicted regions are listed and each mask is painted where it is.

    For each model family (Grounding DINO → SAM, Grounding DINO → SAM 2, SAM 3 alone from text), two tasks:
    a landscape PNG, and a JPEG whose EXIF tag rotates it to portrait (Label Studio shows it rotated, so the
    masks must be sized and laid out for the rotated image). Screenshots and the browser's report stay in this
    test's tmp_path; with E2E_UPDATE_PREVIEW=1 the first family's first page becomes label_config/preview.png.
    """
    config = BRUSH.read_text()
    images = [
        write_image(tmp_path, "street.png", 480, 320, background=(128, 128, 128)),
        write_image(tmp_path, "phone.jpg", 300, 200, background=(128, 128, 128), exif_rotated=True),
    ]
    project_id = label_studio.create_project(f"browser-brush-{family}", config)
    label_studio.import_uploads(project_id, [image.path for image in images])
    project = Project(project_id, config, match_tasks(label_studio.tasks(project_id), images))
    version = connect(label_studio, project, backends.get("legacy", family_models).url)
    retrieve_all(label_studio, project, len(images))
    masks = assert_predictions_valid(label_studio, project, version)
    predictions = predictions_by_task(label_studio, project_id)
    (tmp_path / "predictions.json").write_text(json.dumps(predictions))  # to look at when this test fails
    tasks = sorted(project.images, key=lambda task: images.index(project.images[task]))

    visits = [(task, len(predictions[task]["result"]), tmp_path / f"task-{task}") for task in tasks]
    reports = _open_in_browser(label_studio, tool_env, chromium, project_id, visits)

    colours = _label_colours(config)
    for task, report in zip(tasks, reports, strict=True):
        image, out = project.images[task], tmp_path / f"task-{task}"
        assert (report["image"]["natural_width"], report["image"]["natural_height"]) == (image.width, image.height)
        labels = [region["value"]["brushlabels"][0] for region in predictions[task]["result"]]
        listed = [(region["type"], region["label"]) for region in report["regions"]]
        assert listed == [("brushregion", label) for label in labels], f"task {task}: regions panel differs"
        hidden = _image_shot(out / "stage-hidden.png", image)
        zoom = display_zoom(hidden, np.asarray(ImageOps.exif_transpose(Image.open(image.path)).convert("RGB")))
        judged = [
            assert_region_painted(
                _image_shot(out / f"stage-region-{index}.png", image), hidden, mask, colours[label], zoom
            )
            for index, (mask, label) in enumerate(zip(masks[task], labels, strict=True))
        ]
        assert any(judged), f"task {task}: no predicted mask was large enough on screen to check its colour"
    # On request only (a test run must not dirty the work tree), from the family the preview shows.
    if family == MODEL_FAMILIES[0] and os.environ.get("E2E_UPDATE_PREVIEW") == "1":
        shutil.copyfile(tmp_path / f"task-{tasks[0]}" / "labeling-view.png", PREVIEW)


def _open_in_browser(
    ls: LabelStudio, tool_env: Path, chromium: str, project: int, tasks: list[tuple[int, int, Path]]
) -> list[dict[str, Any]]:
    """Run browser_view.py in the tool environment (it has Playwright) for (task, regions, out) triples."""
    result = tasks[0][2].parent / "browser.json"
    args = {
        "chromium": chromium,
        "url": ls.url,
        "email": ls.credentials.email,
        "password": ls.credentials.password,
        "project": project,
        "tasks": [{"task": task, "regions": regions, "out": str(out)} for task, regions, out in tasks],
        "result": str(result),
    }
    run = subprocess.run(
        [str(tool_env / "bin" / "python"), str(BROWSER_VIEW), json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, f"browser check failed:\n{run.stdout}\n{run.stderr}"
    return list(json.loads(result.read_text()))


def _image_shot(path: Path, image: TestImage) -> np.ndarray:
    """The image area of a stage screenshot, as RGB."""
    return image_area(np.asarray(Image.open(path).convert("RGB")), image.width, image.height)


def _label_colours(label_config: str) -> dict[str, tuple[int, int, int]]:
    """Label value -> its background colour in the config (the colour Label Studio paints its regions in)."""
    colours = {}
    for control in LabelInterface(label_config).controls:
        for label, tag in control.labels_attrs.items():
            background = tag.attr["background"].lstrip("#")
            colours[label] = (int(background[0:2], 16), int(background[2:4], 16), int(background[4:6], 16))
    return colours


def test_unreadable_image_gets_an_empty_prediction_and_the_others_are_valid(
    label_studio: LabelStudio, backends: BackendPool, image_host: ImageServer, tmp_path: Path
) -> None:
    """One task's image URL is broken (404): that task gets an empty prediction, the others real ones.

    Fixing the image is not enough: Label Studio skips tasks that hold a prediction of the current
    model_version, empty or not. Deleting that prediction first makes "Retrieve predictions" redo it.
    """
    config = BRUSH_AND_RECT.read_text()
    project_id = label_studio.create_project("one-bad-image", config)
    uploads = image_set(tmp_path, "ok", ("landscape", "exif6"))
    label_studio.import_uploads(project_id, [image.path for image in uploads])
    hosted = write_image(image_host.root, "hosted.png", 260, 200)  # an absolute http:// URL, fetched directly
    label_studio.import_tasks(
        project_id,
        [{"data": {"image": image_host.url_for("hosted.png")}}, {"data": {"image": image_host.url_for("missing.png")}}],
    )
    tasks = label_studio.tasks(project_id)
    [bad] = [int(t["id"]) for t in tasks if t["data"]["image"].endswith("missing.png")]
    project = Project(project_id, config, match_tasks([t for t in tasks if t["id"] != bad], [*uploads, hosted]))
    version = connect(label_studio, project, backends.get("legacy").url)

    retrieve_all(label_studio, project, len(tasks))
    assert_predictions_valid(label_studio, project, version, empty=frozenset({bad}))

    missing = write_image(image_host.root, "missing.png", 150, 210)  # the user fixes the image
    retrieve_all(label_studio, project, len(tasks))
    assert predictions_by_task(label_studio, project_id)[bad]["result"] == [], "Label Studio re-predicted the task"

    label_studio.delete_predictions(project_id, [bad])
    retrieve_all(label_studio, project, len(tasks))
    project.images[bad] = missing
    assert_predictions_valid(label_studio, project, version)


def test_backend_slower_than_label_studio_timeout_stores_nothing_and_a_retry_collects(
    impatient_label_studio: LabelStudio, backends: BackendPool, image_host: ImageServer, tmp_path: Path
) -> None:
    """/predict outlasts LABEL_STUDIO_ML_TIMEOUT_PREDICT: the user is told "Retrieved N", nothing is stored.

    The backend's jobs keep running; once they are done, "Retrieve predictions" again stores them.
    The backend is one of its own: it reads from the impatient Label Studio, and its worker stays busy
    with the slow image after Label Studio gave up.
    """
    ls = impatient_label_studio
    backend = backends.start("legacy", label_studio_url=ls.url)
    config = BRUSH_AND_RECT.read_text()
    project_id = ls.create_project("slow-backend", config)
    [upload] = image_set(tmp_path, "fast", ("portrait",))
    ls.import_uploads(project_id, [upload.path])
    slow = write_image(image_host.root, "slow.png", 240, 180)
    ls.import_tasks(project_id, [{"data": {"image": image_host.url_for("slow.png", slow=True)}}])
    tasks = ls.tasks(project_id)
    images = {int(t["id"]): slow if "/slow/" in t["data"]["image"] else upload for t in tasks}
    project = Project(project_id, config, images)
    version = connect(ls, project, backend.url)

    started = time.monotonic()
    retrieve_all(ls, project, 2)  # what the user is told: success
    waited = time.monotonic() - started
    assert ls.ml_timeout_predict <= waited < image_host.slow_s, waited
    assert ls.predictions(project_id) == [], "Label Studio stored predictions after its timeout"
    assert f"Read timed out. (read timeout={ls.ml_timeout_predict})" in ls.log_text()  # only its log tells

    time.sleep(image_host.slow_s - waited)  # the slow image is being served now; its job finishes next
    deadline = time.monotonic() + 60
    while not ls.predictions(project_id) and time.monotonic() < deadline:
        retrieve_all(ls, project, 2)
    assert_predictions_valid(ls, project, version)
