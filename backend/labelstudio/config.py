"""Parse a Label Studio labeling config into what this backend serves.

Served: the first <Image> that a <BrushLabels> or <RectangleLabels> control points at (toName), with the
Label values of those controls. Parsing is the SDK's LabelInterface; this module only selects from it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

from label_studio_sdk._legacy.exceptions import LabelStudioXMLSyntaxErrorSentryIgnored
from label_studio_sdk.label_interface import LabelInterface
from label_studio_sdk.label_interface.control_tags import BrushLabelsTag, ControlTag, RectangleLabelsTag
from label_studio_sdk.label_interface.object_tags import ImageTag

from backend.errors import LabelConfigError

ControlKind = Literal["brush", "rectangle"]

# Canonical order of control kinds (LabelSpec.controls follows it).
_CONTROL_TYPES: dict[ControlKind, type[ControlTag]] = {"brush": BrushLabelsTag, "rectangle": RectangleLabelsTag}


@dataclass(frozen=True, slots=True)
class ControlRef:
    """A control tag on the served image: `from_name` is the control's name, `to_name` the <Image>'s."""

    from_name: str
    to_name: str


@dataclass(frozen=True, slots=True)
class LabelSpec:
    """One label the model predicts.

    value: the exact Label value regions must carry (the Label's `alias` when it has one, as in Label Studio).
    phrases: detector text for it: the `predicted_values="a,b"` aliases when present, else the Label's `value`.
    controls: which controls carry it, in the order ("brush", "rectangle").
    """

    value: str
    phrases: tuple[str, ...]
    controls: tuple[ControlKind, ...]


@dataclass(frozen=True, slots=True)
class LabelConfig:
    """What this backend serves of a labeling config.

    image_name: the <Image> tag's name; image_key: the task-data key of its value (`$image` → "image").
    brush / rectangle: the first control of each kind pointing at that image, or None.
    labels: deduplicated by exact value, in config order (at least one).
    """

    image_name: str
    image_key: str
    brush: ControlRef | None
    rectangle: ControlRef | None
    labels: tuple[LabelSpec, ...]


@functools.lru_cache(maxsize=128)
def parse_label_config(xml: str) -> LabelConfig:
    """Parse `xml` (cached: Label Studio resends the same config with every request).

    Raises LabelConfigError for malformed XML, no <Image>, no supported control pointing at an <Image>,
    an <Image> whose value is not a `$variable`, or a served control without <Label>s.
    """
    interface = _interface(xml)
    images = [tag for tag in (interface.objects or ()) if isinstance(tag, ImageTag)]
    if not images:
        raise LabelConfigError("the labeling config has no <Image> tag")
    for image in images:
        controls = _controls_for(interface, image.name)
        if controls:
            return _build(image, controls)
    raise LabelConfigError(
        "no <BrushLabels> or <RectangleLabels> in the labeling config has toName pointing at an <Image> "
        f"(images: {', '.join(image.name for image in images)})"
    )


def _interface(xml: str) -> LabelInterface:
    if not xml.strip():
        raise LabelConfigError("the labeling config is empty")
    try:
        return LabelInterface(xml)
    # ValueError: lxml refuses str input carrying an <?xml encoding=...?> declaration.
    except (LabelStudioXMLSyntaxErrorSentryIgnored, ValueError) as exc:
        raise LabelConfigError(f"the labeling config is not valid XML: {exc}") from exc


def _controls_for(interface: LabelInterface, image_name: str) -> dict[ControlKind, ControlTag]:
    """The first control of each supported kind pointing at `image_name`, in document order."""
    found: dict[ControlKind, ControlTag] = {}
    for control in interface.controls or ():
        for kind, tag_type in _CONTROL_TYPES.items():
            if isinstance(control, tag_type) and image_name in (control.to_name or ()) and kind not in found:
                found[kind] = control
    return found


def _build(image: ImageTag, controls: dict[ControlKind, ControlTag]) -> LabelConfig:
    if image.is_image_list or not image.value_is_variable:
        raise LabelConfigError(
            f'<Image name="{image.name}"> must take its value from the task, like value="$image" '
            f"(got {image.value!r}; image lists are not supported)"
        )
    refs = {kind: ControlRef(from_name=control.name, to_name=image.name) for kind, control in controls.items()}
    return LabelConfig(
        image_name=image.name,
        image_key=image.value_name,
        brush=refs.get("brush"),
        rectangle=refs.get("rectangle"),
        labels=_labels(controls),
    )


def _labels(controls: dict[ControlKind, ControlTag]) -> tuple[LabelSpec, ...]:
    """Labels of all `controls` in document order, merged by exact value."""
    merged: dict[str, LabelSpec] = {}
    for kind, control in controls.items():
        if not control.labels:
            raise LabelConfigError(f'<{control.tag} name="{control.name}"> has no <Label> children')
        for value in control.labels:
            spec = _spec(value, kind, control.labels_attrs[value].attr)
            merged[value] = _merge(merged[value], spec) if value in merged else spec
    return tuple(merged.values())


def _spec(value: str, kind: ControlKind, attrs: dict[str, str]) -> LabelSpec:
    aliases = [part.strip() for part in attrs.get("predicted_values", "").split(",")]
    phrases = tuple(alias for alias in aliases if alias) or (attrs.get("value") or value,)
    return LabelSpec(value=value, phrases=phrases, controls=(kind,))


def _merge(first: LabelSpec, second: LabelSpec) -> LabelSpec:
    """One label in both controls: phrases united (first seen first), controls in canonical order."""
    phrases = tuple(dict.fromkeys(first.phrases + second.phrases))
    controls = tuple(kind for kind in _CONTROL_TYPES if kind in first.controls + second.controls)
    return LabelSpec(value=first.value, phrases=phrases, controls=controls)
