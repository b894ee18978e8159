"""The `predict` command: the worker's pipeline on local files, writing prediction JSON and an overlay PNG."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from backend.errors import BackendError, LocalPredictError
from backend.flow import PredictionFlow, text_classes
from backend.images.fetch import load_image_file
from backend.labelstudio.config import LabelConfig, parse_label_config
from backend.pipeline.overlay import draw_overlay
from backend.settings import Settings

log = logging.getLogger(__name__)


def predict_files(settings: Settings, images: Sequence[Path], label_config: str, out_dir: Path) -> list[Path]:
    """Write `<stem>.json` (the Label Studio prediction) and `<stem>.overlay.png` per image into `out_dir`.

    Raises LocalPredictError after all images were tried if any failed; LabelConfigError up front.
    """
    config = parse_label_config(label_config)
    flow = PredictionFlow.load(settings)
    version = flow.model_version(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    failures: list[str] = []
    for path in images:
        try:
            written.extend(_predict_one(flow, settings, path, config, version, out_dir))
        except BackendError as exc:
            log.error("%s: %s", path, exc)
            failures.append(f"{path}: {exc}")
    if failures:
        raise LocalPredictError("; ".join(failures))
    return written


def _predict_one(
    flow: PredictionFlow, settings: Settings, path: Path, config: LabelConfig, version: str, out_dir: Path
) -> list[Path]:
    image = load_image_file(path, settings.image_max_bytes, settings.image_max_pixels)
    instances = flow.instances(image, config)
    json_path = out_dir / f"{path.stem}.json"
    json_path.write_text(json.dumps(flow.prediction(image, instances, config, version), indent=1))
    overlay_path = out_dir / f"{path.stem}.overlay.png"
    draw_overlay(image, instances, [c.name for c in text_classes(config)]).save(overlay_path)
    return [json_path, overlay_path]
