"""Typed reads of label_studio_sdk tags: the SDK types a tag's `name` Optional, but LabelInterface only
collects tags that have one."""

from __future__ import annotations

from label_studio_sdk.label_interface.control_tags import ControlTag
from label_studio_sdk.label_interface.object_tags import ObjectTag

from backend.errors import LabelConfigError


def tag_name(tag: ControlTag | ObjectTag) -> str:
    """The tag's name attribute; LabelConfigError if it has none (LabelInterface never gives such a tag)."""
    if tag.name is None:
        raise LabelConfigError(f"a <{tag.tag}> tag in the labeling config has no name")
    return tag.name
