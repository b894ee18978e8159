"""The one reader of the environment: every setting, its default and its meaning.

Settings are built once in each entry point (`serve`, `worker`, `predict`) and passed down; nothing else
reads os.environ. The README's configuration table lists the same fields.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from backend.images.fetch import FetchOptions
from backend.images.outbound import OutboundPolicy, parse_hosts, parse_networks
from backend.labelstudio.results import OutputOptions
from backend.pipeline.types import DetectionThresholds, ModelSpec, PostprocessOptions
from backend.queueing.messages import ReviewOptions

if TYPE_CHECKING:
    from backend.pipeline.embedding_store import EmbeddingStore

# The defaults of the model settings are the pipeline's own (one place for each number).
_THRESHOLDS = DetectionThresholds()
_POSTPROCESS = PostprocessOptions()
_OUTPUT = OutputOptions()

DEFAULT_DETECTOR = "IDEA-Research/grounding-dino-tiny"
DEFAULT_SAM = "facebook/sam-vit-huge"


def describe_settings_error(exc: ValidationError) -> str:
    """One line: each invalid setting named by its environment variable (BOX_THRESHOLD: ...), "; " between them,
    never with the value given: a secret set in the wrong place (BASIC_AUTH_PASS, LABEL_STUDIO_API_KEY) must not
    reach a log."""
    parts = []
    for error in exc.errors(include_input=False, include_url=False, include_context=False):
        names = [str(part).upper() for part in error.get("loc", ()) if isinstance(part, str)]
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{'.'.join(names)}: {message}" if names else message)
    return "; ".join(parts)


class Settings(BaseSettings):
    """Typed, validated settings read from environment variables (names are the upper-cased field names)."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True)

    # HTTP
    host: str = Field("0.0.0.0", description="Interface the HTTP server binds to.")
    port: int = Field(9090, ge=1, le=65535, description="Port of the HTTP server.")
    basic_auth_user: str | None = Field(
        None,
        description="With BASIC_AUTH_PASS: require HTTP basic auth on every route but /webhook (Label Studio creates its webhook without credentials; it only queues ids the worker re-reads from Label Studio).",
    )
    basic_auth_pass: str | None = Field(None, description="Password for BASIC_AUTH_USER.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level of all processes.")

    # Queue
    redis_url: str | None = Field(
        None, description="Redis to queue jobs on. Unset: `serve` starts an embedded server and one worker itself."
    )
    queue_name: str = Field(
        "grounded-sam",
        description="Prefix of the rq queues <name>-interactive, <name>-bulk and <name>-reviews (workers take them in that order) and of the review records in Redis.",
    )
    predict_timeout: float = Field(
        90.0,
        gt=0,
        description="Seconds /predict waits for its jobs; keep under Label Studio's ML_TIMEOUT_PREDICT (100 s).",
    )
    sync_budget: float = Field(
        45.0,
        gt=0,
        description="A /predict estimated to need longer (tasks x measured seconds/task / workers) is queued as bulk work and pushed to Label Studio.",
    )
    prior_task_seconds: float = Field(
        2.0, gt=0, description="Seconds per task assumed for that estimate until workers have measured it."
    )
    sync_max_tasks: int = Field(
        64,
        ge=1,
        description="Most tasks one /predict computes while Label Studio waits; more go bulk (with LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY) or get 413.",
    )
    max_request_bytes: int = Field(
        16 * 2**20, gt=0, description="Largest request body accepted, in bytes; a larger one gets 413."
    )
    label_config_max_bytes: int = Field(
        2**20,
        gt=0,
        description="Largest labeling config /setup, /predict and /prelabel accept, in bytes (UTF-8); a larger one gets 413.",
    )
    bulk_chunk_size: int = Field(
        8, ge=1, le=256, description="Tasks per bulk job (they share prompt encoding and model batches)."
    )
    job_timeout: int = Field(600, gt=0, description="Seconds one job may run before rq stops it.")
    result_ttl: int = Field(3600, ge=0, description="Seconds a finished job's prediction stays in Redis for re-use.")
    failure_ttl: int = Field(24 * 3600, ge=0, description="Seconds a failed job stays in rq's failed registry.")
    transient_retries: int = Field(
        3,
        ge=0,
        le=10,
        description="Times a bulk chunk whose failures were all transient (image fetch timeouts, connection errors, HTTP 5xx, 408, 429) is run again later (its pushed tasks are skipped); 0 never. Interactive jobs are never retried.",
    )
    transient_retry_delay: int = Field(
        30,
        ge=1,
        le=3600,
        description="Seconds before a chunk's first transient retry; each next one waits twice as long (at most an hour).",
    )
    worker_heartbeat: float = Field(
        5.0,
        gt=0,
        description="Seconds between a busy worker's heartbeats; 3 missed beats after its worker dies a job is queued again, once (a second death fails it).",
    )
    worker_heartbeat_file: str | None = Field(
        None,
        description="File a worker touches every WORKER_HEARTBEAT seconds while it reaches Redis; `grounded-sam health --worker` checks it is fresh (the image sets it; unset: off).",
    )
    click_route_ttl: int = Field(
        1800,
        ge=0,
        description="Seconds Redis remembers which worker holds an image's embedding after its last use; clicks on that image go to that worker's own queue meanwhile (0: clicks are not routed).",
    )
    click_route_wait: float = Field(
        2.0,
        ge=0,
        le=600,
        description="Longest a click waits in its worker's own queue (that worker busy) before any worker may take it.",
    )
    embedded_redis_dir: str = Field(
        "~/.local/state/grounded-sam/redis",
        description="Folder where the embedded Redis (REDIS_URL unset) keeps its append-only file, so queued and finished work survive restarts; one `serve` per folder.",
    )
    embedded_redis_maxmemory: str = Field(
        "512mb",
        description="Memory limit of the embedded Redis; at the limit writes are refused (noeviction), queue state is never dropped.",
    )
    supervise_max_restarts: int = Field(
        3,
        ge=1,
        description="`serve` restarts its worker or embedded Redis when it dies (after 1 s, 2 s, ... up to 30 s); one that dies again after this many restarts within SUPERVISE_WINDOW stops `serve`.",
    )
    supervise_window: float = Field(300.0, gt=0, description="Seconds over which SUPERVISE_MAX_RESTARTS is counted.")

    # Reviews (the active-learning loop: Label Studio's annotation events compared with the predictions)
    review_keep_iou: float = Field(
        0.5,
        gt=0,
        le=1,
        description="A predicted object counts as kept (or relabelled) when a reviewer's region overlaps its mask by at least this IoU.",
    )
    review_min_reviews: int = Field(
        20, ge=1, description="Fewest reviewed predictions of a label before a threshold is suggested for it."
    )
    review_max_annotations: int = Field(
        10000,
        ge=1,
        description="Most reviewed annotations kept per project and model version (the oldest go first); also the most a START_TRAINING event rescans.",
    )
    review_max_total: int = Field(
        50000,
        ge=1,
        description="Most reviewed annotations kept in Redis over all projects and model versions (the oldest go first; about 1 kB each at 20 objects).",
    )

    # Models
    detector_model: str = Field(
        DEFAULT_DETECTOR,
        description="Hugging Face id or local folder: Grounding DINO, MM-Grounding-DINO or LLMDet (boxes, then "
        "SAM_MODEL), or SAM 3 (masks from text alone; its tracker answers clicks).",
    )
    sam_model: str = Field(
        DEFAULT_SAM,
        description="Hugging Face id or local folder: SAM, SAM-HQ, SAM 2 / 2.1, SAM 3 (its tracker) or EdgeTAM. "
        "Unused when DETECTOR_MODEL is a full SAM 3.",
    )
    sam_checkpoint: str | None = Field(
        None, description="Path to an official segment-anything .pth; when set it replaces SAM_MODEL."
    )
    sam_model_type: Literal["vit_h", "vit_l", "vit_b"] = Field(
        "vit_h", description="Architecture of SAM_CHECKPOINT (checked against the file)."
    )
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto, cpu, cuda or cuda:N.")
    sam_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="SAM precision (and SAM 3 alone's). auto: bfloat16 on CUDA, float32 on the CPU. The Grounding "
        "DINO family always runs in float32. model_version names the resolved dtype, so with auto a CPU worker and "
        "a GPU worker of the same settings announce different fingerprints (one queue serves one of them).",
    )
    detector_compile: bool = Field(
        False,
        description="torch.compile the Grounding DINO family detector's forward (static shapes: compiled once per "
        "worker, image-size bucket and batch size, the first call of each logged with its seconds). Off: on the "
        "CPU compiling takes minutes; turn it on for a long-lived GPU worker after measuring (bench/pipeline.py "
        "--compile).",
    )
    sam_image_batch: int = Field(
        1,
        ge=1,
        le=64,
        description="Images per SAM image-encoder forward in bulk chunks (transformers SAM). On a 2-core CPU 8 was 2.3x slower per image than 1; raise it on a GPU after measuring (bench/). Splits itself when GPU memory runs out.",
    )
    embedding_cache_mb: int = Field(
        1024,
        ge=0,
        le=1024 * 1024,
        description="MiB of each worker's cache of decoded images and their SAM image embeddings (embeddings on the model's device), least recently used evicted first: a click on a cached image runs only SAM's prompt decoder. 0: nothing kept in memory (every click encodes its image unless EMBEDDING_DISK_DIR has it).",
    )
    embedding_disk_dir: str | None = Field(
        None,
        description="Folder of an optional on-disk cache of SAM image embeddings (float16, one file per image and model; survives worker restarts, the workers of one machine may share it); a click on an image found there skips the encoder. Unset: no disk cache.",
    )
    embedding_disk_mb: int = Field(
        10240,
        gt=0,
        description="MiB EMBEDDING_DISK_DIR may hold; after each write the least recently used files are deleted down to it.",
    )
    box_threshold: float = Field(_THRESHOLDS.box, ge=0, le=1, description="Minimum detector score of a box.")
    text_threshold: float = Field(
        _THRESHOLDS.text, ge=0, le=1, description="Minimum score of the label chosen for a box."
    )
    max_detections: int = Field(
        _THRESHOLDS.max_detections, ge=1, description="Most objects kept per image (best scores first)."
    )
    nms_iou: float = Field(
        _THRESHOLDS.nms_iou, ge=0, le=1, description="Boxes of one label overlapping more than this IoU are merged."
    )

    # Post-processing and output (Label attributes min_area / max_instances override the first two per label)
    min_area: int = Field(
        _POSTPROCESS.min_area,
        ge=0,
        description="Fewest mask pixels an object needs to be returned; a Label's min_area overrides it.",
    )
    max_instances: int | None = Field(
        _POSTPROCESS.max_instances,
        ge=1,
        description="Most objects of one label per image (unset: no limit); a Label's max_instances overrides it.",
    )
    negative_iou: float = Field(
        _POSTPROCESS.negative_iou,
        ge=0,
        le=1,
        description="A box overlapping a box of one of its label's negative prompts by more than this IoU is dropped.",
    )
    dedup_iou: float = Field(
        _POSTPROCESS.dedup_iou,
        ge=0,
        le=1,
        description="Objects of different labels whose masks overlap more than this IoU are one object; the higher score keeps it (1: off).",
    )
    dedup_score_margin: float = Field(
        _POSTPROCESS.dedup_score_margin,
        ge=0,
        le=1,
        description="Detection scores this close count as a tie there; the higher SAM mask score wins it.",
    )
    mask_fill_holes: int = Field(
        _POSTPROCESS.fill_holes, ge=0, description="Holes in a mask of at most this many pixels are filled (0: off)."
    )
    mask_min_island: int = Field(
        _POSTPROCESS.min_island,
        ge=0,
        description="Parts of a mask smaller than this many pixels are dropped, never its largest part (0: off).",
    )
    mask_smoothing: float = Field(
        _POSTPROCESS.smoothing, ge=0, description="Sigma in pixels of the Gaussian that smooths mask outlines (0: off)."
    )
    rectangle_source: Literal["detector", "mask"] = Field(
        _OUTPUT.rectangle_source,
        description="Rectangles are the detector's box (detector) or the box around the cleaned mask (mask).",
    )
    polygon_tolerance: float = Field(
        _OUTPUT.polygon_tolerance, ge=0, description="Most distance in pixels between a polygon and its mask's outline."
    )

    # Images
    label_studio_url: str | None = Field(
        None,
        description="Label Studio base URL, for /data/upload and /data/local-files images (not localhost in Docker).",
    )
    label_studio_api_key: str | None = Field(
        None, description="Legacy token or personal access token of a Label Studio user who can read the tasks."
    )
    local_files_document_root: str | None = Field(
        None, description="Read /data/local-files/?d= images from this folder directly when it holds them."
    )
    label_studio_timeout: float = Field(
        30.0, gt=0, description="Seconds for each Label Studio API call (pushing predictions, listing tasks)."
    )
    image_connect_timeout: float = Field(5.0, gt=0, description="Seconds to connect when fetching an image.")
    image_read_timeout: float = Field(30.0, gt=0, description="Seconds to wait for image bytes.")
    image_max_bytes: int = Field(50 * 2**20, gt=0, description="Largest image file accepted, in bytes.")
    image_max_pixels: int = Field(
        100_000_000, gt=0, description="Largest image accepted, in pixels (decompression bombs)."
    )
    image_fetch_deadline: float = Field(
        60.0, gt=0, description="Seconds one image fetch may take in all: redirects, connects and bytes included."
    )
    fetch_allow_networks: str | None = Field(
        None,
        description="Comma-separated CIDRs or addresses image fetches may connect to although they are loopback, private, link-local or otherwise not public (e.g. 10.0.0.0/8,192.168.1.20).",
    )
    fetch_allow_hosts: str | None = Field(
        None,
        description="Comma-separated host names image fetches may connect to whatever they resolve to; a leading dot allows subdomains (.corp.example: a.corp.example, not corp.example).",
    )

    @field_validator("embedding_disk_dir")
    @classmethod
    def _disk_dir_or_unset(cls, value: str | None) -> str | None:
        """A blank EMBEDDING_DISK_DIR is unset."""
        if value is None:
            return None
        if "\0" in value:
            raise ValueError("a folder name cannot hold a NUL character")
        return value.strip() or None

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level_any_case(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _auth_pair(self) -> Settings:
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            raise ValueError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")
        return self

    @property
    def basic_auth(self) -> tuple[str, str] | None:
        if self.basic_auth_user and self.basic_auth_pass:
            return (self.basic_auth_user, self.basic_auth_pass)
        return None

    def thresholds(self) -> DetectionThresholds:
        return DetectionThresholds(
            box=self.box_threshold,
            text=self.text_threshold,
            max_detections=self.max_detections,
            nms_iou=self.nms_iou,
        )

    def postprocess_options(self) -> PostprocessOptions:
        """Negative suppression, one label per object, mask cleanup and the per-label defaults."""
        return PostprocessOptions(
            negative_iou=self.negative_iou,
            dedup_iou=self.dedup_iou,
            dedup_score_margin=self.dedup_score_margin,
            fill_holes=self.mask_fill_holes,
            min_island=self.mask_min_island,
            smoothing=self.mask_smoothing,
            min_area=self.min_area,
            max_instances=self.max_instances,
        )

    def output_options(self) -> OutputOptions:
        return OutputOptions(rectangle_source=self.rectangle_source, polygon_tolerance=self.polygon_tolerance)

    def model_spec(self, device: str) -> ModelSpec:
        """The models to load; `device` is the resolved device (never "auto")."""
        return ModelSpec(
            detector=self.detector_model,
            sam=self.sam_model,
            sam_checkpoint=self.sam_checkpoint,
            sam_model_type=self.sam_model_type,
            device=device,
            sam_dtype=self.resolved_sam_dtype(device),
            sam_image_batch=self.sam_image_batch,
            detector_compile=self.detector_compile,
        )

    def embedding_store(self) -> EmbeddingStore | None:
        """The on-disk embedding cache (EMBEDDING_DISK_DIR, created when missing), or None when unset.

        Imports torch: for workers only (the API never calls it). OSError when the folder cannot be created.
        """
        if self.embedding_disk_dir is None:
            return None
        from backend.pipeline.embedding_store import EmbeddingStore

        return EmbeddingStore(Path(self.embedding_disk_dir).expanduser(), self.embedding_disk_mb * 2**20)

    def review_options(self) -> ReviewOptions:
        """How review jobs compare and record (they carry it from the API to the workers)."""
        return ReviewOptions(self.queue_name, self.review_keep_iou, self.review_max_annotations, self.review_max_total)

    def resolved_sam_dtype(self, device: str) -> Literal["float32", "bfloat16", "float16"]:
        """SAM_DTYPE on `device` (resolved, never "auto"): auto is bfloat16 on CUDA, float32 elsewhere."""
        if self.sam_dtype != "auto":
            return self.sam_dtype
        return "bfloat16" if device.startswith("cuda") else "float32"

    def model_fingerprint(self, device: str = "cpu") -> dict[str, object]:
        """Everything about the models that changes predictions; enters model_version. `device`: where the models
        run (resolved, never "auto"), which decides SAM_DTYPE=auto's dtype: the fingerprint names the resolved one.

        Device itself is left out on purpose: the same weights in the same dtype give the same labels on CPU and GPU.
        """
        return {
            "detector": self.detector_model,
            "sam": self.sam_checkpoint or self.sam_model,
            "sam_dtype": self.resolved_sam_dtype(device),
            "box_threshold": self.box_threshold,
            "text_threshold": self.text_threshold,
            "max_detections": self.max_detections,
            "nms_iou": self.nms_iou,
            "postprocess": asdict(self.postprocess_options()),
            "output": asdict(self.output_options()),
        }

    @model_validator(mode="after")
    def _fetch_allowances(self) -> Settings:
        self.outbound_policy()  # a bad entry is a ValueError naming its variable
        return self

    def outbound_policy(self) -> OutboundPolicy:
        """What image fetches may reach besides public addresses (LABEL_STUDIO_URL's media is allowed anyway)."""
        return OutboundPolicy(
            allow_networks=parse_networks(self.fetch_allow_networks), allow_hosts=parse_hosts(self.fetch_allow_hosts)
        )

    def fetch_options(self) -> FetchOptions:
        return FetchOptions(
            label_studio_url=self.label_studio_url,
            api_key=self.label_studio_api_key,
            connect_timeout=self.image_connect_timeout,
            read_timeout=self.image_read_timeout,
            max_bytes=self.image_max_bytes,
            max_pixels=self.image_max_pixels,
            local_files_root=self.local_files_document_root,
            policy=self.outbound_policy(),
            deadline=self.image_fetch_deadline,
        )
