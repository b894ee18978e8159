"""label_reports: per-label counts, precision, recall and the suggested threshold, on hand-computed cases."""

from __future__ import annotations

import random

import numpy as np
import pytest

from backend.labelstudio.thresholds_xml import threshold_text
from backend.learning.reviews import ReviewedObject
from backend.learning.thresholds import LabelReport, curve, label_reports


def _objects(label: str, kept: list[float], deleted: list[float], missed: int = 0) -> list[ReviewedObject]:
    return [
        *(ReviewedObject(label, "kept", score) for score in kept),
        *(ReviewedObject(label, "deleted", score) for score in deleted),
        *(ReviewedObject(label, "missed", None) for _ in range(missed)),
    ]


# cat: 4 kept, 3 deleted, 1 relabelled away, 2 missed. At each threshold (TP, FP, FN) and F1 = 2TP/(2TP+FP+FN):
# 0.2 (4,4,2) 8/14 · 0.3 (4,3,2) 8/13 · 0.4 (3,3,3) 6/12 · 0.5 (3,2,3) 6/11 · 0.6 (2,2,4) 4/10 · 0.7 (2,1,4) 4/9
# · 0.8 (2,0,4) 4/8 · 0.9 (1,0,5) 2/7: the best is 0.3. Precision: 4/8 4/7 3/6 3/5 2/4 2/3 2/2 1/1.
CAT = [
    *_objects("cat", [0.9, 0.8, 0.5, 0.3], [0.7, 0.4, 0.2], missed=2),
    ReviewedObject("cat", "relabelled", 0.6, "dog"),
]


def _one(objects: list[ReviewedObject], **options: object) -> LabelReport:
    (report,) = label_reports(objects, min_reviews=1, **options)  # type: ignore[arg-type]
    return report


def test_counts_precision_recall_and_the_threshold_maximising_f1() -> None:
    report = _one(CAT)
    assert (report.label, report.reviewed, report.kept, report.relabelled, report.deleted, report.missed) == (
        "cat",
        8,
        4,
        1,
        3,
        2,
    )
    assert report.precision == pytest.approx(4 / 8) and report.recall == pytest.approx(4 / 6)
    assert report.kept_scores == (0.3, 0.5, 0.8, 0.9)
    assert report.deleted_scores == (0.2, 0.4, 0.6, 0.7)  # the relabelled-away prediction included
    assert report.suggested_threshold == 0.25  # F1 is best at 0.3: halfway down to the next reviewed score, 0.2
    assert report.why == "maximises F1 (0.62) over 8 reviews"


def test_curve_gives_precision_and_recall_at_each_reviewed_score() -> None:
    thresholds, precision, recall = curve(_one(CAT), missed=2)
    np.testing.assert_allclose(thresholds, [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    np.testing.assert_allclose(precision, [4 / 8, 4 / 7, 3 / 6, 3 / 5, 2 / 4, 2 / 3, 1, 1])
    np.testing.assert_allclose(recall, [4 / 6, 4 / 6, 3 / 6, 3 / 6, 2 / 6, 2 / 6, 2 / 6, 1 / 6])


@pytest.mark.parametrize(("target", "threshold"), [(0.75, 0.75), (0.6, 0.45), (0.5, 0.199999), (1.0, 0.75)])
def test_a_target_precision_picks_the_lowest_threshold_reaching_it(target: float, threshold: float) -> None:
    report = _one(CAT, target_precision=target)
    assert report.suggested_threshold == threshold
    assert report.why.startswith(f"reaches precision {target:.2f}")


def test_an_unreachable_target_precision_suggests_nothing_and_says_why() -> None:
    report = _one(_objects("dog", [0.5], [0.9, 0.6]), target_precision=0.5)
    assert report.suggested_threshold is None
    assert report.why == "precision 0.50 is unreachable: at best 0.33 (threshold 0.50)"


def test_too_few_reviews_suggest_nothing() -> None:
    (report,) = label_reports(CAT)
    assert (report.suggested_threshold, report.why) == (None, "only 8 reviews (needs 20)")
    assert report.precision == pytest.approx(0.5)  # the figures are still reported


def test_a_tie_goes_to_the_lower_threshold() -> None:
    # F1 at 0.2: 2*3/(6+2+1) = 2/3; at 0.6: 2*2/(4+0+2) = 2/3; in between and above it is lower.
    report = _one(_objects("cat", [0.2, 0.6, 0.8], [0.4, 0.5], missed=1))
    assert report.suggested_threshold == 0.199999  # 0.2, the lowest reviewed score, less 10**-6


def _brute_force_candidate(kept: list[float], deleted: list[float], missed: int, target: float | None) -> float:
    """The reviewed score the module's doc chooses, by counting at every candidate (keeping scores >= it)."""
    best: tuple[float, float] | None = None
    for candidate in sorted(set(kept + deleted)):
        true_pos = sum(score >= candidate for score in kept)
        false_pos = sum(score >= candidate for score in deleted)
        if target is not None:
            if true_pos / max(true_pos + false_pos, 1) >= target:
                return candidate
            continue
        f1 = 2 * true_pos / (2 * true_pos + false_pos + missed + len(kept) - true_pos)
        if best is None or f1 > best[0]:
            best = (f1, candidate)
    assert best is not None
    return best[1]


@pytest.mark.parametrize("seed", range(20))
def test_the_suggestion_written_and_cut_strictly_above_keeps_what_its_candidate_keeps(seed: int) -> None:
    draw = random.Random(seed)
    kept = [round(draw.random(), 3) for _ in range(draw.randint(1, 12))]
    deleted = [round(draw.random(), 3) for _ in range(draw.randint(0, 12))]
    missed = draw.randint(0, 3)
    for target in (None, 0.5):
        report = _one(_objects("cat", kept, deleted, missed), target_precision=target)
        if report.suggested_threshold is None:
            continue
        written = float(threshold_text(report.suggested_threshold))
        assert written == report.suggested_threshold
        candidate = _brute_force_candidate(kept, deleted, missed, target)
        scores = kept + deleted
        assert [score > written for score in scores] == [score >= candidate for score in scores]


def test_labels_without_kept_predictions_or_without_predictions() -> None:
    only_missed, deleted = label_reports(
        [*_objects("dog", [], [0.5, 0.7]), *_objects("bird", [], [], missed=3)], min_reviews=1
    )
    assert (only_missed.label, only_missed.reviewed, only_missed.precision, only_missed.recall) == (
        "bird",
        0,
        None,
        0.0,
    )
    assert (only_missed.suggested_threshold, only_missed.why) == (None, "only 0 reviews (needs 1)")
    assert (deleted.label, deleted.precision, deleted.recall, deleted.suggested_threshold) == ("dog", 0.0, None, None)
    assert deleted.why == "none of its 2 reviewed predictions was kept"


def test_reports_are_sorted_by_label_and_do_not_depend_on_order() -> None:
    objects = [*CAT, *_objects("ant", [0.4], [0.3]), *_objects("zebra", [0.9], [])]
    shuffled = list(objects)
    random.Random(7).shuffle(shuffled)
    reports = label_reports(objects, min_reviews=1)
    assert [report.label for report in reports] == ["ant", "cat", "zebra"]
    assert label_reports(shuffled, min_reviews=1) == reports


@pytest.mark.parametrize("options", [{"target_precision": 0.0}, {"target_precision": 1.5}, {"min_reviews": -1}])
def test_bad_options_raise_value_error(options: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        label_reports(CAT, **options)  # type: ignore[arg-type]
