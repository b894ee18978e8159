"""The prediction flow: one image and a labeling config in, one Label Studio prediction out.

This is where the three pure layers meet: Label Studio format (config, task, result), image fetching and the
model pipeline. A worker loads one `PredictionFlow` (`PredictionFlow.load`: the slow part of its start) and
calls its methods for every job: `fetch` a task's image, then `predict` one image (`instances` and
`prediction` for the `predict` command, which also draws the objects), `answer` an interactive request (SAM
alone for clicks and boxes, typed text as prompts), or
`stream` many images through the models and turn each into a prediction with `result` on other threads (bulk
chunks). Nothing here knows of rq or Redis.

Stages are timed through `timer` (backend.pipeline.timing.StageTimer): "fetch" (one image's download and
decode), "model" (one image through the detector and SAM) and "postprocess" (mask cleanup, filters and the Label
Studio result). Workers pass their WorkerStats, the benchmark a timer that synchronises the device.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import torch
from PIL import Image

from backend.errors import BackendError, DeviceOutOfMemoryError, ImageFetchError, ModelLoadError
from backend.images.fetch import ImageFetcher
from backend.labelstudio.config import LabelConfig
from backend.labelstudio.interactive import SamPrompt, TextPrompt, parse_context
from backend.labelstudio.results import OutputOptions, PredictedObject, build_prediction
from backend.labelstudio.tasks import image_ref
from backend.labelstudio.version import model_version
from backend.lru import SizedLru
from backend.lsclient import LabelStudioApi
from backend.pipeline.build import build_pipeline
from backend.pipeline.grounded_sam import GroundedSam
from backend.pipeline.negatives import ClassPlan
from backend.pipeline.timing import NO_TIMER, StageTimer
from backend.pipeline.types import Instance, Segmented, TextClass
from backend.queueing.messages import QueuedTask
from backend.settings import Settings

log = logging.getLogger(__name__)

# Label sets whose prompt plans a flow keeps (the most recently used).
PLANS_KEPT = 64


class PredictionStore(Protocol):
    """What bulk work needs of Label Studio (backend.lsclient.LabelStudioApi): a task's predictions of a model
    version, creating and deleting predictions."""

    def prediction_ids(self, task: int, model_version: str) -> list[int]: ...

    def create_prediction(self, task: int, prediction: dict[str, Any]) -> object: ...

    def delete_prediction(self, prediction: int) -> None: ...


class PredictionFlow:
    """What a worker loads once (models, image fetcher, Label Studio client, prompt plans per label set) and
    the prediction flow as its methods. Thread-safe: `fetch` and `result` run on several threads while the
    models run on one."""

    def __init__(
        self,
        pipeline: GroundedSam,
        *,
        fetcher: ImageFetcher | None = None,
        fingerprint: Mapping[str, object] | None = None,
        output: OutputOptions = OutputOptions(),
        studio: PredictionStore | None = None,
        timer: StageTimer = NO_TIMER,
        device: str = "cpu",
    ) -> None:
        """fetcher None: a flow for images at hand (tests, the benchmark), whose `fetch` fails every task.
        fingerprint: what enters model_version (Settings.model_fingerprint); studio: Label Studio (LabelStudioApi),
        which bulk work pushes to; device: where the models run (resolved, e.g. "cuda"), as workers announce it."""
        self.pipeline = pipeline
        self.fetcher = fetcher
        self.fingerprint: Mapping[str, object] = dict(fingerprint or {})
        self.output = output
        self.studio = studio
        self.timer = timer
        self.device = device
        # Typed prompts make new label sets; SAM 3's plans hold text features on the device, so only the most
        # recently used are kept (counted by entries: each is small next to the models).
        self._plans: SizedLru[tuple[TextClass, ...], ClassPlan] = SizedLru(max_bytes=PLANS_KEPT, max_items=PLANS_KEPT)
        self._plans_lock = threading.Lock()

    @classmethod
    def load(cls, settings: Settings, timer: StageTimer = NO_TIMER) -> PredictionFlow:
        """Load the models on the configured device (raises ModelLoadError), the image fetcher and, when
        LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY are set, the Label Studio client. `timer` times the flow's
        stages and the pipeline's finer ones (backend.pipeline.timing)."""
        device = resolve_device(settings.device)
        log.info("loading models on %s: detector %s", device, settings.detector_model)
        spec, thresholds = settings.model_spec(device), settings.thresholds()
        pipeline = build_pipeline(spec, thresholds, settings.postprocess_options(), timer=timer)
        fingerprint = settings.model_fingerprint()
        models = pipeline.describe()
        detector, segmenter = models["detector"], models["segmenter"]
        if isinstance(detector, dict) and isinstance(segmenter, dict) and segmenter["source"] == detector["source"]:
            fingerprint["sam"] = settings.detector_model  # SAM 3's own tracker: SAM_MODEL is not used
        log.info("loaded %s and %s", _named(detector), _named(segmenter))
        return cls(
            pipeline,
            fetcher=ImageFetcher(settings.fetch_options()),
            fingerprint=fingerprint,
            output=settings.output_options(),
            studio=_label_studio(settings),
            timer=timer,
            device=device,
        )

    def model_version(self, config: LabelConfig) -> str:
        """The model_version this flow's predictions of `config` carry."""
        return model_version(self.fingerprint, config)

    def fetch(self, task: QueuedTask, config: LabelConfig, label_studio_host: str | None = None) -> Image.Image:
        """The task's image, RGB with EXIF applied; stage "fetch". Raises TaskDataError (no image in the task's
        data) or ImageFetchError. label_studio_host: the origin Label Studio writes into absolute task URLs."""
        ref = image_ref(task.to_json(), config)
        if self.fetcher is None:
            raise ImageFetchError(f"task {task.id}: this prediction flow was built without an image fetcher")
        with self.timer.stage("fetch"):
            return self.fetcher.fetch(ref, task_id=task.id, label_studio_host=label_studio_host)

    def predict(self, image: Image.Image, config: LabelConfig, version: str) -> dict[str, Any]:
        """One RGB image (EXIF applied) → the Label Studio prediction of `config`'s labels, carrying `version`.
        Raises DeviceOutOfMemoryError when the image does not fit in device memory even alone."""
        return self.result(image, self._segmented(image, self.plan(config)), config, version)

    def instances(self, image: Image.Image, config: LabelConfig) -> list[Instance]:
        """The models and cleanup alone: `config`'s objects on `image`, best detection score first (boxes xyxy
        pixels of `image`, masks (H, W), class indexes into `text_classes(config)`)."""
        plan = self.plan(config)
        segmented = self._segmented(image, plan)
        with self.timer.stage("postprocess"):
            return self.pipeline.postprocess(segmented, plan)

    def answer(self, image: Image.Image, config: LabelConfig, version: str, context: object) -> dict[str, Any]:
        """An interactive request's prediction: clicks or a box in `context` go to SAM alone (one region, or
        none for an empty mask), typed text replaces the label prompts, no context is `predict`. Raises
        InteractiveContextError for a context that is malformed or names what `config` lacks."""
        request = parse_context(context, config)
        if isinstance(request, TextPrompt):
            return self.predict(image, request.apply(config), version)
        if request is None:
            return self.predict(image, config, version)
        return self._sam_alone(image, request, config, version)

    def stream(
        self, images: Sequence[Image.Image | BackendError], config: LabelConfig
    ) -> Iterator[Segmented | BackendError]:
        """The models' output for each of `images`, in order, each as soon as it is ready; stage "model" per
        image. An error in `images` (a failed fetch) passes through in its place. When one image does not fit
        in device memory even alone, the images not yet done go one by one: that image's item is its
        DeviceOutOfMemoryError, the others are computed."""
        plan = self.plan(config)
        outputs = self._model_outputs([image for image in images if isinstance(image, Image.Image)], plan)
        for image in images:
            yield image if isinstance(image, BackendError) else next(outputs)

    def result(self, image: Image.Image, segmented: Segmented, config: LabelConfig, version: str) -> dict[str, Any]:
        """The Label Studio prediction of one image from its model output (`stream`): cleanup, filters, regions
        sized to `image` as displayed; stage "postprocess". CPU only: runs on any thread."""
        plan = self.plan(config)
        with self.timer.stage("postprocess"):
            return self.prediction(image, self.pipeline.postprocess(segmented, plan), config, version)

    def prediction(
        self, image: Image.Image, instances: Sequence[Instance], config: LabelConfig, version: str
    ) -> dict[str, Any]:
        """The Label Studio prediction of `instances` (`instances(image, config)`) on `image`."""
        classes = text_classes(config)
        objects = [_to_object(instance, classes) for instance in instances]
        return build_prediction(objects, config, image.width, image.height, version, self.output)

    def plan(self, config: LabelConfig) -> ClassPlan:
        """Tokenised prompt chunks for `config`'s label set, computed once per set."""
        classes = text_classes(config)
        with self._plans_lock:  # the tokenizer is not to be entered from several threads at once
            plan = self._plans.get(classes)
            if plan is None:
                plan = self.pipeline.prepare(classes)
                self._plans.put(classes, plan, size=1)
            return plan

    def _segmented(self, image: Image.Image, plan: ClassPlan) -> Segmented:
        with self.timer.stage("model"):
            return next(self.pipeline.stream([image], plan))

    def _model_outputs(self, images: Sequence[Image.Image], plan: ClassPlan) -> Iterator[Segmented | BackendError]:
        """All images through the models in one stream; after an out-of-memory error, one by one."""
        stream = self.pipeline.stream(images, plan)
        for done in range(len(images)):
            try:
                with self.timer.stage("model"):
                    segmented = next(stream)
            except DeviceOutOfMemoryError:
                log.info(
                    "an image did not fit in device memory with others: the %d left go one by one", len(images) - done
                )
                yield from (self._alone(image, plan) for image in images[done:])
                return
            yield segmented

    def _alone(self, image: Image.Image, plan: ClassPlan) -> Segmented | DeviceOutOfMemoryError:
        try:
            return self._segmented(image, plan)
        except DeviceOutOfMemoryError as exc:
            return exc

    def _sam_alone(self, image: Image.Image, request: SamPrompt, config: LabelConfig, version: str) -> dict[str, Any]:
        points, positive = request.points_px(image.width, image.height)
        with self.timer.stage("model"):
            answer = self.pipeline.segment_points(image, points, positive, request.box_px(image.width, image.height))
        with self.timer.stage("postprocess"):
            found = request.to_object(answer.mask, answer.score)
            return build_prediction([found] if found else [], config, image.width, image.height, version, self.output)


def _label_studio(settings: Settings) -> LabelStudioApi | None:
    """The Label Studio client bulk work pushes with, when LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY are set."""
    if not (settings.label_studio_url and settings.label_studio_api_key):
        return None
    return LabelStudioApi(settings.label_studio_url, settings.label_studio_api_key, settings.label_studio_timeout)


def text_classes(config: LabelConfig) -> tuple[TextClass, ...]:
    """The config's labels as detector classes: exact Label value as name, prompts as phrases, its options."""
    return tuple(TextClass(name=label.value, phrases=label.phrases, options=label.options) for label in config.labels)


def resolve_device(device: str) -> str:
    """ "auto" → the first CUDA device when torch sees one, else the CPU. ModelLoadError, before any model loads,
    for a CUDA device torch cannot see (a CPU build of torch, no driver, an index past the GPUs)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        suffix = device.partition(":")[2]
        index = int(suffix) if suffix.isdigit() else 0
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            build = "a CPU build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
            raise ModelLoadError(
                f"DEVICE={device} but torch ({torch.__version__}, {build}) sees {torch.cuda.device_count()} CUDA "
                "devices. Fix: DEVICE=cpu or auto, or install torch's CUDA build and the NVIDIA driver (README "
                "Set up); in Docker, give the container the GPU"
            )
    return device


def _to_object(instance: Instance, classes: tuple[TextClass, ...]) -> PredictedObject:
    detection = instance.detection
    return PredictedObject(
        label=classes[detection.class_index].name,
        score=instance.score,
        box_xyxy=detection.box_xyxy,
        mask=instance.mask,
        threshold_score=detection.threshold_score,
    )


def _named(described: object) -> str:
    """A model's describe() as "Architecture from source (dtype)" for the log."""
    if not isinstance(described, dict):
        return str(described)
    return f"{described.get('architecture')} from {described.get('source')} ({described.get('dtype')})"
