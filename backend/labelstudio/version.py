"""model_version: one short string naming everything that changes predictions.

Label Studio skips tasks that already hold a prediction of the current model_version, so it must change
when models, thresholds, labels, prompts or the controls regions are written to change, and only then.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict

from backend.labelstudio.config import ControlRef, LabelConfig

PREFIX = "gsam-"


def model_version(fingerprint: Mapping[str, object], config: LabelConfig) -> str:
    """ "gsam-" + the first 12 hex digits of sha256 over canonical JSON of `fingerprint` and the served labels.

    fingerprint: model ids, thresholds, post-processing and output settings (project defaults) and
    anything else that changes outputs; JSON values only (TypeError otherwise; ValueError for NaN).
    From `config` it covers the labels in order (order changes the detector prompt), their phrases,
    controls and per-label options (negatives, threshold, min_area, max_instances), the control and
    image names regions carry, and the image tag with its choice paths; not XML layout, whitespace, tags
    this backend does not serve, nor the interactive-only TextArea and smart controls (they change no
    batch prediction).
    """
    payload = {
        "fingerprint": dict(fingerprint),
        "labels": [
            [spec.value, list(spec.phrases), list(spec.controls), asdict(spec.options)] for spec in config.labels
        ],
        "brush": _control(config.brush),
        "rectangle": _control(config.rectangle),
        "polygon": _control(config.polygon),
        "image_tag": None if config.image_tag is None else asdict(config.image_tag),
    }
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return PREFIX + hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:12]


def _control(ref: ControlRef | None) -> list[str] | None:
    return None if ref is None else [ref.from_name, ref.to_name]
