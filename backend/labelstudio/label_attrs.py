"""Per-label prompting settings, read from attributes on a <Label> (Label Studio ignores attributes it does not know).

    <Label value="Car" prompt="car, automobile" negative="toy car" threshold="0.4" min_area="50" max_instances="3"/>

prompt          comma-separated detector phrases (aliases). `predicted_values` (the SDK's idiom) means the same;
                when both are set, `prompt` wins. Neither: the Label's visible value is the phrase.
negative        comma-separated phrases whose detections suppress this label's overlapping detections;
                they are never returned themselves. Must not repeat one of the label's own phrases.
threshold       minimum detector box score for this label, in [0, 1]; replaces BOX_THRESHOLD for it.
min_area        objects of this label whose cleaned mask has fewer pixels are dropped (int >= 0); replaces MIN_AREA.
max_instances   at most this many objects of this label per image, best first (int >= 1); replaces MAX_INSTANCES.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TypeVar

from backend.class_options import ClassOptions
from backend.errors import LabelConfigError

T = TypeVar("T", int, float)


def read_label_attrs(value: str, attrs: Mapping[str, str], where: str) -> tuple[tuple[str, ...], ClassOptions]:
    """Phrases and options of the Label whose result value is `value`, from its XML attributes.

    where: names the control for error messages, e.g. '<BrushLabels name="mask">'.
    Raises LabelConfigError naming the label and the attribute for an invalid value.
    """
    context = f'<Label value="{value}"> in {where}'
    phrases = _split(attrs.get("prompt")) or _split(attrs.get("predicted_values")) or (attrs.get("value") or value,)
    negatives = _split(attrs.get("negative"))
    own = {_folded(phrase) for phrase in phrases}
    for negative in negatives:
        if _folded(negative) in own:
            raise LabelConfigError(f'{context}: negative="{negative}" repeats one of the label\'s own prompts')
    return phrases, ClassOptions(
        negatives=negatives,
        threshold=_number(attrs, "threshold", context, float, lambda x: 0.0 <= x <= 1.0, "a number in [0, 1]"),
        min_area=_number(attrs, "min_area", context, int, lambda x: x >= 0, "a whole number >= 0 (pixels)"),
        max_instances=_number(attrs, "max_instances", context, int, lambda x: x >= 1, "a whole number >= 1"),
    )


def merge_options(first: ClassOptions, second: ClassOptions, value: str) -> ClassOptions:
    """One label on several controls: negatives united (first seen first); a number set on one control
    applies; set differently on two controls, it raises LabelConfigError naming label and attribute."""
    numbers = {}
    for name in ("threshold", "min_area", "max_instances"):
        a, b = getattr(first, name), getattr(second, name)
        if a is not None and b is not None and a != b:
            raise LabelConfigError(f'<Label value="{value}"> sets {name}="{a}" on one control and "{b}" on another')
        numbers[name] = a if a is not None else b
    return ClassOptions(
        negatives=tuple(dict.fromkeys(first.negatives + second.negatives)),
        **numbers,
    )


def _split(text: str | None) -> tuple[str, ...]:
    """ "a, b ,, c" → ("a", "b", "c"); None → ()."""
    return tuple(part.strip() for part in (text or "").split(",") if part.strip())


def _folded(phrase: str) -> str:
    return " ".join(phrase.casefold().split())


def _number(
    attrs: Mapping[str, str], name: str, context: str, kind: Callable[[str], T], valid: Callable[[T], bool], what: str
) -> T | None:
    """The attribute `name` as `kind` (float or int), None when absent; LabelConfigError when not `what`."""
    raw = attrs.get(name)
    if raw is None:
        return None
    try:
        number = kind(raw.strip())
    except ValueError:
        number = None
    if number is None or not math.isfinite(number) or not valid(number):
        raise LabelConfigError(f'{context}: {name}="{raw}" must be {what}')
    return number
