"""Labeling configs built from a plain label list (for the local `predict` command)."""

from __future__ import annotations

from collections.abc import Sequence
from xml.sax.saxutils import quoteattr


def config_for_labels(labels: Sequence[str]) -> str:
    """An Image + BrushLabels + RectangleLabels config with `labels`, exactly as given, in both controls."""
    tags = "".join(f"<Label value={quoteattr(label)}/>" for label in labels)
    return (
        '<View><Image name="image" value="$image"/>'
        f'<BrushLabels name="mask" toName="image">{tags}</BrushLabels>'
        f'<RectangleLabels name="box" toName="image">{tags}</RectangleLabels>'
        "</View>"
    )


def parse_label_list(text: str) -> list[str]:
    """ "cat, traffic light,,dog" → ["cat", "traffic light", "dog"] (order kept, blanks and repeats dropped)."""
    labels: list[str] = []
    for part in text.split(","):
        label = part.strip()
        if label and label not in labels:
            labels.append(label)
    return labels
