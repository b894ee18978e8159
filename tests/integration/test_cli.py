"""The `predict` command and the start-up failures of `serve`/`worker`, as real processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from backend.labelstudio.templates import config_for_labels
from tests.integration.conftest import free_port
from tests.validation import assert_valid_prediction

pytestmark = pytest.mark.integration


def _run(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "backend.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_predict_writes_prediction_json_and_overlay(tmp_path: Path, model_env: dict[str, str]) -> None:
    """150 labels, two images: one valid prediction and one overlay PNG of the image's size per image."""
    labels = [f"object number {i}" for i in range(150)]
    images = []
    for name, size in (("wide.png", (120, 80)), ("tall.jpg", (60, 90))):
        path = tmp_path / name
        Image.new("RGB", size, (30, 140, 220)).save(path)
        images.append((path, size))
    out = tmp_path / "out"
    result = _run(["predict", *(str(p) for p, _ in images), "--labels", ",".join(labels), "--out", str(out)],
                  model_env)
    assert result.returncode == 0, result.stderr
    config = config_for_labels(labels)
    for path, (width, height) in images:
        prediction = json.loads((out / f"{path.stem}.json").read_text())
        assert prediction["result"], "tiny random models at threshold 0.05 always find something"
        assert_valid_prediction(prediction, config, width, height)
        with Image.open(out / f"{path.stem}.overlay.png") as overlay:
            assert overlay.size == (width, height)


def test_predict_reports_unreadable_image_and_keeps_the_others(tmp_path: Path, model_env: dict[str, str]) -> None:
    good = tmp_path / "good.png"
    Image.new("RGB", (40, 30)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "out"
    result = _run(["predict", str(bad), str(good), "--labels", "cat", "--out", str(out)], model_env)
    assert result.returncode == 1
    assert "bad.png" in result.stderr
    assert (out / "good.json").is_file() and not (out / "bad.json").exists()


def test_serve_exits_with_the_reason_when_models_cannot_load(tmp_path: Path, model_env: dict[str, str]) -> None:
    # One restart, not the default three: each worker start loads (fails to load) the models again.
    env = {**model_env, "DETECTOR_MODEL": str(tmp_path / "no-such-model"), "PORT": str(free_port()),
           "SUPERVISE_MAX_RESTARTS": "1"}
    result = _run(["serve"], env, timeout=120)
    assert result.returncode != 0
    assert "no-such-model" in result.stdout + result.stderr


def test_invalid_settings_are_refused_up_front(model_env: dict[str, str]) -> None:
    result = _run(["worker"], {**model_env, "BOX_THRESHOLD": "1.5", "REDIS_URL": "redis://127.0.0.1:1"})
    assert result.returncode == 2
    assert "box_threshold" in result.stderr.lower()
