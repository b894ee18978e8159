"""Per-class options: read from a label's attributes in the labeling config (backend.labelstudio.label_attrs),
applied by the model pipeline (backend.pipeline). One type for both sides, with no dependencies."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ClassOptions:
    """Per-class settings beyond the phrases; None: the project default (Settings) applies.

    negatives: phrases detected like classes whose boxes suppress this class's overlapping boxes
        (see `PostprocessOptions.negative_iou`); never returned. A negative equal to one of the class's
        own phrases is ignored (a class never suppresses itself).
    threshold: minimum box score of this class's detections; replaces `DetectionThresholds.box`.
    min_area: fewest mask pixels (after cleanup) of a kept instance; replaces `PostprocessOptions.min_area`.
    max_instances: most instances of this class per image, best first; replaces `PostprocessOptions.max_instances`.
    """

    negatives: tuple[str, ...] = ()
    threshold: float | None = None
    min_area: int | None = None
    max_instances: int | None = None
