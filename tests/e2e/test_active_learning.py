"""The active-learning loop against a real Label Studio: pre-label, review, report, --apply, re-label the rest.

A user pre-labels a project of TASKS synthetic images (`prelabel`, tiny random models), connects the backend as an
ML backend and reviews ANNOTATED of the tasks. Connecting is all it takes for the events to arrive: Label Studio
creates a webhook to <backend>/webhook by itself when an ML backend is connected (label_studio/ml/models.py,
create_ml_webhook: send_for_all_actions, with payload); nothing is created through /api/webhooks here, and the test
checks that webhook exists. The reviews are submitted through the API in a known pattern built from the stored
predictions: per label, the better-scoring half of its predicted objects is kept (rectangles copied as predicted), the
next one relabelled (the same rectangle with another label), the rest deleted (left out); the first two reviewed
tasks also get a small rectangle the backend missed. Label Studio's webhook delivers the annotation events, the
backend records what reviewers did, and `report` (a subprocess, as a user runs it) must say the counts and
suggested thresholds computed here by hand (`suggestion`: just below the reviewed score of best F1, since the
pipeline keeps scores strictly above a threshold). Scores are the threshold scores build_prediction writes as an
extra key of each region, which Label Studio keeps (the tiny random detector's box scores are often all 1.0).
`report --apply` writes them into the project's labeling config (model_version changes) and `prelabel` then
re-labels only the tasks nobody annotated.
"""

from __future__ import annotations

import math
import re
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from redis import Redis

from backend.labelstudio.config import parse_label_config
from backend.labelstudio.results import THRESHOLD_KEY
from backend.labelstudio.thresholds_xml import threshold_text
from backend.queueing.reviews import ReviewStore
from tests.e2e.backends import setup_model_version
from tests.e2e.bulk import ScaledBackend, bulk_images, finish, said, scaled_environment, url_project, wait_for
from tests.e2e.flows import REPO, Project, predictions_by_task
from tests.e2e.labelstudio import LabelStudio
from tests.support.images import ImageServer
from tests.support.processes import Processes

# Rectangles: the tiny random SAM draws near-identical masks for different objects, which would make which copied
# region matches which prediction a tie; the detector's boxes differ.
CONFIG = REPO / "label_config" / "rectangle.xml"
TASKS = 6
ANNOTATED = 4  # the first ANNOTATED tasks (in Label Studio's order) are reviewed, the others left untouched
MISSED_ON = 2  # the first MISSED_ON reviewed tasks get one region the backend missed
REVIEWS_TIMEOUT_S = 240.0
# A missed object: a rectangle of this many percent in one corner, where no predicted box overlaps it much.
MISSED_SIDE = 4.0


@dataclass(frozen=True)
class PredictedObject:
    """One predicted object of a task: its regions (brush and rectangle), label and threshold score."""

    task: int
    index: str
    label: str
    score: float
    regions: tuple[dict[str, Any], ...]


@pytest.fixture()
def backend(
    label_studio: LabelStudio, redis_url: str, tiny_detector_dir: Path, tiny_hf_sam_dir: Path, tmp_path: Path
) -> Iterator[ScaledBackend]:
    """`serve` (API only) and one worker on the session's Redis, which `report` reads (REDIS_URL); the user's
    legacy token as LABEL_STUDIO_API_KEY."""
    processes = Processes(tmp_path)
    token = label_studio.credentials.legacy_token
    env = scaled_environment(label_studio.url, token, tiny_detector_dir, tiny_hf_sam_dir, redis_url, 4)
    env.update(OMP_NUM_THREADS="1", MAX_DETECTIONS="4")
    scaled = ScaledBackend(processes, env)
    scaled.start(workers=1)
    yield scaled
    processes.stop_all()


def predicted_objects(prediction: dict[str, Any]) -> list[PredictedObject]:
    """The prediction's objects: regions grouped by the object index of their id ("<i>-rect"); no two alike."""
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for region in prediction["result"]:
        grouped[str(region["id"]).split("-", 1)[0]].append(region)
    objects = []
    for index, regions in grouped.items():
        labels = {label for region in regions for label in region["value"][region["type"]]}
        assert len(labels) == 1, regions
        objects.append(
            PredictedObject(
                int(prediction["task"]), index, labels.pop(), max(r[THRESHOLD_KEY] for r in regions), tuple(regions)
            )
        )
    boxes = [tuple(r["value"][key] for key in ("x", "y", "width", "height")) for obj in objects for r in obj.regions]
    assert len(set(boxes)) == len(boxes), f"two objects of task {prediction['task']} have one box: {objects}"
    return objects


def review_pattern(objects: list[PredictedObject]) -> dict[tuple[int, str], str]:
    """(task, object index) → "kept" / "relabelled" / "deleted": per label, by score from the best, the first half
    (rounded up) kept, the next one relabelled, the rest deleted."""
    outcomes = {}
    by_label: dict[str, list[PredictedObject]] = defaultdict(list)
    for obj in objects:
        by_label[obj.label].append(obj)
    for same in by_label.values():
        ranked = sorted(same, key=lambda o: -o.score)
        kept = math.ceil(len(ranked) / 2)
        for rank, obj in enumerate(ranked):
            outcome = "kept" if rank < kept else "relabelled" if rank == kept else "deleted"
            outcomes[obj.task, obj.index] = outcome
    return outcomes


def relabelled(regions: tuple[dict[str, Any], ...], label: str) -> list[dict[str, Any]]:
    return [{**region, "value": {**region["value"], region["type"]: [label]}} for region in regions]


def without_score(region: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in region.items() if key not in ("score", THRESHOLD_KEY)}


def suggestion(kept: list[float], lower: list[float], missed: int) -> float:
    """The threshold the report suggests, by hand: the reviewed score with the best F1 (the lowest of a tie; scores
    at or above it kept), then halfway down to the next lower reviewed score (none: 10**-6 below it), rounded down
    to 6 decimals."""

    def f1(threshold: float) -> float:
        true_pos = sum(score >= threshold for score in kept)
        false_pos = sum(score >= threshold for score in lower)
        return 2 * true_pos / (2 * true_pos + false_pos + missed + len(kept) - true_pos)

    scores = sorted(set(kept + lower))
    best = max(scores, key=f1)
    step = 1e-6
    below = max((score for score in scores if score < best), default=best - 2 * step)
    return max(0.0, round(math.floor((best + below) / 2 / step) * step, 6))


def missed_rectangle(predicted: list[PredictedObject], label: str, size: tuple[int, int]) -> dict[str, Any]:
    """A small rectangle in the corner farthest from every predicted box (so it matches none of them)."""
    boxes = [r["value"] for obj in predicted for r in obj.regions if r["type"] == "rectanglelabels"]
    corners = [(0.5, 0.5), (100 - MISSED_SIDE - 0.5, 0.5), (0.5, 100 - MISSED_SIDE - 0.5)]
    corners.append((100 - MISSED_SIDE - 0.5, 100 - MISSED_SIDE - 0.5))

    def overlap(corner: tuple[float, float]) -> float:
        x, y = corner
        return sum(
            max(0.0, min(x + MISSED_SIDE, b["x"] + b["width"]) - max(x, b["x"]))
            * max(0.0, min(y + MISSED_SIDE, b["y"] + b["height"]) - max(y, b["y"]))
            for b in boxes
        )

    x, y = min(corners, key=overlap)
    return {
        "id": f"missed-{uuid.uuid4().hex[:6]}",
        "from_name": "box",
        "to_name": "image",
        "type": "rectanglelabels",
        "value": {
            "x": x,
            "y": y,
            "width": MISSED_SIDE,
            "height": MISSED_SIDE,
            "rotation": 0,
            "rectanglelabels": [label],
        },
        "original_width": size[0],
        "original_height": size[1],
        "image_rotation": 0,
    }


def annotate(ls: LabelStudio, task: int, result: list[dict[str, Any]]) -> int:
    """Submit an annotation of `task` as a reviewer's Submit does; its id."""
    created = ls.call("POST", f"/api/tasks/{task}/annotations/", json={"result": result, "was_cancelled": False})
    return int(created["id"])


def label_block(log: str, label: str) -> str:
    """The report's lines about `label` (its header line and the indented ones under it)."""
    match = re.search(rf"^{re.escape(label)}: .*\n(?:  .*\n?)*", log, re.MULTILINE)
    assert match, f"the report says nothing about {label}:\n{log}"
    return match.group(0)


def test_reviews_teach_thresholds_that_apply_and_relabel_the_untouched_tasks(
    label_studio: LabelStudio, image_host: ImageServer, backend: ScaledBackend, tmp_path: Path
) -> None:
    ls = label_studio
    name = f"learn-{uuid.uuid4().hex[:6]}"
    project: Project = url_project(ls, name, CONFIG, image_host, bulk_images(image_host, name, TASKS))
    labels = [spec.value for spec in parse_label_config(project.label_config).labels]
    version = setup_model_version(backend.api, str(project.id), project.label_config)  # type: ignore[arg-type]
    first = backend.command(["prelabel", "--project", str(project.id)])
    assert finish(first) == 0, said(first)

    # Settings → Model → Connect model: Label Studio creates the project's webhook to <backend>/webhook itself.
    ls.connect_ml(project.id, backend.url)
    hooks = ls.call("GET", "/api/webhooks/", params={"project": project.id})
    assert [hook["url"] for hook in hooks] == [f"{backend.url}/webhook"], hooks

    order = [int(task["id"]) for task in ls.tasks(project.id)]
    reviewed, untouched = order[:ANNOTATED], order[ANNOTATED:]
    predictions = predictions_by_task(ls, project.id)
    # Label Studio keeps the extra key of every region the backend wrote: what the thresholds are learned on.
    regions = [region for task in order for region in predictions[task]["result"]]
    assert regions and all(isinstance(region.get(THRESHOLD_KEY), float) for region in regions), regions
    objects = {task: predicted_objects(predictions[task]) for task in reviewed}
    pattern = review_pattern([obj for task in reviewed for obj in objects[task]])
    expected: dict[str, dict[str, Any]] = defaultdict(lambda: defaultdict(int))
    for index, task in enumerate(reviewed):
        result = []
        for obj in objects[task]:
            outcome = pattern[obj.task, obj.index]
            expected[obj.label][outcome] += 1
            if outcome == "kept":
                result += [without_score(region) for region in obj.regions]
                expected[obj.label].setdefault("kept_scores", []).append(obj.score)
            else:
                expected[obj.label].setdefault("lower_scores", []).append(obj.score)
            if outcome == "relabelled":
                other = next(label for label in labels if label != obj.label)
                result += [without_score(region) for region in relabelled(obj.regions, other)]
        if index < MISSED_ON:
            image = project.images[task]
            result.append(missed_rectangle(objects[task], labels[0], (image.width, image.height)))
            expected[labels[0]]["missed"] += 1
        annotate(ls, task, result)
    assert pattern, f"the tiny models predicted nothing on the reviewed tasks: {predictions}"

    # Label Studio's webhook delivers the events; the worker records what the reviewers did.
    store = ReviewStore(Redis.from_url(backend.env["REDIS_URL"]), backend.env["QUEUE_NAME"], 10000)
    wait_for(
        f"the {ANNOTATED} reviews of {version} recorded (see the worker's log)",
        lambda: store.annotations(project.id, version) == ANNOTATED,
        backend.workers[0],
        REVIEWS_TIMEOUT_S,
    )

    # Enough reviews: as many as the most reviewed label has; a label with fewer is left alone.
    reviews = {label: sum(counts[o] for o in ("kept", "relabelled", "deleted")) for label, counts in expected.items()}
    needed = max(reviews.values())
    plot = tmp_path / "thresholds.png"
    report = ["report", "--project", str(project.id), "--min-reviews", str(needed)]
    run = backend.processes.start([*report, "--plot", str(plot)], backend.env)  # reads Redis and Label Studio
    assert finish(run) == 0, said(run)
    log = run.log()
    assert f"project {project.id}, model version {version}:" in log and f"from {ANNOTATED} annotations" in log, log
    suggested = {}
    for label, counts in expected.items():
        block = label_block(log, label)
        kept, relabel, deleted, missed = (counts[key] for key in ("kept", "relabelled", "deleted", "missed"))
        line = f"{label}: {reviews[label]} reviewed predictions: kept {kept}, relabelled {relabel}, deleted {deleted}"
        assert f"{line}; missed {missed}" in block, block
        if reviews[label] < needed:
            assert f"left alone: only {reviews[label]} reviews (needs {needed})" in block, block
        elif counts["kept"]:
            suggested[label] = suggestion(counts["kept_scores"], counts.get("lower_scores", []), missed)
            assert f"suggested threshold {threshold_text(suggested[label])}: maximises F1" in block, block
    assert suggested, f"no label got a suggestion:\n{log}"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --apply: the project's config carries the thresholds (visible in its settings); model_version changes.
    applied = backend.processes.start([*report, "--apply"], backend.env)
    assert finish(applied) == 0, said(applied)
    for label, threshold in suggested.items():
        assert f"  {label}: threshold unset (BOX_THRESHOLD) → {threshold_text(threshold)}" in applied.log(), said(
            applied
        )
    config = str(ls.call("GET", f"/api/projects/{project.id}")["label_config"])
    written = {spec.value: spec.options.threshold for spec in parse_label_config(config).labels}
    assert written == {
        label: float(threshold_text(suggested[label])) if label in suggested else None for label in labels
    }
    new_version = setup_model_version(backend.api, str(project.id), config)  # type: ignore[arg-type]
    assert new_version != version

    # prelabel now re-labels only the tasks nobody has annotated.
    again = backend.command(["prelabel", "--project", str(project.id)])
    assert finish(again) == 0, said(again)
    assert f"{len(untouched)} to pre-label, annotated: skipped {ANNOTATED}" in again.log(), said(again)
    versions: dict[int, set[str]] = defaultdict(set)
    for prediction in ls.predictions(project.id):
        versions[int(prediction["task"])].add(str(prediction["model_version"]))
    assert [task for task in reviewed if new_version in versions[task]] == [], versions
    assert [task for task in untouched if new_version not in versions[task]] == [], versions
