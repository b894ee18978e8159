"""Which checkpoints the backend runs, told apart by their config's `model_type` before any weights load.

A checkpoint named where it cannot serve (a SAM as the detector, a detector as SAM, SAM 3's tracker without its
text head as the detector, an architecture not listed here) is a ModelLoadError at start-up that names what was
found and what is supported, never an error at the first job.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from transformers import PretrainedConfig, PreTrainedModel

from backend.errors import ModelLoadError

# What from_pretrained's config lookup raises for a missing folder or hub id, or an unreadable config.json.
_CONFIG_ERRORS = (OSError, ValueError)

Role = Literal["detector", "segmenter"]

# model_type → the family's name, by what it can do here.
BOX_DETECTORS = {"grounding-dino": "Grounding DINO", "mm-grounding-dino": "MM-Grounding-DINO or LLMDet"}
# SAM 3's text head: instance masks from phrases, with no second SAM pass. "sam3_video" is how the hub's
# facebook/sam3 is saved (detector and tracker in one checkpoint); "sam3" holds the detector alone.
TEXT_SEGMENTERS = {"sam3": "SAM 3", "sam3_video": "SAM 3"}
SEGMENTERS = {
    "sam": "SAM",
    "sam_hq": "SAM-HQ",
    "sam2": "SAM 2 / 2.1",
    "sam2_video": "SAM 2 / 2.1",
    "sam3_tracker": "SAM 3's tracker",
    "sam3_tracker_video": "SAM 3's tracker",
    "sam3_video": "SAM 3's tracker",
    "edgetam": "EdgeTAM",
    "edgetam_video": "EdgeTAM",
}
# Full SAM 3 checkpoints that also hold the tracker (box and point prompts).
WITH_TRACKER = frozenset({"sam3_video"})
# Checkpoints whose segmenter is SAM 3's tracker, loaded with the tracker's own processor (a full SAM 3's
# processor is the text one).
SAM3_TRACKERS = frozenset({"sam3_tracker", "sam3_tracker_video", "sam3_video"})


@dataclass(frozen=True, slots=True)
class Architecture:
    """What a checkpoint's config says it is: model_type (config.json) and the family's name."""

    model_type: str
    family: str

    @property
    def segments_text(self) -> bool:
        """SAM 3 with its text head: it finds and segments the objects itself."""
        return self.model_type in TEXT_SEGMENTERS

    @property
    def has_tracker(self) -> bool:
        """A full SAM 3 checkpoint whose tracker answers clicks and boxes."""
        return self.model_type in WITH_TRACKER

    @property
    def is_sam3_tracker(self) -> bool:
        """As a segmenter: SAM 3's tracker (from a tracker or a full SAM 3 checkpoint)."""
        return self.model_type in SAM3_TRACKERS


def model_identity(model: PreTrainedModel) -> dict[str, str]:
    """Plain values that identify a loaded model (for the model version): its source, class and dtype."""
    return {"source": model.name_or_path or "", "architecture": type(model).__name__, "dtype": str(model.dtype)}


def model_type(source: str) -> str:
    """config.json's model_type of a local folder or hub id (the Hugging Face cache, or one small download)."""
    if Path(source).is_dir() and not (Path(source) / "config.json").is_file():
        raise ModelLoadError(f"{source!r} has no config.json. Fix: give a folder written by save_pretrained")
    try:
        config, _ = PretrainedConfig.get_config_dict(source)
    except _CONFIG_ERRORS as error:
        raise ModelLoadError(
            f"cannot read the model config of {source!r} ({type(error).__name__}: {error}). Fix: give a folder "
            "written by save_pretrained (with config.json) or a Hugging Face hub id"
        ) from error
    return str(config.get("model_type", ""))


def detector_architecture(source: str) -> Architecture:
    """The architecture of DETECTOR_MODEL: a Grounding DINO family detector or SAM 3 (text → masks)."""
    found = model_type(source)
    family = BOX_DETECTORS.get(found) or TEXT_SEGMENTERS.get(found)
    if family is None:
        raise ModelLoadError(_unsupported("DETECTOR_MODEL", source, found, "detector", BOX_DETECTORS | TEXT_SEGMENTERS))
    return Architecture(found, family)


def segmenter_architecture(source: str) -> Architecture:
    """The architecture of SAM_MODEL: a SAM family model that takes box and point prompts."""
    found = model_type(source)
    family = SEGMENTERS.get(found)
    if family is None:
        raise ModelLoadError(_unsupported("SAM_MODEL", source, found, "segmenter", SEGMENTERS))
    return Architecture(found, family)


def _unsupported(setting: str, source: str, found: str, role: Role, supported: dict[str, str]) -> str:
    """What was found where, what that setting takes, and the likely fix."""
    named = _known(found) or (f"model_type {found!r}" if found else "a config without model_type")
    families = ", ".join(sorted(set(supported.values())))
    hint = ""
    if found in SEGMENTERS and role == "detector":
        hint = (
            " A segmenter (box and point prompts) cannot find objects from text: set it as SAM_MODEL; for SAM 3 "
            "alone from text give the full SAM 3 checkpoint (facebook/sam3) with its text head."
        )
    elif found in BOX_DETECTORS | TEXT_SEGMENTERS and role == "segmenter":
        hint = " A text detector cannot take box prompts: set it as DETECTOR_MODEL."
    return f"{setting}={source!r} is {named}, which is no {role} this backend runs (it runs {families}).{hint}"


def _known(found: str) -> str | None:
    """The family name of a model_type this backend knows in any role."""
    name = BOX_DETECTORS.get(found) or TEXT_SEGMENTERS.get(found) or SEGMENTERS.get(found)
    return None if name is None else f"{name} (model_type {found!r})"
