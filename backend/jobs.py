"""Worker-side job: one Label Studio task in, one Label Studio prediction out.

This is where the three pure layers meet: Label Studio format (config, task, result), image fetching
and the model pipeline. The worker installs a `Runtime` (models loaded once) before it takes jobs;
rq calls `predict_task` (interactive queue; backend.prelabel has the bulk job) by its dotted name with
a JSON payload, backend.queueing.payloads.PredictPayload (the labeling config by reference).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from rq import get_current_job
from rq.job import Job

from backend.errors import BackendError, ModelVersionMismatchError
from backend.images.fetch import ImageFetcher
from backend.labelstudio.config import LabelConfig, parse_label_config
from backend.labelstudio.interactive import SamPrompt, TextPrompt, parse_context
from backend.labelstudio.results import OutputOptions, PredictedObject, build_prediction
from backend.labelstudio.tasks import image_ref, task_id
from backend.labelstudio.version import model_version
from backend.lsclient import LabelStudioApi
from backend.pipeline.build import build_pipeline
from backend.pipeline.grounded_sam import GroundedSam
from backend.pipeline.negatives import ClassPlan
from backend.pipeline.types import Instance, Segmented, TextClass
from backend.queueing.payloads import config_ttl, payload_config
from backend.queueing.stats import WorkerStats
from backend.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """What a worker keeps between jobs: loaded models, the image fetcher, prompt plans per label set."""

    pipeline: GroundedSam
    fetcher: ImageFetcher
    fingerprint: Mapping[str, object]
    output: OutputOptions = OutputOptions()
    studio: LabelStudioApi | None = None
    _plans: dict[tuple[TextClass, ...], ClassPlan] = field(default_factory=dict)

    def plan_for(self, classes: tuple[TextClass, ...]) -> ClassPlan:
        """Tokenised prompt chunks for a label set, computed once per set."""
        if classes not in self._plans:
            self._plans[classes] = self.pipeline.prepare(classes)
        return self._plans[classes]


_runtime: Runtime | None = None


def current_runtime() -> Runtime:
    """The installed runtime; jobs fail clearly in a process that never loaded models."""
    if _runtime is None:
        raise RuntimeError("no job runtime installed: start workers with the `worker` command")
    return _runtime


def current_job() -> Job:
    """The rq job this thread runs; the job functions below run only as rq jobs."""
    job = get_current_job()
    if job is None:
        raise RuntimeError("not running as an rq job")
    return job


def install(runtime: Runtime) -> None:
    """Register the worker's runtime once, before it takes jobs."""
    global _runtime
    if _runtime is not None:
        raise RuntimeError("the job runtime is already installed in this process")
    _runtime = runtime


def uninstall() -> None:
    """Forget the runtime (tests that install several in one process)."""
    global _runtime
    _runtime = None


def text_classes(config: LabelConfig) -> tuple[TextClass, ...]:
    """The config's labels as detector classes: exact Label value as name, prompts as phrases, its options."""
    return tuple(TextClass(name=label.value, phrases=label.phrases, options=label.options) for label in config.labels)


def predict_task(payload: dict[str, Any]) -> dict[str, Any]:
    """Run one task through fetch → Grounding DINO → SAM → Label Studio result.

    Raises (so rq records the job as failed, with the traceback) on any error; the API turns a
    failed job into an empty prediction for that task only.
    """
    runtime = current_runtime()
    task = payload["task"]
    config, version = checked_config(runtime, payload)
    stats = WorkerStats(current_job().connection)
    started = time.perf_counter()
    try:
        with stats.stage("fetch"):
            image = fetch_image(runtime, task, config, payload)
    except BackendError as exc:  # the worker logs the job's failure, once (HeartbeatWorker.handle_exception)
        stats.failure(type(exc).__name__)
        raise
    with stats.stage("model"):
        prediction = _interactive_or_batch(runtime, image, config, version, payload.get("context"))
    stats.task_done(time.perf_counter() - started)
    return prediction


def _interactive_or_batch(
    runtime: Runtime, image: Image.Image, config: LabelConfig, version: str, context: object
) -> dict[str, Any]:
    """A click/box in `context` goes to SAM alone, typed text replaces the label prompts, else the batch path."""
    request = parse_context(context, config)
    if isinstance(request, SamPrompt):
        points, positive = request.points_px(image.width, image.height)
        answer = runtime.pipeline.segment_points(image, points, positive, request.box_px(image.width, image.height))
        found = request.to_object(answer.mask, answer.score)
        return build_prediction([found] if found else [], config, image.width, image.height, version, runtime.output)
    if isinstance(request, TextPrompt):
        return predict_image(runtime, image, request.apply(config), version)
    return predict_image(runtime, image, config, version)


def fetch_image(
    runtime: Runtime, task: Mapping[str, Any], config: LabelConfig, payload: Mapping[str, Any]
) -> Image.Image:
    """The task's image, RGB with EXIF applied (ImageFetchError / TaskDataError when it cannot be had)."""
    ref = image_ref(task, config)
    return runtime.fetcher.fetch(ref, task_id=task_id(task), label_studio_host=payload.get("label_studio_host"))


def checked_config(runtime: Runtime, payload: Mapping[str, Any]) -> tuple[LabelConfig, str]:
    """The payload's parsed config (read from Redis by reference) and model version, after checking this
    worker computes that version."""
    job = current_job()
    # Every read extends the stored config's life as the API's store did, so the jobs queued behind find it.
    ttl_s = config_ttl(int(job.timeout or 0), job.result_ttl or 0, job.failure_ttl or 0)
    config = parse_label_config(payload_config(job.connection, payload, ttl_s))
    expected = model_version(runtime.fingerprint, config)
    if payload["model_version"] != expected:
        raise ModelVersionMismatchError(
            f"job asks for model_version {payload['model_version']} but this worker computes {expected}: "
            "API and worker run with different model settings"
        )
    return config, expected


def predict_image(runtime: Runtime, image: Image.Image, config: LabelConfig, version: str) -> dict[str, Any]:
    """One RGB image (EXIF applied) → one Label Studio prediction of `config`'s labels."""
    classes = text_classes(config)
    return to_prediction(runtime, segment_image(runtime, image, classes), classes, config, image, version)


def segment_image(runtime: Runtime, image: Image.Image, classes: tuple[TextClass, ...]) -> list[Instance]:
    """Grounding DINO boxes for `classes`, then a SAM mask per box (HxW of `image`)."""
    return runtime.pipeline.run(image, runtime.plan_for(classes))


def stream_images(
    runtime: Runtime, images: Sequence[Image.Image], classes: tuple[TextClass, ...]
) -> Iterator[Segmented]:
    """The models' output for each image, in order, as soon as it is ready (GroundedSam.stream)."""
    return runtime.pipeline.stream(images, runtime.plan_for(classes))


def finish_image(runtime: Runtime, segmented: Segmented, classes: tuple[TextClass, ...]) -> list[Instance]:
    """One image's instances from its model output: cleanup and filters, CPU only (GroundedSam.finish)."""
    return runtime.pipeline.postprocess(segmented, runtime.plan_for(classes))


def to_prediction(
    runtime: Runtime,
    instances: list[Instance],
    classes: tuple[TextClass, ...],
    config: LabelConfig,
    image: Image.Image,
    version: str,
) -> dict[str, Any]:
    """Label Studio prediction of `instances` on `image` (regions sized to the image as displayed)."""
    objects = [_to_object(instance, classes) for instance in instances]
    return build_prediction(objects, config, image.width, image.height, version, runtime.output)


def _to_object(instance: Instance, classes: tuple[TextClass, ...]) -> PredictedObject:
    detection = instance.detection
    return PredictedObject(
        label=classes[detection.class_index].name,
        score=instance.score,
        box_xyxy=detection.box_xyxy,
        mask=instance.mask,
    )


def build_runtime(settings: Settings) -> Runtime:
    """Load the models once (the slow part of a worker's start) and the image fetcher."""
    device = resolve_device(settings.device)
    sam = settings.sam_checkpoint or settings.sam_model
    log.info("loading models on %s: detector %s, SAM %s", device, settings.detector_model, sam)
    pipeline = build_pipeline(settings.model_spec(device), settings.thresholds(), settings.postprocess_options())
    studio = None
    if settings.label_studio_url and settings.label_studio_api_key:
        studio = LabelStudioApi(settings.label_studio_url, settings.label_studio_api_key, settings.label_studio_timeout)
    return Runtime(
        pipeline=pipeline,
        fetcher=ImageFetcher(settings.fetch_options()),
        fingerprint=settings.model_fingerprint(),
        output=settings.output_options(),
        studio=studio,
    )


def resolve_device(device: str) -> str:
    """ "auto" → the first CUDA device when torch sees one, else the CPU."""
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"
