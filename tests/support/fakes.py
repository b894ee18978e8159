"""Doubles that isolate the API and queue code from the models and from Label Studio.

FixedPipeline stands in for backend.pipeline.grounded_sam.GroundedSam under a real PredictionFlow: every image
gets the same objects (boxes given as fractions of the image, so they fit any size), without a model.
MemoryStudio stands in for Label Studio's prediction API (backend.flow.PredictionStore) in a worker, and for what
review jobs read (backend.review_job.ReviewSource: labeling configs, annotations).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from backend.errors import LabelStudioApiError
from backend.lsclient import StudioAnnotation, StudioPrediction, TaskReview
from backend.packed_mask import PackedMask
from backend.pipeline.embeddings import ImageEmbedding
from backend.pipeline.negatives import ClassPlan
from backend.pipeline.types import Detection, Instance, PromptedMask, Segmented, TextClass

Fractions = tuple[float, float, float, float]


@dataclass(frozen=True)
class FixedObject:
    """One object FixedPipeline finds on every image: a class index, its box as fractions of the image's width
    and height (x1, y1, x2, y2 in [0, 1]), filled as its mask, and its detection score."""

    class_index: int
    box: Fractions
    score: float = 0.9


@dataclass
class FixedPipeline:
    """A GroundedSam double: `objects` on every image, SAM alone answers a square around the first click.

    `images` records the (width, height) of every image the models were given, across threads (an image SAM
    alone answers a click on from a kept embedding is not given: it records nothing); `encoded` counts the images
    "encoded" (each image with objects gives a tensor-less embedding, kept by the flow as SAM's would be).
    """

    objects: tuple[FixedObject, ...] = (FixedObject(0, (0.1, 0.2, 0.6, 0.7)),)
    mask_score: float = 0.8
    images: list[tuple[int, int]] = field(default_factory=list)
    encoded: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def prepare(self, classes: Sequence[TextClass]) -> ClassPlan:
        """A plan naming `classes` (no prompt: nothing is tokenised)."""
        classes = tuple(classes)
        return ClassPlan(classes, None, tuple(frozenset() for _ in classes), ())  # type: ignore[arg-type]

    def stream(
        self,
        images: Sequence[Image.Image],
        plan: ClassPlan,
        known: Sequence[ImageEmbedding | None] | None = None,
        keep: Callable[[int, ImageEmbedding], None] | None = None,
    ) -> Iterator[Segmented]:
        """One Segmented per image, in order: the objects whose class is in the plan, sized to the image; an
        image with objects and no `known` embedding is encoded and its embedding given to `keep`."""
        for index, image in enumerate(images):
            with self._lock:
                self.images.append(image.size)
            segmented = self._segmented(image.width, image.height, len(plan.classes))
            if segmented.detections and (known is None or known[index] is None) and keep is not None:
                keep(index, self.encode(image))
            yield segmented

    def encode(self, image: Image.Image) -> ImageEmbedding:
        """A tensor-less embedding of `image` (its size is all SAM alone needs here)."""
        with self._lock:
            self.encoded += 1
        return ImageEmbedding(
            tensors={}, sizes={}, input_hw=(image.height, image.width), image_hw=(image.height, image.width)
        )

    def postprocess(self, segmented: Segmented, plan: ClassPlan) -> list[Instance]:
        """The Segmented's detections with their masks, as they are (no cleanup)."""
        if not segmented.detections or segmented.masks is None or segmented.scores is None:
            return []
        parts = zip(segmented.detections, segmented.masks, segmented.scores, strict=True)
        return [Instance(detection, mask, float(score)) for detection, mask, score in parts]

    def segment_points(
        self,
        target: Image.Image | ImageEmbedding,
        points_xy: npt.NDArray[np.floating[Any]],
        positive: npt.NDArray[np.bool_],
        box_xyxy: Fractions | None = None,
    ) -> PromptedMask:
        """A 10 x 10 square centred on the first point (the box when there is no point)."""
        if isinstance(target, Image.Image):
            with self._lock:
                self.images.append(target.size)
            height, width = target.height, target.width
        else:
            height, width = target.image_hw
        if len(points_xy):
            x, y = (int(v) for v in points_xy[0])
        elif box_xyxy is not None:
            x, y = int((box_xyxy[0] + box_xyxy[2]) / 2), int((box_xyxy[1] + box_xyxy[3]) / 2)
        else:
            raise ValueError("SAM alone needs a point or a box")
        mask = np.zeros((height, width), dtype=bool)
        mask[max(0, y - 5) : y + 5, max(0, x - 5) : x + 5] = True
        return PromptedMask(PackedMask.of(mask), self.mask_score)

    def _segmented(self, width: int, height: int, classes: int) -> Segmented:
        found = [obj for obj in self.objects if obj.class_index < classes]
        if not found:
            return Segmented((), None, None)
        detections = tuple(Detection(_pixels(obj.box, width, height), obj.score, obj.class_index) for obj in found)
        masks = tuple(_filled(detection.box_xyxy, width, height) for detection in detections)
        return Segmented(detections, masks, np.full(len(found), self.mask_score, dtype=np.float32))


def _pixels(box: Fractions, width: int, height: int) -> Fractions:
    x1, y1, x2, y2 = box
    return (x1 * width, y1 * height, x2 * width, y2 * height)


def _filled(box: Fractions, width: int, height: int) -> PackedMask:
    mask = np.zeros((height, width), dtype=bool)
    x1, y1, x2, y2 = (round(v) for v in box)
    mask[y1:y2, x1:x2] = True
    return PackedMask.of(mask)


@dataclass
class MemoryStudio:
    """Label Studio's predictions as a worker sees them (backend.flow.PredictionStore), in memory.

    `predictions` maps each prediction id to (task, prediction); `created` lists the tasks pushed, in order.
    `label_configs` maps a project to its labeling config; `annotations` an annotation id to (project, task,
    annotation: {"id", "result", "was_cancelled"}), as `annotate` writes them.
    """

    predictions: dict[int, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    created: list[int] = field(default_factory=list)
    label_configs: dict[int, str] = field(default_factory=dict)
    annotations: dict[int, tuple[int, int, dict[str, Any]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def prediction_ids(self, task: int, model_version: str) -> list[int]:
        with self._lock:
            return [
                pid
                for pid, (tid, prediction) in self.predictions.items()
                if tid == task and prediction.get("model_version") == model_version
            ]

    def create_prediction(self, task: int, prediction: dict[str, Any]) -> object:
        with self._lock:
            pid = len(self.created) + 1
            self.predictions[pid] = (task, prediction)
            self.created.append(task)
        return {"id": pid}

    def delete_prediction(self, prediction: int) -> None:
        with self._lock:
            del self.predictions[prediction]

    def of_task(self, task: int) -> list[dict[str, Any]]:
        """The predictions task `task` holds now."""
        with self._lock:
            return [prediction for tid, prediction in self.predictions.values() if tid == task]

    def annotate(
        self,
        project: int,
        task: int,
        annotation: int,
        result: list[dict[str, Any]],
        cancelled: bool = False,
        updated_at: float | None = None,
    ) -> None:
        """Create or replace annotation `annotation` of `task` (in `project`, updated at `updated_at`)."""
        with self._lock:
            self.annotations[annotation] = (
                project,
                task,
                {
                    "id": annotation,
                    "result": result,
                    "was_cancelled": cancelled,
                    "project": project,
                    "updated_at": updated_at,
                },
            )

    def delete_annotation(self, annotation: int) -> None:
        with self._lock:
            del self.annotations[annotation]

    def annotation_exists(self, annotation: int) -> bool:
        with self._lock:
            return annotation in self.annotations

    def label_config(self, project: int) -> str:
        if project not in self.label_configs:
            raise LabelStudioApiError(f"Label Studio answered 404: no project {project}")
        return self.label_configs[project]

    def task_review(self, task: int) -> TaskReview:
        with self._lock:
            annotations = [a for _, tid, a in self.annotations.values() if tid == task]
            predictions = [(pid, p) for pid, (tid, p) in self.predictions.items() if tid == task]
        return _review(task, annotations, predictions)

    def annotated_tasks(self, project: int) -> Iterator[TaskReview]:
        with self._lock:
            tasks = sorted({tid for pid, tid, _ in self.annotations.values() if pid == project})
        for task in tasks:
            yield self.task_review(task)


def _review(task: int, annotations: list[dict[str, Any]], predictions: list[tuple[int, dict[str, Any]]]) -> TaskReview:
    return TaskReview(
        task=task,
        annotations=tuple(
            StudioAnnotation(a["id"], tuple(a["result"]), a["was_cancelled"], a.get("project"), a.get("updated_at"))
            for a in sorted(annotations, key=lambda a: a["id"])
        ),
        predictions=tuple(StudioPrediction(pid, p.get("model_version"), tuple(p["result"])) for pid, p in predictions),
    )
