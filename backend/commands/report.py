"""The `report` command: what the reviews in Label Studio taught about each label, and (--apply) acting on it.

It reads the reviewed objects the backend recorded from Label Studio's annotation events (ReviewStore, in
REDIS_URL) for one model version of a project (the newest with reviews unless --model-version), prints per
label the counts, precision, recall, kept vs deleted score quartiles and a suggested threshold
(backend.learning.thresholds), and with --plot writes each label's precision/recall-vs-threshold chart.
--apply writes the suggestions into the project's labeling config in Label Studio as the Labels' `threshold`
attributes (visible and reversible under Settings → Labeling Interface), which changes model_version:
`prelabel` then re-labels the tasks nobody has annotated yet. Labels with too few reviews are left alone.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from redis.exceptions import RedisError

from backend.errors import QueueUnavailableError, StudioNotConfiguredError
from backend.labelstudio.config import parse_label_config
from backend.labelstudio.thresholds_xml import threshold_text, with_thresholds
from backend.learning.thresholds import LabelReport, label_reports
from backend.lsclient import LabelStudioApi
from backend.queueing.connection import api_connection
from backend.queueing.reviews import ReviewStore
from backend.settings import Settings

_QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True, slots=True)
class ReportOptions:
    """The command's options; min_reviews None: REVIEW_MIN_REVIEWS."""

    project: int
    model_version: str | None = None
    target_precision: float | None = None
    min_reviews: int | None = None
    plot: Path | None = None
    apply: bool = False


def report(settings: Settings, options: ReportOptions) -> int:
    """Print the report (stdout), write the plot, apply the thresholds; the exit code (1: nothing to report).

    Raises QueueUnavailableError when Redis cannot be read, LabelStudioApiError when Label Studio refuses.
    """
    if not settings.redis_url:
        return _fail(
            "report reads the reviews the backend recorded in Redis: set REDIS_URL to the Redis its workers use "
            "(`serve` without REDIS_URL keeps them in its embedded Redis, which only it can reach)"
        )
    store = ReviewStore(api_connection(settings.redis_url), settings.queue_name, settings.review_max_annotations)
    try:
        versions = store.versions(options.project)
        version = options.model_version or (versions[0] if versions else None)
        if version is None or version not in versions:
            return _fail(_nothing_recorded(options.project, version, versions))
        objects = store.objects(options.project, version)
        annotations = store.annotations(options.project, version)
    except (RedisError, OSError) as exc:
        raise QueueUnavailableError(f"cannot read the reviews from Redis: {exc}") from exc
    if not objects:
        return _fail(_nothing_recorded(options.project, version, versions))
    min_reviews = options.min_reviews or settings.review_min_reviews
    reports = label_reports(objects, target_precision=options.target_precision, min_reviews=min_reviews)
    print(
        f"project {options.project}, model version {version}: {len(objects)} reviewed objects "
        f"from {annotations} annotations"
    )
    print("\n".join(line for each in reports for line in report_lines(each)))
    if options.plot is not None and (code := _plot(reports, options.plot)) != 0:
        return code
    if options.apply:
        print("\n".join(apply_thresholds(_studio(settings), options.project, reports)))
    return 0


def report_lines(label: LabelReport) -> list[str]:
    """One label's part of the report: counts, precision/recall, score quartiles, the suggestion or why none."""
    lines = [
        f"{label.label}: {label.reviewed} reviewed predictions: kept {label.kept}, relabelled {label.relabelled}, "
        f"deleted {label.deleted}; missed {label.missed}",
        f"  precision {_ratio(label.precision)}, recall {_ratio(label.recall)}",
        f"  scores kept:    {distribution(label.kept_scores)}",
        f"  scores deleted: {distribution(label.deleted_scores)}"
        + (" (relabelled away included)" * bool(label.relabelled)),
    ]
    if label.suggested_threshold is None:
        lines.append(f"  left alone: {label.why}")
    else:
        lines.append(f"  suggested threshold {threshold_text(label.suggested_threshold)}: {label.why}")
    return lines


def distribution(scores: Sequence[float]) -> str:
    """ "n 5: min 0.31, q1 0.40, median 0.52, q3 0.61, max 0.80", or "none"."""
    if not scores:
        return "none"
    low, q1, median, q3, high = np.quantile(np.asarray(scores, dtype=np.float64), _QUANTILES)
    return f"n {len(scores)}: min {low:.2f}, q1 {q1:.2f}, median {median:.2f}, q3 {q3:.2f}, max {high:.2f}"


def apply_thresholds(studio: LabelStudioApi, project: int, reports: Sequence[LabelReport]) -> list[str]:
    """Write each suggested threshold into the project's labeling config; lines saying old → new per label.

    Labels the config no longer has are left out (said so); with no suggestion nothing is written.
    """
    xml = studio.label_config(project)
    current = {spec.value: spec.options.threshold for spec in parse_label_config(xml).labels}
    suggested = {r.label: r.suggested_threshold for r in reports if r.suggested_threshold is not None}
    applied = {label: threshold for label, threshold in suggested.items() if label in current}
    lines = [
        f"  {label}: not in the project's labeling config any more, left out"
        for label in suggested.keys() - current.keys()
    ]
    if not applied:
        return [*lines, "nothing applied: no label of the labeling config has a suggested threshold"]
    studio.set_label_config(project, with_thresholds(xml, applied))
    lines += [
        f"  {label}: threshold {_old(current[label])} → {threshold_text(threshold)}"
        for label, threshold in sorted(applied.items())
    ]
    return [
        f"applied to project {project}'s labeling config (its model_version changes; `grounded-sam prelabel "
        f"--project {project}` re-labels the tasks nobody has annotated yet):",
        *lines,
    ]


def _nothing_recorded(project: int, version: str | None, versions: Sequence[str]) -> str:
    if not versions:
        return (
            f"no reviews recorded for project {project}: they are learned from the annotations submitted while the "
            "backend is connected to the project (Label Studio's webhook), on tasks it pre-labelled"
        )
    return f"no reviews recorded for model version {version} of project {project} (with reviews: {', '.join(versions)})"


def _plot(reports: Sequence[LabelReport], path: Path) -> int:
    from backend.learning.plot import write_plot  # matplotlib: only when asked

    try:
        write_plot(reports, path)
    except OSError as exc:
        return _fail(f"--plot {path}: cannot write ({exc.strerror or exc})")
    print(f"plot written to {path}")
    return 0


def _studio(settings: Settings) -> LabelStudioApi:
    if not (settings.label_studio_url and settings.label_studio_api_key):
        raise StudioNotConfiguredError(
            "--apply writes the project's labeling config in Label Studio: "
            "set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY"
        )
    return LabelStudioApi(settings.label_studio_url, settings.label_studio_api_key, settings.label_studio_timeout)


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _old(threshold: float | None) -> str:
    return "unset (BOX_THRESHOLD)" if threshold is None else threshold_text(threshold)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1
