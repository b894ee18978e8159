"""Write per-label `threshold` attributes into a labeling config, leaving the rest of the XML as it was.

The attribute is the one label_attrs reads: <Label value="Car" threshold="0.41"/> on the <Label>s of the
controls this backend serves (config.py: the first BrushLabels, RectangleLabels and PolygonLabels on the served
image). A label is named by its result value (the Label's `alias` when it has one, as LabelSpec.value); a
label on several served controls gets the threshold on each (label_attrs refuses two different ones).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

from lxml import etree

from backend.errors import LabelConfigError
from backend.labelstudio.config import LabelConfig, parse_label_config

# Decimals written: finer than any score difference that matters, short enough to read in the project settings.
DECIMALS = 6


def with_thresholds(xml: str, thresholds: Mapping[str, float]) -> str:
    """`xml` with threshold="T" set on every served <Label> of each label in `thresholds` (label value → T).

    Other labels, attributes, comments and whitespace are kept; T is written with at most DECIMALS decimals.
    Raises LabelConfigError when `xml` cannot be served or names no such label, ValueError for a T outside [0, 1].
    """
    config = parse_label_config(xml)  # the SDK's parse first: malformed or unservable configs fail as they do there
    known = {spec.value for spec in config.labels}
    unknown = sorted(set(thresholds) - known)
    if unknown:
        raise LabelConfigError(
            f"the labeling config has no label {', '.join(map(repr, unknown))} (labels: {', '.join(sorted(known))})"
        )
    texts = {label: threshold_text(value) for label, value in thresholds.items()}
    # As image_tags parses: no entity expansion, no network.
    root = etree.fromstring(xml, etree.XMLParser(resolve_entities=False, no_network=True))
    for label in _served_labels(root, config):
        value = label.get("alias") or label.get("value")
        if value in texts:
            label.set("threshold", texts[value])
    return str(etree.tostring(root.getroottree(), encoding="unicode"))


def threshold_text(threshold: float) -> str:
    """0.4 → "0.4", 0.123456789 → "0.123457", 1.0 → "1"; ValueError outside [0, 1] or not finite."""
    if not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
        raise ValueError(f"a threshold must be a number in [0, 1], got {threshold!r}")
    return f"{threshold:.{DECIMALS}f}".rstrip("0").rstrip(".")


def _served_labels(root: etree._Element, config: LabelConfig) -> Iterator[etree._Element]:
    """The <Label> elements of the served controls (matched by tag and name), in document order."""
    served = {
        (tag, ref.from_name)
        for tag, ref in (
            ("BrushLabels", config.brush),
            ("RectangleLabels", config.rectangle),
            ("PolygonLabels", config.polygon),
        )
        if ref is not None
    }
    for control in root.iter("BrushLabels", "RectangleLabels", "PolygonLabels"):
        if (control.tag, control.get("name")) in served:
            yield from control.iter("Label")
