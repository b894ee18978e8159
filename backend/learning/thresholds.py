"""Per-label precision, recall and a suggested score threshold from reviewed objects.

Scores are threshold scores (reviews.py): the scores a per-label `threshold` cuts. Candidates are the reviewed
scores; a candidate s keeps the predictions scoring s or more. At s: true positives are the kept predictions at or
above s; false positives the deleted and relabelled-away ones at or above s; misses the reviewer's added objects
plus the kept predictions below s. Chosen: the candidate maximising F1, or with a target precision the lowest one
reaching it; ties go to the lower candidate. The pipeline keeps scores strictly above a threshold, written with
DECIMALS decimals, so the suggested threshold is placed below the chosen candidate: the midpoint between it and
the next lower candidate (the lowest: 10**-DECIMALS below it), rounded down to DECIMALS decimals. It keeps exactly
what the chosen candidate keeps (unless two candidates are closer than 2 * 10**-DECIMALS). Deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from backend.labelstudio.thresholds_xml import DECIMALS
from backend.learning.reviews import ReviewedObject

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class LabelReport:
    """What the reviews of one label say.

    reviewed: predictions reviewed (kept + relabelled + deleted). precision: kept / reviewed; recall:
    kept / (kept + missed); None when the denominator is 0. kept_scores / deleted_scores: sorted scores of the kept
    predictions and of the deleted or relabelled-away ones. suggested_threshold: None when too few reviews or none
    fits; `why` says which, in one line.
    """

    label: str
    reviewed: int
    kept: int
    relabelled: int
    deleted: int
    missed: int
    precision: float | None
    recall: float | None
    kept_scores: tuple[float, ...]
    deleted_scores: tuple[float, ...]
    suggested_threshold: float | None
    why: str


def label_reports(
    objects: Sequence[ReviewedObject], *, target_precision: float | None = None, min_reviews: int = 20
) -> tuple[LabelReport, ...]:
    """One report per label (predicted or missed), sorted by label. Raises ValueError for a target_precision
    outside (0, 1] or a negative min_reviews."""
    if target_precision is not None and not 0.0 < target_precision <= 1.0:
        raise ValueError(f"target_precision must be in (0, 1], got {target_precision!r}")
    if min_reviews < 0:
        raise ValueError(f"min_reviews must not be negative, got {min_reviews!r}")
    labels = sorted({obj.label for obj in objects})
    return tuple(
        _report(label, [o for o in objects if o.label == label], target_precision, min_reviews) for label in labels
    )


def curve(report: LabelReport, missed: int) -> tuple[FloatArray, FloatArray, FloatArray]:
    """(thresholds, precision, recall), each (N,): at each distinct reviewed score, ascending, with `missed`
    objects the predictions never found (recall 0 where there is nothing to find)."""
    thresholds, true_pos, false_pos = _counts(report)
    precision = true_pos / np.maximum(true_pos + false_pos, 1.0)  # every threshold keeps its own score's prediction
    recall = true_pos / max(len(report.kept_scores) + missed, 1)
    return thresholds, precision, recall


def _counts(report: LabelReport) -> tuple[FloatArray, FloatArray, FloatArray]:
    """(thresholds, true positives, false positives), each (N,), at each distinct reviewed score, ascending."""
    kept = np.sort(np.array(report.kept_scores, dtype=np.float64))
    deleted = np.sort(np.array(report.deleted_scores, dtype=np.float64))
    thresholds = np.unique(np.concatenate([kept, deleted]))
    true_pos = (kept.size - np.searchsorted(kept, thresholds, side="left")).astype(np.float64)
    false_pos = (deleted.size - np.searchsorted(deleted, thresholds, side="left")).astype(np.float64)
    return thresholds, true_pos, false_pos


def _report(label: str, objects: Sequence[ReviewedObject], target: float | None, min_reviews: int) -> LabelReport:
    counts = {outcome: sum(o.outcome == outcome for o in objects) for outcome in ("kept", "relabelled", "deleted")}
    missed = sum(o.outcome == "missed" for o in objects)
    reviewed = sum(counts.values())
    kept_scores = tuple(sorted(o.score for o in objects if o.outcome == "kept" and o.score is not None))
    deleted_scores = tuple(
        sorted(o.score for o in objects if o.outcome in ("deleted", "relabelled") and o.score is not None)
    )
    report = LabelReport(
        label=label,
        reviewed=reviewed,
        kept=counts["kept"],
        relabelled=counts["relabelled"],
        deleted=counts["deleted"],
        missed=missed,
        precision=counts["kept"] / reviewed if reviewed else None,
        recall=counts["kept"] / (counts["kept"] + missed) if counts["kept"] + missed else None,
        kept_scores=kept_scores,
        deleted_scores=deleted_scores,
        suggested_threshold=None,
        why="",
    )
    threshold, why = _suggest(report, target, min_reviews)
    return replace(report, suggested_threshold=threshold, why=why)


def _suggest(report: LabelReport, target: float | None, min_reviews: int) -> tuple[float | None, str]:
    if report.reviewed < max(min_reviews, 1):
        return None, f"only {report.reviewed} reviews (needs {max(min_reviews, 1)})"
    if not report.kept_scores:
        return None, f"none of its {report.reviewed} reviewed predictions was kept"
    thresholds, precision, recall = curve(report, report.missed)
    if target is None:
        true_pos, false_pos = _counts(report)[1:]
        # 2TP / (2TP + FP + FN) from counts: equal F1s are equal floats, so ties are exact. FN: missed + kept below t.
        f1 = 2 * true_pos / (2 * true_pos + false_pos + (report.missed + len(report.kept_scores) - true_pos))
        best = int(np.argmax(f1))  # the first maximum: the lowest threshold of a tie
        return _below(thresholds, best), f"maximises F1 ({f1[best]:.2f}) over {report.reviewed} reviews"
    reaching = np.flatnonzero(precision >= target)
    if reaching.size == 0:
        top = int(np.argmax(precision))
        return None, (
            f"precision {target:.2f} is unreachable: at best {precision[top]:.2f} (threshold {thresholds[top]:.2f})"
        )
    first = int(reaching[0])
    return _below(thresholds, first), (
        f"reaches precision {target:.2f} ({precision[first]:.2f}, recall {recall[first]:.2f}) over "
        f"{report.reviewed} reviews"
    )


def _below(candidates: FloatArray, chosen: int) -> float:
    """The threshold just below candidates[chosen] (ascending, distinct): see the module's doc. In [0, 1)."""
    step = 10.0**-DECIMALS
    score = float(candidates[chosen])
    lower = float(candidates[chosen - 1]) if chosen > 0 else score - 2 * step
    return max(0.0, round(math.floor((score + lower) / 2 / step) * step, DECIMALS))
