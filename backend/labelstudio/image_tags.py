"""Image-level tags: a <Choices> or <Taxonomy> on the served image that names which labels are present.

A label maps to a choice by exact value (the Choice's `alias` when it has one, else its `value`, as Label
Studio stores it). In a <Taxonomy> the first matching node in document order wins, at any depth, and the
label is written as that node's path from the root, e.g. ["Animal", "Cat"]. Choices that match no label
are never predicted; a control none of whose choices matches a label is not served.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from label_studio_sdk.label_interface.control_tags import ChoicesTag, ControlTag, TaxonomyTag
from lxml import etree

from backend.labelstudio.sdk_tags import tag_name

TagKind = Literal["choices", "taxonomy"]


@dataclass(frozen=True, slots=True)
class ImageTagControl:
    """A Choices/Taxonomy control on the served image.

    paths: (label value, choice path) for every served label that has a choice, in label order; a
        Choices path has one element. single: a Choices without choice="multiple" (one choice at most).
    """

    from_name: str
    to_name: str
    kind: TagKind
    paths: tuple[tuple[str, tuple[str, ...]], ...]
    single: bool


def find_image_tag(
    xml: str, controls: Sequence[ControlTag], image_name: str, labels: Sequence[str]
) -> ImageTagControl | None:
    """The first Choices/Taxonomy in `controls` pointing at `image_name` with a choice for one of `labels`."""
    for control in controls:
        if not isinstance(control, ChoicesTag | TaxonomyTag) or image_name not in (control.to_name or ()):
            continue
        taxonomy = isinstance(control, TaxonomyTag)
        choices = _taxonomy_paths(xml, tag_name(control)) if taxonomy else [(value,) for value in control.labels or ()]
        paths = tuple((label, path) for label in labels if (path := _first_ending(choices, label)) is not None)
        if paths:
            return ImageTagControl(
                from_name=tag_name(control),
                to_name=image_name,
                kind="taxonomy" if taxonomy else "choices",
                paths=paths,
                single=isinstance(control, ChoicesTag) and not control.is_multiple_choice,
            )
    return None


def _first_ending(paths: Sequence[tuple[str, ...]], value: str) -> tuple[str, ...] | None:
    return next((path for path in paths if path[-1] == value), None)


def _taxonomy_paths(xml: str, name: str) -> list[tuple[str, ...]]:
    """Path of every <Choice> under <Taxonomy name=`name`>, depth-first in document order."""
    # Already parsed once by the SDK; parsed again here for the nesting, which the SDK flattens.
    root = etree.fromstring(xml, etree.XMLParser(resolve_entities=False, no_network=True))
    taxonomy = next(node for node in root.iter("Taxonomy") if node.get("name") == name)
    return list(_walk(taxonomy, ()))


def _walk(node: etree._Element, prefix: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
    for child in node.iterchildren("Choice"):
        value = child.get("alias") or child.get("value")
        if value is None:  # the SDK skips such a Choice too
            continue
        path = (*prefix, value)
        yield path
        yield from _walk(child, path)
