"""Interactive requests: Label Studio's `params.context` → what the user asked for on one task.

Label Studio sends `{"result": [region, ...]}`: the regions just drawn, coordinates in percent (0..100)
of the image as displayed. This backend reads:

- keypointlabels / rectanglelabels regions from a smart control of the config (smart="true"): a SAM
  prompt. Every keypoint is a click (`is_positive` false: background; missing: foreground; one off the image
  is refused); the last
  rectangle is the box (rotation ignored). The mask is returned with the label of the last such region.
  SAM alone answers; the detector does not run.
- a textarea region from the config's prompt <TextArea>: text that replaces the label prompts for this
  task. Items are separated by commas or new lines; "Label: phrase" prompts that Label with the phrase;
  an item equal (ignoring case) to a Label's value or one of its prompts prompts that Label; with a
  single Label any item prompts it. Only the Labels named are detected; their other settings stay.

A smart region wins over text in the same context. Other regions are ignored.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from backend.errors import InteractiveContextError
from backend.labelstudio.config import LabelConfig, LabelSpec
from backend.labelstudio.results import PredictedObject, mask_box
from backend.packed_mask import Mask


@dataclass(frozen=True, slots=True)
class Click:
    """One keypoint: x, y in percent of the displayed image; positive False marks background."""

    x: float
    y: float
    positive: bool


@dataclass(frozen=True, slots=True)
class SamPrompt:
    """Clicks and/or a box (xyxy percent) for SAM alone; the mask is returned with `label`."""

    label: str
    clicks: tuple[Click, ...]
    box: tuple[float, float, float, float] | None

    def points_px(self, width: int, height: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
        """Clicks in pixels of a width x height image: points (N, 2) float32 xy, positive (N,) bool."""
        points = np.array([(c.x * width / 100.0, c.y * height / 100.0) for c in self.clicks], np.float32)
        return points.reshape(-1, 2), np.array([c.positive for c in self.clicks], dtype=bool)

    def to_object(self, mask: Mask, score: float) -> PredictedObject | None:
        """SAM's answer as the object to return: this label, SAM's score, the box around the bool (H, W)
        mask; None when the mask is empty (nothing to return)."""
        box = mask_box(mask)
        return None if box is None else PredictedObject(label=self.label, score=score, box_xyxy=box, mask=mask)

    def box_px(self, width: int, height: int) -> tuple[float, float, float, float] | None:
        """The box in xyxy pixels of a width x height image, or None."""
        if self.box is None:
            return None
        x1, y1, x2, y2 = self.box
        return (x1 * width / 100.0, y1 * height / 100.0, x2 * width / 100.0, y2 * height / 100.0)


@dataclass(frozen=True, slots=True)
class TextPrompt:
    """Typed text and the labels it prompts: the config's Labels it names, with the typed phrases."""

    text: str
    labels: tuple[LabelSpec, ...]

    def apply(self, config: LabelConfig) -> LabelConfig:
        """`config` with its labels replaced by this prompt's (detect these, with these phrases)."""
        return dataclasses.replace(config, labels=self.labels)


def parse_context(context: object, config: LabelConfig) -> SamPrompt | TextPrompt | None:
    """The request in `context`; None when there is none (no context, or an empty result: a batch request).

    Raises InteractiveContextError naming what is wrong.
    """
    if context is None or (isinstance(context, Mapping) and not context.get("result")):
        return None
    if not isinstance(context, Mapping) or not isinstance(context["result"], list):
        raise InteractiveContextError('context must be {"result": [region, ...]}')
    smart = {ref.from_name for ref in config.smart}
    clicks: list[Click] = []
    box, label, texts = None, None, []
    for position, region in enumerate(context["result"]):
        if not isinstance(region, Mapping) or not isinstance(region.get("value"), Mapping):
            raise InteractiveContextError(f"context.result[{position}] must be a region with a value object")
        kind, value, where = region.get("type"), region["value"], f"context.result[{position}]"
        if kind == "keypointlabels" and region.get("from_name") in smart:
            clicks.append(Click(_inside(value, "x", where), _inside(value, "y", where), _positive(region, where)))
            label = _label(value, kind, where)
        elif kind == "rectanglelabels" and region.get("from_name") in smart:
            box, label = _box(value, where), _label(value, kind, where)
        elif kind == "textarea" and config.prompt is not None and region.get("from_name") == config.prompt.from_name:
            texts.extend(_texts(value, where))
    if label is not None:
        if label not in {spec.value for spec in config.labels}:
            raise InteractiveContextError(f"label {label!r} of the smart region is not a label of the config")
        return SamPrompt(label=label, clicks=tuple(clicks), box=box)
    if texts:
        return text_prompt("\n".join(texts), config)
    raise InteractiveContextError(
        "context.result has no smart keypoint or rectangle and no prompt text this labeling config reads"
    )


def text_prompt(text: str, config: LabelConfig) -> TextPrompt:
    """The labels `text` prompts, by the rules in this module's docstring; InteractiveContextError if an
    item names no label (with several labels) or the text has no item."""
    phrases: dict[str, list[str]] = {}
    for item in filter(None, (part.strip() for part in re.split(r"[,\n]", text))):
        spec, phrase = _resolve(item, config.labels)
        phrases.setdefault(spec.value, []).append(phrase)
    if not phrases:
        raise InteractiveContextError("the prompt text is empty")
    labels = tuple(
        dataclasses.replace(spec, phrases=tuple(dict.fromkeys(phrases[spec.value])))
        for spec in config.labels
        if spec.value in phrases
    )
    return TextPrompt(text=text, labels=labels)


def _resolve(item: str, labels: tuple[LabelSpec, ...]) -> tuple[LabelSpec, str]:
    """The label an item prompts and the phrase it prompts it with."""
    head, colon, tail = item.partition(":")
    by_value = {spec.value.casefold(): spec for spec in labels}
    if colon and head.strip().casefold() in by_value and tail.strip():
        return by_value[head.strip().casefold()], tail.strip()
    for spec in labels:
        if item.casefold() in {spec.value.casefold(), *(phrase.casefold() for phrase in spec.phrases)}:
            return spec, item
    if len(labels) == 1:
        return labels[0], item
    names = ", ".join(spec.value for spec in labels)
    raise InteractiveContextError(f'prompt {item!r} names no label; write "Label: {item}" with one of: {names}')


def _percent(value: Mapping[str, Any], key: str, where: str) -> float:
    """value[key] as a finite number, clamped to 0..100."""
    number = value.get(key)
    if isinstance(number, bool) or not isinstance(number, int | float) or not math.isfinite(number):
        raise InteractiveContextError(f"{where}.value.{key} must be a finite number (percent), got {number!r}")
    return min(100.0, max(0.0, float(number)))


def _inside(value: Mapping[str, Any], key: str, where: str) -> float:
    """A click's coordinate: value[key] in percent, which must lie on the image (0..100)."""
    number = value.get(key)
    percent = _percent(value, key, where)
    if percent != number:
        raise InteractiveContextError(f"{where}: the click at {key}={number}% is outside the image (0..100%)")
    return percent


def _box(value: Mapping[str, Any], where: str) -> tuple[float, float, float, float]:
    x, y = _percent(value, "x", where), _percent(value, "y", where)
    right = min(100.0, x + _percent(value, "width", where))
    bottom = min(100.0, y + _percent(value, "height", where))
    if right <= x or bottom <= y:
        raise InteractiveContextError(f"{where}: the rectangle has no area inside the image")
    return (x, y, right, bottom)


def _positive(region: Mapping[str, Any], where: str) -> bool:
    flag = region.get("is_positive", True)
    if not isinstance(flag, bool | int):
        raise InteractiveContextError(f"{where}.is_positive must be true or false, got {flag!r}")
    return bool(flag)


def _label(value: Mapping[str, Any], kind: str, where: str) -> str:
    labels = value.get(kind) or value.get("labels")
    if not isinstance(labels, list) or not labels or not isinstance(labels[0], str):
        raise InteractiveContextError(f"{where}.value.{kind} must list the chosen label")
    return labels[0]


def _texts(value: Mapping[str, Any], where: str) -> list[str]:
    text = value.get("text")
    texts = [text] if isinstance(text, str) else text
    if not isinstance(texts, list) or not all(isinstance(item, str) for item in texts):
        raise InteractiveContextError(f"{where}.value.text must be a list of strings, got {text!r}")
    return texts
