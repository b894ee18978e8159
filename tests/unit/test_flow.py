"""The prediction flow (backend.flow) with real tiny models: what the jobs return is what it computes, its stream
keeps order and passes failed fetches through, its timer hook sees every stage; the job functions refuse a
message of another schema; a bulk job computes its tasks through the flow."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from PIL import Image
from redis import Redis
from rq import Queue, SimpleWorker
from rq.job import Job
from rq.serializers import JSONSerializer

from backend import jobs
from backend.embedding_cache import ImageCache
from backend.errors import ImageFetchError, ModelLoadError, TaskDataError
from backend.flow import PredictionFlow, resolve_device
from backend.images.fetch import ImageFetcher
from backend.labelstudio.config import LabelConfig, parse_label_config
from backend.pipeline.build import build_pipeline
from backend.pipeline.embedding_store import EmbeddingStore
from backend.pipeline.grounded_sam import GroundedSam
from backend.pipeline.timing import StageTimer
from backend.pipeline.types import DetectionThresholds, ModelSpec, Segmented
from backend.prelabel import ChunkReport
from backend.queueing.bulk import META_FAILED
from backend.queueing.claims import TaskClaims
from backend.queueing.configs import store_config
from backend.queueing.messages import SCHEMA_KEY, ChunkJob, PredictJob, QueuedTask
from backend.queueing.stats import PREFIX, WorkerStats
from backend.settings import Settings
from tests.support.paths import REPO
from tests.tiny_models import build_tiny_sam3

EVERYTHING = DetectionThresholds(box=0.0, text=0.0, max_detections=3, nms_iou=1.0)
SIZES = ((48, 64), (40, 72), (56, 56))  # (height, width): each image's masks tell which image they are


class RecordingTimer:
    """A StageTimer that records the names of the stages it timed, from any thread."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._lock = threading.Lock()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        yield
        with self._lock:
            self.names.append(name)


class RecordingStudio:
    """Stands in for Label Studio: records the predictions pushed; no task has one yet."""

    def __init__(self) -> None:
        self.created: dict[int, dict[str, Any]] = {}

    def prediction_ids(self, task: int, model_version: str) -> list[int]:
        return []

    def create_prediction(self, task: int, prediction: dict[str, Any]) -> None:
        self.created[task] = prediction

    def delete_prediction(self, prediction: int) -> None:
        raise AssertionError("nothing to replace")


@pytest.fixture(scope="module")
def pipeline(tiny_detector_dir: Path, tiny_hf_sam_dir: Path) -> GroundedSam:
    return build_pipeline(ModelSpec(detector=str(tiny_detector_dir), sam=str(tiny_hf_sam_dir)), EVERYTHING)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Local files (Label Studio's local-files storage) a3.png ..., one per SIZES entry."""
    folder = tmp_path_factory.mktemp("local_files")
    for index, (height, width) in enumerate(SIZES):
        Image.fromarray(image_pixels(height, width, index)).save(folder / f"a{index}.png")
    return folder


@pytest.fixture()
def fetcher(image_dir: Path) -> Iterator[ImageFetcher]:
    with ImageFetcher(Settings(local_files_document_root=str(image_dir)).fetch_options()) as fetcher:
        yield fetcher


@pytest.fixture(scope="module")
def config() -> LabelConfig:
    return parse_label_config((REPO / "label_config" / "brush_and_rectangle.xml").read_text())


def image_pixels(height: int, width: int, seed: int) -> npt.NDArray[np.uint8]:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def task(index: int) -> QueuedTask:
    return QueuedTask(id=100 + index, data={"image": f"/data/local-files/?d=a{index}.png"})


def test_the_interactive_job_returns_the_flows_prediction(
    redis_url: str, pipeline: GroundedSam, fetcher: ImageFetcher, config: LabelConfig
) -> None:
    """Through rq, as a worker runs it: the job's result is `predict` of the same image."""
    redis = Redis.from_url(redis_url)
    flow = PredictionFlow(pipeline, fetcher=fetcher, fingerprint={"models": "tiny"})
    version = flow.model_version(config)
    ref = store_config(redis, (REPO / "label_config" / "brush_and_rectangle.xml").read_text(), 600)
    message = PredictJob(task=task(0), label_config_ref=ref, model_version=version)
    jobs.install(flow, WorkerStats(redis))
    try:
        job = run_job(redis, "backend.jobs.predict_task", message.to_json())
    finally:
        jobs.uninstall()
    expected = flow.predict(flow.task_image(task(0), config).image, config, version)
    assert expected["result"], "the tiny models with zero thresholds found nothing: the comparison shows nothing"
    assert job.return_value() == json.loads(json.dumps(expected))


def test_a_job_message_of_another_schema_fails_the_job_with_its_reason(redis_url: str) -> None:
    """No flow is needed to refuse it: the message is read first."""
    redis = Redis.from_url(redis_url)
    predict = PredictJob(task=task(0), label_config_ref="ref", model_version="v").to_json()
    chunk = ChunkJob(project="1", tasks=(task(0),), label_config_ref="ref", model_version="v").to_json()
    for function, message in (("backend.jobs.predict_task", predict), ("backend.prelabel.prelabel_chunk", chunk)):
        job = run_job(redis, function, message | {SCHEMA_KEY: 99})
        result = job.latest_result()
        assert job.is_failed and result is not None and result.exc_string is not None, function
        assert "JobMessageError" in result.exc_string and "message schema 99" in result.exc_string, result.exc_string


def test_stream_keeps_order_and_passes_a_fetch_error_through_in_place(
    pipeline: GroundedSam, config: LabelConfig
) -> None:
    flow = PredictionFlow(pipeline)
    images = [Image.fromarray(image_pixels(height, width, seed)) for seed, (height, width) in enumerate(SIZES)]
    failed = ImageFetchError("HTTP 404")

    outputs = list(flow.stream([images[0], failed, images[1], images[2]], config))

    assert outputs[1] is failed
    found = [output for output in outputs if not isinstance(output, ImageFetchError)]
    for image, segmented in zip(images, found, strict=True):
        assert isinstance(segmented, Segmented) and segmented.masks and segmented.detections
        assert {mask.shape for mask in segmented.masks} == {(image.height, image.width)}
        assert flow.result(image, segmented, config, "v") == flow.predict(image, config, "v")


def test_the_timer_sees_the_fetch_model_and_postprocess_stages(
    pipeline: GroundedSam, fetcher: ImageFetcher, config: LabelConfig
) -> None:
    timer = RecordingTimer()
    flow = PredictionFlow(pipeline, fetcher=fetcher, timer=timer)

    image = flow.task_image(task(1), config).image
    flow.predict(image, config, "v")
    assert timer.names == ["fetch", "model", "postprocess"]

    timer.names.clear()
    for segmented in flow.stream([image, image], config):
        assert isinstance(segmented, Segmented)
        flow.result(image, segmented, config, "v")
    assert timer.names == ["model", "postprocess", "model", "postprocess"]


def test_a_task_without_its_image_fails_before_fetching(pipeline: GroundedSam, config: LabelConfig) -> None:
    flow = PredictionFlow(pipeline)
    with pytest.raises(TaskDataError, match='task 7: data has no "image"'):
        flow.task_image(QueuedTask(id=7, data={"picture": "x.png"}), config)
    with pytest.raises(ImageFetchError, match="without an image fetcher"):
        flow.task_image(task(0), config)


INTERACTIVE = parse_label_config((REPO / "label_config" / "interactive.xml").read_text())


def click_at(x: float, y: float) -> dict[str, Any]:
    """Label Studio's context for one smart keypoint (percent of the image) with the label Car."""
    region = {"type": "keypointlabels", "from_name": "click", "value": {"x": x, "y": y, "keypointlabels": ["Car"]}}
    return {"result": [region]}


def tiny_flow(
    tiny_detector_dir: Path, tiny_hf_sam_dir: Path, fetcher: ImageFetcher, cache: ImageCache | None = None
) -> tuple[PredictionFlow, RecordingTimer]:
    """A flow as a worker loads it (the flow's timer is the pipeline's too, so its stages show what ran)."""
    timer = RecordingTimer()
    spec = ModelSpec(detector=str(tiny_detector_dir), sam=str(tiny_hf_sam_dir))
    pipeline = build_pipeline(spec, EVERYTHING, timer=timer)
    flow = PredictionFlow(pipeline, fetcher=fetcher, fingerprint={"models": "tiny"}, timer=timer, cache=cache)
    return flow, timer


def test_a_click_goes_to_sam_alone(tiny_detector_dir: Path, tiny_hf_sam_dir: Path, fetcher: ImageFetcher) -> None:
    flow, timer = tiny_flow(tiny_detector_dir, tiny_hf_sam_dir, fetcher)

    answer = flow.answer(task(0), INTERACTIVE, "v", click_at(50, 50))

    values = [region["value"] for region in answer["result"]]
    labels = {tuple(labels) for value in values for key, labels in value.items() if key.endswith("labels")}
    assert labels <= {("Car",)} and answer["model_version"] == "v"
    assert "sam" in timer.names and "detector" not in timer.names, f"stages {timer.names}"


def test_clicks_on_a_kept_image_run_only_the_decoder_and_answer_as_without_the_cache(
    tiny_detector_dir: Path, tiny_hf_sam_dir: Path, fetcher: ImageFetcher
) -> None:
    cached, timer = tiny_flow(tiny_detector_dir, tiny_hf_sam_dir, fetcher, ImageCache(64 * 2**20))
    uncached, uncached_timer = tiny_flow(tiny_detector_dir, tiny_hf_sam_dir, fetcher, ImageCache(0))
    clicks = [click_at(30, 30), click_at(50, 90), click_at(50, 50)]  # full, full, empty masks (tiny SAM)

    answers = [cached.answer(task(0), INTERACTIVE, "v", click) for click in clicks]
    expected = [uncached.answer(task(0), INTERACTIVE, "v", click) for click in clicks]

    assert answers == expected and answers[0]["result"] and not answers[2]["result"]
    assert timer.names.count("sam_encoder") == 1, "a click on a kept image encoded it again"
    assert uncached_timer.names.count("sam_encoder") == 3, "EMBEDDING_CACHE_MB=0 still kept an embedding"
    assert cached.cache.figures().entries == 1 and uncached.cache.figures().entries == 0


def test_a_changed_image_is_never_answered_from_its_old_embedding(
    tiny_detector_dir: Path, tiny_hf_sam_dir: Path, tmp_path: Path
) -> None:
    picture = tmp_path / "a0.png"
    Image.fromarray(image_pixels(48, 64, 0)).save(picture)
    with ImageFetcher(Settings(local_files_document_root=str(tmp_path)).fetch_options()) as fetcher:
        flow, timer = tiny_flow(tiny_detector_dir, tiny_hf_sam_dir, fetcher, ImageCache(64 * 2**20))
        flow.answer(task(0), INTERACTIVE, "v", click_at(50, 50))
        Image.fromarray(image_pixels(40, 72, 1)).save(picture)  # another image under the same name

        answer = flow.answer(task(0), INTERACTIVE, "v", click_at(50, 50))

    assert timer.names.count("sam_encoder") == 2, "the changed image was answered from the old embedding"
    assert all(r["original_width"] == 72 and r["original_height"] == 40 for r in answer["result"])


def test_a_prediction_leaves_its_embedding_for_the_first_click(
    tiny_detector_dir: Path, tiny_hf_sam_dir: Path, fetcher: ImageFetcher
) -> None:
    flow, timer = tiny_flow(tiny_detector_dir, tiny_hf_sam_dir, fetcher, ImageCache(64 * 2**20))
    predicted = flow.answer(task(1), INTERACTIVE, "v", None)  # "Retrieve predictions": the whole pipeline
    assert predicted["result"], "zero thresholds found nothing: no box, so SAM never encoded the image"
    encoded = timer.names.count("sam_encoder")

    flow.answer(task(1), INTERACTIVE, "v", click_at(40, 60))

    assert encoded == 1 and timer.names.count("sam_encoder") == 1, "the first click encoded the image again"


def test_a_bulk_stream_leaves_embeddings_and_the_disk_keeps_them_for_a_restarted_worker(
    tiny_detector_dir: Path,
    tiny_hf_sam_dir: Path,
    fetcher: ImageFetcher,
    config: LabelConfig,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = EmbeddingStore(tmp_path / "embeddings", 64 * 2**20)
    flow, _ = tiny_flow(tiny_detector_dir, tiny_hf_sam_dir, fetcher, ImageCache(64 * 2**20, store))
    targets = [flow.task_image(task(index), config) for index in range(len(SIZES))]
    kept: list[str] = []
    flow.on_kept = kept.append

    assert all(not isinstance(out, Exception) for out in flow.stream(targets, config, to_disk=True))
    assert kept == [target.ref for target in targets], "each image's embedding is announced as kept, in order"

    restarted, timer = tiny_flow(tiny_detector_dir, tiny_hf_sam_dir, fetcher, ImageCache(64 * 2**20, store))
    written: list[str] = []
    put = store.put
    monkeypatch.setattr(store, "put", lambda key, *rest: (written.append(key), put(key, *rest))[1])
    answer = restarted.answer(task(2), INTERACTIVE, "v", click_at(50, 50))
    restarted.answer(task(2), INTERACTIVE, "v", click_at(30, 30))
    assert "sam_encoder" not in timer.names, "the restarted worker encoded an image the disk cache holds"
    assert restarted.cache.figures().disk_hits == 1
    assert all(r["original_width"] == 56 for r in answer["result"])
    assert written == [], "a click on a kept embedding wrote its file again"


def test_worker_stats_time_the_flows_stages_and_nothing_finer(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    redis.delete(f"{PREFIX}:stage:model", f"{PREFIX}:stage:sam_encoder")
    timer: StageTimer = WorkerStats(redis)
    with timer.stage("model"), timer.stage("sam_encoder"):
        pass
    assert redis.hget(f"{PREFIX}:stage:model", "count") == b"1"
    assert not redis.exists(f"{PREFIX}:stage:sam_encoder"), "a pipeline stage went to the worker's histograms"


def test_a_bulk_job_pushes_its_tasks_and_fails_naming_the_one_it_could_not(
    redis_url: str, pipeline: GroundedSam, fetcher: ImageFetcher, config: LabelConfig
) -> None:
    """Through rq, as a worker runs it: the chunk's images go through the flow and their predictions to Label
    Studio; the task whose image is missing fails the job, named in its error and its meta."""
    redis = Redis.from_url(redis_url)
    studio = RecordingStudio()
    flow = PredictionFlow(pipeline, fetcher=fetcher, studio=studio)
    version = flow.model_version(config)
    ref = store_config(redis, (REPO / "label_config" / "brush_and_rectangle.xml").read_text(), 600)
    missing = QueuedTask(id=9, data={"image": "/data/local-files/?d=missing.png"})
    project = f"p{uuid.uuid4().hex[:8]}"
    message = ChunkJob(project, (task(0), missing, task(2)), label_config_ref=ref, model_version=version)
    jobs.install(flow, WorkerStats(redis))
    try:
        job = run_job(redis, "backend.prelabel.prelabel_chunk", message.to_json())
    finally:
        jobs.uninstall()
    result = job.latest_result()
    assert job.is_failed and result is not None and result.exc_string is not None
    assert "TasksFailedError" in result.exc_string and "task 9: " in result.exc_string, result.exc_string
    assert job.meta[META_FAILED] == [9] and sorted(studio.created) == [100, 102]
    assert studio.created[102] == flow.predict(flow.task_image(task(2), config).image, config, version)
    claims = TaskClaims(redis, project, version)
    assert claims.is_done(100) and claims.is_done(102) and claims.holder(9) is None


def test_a_chunk_failure_is_retryable_only_when_every_task_failure_was() -> None:
    transient, lasting = ImageFetchError("timed out", retryable=True), ImageFetchError("HTTP 404")
    assert ChunkReport().failure() is None
    error = ChunkReport(failed={3: transient, 1: transient}).failure()
    assert error is not None and error.retryable and str(error) == "task 1: timed out; task 3: timed out"
    error = ChunkReport(failed={3: transient, 1: lasting}).failure()
    assert error is not None and not error.retryable


def run_job(redis: Redis, function: str, message: dict[str, Any]) -> Job:
    """Queue `function(message)` and run it on a burst worker in this process (the installed flow is seen)."""
    queue = Queue(f"flow-{uuid.uuid4().hex[:8]}", connection=redis, serializer=JSONSerializer)
    job = queue.enqueue(function, message, job_timeout=600, result_ttl=600, failure_ttl=600)
    SimpleWorker([queue], connection=redis, serializer=JSONSerializer).work(burst=True)
    job.refresh()
    return job


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_a_cuda_device_torch_cannot_see_is_a_load_error_before_any_model_loads(device: str) -> None:
    with pytest.raises(ModelLoadError, match=f"DEVICE={device} but torch .* sees 0 CUDA devices"):
        resolve_device(device)
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"


def test_sam3_alone_names_its_own_tracker_in_the_fingerprint_not_the_unused_sam_model(
    tiny_detector_dir: Path, tiny_hf_sam_dir: Path, tmp_path: Path
) -> None:
    sam3 = build_tiny_sam3(tmp_path / "sam3")
    alone = PredictionFlow.load(Settings(detector_model=str(sam3), sam_model="nobody-here/unused", device="cpu"))
    assert alone.fingerprint["sam"] == str(sam3)
    other_sam = PredictionFlow.load(Settings(detector_model=str(sam3), sam_model=str(tiny_hf_sam_dir), device="cpu"))
    assert other_sam.fingerprint == alone.fingerprint  # changing the unused SAM_MODEL changes no model_version
    grounded = PredictionFlow.load(
        Settings(detector_model=str(tiny_detector_dir), sam_model=str(tiny_hf_sam_dir), device="cpu")
    )
    assert grounded.fingerprint["sam"] == str(tiny_hf_sam_dir)
