"""The review overlay: masks tinted, boxes and labels drawn, the input left untouched."""

from __future__ import annotations

import numpy as np
from PIL import Image

from backend.pipeline.overlay import draw_overlay
from backend.pipeline.types import Detection, Instance

GREY = (128, 128, 128)


def instance(box: tuple[float, float, float, float], class_index: int, shape: tuple[int, int]) -> Instance:
    mask = np.zeros(shape, dtype=bool)
    x1, y1, x2, y2 = map(int, box)
    mask[y1:y2, x1:x2] = True
    return Instance(Detection(box, 0.87, class_index), mask, 0.9)


def test_masks_boxes_and_labels_are_drawn_on_a_copy() -> None:
    image = Image.new("RGB", (160, 120), GREY)
    instances = [instance((10, 30, 70, 100), 0, (120, 160)), instance((90, 40, 150, 110), 1, (120, 160))]

    drawn = draw_overlay(image, instances, ["Cat", "Traffic light"])

    pixels = np.asarray(drawn)
    assert drawn.mode == "RGB" and drawn.size == image.size
    assert np.asarray(image).tolist() == np.full((120, 160, 3), 128).tolist()  # input untouched
    assert (pixels[60, 40] != GREY).any() and (pixels[60, 120] != GREY).any()  # inside each mask
    assert not (pixels[60, 40] == pixels[60, 120]).all()  # classes get different colours
    assert (pixels[5, 80] == GREY).all()  # outside every instance
    assert (pixels[15:30, 10:40] < 64).all(axis=-1).any()  # dark label text just above the box's top-left


def test_a_label_at_the_top_edge_goes_inside_the_box() -> None:
    image = Image.new("RGB", (160, 120), GREY)

    pixels = np.asarray(draw_overlay(image, [instance((10, 0, 70, 100), 0, (120, 160))], ["Cat"]))

    assert (pixels[0:12, 10:40] < 64).all(axis=-1).any()


def test_no_instances_leave_the_image_as_it_was() -> None:
    image = Image.new("RGB", (64, 48), GREY)

    assert np.array_equal(np.asarray(draw_overlay(image, [], ["Cat"])), np.asarray(image))


def test_the_label_shows_the_review_score_the_prediction_json_carries() -> None:
    """Detector 0.81 with SAM 1.0 and detector 0.9 with SAM 0.9 have the same review score (0.90): the same
    picture; detector 0.9 with SAM 0.5 (review score 0.67) is labelled differently."""
    image = Image.new("RGB", (160, 120), GREY)

    def drawn(detector: float, sam: float) -> np.ndarray:
        mask = np.zeros((120, 160), dtype=bool)
        mask[30:100, 10:70] = True
        candidate = Instance(Detection((10, 30, 70, 100), detector, 0), mask, sam)
        return np.asarray(draw_overlay(image, [candidate], ["Cat"]))

    assert Instance(Detection((10, 30, 70, 100), 0.81, 0), np.zeros((120, 160), bool), 1.0).score == 0.9
    assert np.array_equal(drawn(0.81, 1.0), drawn(0.9, 0.9))
    assert not np.array_equal(drawn(0.9, 0.9), drawn(0.9, 0.5))
