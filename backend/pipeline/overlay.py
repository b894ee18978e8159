"""A picture of instances on their image, for people checking what the pipeline found."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from backend.packed_mask import packed
from backend.pipeline.types import Instance

MASK_ALPHA = 110  # of 255: the image stays visible under the masks
# Distinct, saturated colours; class i uses PALETTE[i % len(PALETTE)].
PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40),
)  # fmt: skip


def draw_overlay(image: Image.Image, instances: Sequence[Instance], class_names: Sequence[str]) -> Image.Image:
    """A new RGB image: `image` with each instance's translucent mask, box outline, and "name score" label.

    Masks must be (H, W) of `image`; boxes are xyxy pixels of it; class_names is indexed by class_index. The score
    is the instance's review score (`Instance.score`), the one its regions carry in the prediction JSON.
    """
    tint = np.zeros((image.height, image.width, 4), dtype=np.uint8)
    for instance in instances:
        mask = packed(instance.mask)
        if mask.box is not None:
            left, top, right, bottom = mask.box
            tint[top:bottom, left:right][mask.crop()] = (*_colour(instance), MASK_ALPHA)
    canvas = Image.alpha_composite(image.convert("RGBA"), Image.fromarray(tint))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for instance in instances:
        detection = instance.detection
        draw.rectangle(detection.box_xyxy, outline=_colour(instance), width=2)
        text = f"{class_names[detection.class_index]} {instance.score:.2f}"
        box_left, box_top = detection.box_xyxy[:2]
        height = font.getbbox(text)[3]
        origin = (box_left, box_top - height if box_top >= height else box_top)  # above the box where it fits
        draw.rectangle(draw.textbbox(origin, text, font=font), fill=_colour(instance))
        draw.text(origin, text, fill=(0, 0, 0), font=font)
    return canvas.convert("RGB")


def _colour(instance: Instance) -> tuple[int, int, int]:
    return PALETTE[instance.detection.class_index % len(PALETTE)]
