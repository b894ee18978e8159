"""A checkpoint in the wrong place is a ModelLoadError at start-up naming what was found and what is supported
(backend/pipeline/architectures.py). The folders here hold only a config.json: that build_pipeline fails with the
architecture's message, not a missing-weights one, shows the check comes before anything loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Sam3Model, Sam3TrackerModel

from backend.errors import ModelLoadError
from backend.pipeline.architectures import (
    BOX_DETECTORS,
    SEGMENTERS,
    TEXT_SEGMENTERS,
    detector_architecture,
    model_type,
    segmenter_architecture,
)
from backend.pipeline.build import build_pipeline, build_segmenter, share_backbone
from backend.pipeline.types import DetectionThresholds, ModelSpec
from tests.tiny_models import build_tiny_sam3


def config_only(directory: Path, model_type_name: str | None) -> Path:
    """A folder whose config.json names `model_type_name` (None: no model_type at all), and no weights."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {} if model_type_name is None else {"model_type": model_type_name}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("found", sorted(BOX_DETECTORS | TEXT_SEGMENTERS))
def test_every_detector_family_is_read_from_its_config(tmp_path: Path, found: str) -> None:
    architecture = detector_architecture(str(config_only(tmp_path, found)))
    assert architecture.model_type == found
    assert architecture.segments_text == (found in TEXT_SEGMENTERS)


@pytest.mark.parametrize("found", sorted(SEGMENTERS))
def test_every_segmenter_family_is_read_from_its_config(tmp_path: Path, found: str) -> None:
    assert segmenter_architecture(str(config_only(tmp_path, found))).family == SEGMENTERS[found]


def test_only_the_full_sam3_checkpoint_brings_a_tracker(tmp_path: Path) -> None:
    assert detector_architecture(str(config_only(tmp_path / "full", "sam3_video"))).has_tracker
    assert not detector_architecture(str(config_only(tmp_path / "detector", "sam3"))).has_tracker


@pytest.mark.parametrize(
    ("detector", "sam", "expected"),
    [
        ("detr", "sam", ["DETECTOR_MODEL=", "model_type 'detr'", "no detector", "Grounding DINO", "SAM 3"]),
        ("sam2_video", "sam", ["DETECTOR_MODEL=", "SAM 2 / 2.1 (model_type 'sam2_video')", "set it as SAM_MODEL"]),
        ("sam3_tracker", "sam", ["SAM 3's tracker (model_type 'sam3_tracker')", "with its text head"]),
        (None, "sam", ["DETECTOR_MODEL=", "a config without model_type"]),
        ("grounding-dino", "mm-grounding-dino", ["SAM_MODEL=", "MM-Grounding-DINO", "set it as DETECTOR_MODEL"]),
        ("grounding-dino", "sam3", ["SAM_MODEL=", "SAM 3 (model_type 'sam3')", "no segmenter"]),
        ("grounding-dino", "clip", ["SAM_MODEL=", "model_type 'clip'", "SAM-HQ", "EdgeTAM"]),
    ],
)
def test_a_checkpoint_in_the_wrong_place_fails_before_anything_loads(
    tmp_path: Path, detector: str | None, sam: str, expected: list[str]
) -> None:
    spec = ModelSpec(
        detector=str(config_only(tmp_path / "detector", detector)), sam=str(config_only(tmp_path / "sam", sam))
    )
    with pytest.raises(ModelLoadError) as raised:
        build_pipeline(spec, DetectionThresholds())
    message = str(raised.value)
    assert all(part in message for part in expected), message
    assert "weights" not in message and "safetensors" not in message


def test_a_folder_without_config_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"has no config\.json"):
        model_type(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot read the model config of"):
        model_type(str(tmp_path))


@pytest.fixture(scope="module")
def tiny_sam3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sam3(tmp_path_factory.mktemp("sam3") / "sam3")


def test_sam3_alone_needs_no_sam_model_and_its_tracker_shares_the_detector_backbone(tiny_sam3: Path) -> None:
    # An absent SAM_MODEL hub id (HF_HUB_OFFLINE=1 in the tests) is neither looked for nor loaded.
    pipeline = build_pipeline(ModelSpec(detector=str(tiny_sam3), sam="nobody-here/no-sam"), DetectionThresholds())
    described = pipeline.describe()
    assert described["detector"] == {"source": str(tiny_sam3), "architecture": "Sam3Model", "dtype": "torch.float32"}
    assert described["segmenter"] == {
        "source": str(tiny_sam3),
        "architecture": "Sam3TrackerModel",
        "dtype": "torch.float32",
    }
    detector_model = pipeline._detector._model  # type: ignore[attr-defined]
    tracker = pipeline._segmenter._model  # type: ignore[attr-defined]
    assert tracker.vision_encoder.backbone is detector_model.vision_encoder.backbone


def test_a_full_sam3_as_sam_model_is_its_tracker_after_grounding_dino(tiny_detector_dir: Path, tiny_sam3: Path) -> None:
    pipeline = build_pipeline(ModelSpec(detector=str(tiny_detector_dir), sam=str(tiny_sam3)), DetectionThresholds())
    assert pipeline.describe()["segmenter"]["architecture"] == "Sam3TrackerModel"  # type: ignore[index]


def test_a_tracker_whose_backbone_differs_is_refused(tiny_sam3: Path) -> None:
    detector = Sam3Model.from_pretrained(tiny_sam3).eval()
    tracker = Sam3TrackerModel.from_pretrained(tiny_sam3).eval()
    share_backbone(tracker, detector)  # the same checkpoint: accepted
    with torch.no_grad():
        next(detector.vision_encoder.backbone.parameters()).add_(1.0)
    other = Sam3TrackerModel.from_pretrained(tiny_sam3).eval()
    with pytest.raises(ModelLoadError, match="different vision backbones"):
        share_backbone(other, detector)


def test_a_checkpoint_missing_weights_is_refused_not_left_random(tiny_hf_sam_dir: Path, tmp_path: Path) -> None:
    partial = tmp_path / "partial-sam"
    shutil.copytree(tiny_hf_sam_dir, partial)
    weights = load_file(partial / "model.safetensors")
    dropped = sorted(key for key in weights if key.startswith("mask_decoder."))[:2]
    save_file({key: value for key, value in weights.items() if key not in dropped}, partial / "model.safetensors")
    with pytest.raises(ModelLoadError, match="lacks 2 of its weights") as raised:
        build_segmenter(ModelSpec(detector="unused", sam=str(partial)))
    assert dropped[0] in str(raised.value)
