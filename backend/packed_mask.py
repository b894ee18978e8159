"""A mask as its pixels' bounding box, bit-packed: what a full-resolution mask costs to keep. numpy/OpenCV only,
shared by the model pipeline (which makes them) and the Label Studio format (which encodes them).

A 48 MP image's mask is 48 MB as a bool (H, W) array and 192 MB as the float32 that upsampling makes; 100 of
them do not fit a worker. `PackedMask` holds only the rows and columns between the mask's first and last
pixels, 8 pixels a byte (np.packbits along each row): an object covering a tenth of the image costs a
hundredth of its bool mask, a mask covering all of it an eighth. Every step after SAM (cleanup, filters,
deduplication, RLE, polygons, rectangles, overlay) reads it directly, unpacking at most one crop at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import cv2
import numpy as np
import numpy.typing as npt


@dataclass(frozen=True, slots=True, eq=False)
class PackedMask:
    """A bool mask of an image of `height` x `width` pixels, stored as its tight bounding-box crop.

    top, left: the crop's offset in the image (0, 0 when the mask is empty).
    bits: np.packbits of the bool (rows, cols) crop along each row, (rows, ceil(cols / 8)) uint8; (0, 0) when empty.
    cols: the crop's width in pixels (the packed rows are padded to whole bytes). area: its pixel count.
    The crop is tight: its first and last row and column each hold at least one pixel of the mask.
    """

    height: int
    width: int
    top: int
    left: int
    cols: int
    area: int
    bits: npt.NDArray[np.uint8] = field(repr=False)

    def __eq__(self, other: object) -> bool:
        """The same mask of the same image size (the bits compared too)."""
        if not isinstance(other, PackedMask):
            return NotImplemented
        same = (self.height, self.width, self.top, self.left, self.cols, self.area)
        return same == (other.height, other.width, other.top, other.left, other.cols, other.area) and np.array_equal(
            self.bits, other.bits
        )

    __hash__ = None  # type: ignore[assignment]  # holds an array: not hashable

    @classmethod
    def of(cls, mask: npt.NDArray[np.bool_]) -> PackedMask:
        """The packed form of a bool (H, W) mask."""
        if mask.ndim != 2:
            raise ValueError(f"mask must be a bool HxW array, got shape {mask.shape}")
        height, width = mask.shape
        return cls.from_window(mask, 0, 0, (height, width))

    @classmethod
    def from_window(cls, window: npt.NDArray[np.bool_], top: int, left: int, shape: tuple[int, int]) -> PackedMask:
        """The mask of an image of `shape` (H, W) that is `window` (bool (h, w), at offset top, left) and
        empty elsewhere; the window need not be tight (it is trimmed to its pixels' bounding box)."""
        x, y, cols, rows = cv2.boundingRect(np.ascontiguousarray(window).view(np.uint8)) if window.size else (0,) * 4
        if cols == 0:
            return cls.empty(shape)
        crop = window[y : y + rows, x : x + cols]
        area = int(np.count_nonzero(crop))
        return cls(int(shape[0]), int(shape[1]), top + y, left + x, cols, area, np.packbits(crop, axis=1))

    @classmethod
    def empty(cls, shape: tuple[int, int]) -> PackedMask:
        """No pixels, on an image of `shape` (H, W)."""
        return cls(int(shape[0]), int(shape[1]), 0, 0, 0, 0, np.zeros((0, 0), np.uint8))

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of the image, as a full mask's shape."""
        return self.height, self.width

    @property
    def rows(self) -> int:
        """The crop's height in pixels."""
        return len(self.bits)

    @property
    def box(self) -> tuple[int, int, int, int] | None:
        """xyxy of the crop in pixels, right and bottom exclusive; None when the mask is empty."""
        return None if self.area == 0 else (self.left, self.top, self.left + self.cols, self.top + self.rows)

    @property
    def nbytes(self) -> int:
        """Bytes of mask data held."""
        return self.bits.nbytes

    def crop(self) -> npt.NDArray[np.bool_]:
        """The bool (rows, cols) crop."""
        return np.unpackbits(self.bits, axis=1, count=self.cols).view(np.bool_)

    def window(self, top: int, left: int, bottom: int, right: int) -> npt.NDArray[np.bool_]:
        """The bool (bottom - top, right - left) part of the full mask in rows [top, bottom), columns
        [left, right) of the image (a rectangle inside it); only that part is unpacked."""
        out = np.zeros((max(bottom - top, 0), max(right - left, 0)), dtype=bool)
        y0, y1 = max(top, self.top), min(bottom, self.top + self.rows)
        x0, x1 = max(left, self.left), min(right, self.left + self.cols)
        if y0 >= y1 or x0 >= x1:
            return out
        first, last = (x0 - self.left) // 8, (x1 - self.left + 7) // 8  # the bytes holding columns x0..x1
        unpacked = np.unpackbits(self.bits[y0 - self.top : y1 - self.top, first:last], axis=1).view(np.bool_)
        start = x0 - self.left - 8 * first
        out[y0 - top : y1 - top, x0 - left : x1 - left] = unpacked[:, start : start + x1 - x0]
        return out

    def clipped(self, height: int, width: int) -> PackedMask:
        """This mask on the image's top-left `height` x `width` pixels (an image padded at its bottom and right
        and the padding cut off again)."""
        if self.box is None:
            return PackedMask.empty((height, width))
        left, top, right, bottom = self.box
        if right <= width and bottom <= height:
            return replace(self, height=height, width=width)
        part = self.window(top, left, min(bottom, height), min(right, width))
        return PackedMask.from_window(part, top, left, (height, width))

    def to_array(self) -> npt.NDArray[np.bool_]:
        """The full bool (H, W) mask (tests and small images: it costs H x W bytes)."""
        return self.window(0, 0, self.height, self.width)

    def runs(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Painted runs of the full mask in row-major order: start and end (exclusive) flat pixel indexes,
        sorted, neither overlapping nor touching; computed from the crop, row by row."""
        if self.area == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        crop = self.crop()
        edges = np.diff(np.pad(crop, ((0, 0), (1, 1))).view(np.int8), axis=1)  # +1 at a run's start, -1 past its end
        rows, starts = np.nonzero(edges == 1)
        _, ends = np.nonzero(edges == -1)  # same row-major order, one end per start
        base = (rows.astype(np.int64) + self.top) * self.width + self.left
        starts, ends = base + starts, base + ends
        # A run ending at the image's right edge continues on the next row when that row's run starts at column 0.
        joined = np.flatnonzero(ends[:-1] == starts[1:])
        return np.delete(starts, joined + 1), np.delete(ends, joined)


Mask = PackedMask | npt.NDArray[np.bool_]


def packed(mask: Mask) -> PackedMask:
    """`mask` as a PackedMask (a bool (H, W) array is packed; a PackedMask is returned as is)."""
    return mask if isinstance(mask, PackedMask) else PackedMask.of(mask)


def stacked(masks: Sequence[PackedMask], shape: tuple[int, int]) -> npt.NDArray[np.bool_]:
    """The bool (N, H, W) array of N masks of an image of `shape` (H, W): N x H x W bytes, for tests and tools."""
    return np.stack([mask.to_array() for mask in masks]) if masks else np.zeros((0, *shape), dtype=bool)
