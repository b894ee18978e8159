"""Images of any shape through models built for ordinary ones: what is missing is padded at the bottom and
right, so pixel coordinates stay those of the image, and whatever lands in the padding is cut off again.

Grounding DINO picks its queries (900; 300 in the tests' tiny model) among the cells of its feature maps: an
image much wider than tall (4000x16: 1333x5 after the processor) has too few cells and the model raises
`selected index k out of range`; past ~1333:1 the processor itself resizes one side to 0 px. So an image
wider (or taller) than DETECTOR_MAX_ASPECT is first shrunk to at most DETECTOR_LONGEST px on its long side
(never enlarged; the processor shrinks it there anyway) and then padded with black to that aspect ratio.
SAM resizes the long side to its input size (1024 px; 256 in the tiny test model): past SAM_MAX_ASPECT the
short side would round to 0 px, so such an image is padded at full resolution to that ratio (a 20000x50 image
becomes 20000x79) and its masks are cut back to the image.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
from PIL import Image

DETECTOR_MAX_ASPECT = 4.0
DETECTOR_LONGEST = 1333  # Grounding DINO processors' longest edge
SAM_MAX_ASPECT = 256.0


def detector_input(image: Image.Image) -> tuple[Image.Image, tuple[float, float]]:
    """The image to give Grounding DINO's processor, and the size (width, height), in pixels of `image`,
    that the model's normalised boxes are relative to (larger than the image where it was padded)."""
    width, height = image.size
    if max(width, height) <= DETECTOR_MAX_ASPECT * min(width, height):
        return image, (float(width), float(height))
    scale = min(1.0, DETECTOR_LONGEST / max(width, height))
    small_w, small_h = max(1, round(width * scale)), max(1, round(height * scale))
    small = image.resize((small_w, small_h), Image.Resampling.BILINEAR) if scale < 1 else image
    padded_w = max(small_w, math.ceil(small_h / DETECTOR_MAX_ASPECT))
    padded_h = max(small_h, math.ceil(small_w / DETECTOR_MAX_ASPECT))
    canvas = Image.new("RGB", (padded_w, padded_h))
    canvas.paste(small, (0, 0))
    return canvas, (padded_w * width / small_w, padded_h * height / small_h)


def sam_input(pixels: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """`pixels` (H, W, 3) as SAM can take them: the array itself, or a copy padded with black at the bottom
    or right to SAM_MAX_ASPECT; masks of the copy's size are cut back to (H, W) by the caller."""
    height, width = pixels.shape[:2]
    padded_h = max(height, math.ceil(width / SAM_MAX_ASPECT))
    padded_w = max(width, math.ceil(height / SAM_MAX_ASPECT))
    if (padded_h, padded_w) == (height, width):
        return pixels
    canvas = np.zeros((padded_h, padded_w, *pixels.shape[2:]), dtype=pixels.dtype)
    canvas[:height, :width] = pixels
    return canvas
