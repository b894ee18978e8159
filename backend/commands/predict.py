"""The `predict` command: the worker's pipeline on local files, writing prediction JSON and an overlay PNG."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from backend.errors import BackendError, LocalPredictError
from backend.flow import PredictionFlow, text_classes
from backend.images.fetch import load_image_file
from backend.labelstudio.config import LabelConfig, parse_label_config
from backend.pipeline.overlay import draw_overlay
from backend.settings import Settings

# Levels of the prediction JSON written one item per line (the prediction's keys, then its regions); deeper
# values (a region, its RLE) stay on one line.
JSON_LINE_LEVELS = 2


def predict_files(settings: Settings, images: Sequence[Path], label_config: str, out_dir: Path) -> list[Path]:
    """Write `<stem>.json` (the Label Studio prediction) and `<stem>.overlay.png` per image into `out_dir`.

    Raises, before the models load: LabelConfigError, or LocalPredictError when an image file cannot be opened or
    `out_dir` cannot be made. Then LocalPredictError after all images were tried if any failed (the others are
    written).
    """
    config = parse_label_config(label_config)
    unreadable = [problem for problem in map(_unreadable, images) if problem]
    if unreadable:
        raise LocalPredictError(f"{'; '.join(unreadable)} (nothing was predicted)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LocalPredictError(f"--out {str(out_dir)!r} cannot be a folder: {exc.strerror or exc}") from exc
    flow = PredictionFlow.load(settings)
    version = flow.model_version(config)
    written: list[Path] = []
    failures: list[str] = []
    for path in images:
        try:
            written.extend(_predict_one(flow, settings, path, config, version, out_dir))
        except BackendError as exc:
            failures.append(str(exc))
    if failures:
        raise LocalPredictError(
            f"{len(failures)} of {len(images)} images failed: {'; '.join(failures)} (the others are in {out_dir})"
        )
    return written


def layered_json(value: object, levels: int = JSON_LINE_LEVELS, _level: int = 0) -> str:
    """JSON with the items of the outer `levels` objects and arrays one per line (indented by one space per
    level) and everything deeper compact: readable outside, never one RLE integer per line."""
    pad, close = " " * (_level + 1), " " * _level
    if _level < levels and isinstance(value, dict) and value:
        items = [f"{pad}{json.dumps(key)}: {layered_json(item, levels, _level + 1)}" for key, item in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{close}}}"
    if _level < levels and isinstance(value, list) and value:
        items = [pad + layered_json(item, levels, _level + 1) for item in value]
        return "[\n" + ",\n".join(items) + f"\n{close}]"
    return json.dumps(value, separators=(",", ":"))


def _unreadable(path: Path) -> str | None:
    """Why `path` cannot be opened as a file ("x.png: cannot read (No such file or directory)"), or None."""
    try:
        with path.open("rb"):
            return None
    except OSError as exc:
        return f"{path}: cannot read ({exc.strerror or exc})"


def _predict_one(
    flow: PredictionFlow, settings: Settings, path: Path, config: LabelConfig, version: str, out_dir: Path
) -> list[Path]:
    image = load_image_file(path, settings.image_max_bytes, settings.image_max_pixels)
    instances = flow.instances(image, config)
    json_path = out_dir / f"{path.stem}.json"
    json_path.write_text(layered_json(flow.prediction(image, instances, config, version)) + "\n")
    overlay_path = out_dir / f"{path.stem}.overlay.png"
    draw_overlay(image, instances, [c.name for c in text_classes(config)]).save(overlay_path)
    return [json_path, overlay_path]
