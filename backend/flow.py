"""The prediction flow: one image and a labeling config in, one Label Studio prediction out.

This is where the three pure layers meet: Label Studio format (config, task, result), image fetching and the
model pipeline. A worker loads one `PredictionFlow` (`PredictionFlow.load`: the slow part of its start) and
calls its methods for every job: `answer` an interactive request (its task's image through the cache, then SAM
alone for clicks and boxes, typed text as prompts, or the whole pipeline), `task_image` then `stream` many images
through the models and turn each into a prediction with `result` on other threads (bulk chunks), or `predict`
one image at hand (`instances` and `prediction` for the `predict` command, which also draws the objects).
Nothing here knows of rq or Redis.

Each worker keeps the images it decoded and their SAM image embeddings (backend.embedding_cache, bounded by
EMBEDDING_CACHE_MB; optionally on disk too), keyed by the image's reference and the models: a click on a cached
image asks the fetcher only whether the image changed (backend.images.fetch validators: no request at all for
Label Studio's uploads) and runs only SAM's prompt decoder. Pre-annotation leaves its embeddings behind, so the
first click on a pre-labelled task is as fast. `on_kept` is told each reference whose embedding was kept (the
worker routes later clicks on that image to itself).

Stages are timed through `timer` (backend.pipeline.timing.StageTimer): "fetch" (one image's download and
decode), "model" (one image through the detector and SAM) and "postprocess" (mask cleanup, filters and the Label
Studio result). Workers pass their WorkerStats, the benchmark a timer that synchronises the device.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from PIL import Image

from backend.embedding_cache import CachedImage, ImageCache
from backend.errors import BackendError, DeviceOutOfMemoryError, ImageFetchError, ModelLoadError
from backend.images.fetch import ImageFetcher
from backend.labelstudio.config import LabelConfig
from backend.labelstudio.interactive import SamPrompt, TextPrompt, parse_context
from backend.labelstudio.results import OutputOptions, PredictedObject, build_prediction, interactive_id_prefix
from backend.labelstudio.tasks import image_ref
from backend.labelstudio.version import model_version
from backend.lru import SizedLru
from backend.lsclient import LabelStudioApi
from backend.pipeline.build import build_pipeline
from backend.pipeline.embeddings import LAYOUT, ImageEmbedding
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


@dataclass(frozen=True, slots=True, eq=False)
class TaskImage:
    """A task's image as the flow has it: the image reference (task data), its cache key and the cache's entry
    (the decoded image, or None where only its embedding is at hand; its SAM embedding once computed)."""

    ref: str
    key: str
    entry: CachedImage

    @property
    def image(self) -> Image.Image:
        """The decoded image; only for entries fetched with pixels (`PredictionFlow.task_image`)."""
        if self.entry.image is None:
            raise ValueError(f"only the embedding of {self.ref!r} is at hand, not its pixels")
        return self.entry.image


class PredictionFlow:
    """What a worker loads once (models, image fetcher, Label Studio client, prompt plans per label set) and
    the prediction flow as its methods. Thread-safe: `task_image` and `result` run on several threads while the
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
        cache: ImageCache | None = None,
    ) -> None:
        """fetcher None: a flow for images at hand (tests, the benchmark), whose `task_image` fails every task.
        fingerprint: what enters model_version (Settings.model_fingerprint); studio: Label Studio (LabelStudioApi),
        which bulk work pushes to; device: where the models run (resolved, e.g. "cuda"), as workers announce it;
        cache: the images and embeddings kept between jobs (None: nothing kept)."""
        self.pipeline = pipeline
        self.fetcher = fetcher
        self.fingerprint: Mapping[str, object] = dict(fingerprint or {})
        self.output = output
        self.studio = studio
        self.timer = timer
        self.device = device
        self.cache = cache if cache is not None else ImageCache(0)
        self.on_kept: Callable[[str], None] = _ignore
        # Cache keys name the models and the embeddings' layout too: a disk cache shared by workers of other settings
        # or versions never mixes them.
        models = json.dumps([LAYOUT, self.fingerprint], sort_keys=True, default=str)
        self._models = hashlib.sha256(models.encode()).hexdigest()
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
        fingerprint = settings.model_fingerprint(device)  # names SAM_DTYPE=auto's dtype on this device
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
            cache=_image_cache(settings, pipeline),
        )

    def model_version(self, config: LabelConfig) -> str:
        """The model_version this flow's predictions of `config` carry."""
        return model_version(self.fingerprint, config)

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

    def answer(
        self,
        task: QueuedTask,
        config: LabelConfig,
        version: str,
        context: object,
        label_studio_host: str | None = None,
    ) -> dict[str, Any]:
        """An interactive request's prediction for `task`: clicks or a box in `context` go to SAM alone (one
        region, or none for an empty mask) on the image's kept embedding where there is one, typed text replaces
        the label prompts, no context runs the whole pipeline. Either way the image's embedding is kept afterwards
        (in memory, and on disk where there is an on-disk cache), also when nothing was detected: the annotator's
        next click needs it. Raises InteractiveContextError for a context that is malformed or names what `config`
        lacks, TaskDataError or ImageFetchError for the task's image (`task_image`)."""
        request = parse_context(context, config)
        if isinstance(request, SamPrompt):
            target = self.task_image(task, config, label_studio_host, pixels=False)
            return self._sam_alone(target, request, config, version, interactive_id_prefix(context, target.ref))
        target = self.task_image(task, config, label_studio_host, pixels=True)
        asked = request.apply(config) if isinstance(request, TextPrompt) else config
        segmented = next(self.stream([target], asked, to_disk=True))
        if isinstance(segmented, BackendError):
            raise segmented
        self.embed(target, to_disk=True)  # SAM saw no box: nothing was encoded yet
        prefix = "" if request is None else interactive_id_prefix(context, target.ref)
        return self.result(target.image, segmented, asked, version, prefix)

    def task_image(
        self, task: QueuedTask, config: LabelConfig, label_studio_host: str | None = None, *, pixels: bool = True
    ) -> TaskImage:
        """The task's image through the cache; stage "fetch". A kept entry whose image is unchanged (its
        validator says so: backend.images.fetch) is used as it is; otherwise the image is fetched and decoded
        and the new entry kept. pixels: the decoded image is needed (the detector runs), not only the embedding.
        Raises TaskDataError (no image in the task's data) or ImageFetchError."""
        ref = image_ref(task.to_json(), config)
        if self.fetcher is None:
            raise ImageFetchError(f"task {task.id}: this prediction flow was built without an image fetcher")
        key = f"{hashlib.sha256(ref.encode()).hexdigest()}-{self._models}"  # a data: URI can be megabytes long
        kept = self.cache.get(key)
        usable = kept is not None and (kept.image is not None or (not pixels and kept.embedding is not None))
        known = kept.validator if usable and kept is not None else None
        with self.timer.stage("fetch"):
            fetched = self.fetcher.fetch_if_changed(ref, task.id, label_studio_host, known=known)
        if fetched.image is None and kept is not None:
            return TaskImage(ref, key, kept)
        if fetched.image is None:  # the fetcher answers "unchanged" only to a validator it was given
            raise ImageFetchError(f"task {task.id}: the fetcher found {ref!r} unchanged but nothing was kept")
        # A disk-only entry refetched for its pixels keeps its embedding while the image is the same.
        same = kept is not None and kept.validator == fetched.validator
        entry = CachedImage(
            fetched.validator, fetched.image.size, fetched.image, kept.embedding if same and kept else None
        )
        self.cache.put(key, entry)
        return TaskImage(ref, key, entry)

    def stream(
        self, images: Sequence[TaskImage | Image.Image | BackendError], config: LabelConfig, *, to_disk: bool = False
    ) -> Iterator[Segmented | BackendError]:
        """The models' output for each of `images`, in order, each as soon as it is ready; stage "model" per
        image. An error in `images` (a failed fetch) passes through in its place. When one image does not fit
        in device memory even alone, the images not yet done go one by one: that image's item is its
        DeviceOutOfMemoryError, the others are computed.

        TaskImages (`task_image`) use the SAM embeddings kept with them and keep those SAM computes (in memory,
        and in the on-disk cache too when `to_disk`); plain images keep nothing."""
        plan = self.plan(config)
        work = [image for image in images if not isinstance(image, BackendError)]
        outputs = self._model_outputs(work, plan, to_disk)
        for image in images:
            yield image if isinstance(image, BackendError) else next(outputs)

    def embed(self, target: TaskImage, *, to_disk: bool = False, store_kept: bool = False) -> ImageEmbedding:
        """The SAM embedding of `target`: the kept one (its entry's, or what the cache has kept for the same image
        since, e.g. during `stream`), else encoded now (stage "model"); kept either way (`on_kept` renews the
        route). to_disk: an embedding encoded now goes to the on-disk cache too (a no-op without one); store_kept:
        so does a kept one (`prelabel --embeddings`; otherwise a kept one is on disk already, or was kept without
        it, and every click would write the file again)."""
        kept = self.cache.peek(target.key)
        current = kept if kept is not None and kept.validator == target.entry.validator else target.entry
        if current.embedding is not None:
            self._keep(target, current.embedding, to_disk and store_kept)
            return current.embedding
        with self.timer.stage("model"):
            embedding = self.pipeline.encode(target.image)
        self._keep(target, embedding, to_disk)
        return embedding

    def result(
        self, image: Image.Image, segmented: Segmented, config: LabelConfig, version: str, id_prefix: str = ""
    ) -> dict[str, Any]:
        """The Label Studio prediction of one image from its model output (`stream`): cleanup, filters, regions
        sized to `image` as displayed; stage "postprocess". CPU only: runs on any thread. id_prefix: of every
        region id (interactive answers: backend.labelstudio.results.interactive_id_prefix)."""
        plan = self.plan(config)
        with self.timer.stage("postprocess"):
            return self.prediction(image, self.pipeline.postprocess(segmented, plan), config, version, id_prefix)

    def prediction(
        self,
        image: Image.Image,
        instances: Sequence[Instance],
        config: LabelConfig,
        version: str,
        id_prefix: str = "",
    ) -> dict[str, Any]:
        """The Label Studio prediction of `instances` (`instances(image, config)`) on `image`."""
        classes = text_classes(config)
        objects = [_to_object(instance, classes) for instance in instances]
        return build_prediction(objects, config, image.width, image.height, version, self.output, id_prefix)

    def plan(self, config: LabelConfig) -> ClassPlan:
        """Tokenised prompt chunks for `config`'s label set, computed once per set."""
        classes = text_classes(config)
        with self._plans_lock:  # the tokenizer is not to be entered from several threads at once
            plan = self._plans.get(classes)
            if plan is None:
                plan = self.pipeline.prepare(classes)
                self._plans.put(classes, plan, size=1)
            return plan

    def _segmented(self, image: Image.Image | TaskImage, plan: ClassPlan, to_disk: bool = False) -> Segmented:
        with self.timer.stage("model"):
            return next(self._pipeline_stream([image], plan, to_disk))

    def _model_outputs(
        self, images: Sequence[Image.Image | TaskImage], plan: ClassPlan, to_disk: bool = False
    ) -> Iterator[Segmented | BackendError]:
        """All images through the models in one stream; after an out-of-memory error, one by one."""
        stream = self._pipeline_stream(images, plan, to_disk)
        for done in range(len(images)):
            try:
                with self.timer.stage("model"):
                    segmented = next(stream)
            except DeviceOutOfMemoryError:
                log.info(
                    "an image did not fit in device memory with others: the %d left go one by one, the cache's "
                    "embeddings dropped",
                    len(images) - done,
                )
                self.cache.drop_memory()
                yield from (self._alone(image, plan, to_disk) for image in images[done:])
                return
            yield segmented

    def _pipeline_stream(
        self, images: Sequence[Image.Image | TaskImage], plan: ClassPlan, to_disk: bool
    ) -> Iterator[Segmented]:
        """The pipeline's stream of `images`, with the embeddings kept with TaskImages given and the new ones kept."""
        targets = [image if isinstance(image, TaskImage) else None for image in images]
        pixels = [image.image if isinstance(image, TaskImage) else image for image in images]
        known = [None if target is None else target.entry.embedding for target in targets]

        def keep(index: int, embedding: ImageEmbedding) -> None:
            target = targets[index]
            if target is not None:
                self._keep(target, embedding, to_disk)

        return self.pipeline.stream(pixels, plan, known=known, keep=keep)

    def _keep(self, target: TaskImage, embedding: ImageEmbedding, to_disk: bool) -> None:
        """Keep `embedding` with `target`'s image in the cache (and on disk when `to_disk`); tell `on_kept` when
        memory kept it (the worker then routes clicks on that image here)."""
        entry = target.entry
        if self.cache.put(target.key, CachedImage(entry.validator, entry.image_wh, entry.image, embedding), to_disk):
            self.on_kept(target.ref)

    def _alone(
        self, image: Image.Image | TaskImage, plan: ClassPlan, to_disk: bool = False
    ) -> Segmented | DeviceOutOfMemoryError:
        try:
            return self._segmented(image, plan, to_disk)
        except DeviceOutOfMemoryError as exc:
            return exc

    def _sam_alone(
        self, target: TaskImage, request: SamPrompt, config: LabelConfig, version: str, id_prefix: str
    ) -> dict[str, Any]:
        """SAM alone on the image's embedding (encoded and kept first when it has none). Out of device memory, the
        kept embeddings (which hold device memory) are dropped and the prompt decoded once more; a kept embedding
        the decoder refuses is forgotten (the next click encodes the image again)."""
        width, height = target.entry.image_wh
        points, positive = request.points_px(width, height)
        embedding = self.embed(target, to_disk=True)
        box = request.box_px(width, height)
        try:
            with self.timer.stage("model"):
                answer = self.pipeline.segment_points(embedding, points, positive, box)
        except DeviceOutOfMemoryError:
            log.info("out of device memory decoding a click: the cache's embeddings are dropped, decoding again")
            self.cache.drop_memory()
            with self.timer.stage("model"):
                answer = self.pipeline.segment_points(embedding, points, positive, box)
        except (ValueError, KeyError):
            self.cache.forget(target.key)
            raise
        with self.timer.stage("postprocess"):
            found = request.to_object(answer.mask, answer.score)
            objects = [found] if found else []
            return build_prediction(objects, config, width, height, version, self.output, id_prefix)


def _ignore(ref: str) -> None:
    """The default `on_kept`: nobody routes clicks (tests, the `predict` command, the benchmark)."""


def _image_cache(settings: Settings, pipeline: GroundedSam) -> ImageCache:
    """The worker's image and embedding cache: EMBEDDING_CACHE_MB in memory, EMBEDDING_DISK_DIR on disk (each
    on its own); what comes back from disk goes where SAM runs, in its dtype."""
    store = settings.embedding_store()
    device, dtype = pipeline.segmenter_device, pipeline.segmenter_dtype
    return ImageCache(settings.embedding_cache_mb * 2**20, store, device=device, dtype=dtype)


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
