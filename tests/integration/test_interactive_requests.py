"""Interactive requests (Label Studio's `params.context`) through the real server, queue and worker."""

from __future__ import annotations

import httpx
from PIL import Image

from tests.support.images import ImageServer
from tests.support.paths import REPO
from tests.support.processes import Processes
from tests.validation import assert_valid_prediction

CONFIG = (REPO / "label_config" / "interactive.xml").read_text()


def _ask(url: str, image_url: str, context: object) -> httpx.Response:
    body = {
        "tasks": [{"id": 11, "data": {"image": image_url}}],
        "label_config": CONFIG,
        "project": "5.1",
        "params": {"login": None, "password": None, "context": context},
    }
    return httpx.post(f"{url}/predict", json=body, timeout=90)


def _keypoint(x: float, y: float, label: str, positive: bool = True) -> dict[str, object]:
    return {
        "original_width": 80,
        "original_height": 60,
        "image_rotation": 0,
        "is_positive": positive,
        "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": [label]},
        "from_name": "click",
        "to_name": "image",
        "type": "keypointlabels",
        "origin": "manual",
    }


def test_clicks_text_and_bad_context(
    processes: Processes, model_env: dict[str, str], image_server: ImageServer
) -> None:
    """A smart click → one mask with the clicked label (SAM alone); typed text → only the labels it names;
    a context that makes no sense → 400 with the reason, nothing computed."""
    serve = processes.serve(model_env)
    image = image_server.add("street.png", Image.new("RGB", (80, 60), (120, 120, 120)))

    clicked = _ask(serve.url, image, {"result": [_keypoint(40, 50, "Person"), _keypoint(10, 10, "Person", False)]})
    assert clicked.status_code == 200, clicked.text
    [prediction] = clicked.json()["results"]
    assert_valid_prediction(prediction, CONFIG, 80, 60)
    labels = [(r["type"], r["value"][r["type"]]) for r in prediction["result"]]
    assert labels == [("brushlabels", ["Person"]), ("rectanglelabels", ["Person"])]  # one object: mask + its box

    text = {
        "result": [{"from_name": "prompt", "to_name": "image", "type": "textarea", "value": {"text": ["Car: red car"]}}]
    }
    typed = _ask(serve.url, image, text)
    assert typed.status_code == 200, typed.text
    [prediction] = typed.json()["results"]
    assert_valid_prediction(prediction, CONFIG, 80, 60)
    assert prediction["result"], "tiny random models at threshold 0.05 always find something"
    assert {label for r in prediction["result"] for label in r["value"][r["type"]]} == {"Car"}

    bad = _ask(serve.url, image, {"result": [{"type": "keypointlabels", "from_name": "click", "value": {"x": "left"}}]})
    assert bad.status_code == 400
    assert "interactive request" in bad.json()["detail"]
