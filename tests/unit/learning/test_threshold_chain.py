"""From a review back to the detector: the threshold a report suggests for a label, written into the labeling
config and read back as that label's box threshold, keeps exactly the predictions the report counted above it.

The real chain: the tiny Grounding DINO's detections (random weights: any scores do), flow's objects,
build_prediction, compare_review, label_reports, thresholds_xml.with_thresholds, parse_label_config and the
detector's per-class box cut again.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from backend.flow import _to_object, text_classes
from backend.labelstudio.config import LabelConfig, parse_label_config
from backend.labelstudio.results import THRESHOLD_KEY, build_prediction
from backend.labelstudio.thresholds_xml import with_thresholds
from backend.learning.reviews import compare_review
from backend.learning.thresholds import label_reports
from backend.packed_mask import packed
from backend.pipeline.detector import GroundingDinoDetector
from backend.pipeline.negatives import build_class_plan
from backend.pipeline.types import Detection, DetectionThresholds, Instance
from tests.support.synthetic import random_image

W, H = 64, 48
XML = (
    '<View><Image name="img" value="$image"/><RectangleLabels name="box" toName="img">'
    '<Label value="Cat" prompt="cat"/><Label value="Wheelbarrow"/></RectangleLabels></View>'
)
# Every query kept (no NMS, no cap) so that the per-class box cut is the only filter.
LOW = DetectionThresholds(box=0.0, text=0.0, max_detections=100_000, nms_iou=1.0)


def _detect(detector: GroundingDinoDetector, config: LabelConfig) -> list[Detection]:
    plan = build_class_plan(text_classes(config), detector.prepare, LOW.box)
    with torch.inference_mode():
        return detector.detect(random_image(W, H), plan.prompt, LOW, plan.box_thresholds)


def _prediction(detections: list[Detection], config: LabelConfig) -> list[dict[str, Any]]:
    empty = packed(np.zeros((H, W), dtype=bool))
    instances = [Instance(detection, empty, mask_score=0.8) for detection in detections]
    objects = [_to_object(instance, text_classes(config)) for instance in instances]
    result: list[dict[str, Any]] = build_prediction(objects, config, W, H, "v1")["result"]
    return result


def test_an_applied_suggested_threshold_keeps_exactly_what_the_report_counted_above_it(
    detector: GroundingDinoDetector,
) -> None:
    config = parse_label_config(XML)
    detections = _detect(detector, config)
    predicted = _prediction(detections, config)
    cats = sorted((r for r in predicted if r["value"]["rectanglelabels"] == ["Cat"]), key=lambda r: r[THRESHOLD_KEY])
    assert len(cats) >= 6
    assert all(r[THRESHOLD_KEY] != r["score"] for r in cats)  # the review score is another number
    # The reviewer keeps the upper half of the cats and the lowest one, deletes the others.
    kept = [cats[0], *cats[len(cats) // 2 :]]
    annotated = [copy.deepcopy(r) for r in predicted if r not in cats or r in kept]
    reports = label_reports(compare_review(predicted, annotated, config, 0.5), min_reviews=1)
    (report,) = [r for r in reports if r.label == "Cat"]
    assert report.suggested_threshold is not None and report.reviewed == len(cats)
    # What the report counts: the predictions at or above its F1-best candidate (the lowest of a tie).
    scores = report.kept_scores + report.deleted_scores
    candidate = max(sorted(set(scores)), key=lambda t: _f1(report.kept_scores, report.deleted_scores, t))
    counted = sorted(d.box_xyxy for d in detections if d.class_index == 0 and d.threshold_score >= candidate)

    applied = parse_label_config(with_thresholds(XML, {"Cat": report.suggested_threshold}))
    assert applied.labels[0].options.threshold == report.suggested_threshold
    again = [d for d in _detect(detector, applied) if d.class_index == 0]
    assert counted and sorted(d.box_xyxy for d in again) == counted


def _f1(kept: tuple[float, ...], deleted: tuple[float, ...], threshold: float) -> float:
    true_pos = sum(s >= threshold for s in kept)
    false_pos = sum(s >= threshold for s in deleted)
    return 2 * true_pos / (2 * true_pos + false_pos + len(kept) - true_pos)
