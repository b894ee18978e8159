"""Negative prompts: phrases detected like classes, whose boxes suppress a class's overlapping boxes.

Each class's negative phrases join the detector prompt as extra classes after the caller's classes (one
per distinct phrase; a phrase that is already some class's prompt is that class instead). A detection of
class C is dropped when its box IoU with a detection of one of C's suppressors exceeds `negative_iou`;
detections of the extra classes are never returned. The same for any detector: Grounding DINO's prompt plan
(PromptPlan) or SAM 3's text prompts (sam3_text.Sam3Prompts), whose instances' boxes are compared the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic

import torch
from typing_extensions import TypeVar

from backend.pipeline.detector import box_iou
from backend.pipeline.prompts import normalize_phrase
from backend.pipeline.types import Detection, TextClass

# The detector's prompt plan: backend.pipeline.prompts.PromptPlan (Grounding DINO) or sam3_text.Sam3Prompts.
Prompt = TypeVar("Prompt", default=Any)


@dataclass(frozen=True, slots=True)
class ClassPlan(Generic[Prompt]):
    """A class set ready for the detector.

    classes: the caller's classes; detector class indexes below len(classes) are theirs, the rest negatives.
    prompt: the detector's prompt plan over the caller's classes followed by one class per extra negative phrase.
    suppressors: per caller class, the detector class indexes whose boxes suppress its boxes.
    box_thresholds: per detector class, its box threshold (a class's own, else the default).
    """

    classes: tuple[TextClass, ...]
    prompt: Prompt
    suppressors: tuple[frozenset[int], ...]
    box_thresholds: tuple[float, ...]


def build_class_plan(
    classes: Sequence[TextClass], prepare: Callable[[Sequence[TextClass]], Prompt], default_box: float
) -> ClassPlan[Prompt]:
    """Expand negatives into detector classes and prepare them all with `prepare` (the detector's)."""
    classes = tuple(classes)
    owner: dict[str, int] = {}  # normalised phrase → detector class index
    for index, text_class in enumerate(classes):
        for phrase in map(normalize_phrase, text_class.phrases):
            owner.setdefault(phrase, index)
    extra: list[TextClass] = []
    suppressors: list[frozenset[int]] = []
    for index, text_class in enumerate(classes):
        mine: set[int] = set()
        for negative in text_class.options.negatives:
            phrase = normalize_phrase(negative)
            if phrase and phrase not in owner:
                owner[phrase] = len(classes) + len(extra)
                extra.append(TextClass(name=f"negative: {phrase}", phrases=(phrase,)))
            if phrase and owner[phrase] != index:
                mine.add(owner[phrase])
        suppressors.append(frozenset(mine))
    thresholds = [default_box if c.options.threshold is None else c.options.threshold for c in classes]
    return ClassPlan(
        classes=classes,
        prompt=prepare(classes + tuple(extra)),
        suppressors=tuple(suppressors),
        box_thresholds=(*thresholds, *[default_box] * len(extra)),
    )


def suppress_negatives(detections: Sequence[Detection], plan: ClassPlan, iou: float) -> list[Detection]:
    """Detections of the caller's classes that no suppressor box overlaps by more than `iou`, order kept."""
    return [detections[index] for index in unsuppressed(detections, plan, iou)]


def unsuppressed(detections: Sequence[Detection], plan: ClassPlan, iou: float) -> list[int]:
    """Indexes into `detections` of those `suppress_negatives` keeps, ascending (to keep masks aligned)."""
    if not detections:
        return []
    boxes = torch.tensor([detection.box_xyxy for detection in detections], dtype=torch.float32)
    kept = []
    for index, detection in enumerate(detections):
        if detection.class_index >= len(plan.classes):
            continue
        suppressors = plan.suppressors[detection.class_index]
        rivals = torch.tensor([other.class_index in suppressors for other in detections], dtype=torch.bool)
        if not (box_iou(boxes[index], boxes[rivals]) > iou).any():
            kept.append(index)
    return kept
