"""Parse a Label Studio labeling config into what this backend serves.

Served: the first <Image> that a <BrushLabels>, <RectangleLabels> or <PolygonLabels> control points at
(toName), with the Label values of those controls and their prompting attributes (see label_attrs); on that
image also the first Choices/Taxonomy image tag (see image_tags), the first <TextArea> (a typed prompt for
interactive requests) and the KeyPointLabels/RectangleLabels with smart="true" (interactive SAM prompts).
Parsing is the SDK's LabelInterface; this module only selects from it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

from label_studio_sdk._legacy.exceptions import LabelStudioXMLSyntaxErrorSentryIgnored
from label_studio_sdk.label_interface.control_tags import (
    BrushLabelsTag,
    ControlTag,
    KeyPointLabelsTag,
    PolygonLabelsTag,
    RectangleLabelsTag,
    TextAreaTag,
)
from label_studio_sdk.label_interface.interface import LabelInterface
from label_studio_sdk.label_interface.object_tags import ImageTag

from backend.class_options import ClassOptions
from backend.errors import LabelConfigError
from backend.labelstudio.image_tags import ImageTagControl, find_image_tag
from backend.labelstudio.label_attrs import merge_options, read_label_attrs
from backend.labelstudio.sdk_tags import tag_name
from backend.lru import SizedLru

ControlKind = Literal["brush", "rectangle", "polygon"]

# Canonical order of control kinds (LabelSpec.controls follows it).
_CONTROL_TYPES: dict[ControlKind, type[ControlTag]] = {
    "brush": BrushLabelsTag,
    "rectangle": RectangleLabelsTag,
    "polygon": PolygonLabelsTag,
}
_SMART_TYPES = (KeyPointLabelsTag, RectangleLabelsTag)


@dataclass(frozen=True, slots=True)
class ControlRef:
    """A control tag on the served image: `from_name` is the control's name, `to_name` the <Image>'s."""

    from_name: str
    to_name: str


@dataclass(frozen=True, slots=True)
class LabelSpec:
    """One label the model predicts.

    value: the exact Label value regions must carry (the Label's `alias` when it has one, as in Label Studio).
    phrases: detector text for it: `prompt` or `predicted_values` aliases when present, else the Label's `value`.
    controls: which controls carry it, in the order ("brush", "rectangle", "polygon").
    options: negative phrases, threshold, min_area, max_instances from the Label's attributes.
    """

    value: str
    phrases: tuple[str, ...]
    controls: tuple[ControlKind, ...]
    options: ClassOptions = ClassOptions()


@dataclass(frozen=True, slots=True)
class LabelConfig:
    """What this backend serves of a labeling config.

    image_name: the <Image> tag's name; image_key: the task-data key of its value (`$image` → "image").
    brush / rectangle / polygon: the first control of each kind pointing at that image, or None.
    labels: deduplicated by exact value, in config order (at least one).
    image_tag: the Choices/Taxonomy that tags which labels are present, or None.
    prompt: the <TextArea> on the image whose text replaces label prompts interactively, or None.
    smart: KeyPointLabels/RectangleLabels with smart="true" on the image (interactive SAM prompts).
    """

    image_name: str
    image_key: str
    brush: ControlRef | None
    rectangle: ControlRef | None
    labels: tuple[LabelSpec, ...]
    polygon: ControlRef | None = None
    image_tag: ImageTagControl | None = None
    prompt: ControlRef | None = None
    smart: tuple[ControlRef, ...] = ()


# Parsed configs by their text, bounded by the memory of the texts kept (Label Studio resends the same
# config with every request; distinct huge configs must not pile up).
PARSE_CACHE_BYTES = 32 * 2**20
_parsed: SizedLru[str, LabelConfig] = SizedLru(PARSE_CACHE_BYTES, max_items=256)


def parse_label_config(xml: str) -> LabelConfig:
    """Parse `xml` (cached, see PARSE_CACHE_BYTES).

    Raises LabelConfigError for malformed XML, no <Image>, no supported control pointing at an <Image>,
    an <Image> whose value is not a `$variable`, a served control without <Label>s, an invalid Label
    attribute, or a smart control with a label no served control has.
    """
    config = _parsed.get(xml)
    if config is None:
        config = _parse(xml)
        _parsed.put(xml, config, sys.getsizeof(xml))
    return config


def _parse(xml: str) -> LabelConfig:
    interface = _interface(xml)
    images = [tag for tag in (interface.objects or ()) if isinstance(tag, ImageTag)]
    if not images:
        raise LabelConfigError("the labeling config has no <Image> tag")
    for image in images:
        controls = _controls_for(interface, tag_name(image))
        if controls:
            return _build(xml, interface, image, controls)
    raise LabelConfigError(
        "no <BrushLabels>, <RectangleLabels> or <PolygonLabels> in the labeling config has toName pointing at "
        f"an <Image> (images: {', '.join(tag_name(image) for image in images)})"
    )


def _interface(xml: str) -> LabelInterface:
    if not xml.strip():
        raise LabelConfigError("the labeling config is empty")
    try:
        return LabelInterface(xml)
    # ValueError: lxml refuses str input carrying an <?xml encoding=...?> declaration.
    except (LabelStudioXMLSyntaxErrorSentryIgnored, ValueError) as exc:
        raise LabelConfigError(f"the labeling config is not valid XML: {exc}") from exc


def _points_at(control: ControlTag, image_name: str) -> bool:
    return image_name in (control.to_name or ())


def _controls_for(interface: LabelInterface, image_name: str) -> dict[ControlKind, ControlTag]:
    """The first control of each supported kind pointing at `image_name`, in document order."""
    found: dict[ControlKind, ControlTag] = {}
    for control in interface.controls or ():
        for kind, tag_type in _CONTROL_TYPES.items():
            if isinstance(control, tag_type) and _points_at(control, image_name) and kind not in found:
                found[kind] = control
    return found


def _build(
    xml: str, interface: LabelInterface, image: ImageTag, controls: dict[ControlKind, ControlTag]
) -> LabelConfig:
    if image.is_image_list or not image.value_is_variable:
        raise LabelConfigError(
            f'<Image name="{image.name}"> must take its value from the task, like value="$image" '
            f"(got {image.value!r}; image lists are not supported)"
        )
    image_name = tag_name(image)
    refs = {kind: ControlRef(from_name=tag_name(control), to_name=image_name) for kind, control in controls.items()}
    labels = _labels(controls)
    all_controls = list(interface.controls or ())
    values = [spec.value for spec in labels]
    return LabelConfig(
        image_name=image_name,
        image_key=image.value_name,
        brush=refs.get("brush"),
        rectangle=refs.get("rectangle"),
        polygon=refs.get("polygon"),
        labels=labels,
        image_tag=find_image_tag(xml, all_controls, image_name, values),
        prompt=next((ControlRef(tag_name(c), image_name) for c in all_controls if _is_prompt(c, image_name)), None),
        smart=_smart_controls(all_controls, image_name, set(values)),
    )


def _labels(controls: dict[ControlKind, ControlTag]) -> tuple[LabelSpec, ...]:
    """Labels of all `controls` in document order, merged by exact value."""
    merged: dict[str, LabelSpec] = {}
    for kind, control in controls.items():
        if not control.labels:
            raise LabelConfigError(f'<{control.tag} name="{control.name}"> has no <Label> children')
        for value in control.labels:
            attrs = (control.labels_attrs or {})[value].attr
            phrases, options = read_label_attrs(value, attrs, f'<{control.tag} name="{control.name}">')
            spec = LabelSpec(value=value, phrases=phrases, controls=(kind,), options=options)
            merged[value] = _merge(merged[value], spec) if value in merged else spec
    return tuple(merged.values())


def _merge(first: LabelSpec, second: LabelSpec) -> LabelSpec:
    """One label in several controls: phrases united (first seen first), controls in canonical order."""
    return LabelSpec(
        value=first.value,
        phrases=tuple(dict.fromkeys(first.phrases + second.phrases)),
        controls=tuple(kind for kind in _CONTROL_TYPES if kind in first.controls + second.controls),
        options=merge_options(first.options, second.options, first.value),
    )


def _is_prompt(control: ControlTag, image_name: str) -> bool:
    return isinstance(control, TextAreaTag) and _points_at(control, image_name)


def _smart_controls(controls: list[ControlTag], image_name: str, served: set[str]) -> tuple[ControlRef, ...]:
    """KeyPointLabels/RectangleLabels with smart="true" (or smartOnly) on the image; their labels must be served."""
    smart = []
    for control in controls:
        flags = (str((control.attr or {}).get(key, "")).lower() for key in ("smart", "smartOnly"))
        if not (isinstance(control, _SMART_TYPES) and _points_at(control, image_name) and "true" in flags):
            continue
        unknown = [value for value in control.labels or () if value not in served]
        if unknown:
            raise LabelConfigError(
                f'smart <{control.tag} name="{control.name}"> has labels no BrushLabels, RectangleLabels or '
                f"PolygonLabels on the image has: {', '.join(map(repr, unknown))}; a smart prompt's mask "
                "is returned with its label"
            )
        smart.append(ControlRef(tag_name(control), image_name))
    return tuple(smart)
