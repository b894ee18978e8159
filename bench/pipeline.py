"""Benchmark of the worker's model pipeline: generated images through decode → text detector → SAM → cleanup →
Label Studio prediction (RLE) → JSON, the batched path and the one-image-at-a-time path side by side in one run.

    python bench/pipeline.py --images 16 --size 1920x1080 --objects 5 --models tiny --sam hf --device cpu \
        --batch 8 --out bench/results/cpu_tiny.json

Every model family the backend runs: `--detector grounding-dino|mm-grounding-dino|sam3` and `--segmenter
sam|sam_hq|sam2|sam3_tracker|edgetam` (or a `--family` preset); `--detector sam3` is SAM 3 alone from text.
Models are built from configs with random weights (tiny: the tests' builders; full: the released checkpoints'
architectures, see `_build_full`), saved to a folder and loaded back through `build_pipeline`, the code production
runs; the JSON names the families and counts their parameters. Random weights cost what trained weights cost,
except where the cost depends on what the model outputs:
the detector's box count (capped here, see `thresholds`) and the masks' shapes (cleanup, RLE, JSON).

Both paths are the production PredictionFlow (backend/flow.py): `predict` per image, and the bulk path's
`stream` + `result`. Per-stage times come from the StageTimer hook the flow and the pipeline offer
(backend/pipeline/timing.py): this script passes its own timer and replaces no code (its one knob: the staged pass sets
backend.pipeline.threads.PREPROCESS_THREADS to 1, as that module documents). On CUDA every stage
boundary synchronises, so the stage breakdown comes from its own pass and the images/s from a pass with the
timers switched off. See bench/README.md for what every number means.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import io
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: every model is built here
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

import backend.pipeline.threads as threads_module  # noqa: E402
import backend.prelabel as prelabel  # noqa: E402
from backend.errors import BackendError  # noqa: E402
from backend.flow import PredictionFlow  # noqa: E402
from backend.images.fetch import decode_image  # noqa: E402
from backend.labelstudio.config import parse_label_config  # noqa: E402
from backend.packed_mask import PackedMask  # noqa: E402
from backend.pipeline.architectures import detector_architecture  # noqa: E402
from backend.pipeline.build import build_detector, build_pipeline, build_sam3, build_segmenter  # noqa: E402
from backend.pipeline.detector import (  # noqa: E402
    STRAIGHTFORWARD,
    DetectorOptions,
    GroundingDinoDetector,
    device_options,
)
from backend.pipeline.embeddings import ImageEmbedding  # noqa: E402
from backend.pipeline.grounded_sam import GroundedSam  # noqa: E402
from backend.pipeline.sam3_text import Sam3Prompts, Sam3TextDetector  # noqa: E402
from backend.pipeline.segmenter import Flags, Floats, Masks, Pixels, Scores, Segmenter  # noqa: E402
from backend.pipeline.timing import StageTimer  # noqa: E402
from backend.pipeline.types import (  # noqa: E402
    DetectionThresholds,
    ModelSpec,
    PostprocessOptions,
    Segmented,
    TextClass,
)
from backend.settings import Settings  # noqa: E402

# SAM image encoders by name: transformers SamVisionConfig sizes and segment-anything registry names.
SAM_SIZES = {
    "vit_b": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, global_attn_indexes=[2, 5, 8, 11]),
    "vit_l": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, global_attn_indexes=[5, 11, 17, 23]),
    "vit_h": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, global_attn_indexes=[7, 15, 23, 31]),
}
MAX_PIXELS = 100_000_000  # decode_image's cap; generous, the bench's images are known

# Rows of the stage table, in pipeline order: (stage, description). Each row is that stage's exclusive time (the
# stages nested in it taken out): production's stage names (backend/pipeline/timing.py, backend/flow.py), plus
# the bench's own "decode" and "json"; "unattributed" is the wall time of a pass outside every stage.
STAGES = [
    ("decode", "decode PNG bytes (backend.images.decode_image; the bench's stand-in for fetch)"),
    ("detector_preprocess", "detector's image processor (resize+normalise, CPU)"),
    ("detector_forward", "detector forward (DINO: all of it; SAM 3: vision encoder, each phrase slice), host->device"),
    ("detector", "detector rest: scoring, NMS, boxes to pixels (SAM 3: the text features' repeat too)"),
    ("negatives", "negative-phrase suppression (box IoU)"),
    ("sam_preprocess", "SAM processor / ResizeLongestSide (resize to 1024, CPU)"),
    ("sam_encoder", "SAM image encoder (get_image_embeddings / Sam.preprocess+image_encoder)"),
    ("sam_decoder", "SAM prompt encoder + mask decoder"),
    ("sam_upsample", "masks to original size + packed (SAM post_process_masks; SAM 3 its own masks), crops to host"),
    ("sam", "SAM rest: pixels handed to SAM, scores to host"),
    ("model", "flow's model stage rest (stream bookkeeping)"),
    ("cleanup", "cleanup: fill holes, islands, dedup, caps (GroundedSam.postprocess)"),
    ("postprocess", "flow's postprocess rest: the Label Studio result (regions, brush RLE, rectangles)"),
    ("json", "json.dumps of the prediction"),
    ("unattributed", "wall time of the pass not inside any stage"),
]


# ---------------------------------------------------------------------------------------------- models


# Model families, by the names of --detector and --segmenter: the config's model_type (with '-' for the detectors,
# as transformers spells them). --detector sam3: SAM 3 alone from text, its own tracker for clicks (no --segmenter).
DETECTORS = ("grounding-dino", "mm-grounding-dino", "sam3")
SEGMENTERS = ("sam", "sam_hq", "sam2", "sam3_tracker", "edgetam")
# --family: the combinations the GPU script measures, by one name each.
FAMILIES = {
    "gdino-sam": ("grounding-dino", "sam"),
    "gdino-sam2": ("grounding-dino", "sam2"),
    "sam3": ("sam3", "sam3_tracker"),
}
# The tests' builders of tiny models, by family, and the modules they are in: the one place this bench names them.
TINY_MODULES = ("tests.tiny_models",)
TINY_BUILDERS = {
    "grounding-dino": "build_tiny_grounding_dino",
    "mm-grounding-dino": "build_tiny_mm_grounding_dino",
    "sam3": "build_tiny_sam3",
    "sam": "build_tiny_hf_sam",
    "sam_hq": "build_tiny_sam_hq",
    "sam2": "build_tiny_sam2",
    "sam3_tracker": "build_tiny_sam3_tracker",
    "edgetam": "build_tiny_edgetam",
}
# SAM 2.1 Hiera-L (facebook/sam2.1-hiera-large; the original sam2.1_hiera_l.yaml): Hiera widths and depths.
SAM2_HIERA_LARGE = dict(
    hidden_size=144,
    num_attention_heads=2,
    embed_dim_per_stage=[144, 288, 576, 1152],
    num_attention_heads_per_stage=[2, 4, 8, 16],
    blocks_per_stage=[2, 6, 36, 4],
    global_attention_blocks=[23, 33, 43],
    window_size_per_stage=[8, 4, 16, 8],
    window_positional_embedding_background_size=[7, 7],
)
_ROLES = {"detector": "detector", "sam": "segmenter"}  # ModelSpec's field → the role the JSON names
CLIP_VOCAB = 49408  # SAM 3's text encoder (CLIP): <|startoftext|> 49406, <|endoftext|> 49407


def tiny(name: str) -> Any:
    """A helper of the tests' tiny models (builder or vocabulary), from the first of TINY_MODULES that has it."""
    import importlib

    for module in TINY_MODULES:
        found = getattr(importlib.import_module(module), name, None)
        if found is not None:
            return found
    raise LookupError(f"no {name} in {', '.join(TINY_MODULES)}")


def build_models(directory: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Save the detector and the segmenter of `args` with random weights under `directory`; return the ModelSpec
    paths, the families and their parameter counts (`parameters`: element counts, see `_counted`)."""
    directory.mkdir(parents=True, exist_ok=True)
    detector, segmenter = args.detector, args.segmenter
    if args.models == "tiny":
        made = {"detector": tiny(TINY_BUILDERS[detector])(directory / "detector")}
        if detector != "sam3":
            if segmenter == "sam" and args.sam == "pth":
                made["sam"] = tiny("build_tiny_sam_checkpoint")(directory / "sam.pth")
            else:
                made["sam"] = tiny(TINY_BUILDERS[segmenter])(directory / "sam")
        counts = {_ROLES[role]: _saved_elements(Path(path)) for role, path in made.items()}
        paths = _paths(made, "vit_b" if args.sam == "pth" else "vit_h")
    else:
        paths, counts = _build_full(directory, args)
    families = {"detector": detector, "segmenter": "sam3 (its own tracker)" if detector == "sam3" else segmenter}
    return paths | {"families": families, "parameters": counts}


def _paths(made: dict[str, Path], sam_type: str) -> dict[str, Any]:
    """ModelSpec's paths: SAM 3 alone names its own checkpoint as SAM too (its tracker answers the prompts)."""
    sam = made.get("sam", made["detector"])
    paths = {"detector": str(made["detector"]), "sam": str(sam), "sam_type": sam_type}
    if sam.suffix == ".pth":
        paths["sam_checkpoint"] = str(sam)
    return paths


def _saved_elements(path: Path) -> dict[str, int]:
    """Elements of the tensors saved at `path` (safetensors files of a folder, or a .pth state dict): parameters
    and persistent buffers, each stored tensor once."""
    if path.suffix == ".pth":
        return {"total": sum(t.numel() for t in torch.load(path, map_location="cpu", weights_only=True).values())}
    from safetensors import safe_open

    total = 0
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as weights:
            total += sum(int(np.prod(weights.get_slice(key).get_shape())) for key in weights.keys())  # noqa: SIM118
    return {"total": total}


def _counted(model: torch.nn.Module) -> dict[str, int]:
    """Parameter elements of `model` (each shared tensor once): total, and per top-level sub-module."""
    counts = {"total": sum(p.numel() for p in model.parameters())}
    counts |= {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    return counts


# Words that tokenize whole in the full-size vocabulary (others split into characters): the bench's labels.
BENCH_WORDS = [
    "a",
    "an",
    "the",
    "of",
    "and",
    "with",
    "on",
    "in",
    "cat",
    "dog",
    "car",
    "person",
    "traffic",
    "light",
    "bicycle",
    "bus",
    "truck",
    "bird",
    "tree",
    "sign",
    "road",
    "automobile",
    "cone",
    "label",
    "object",
    "thing",
    "red",
    "green",
    "blue",
    "small",
    "large",
]


def _bert_vocab() -> dict[str, int]:
    """A bert-base-uncased-sized vocabulary (30522 ids) with its special ids where Grounding DINO hard-codes them
    ([CLS] 101, [SEP] 102, '.' 1012, '?' 1029); lower-case ASCII text tokenizes into words or single characters."""
    return tiny("bert_vocab")(BENCH_WORDS, size=30522)


def _create(factory: Callable[[], torch.nn.Module], device: str) -> torch.nn.Module:
    """Random init (seeded) on the GPU when there is one (much faster for ~1 G parameters), else on the CPU."""
    torch.manual_seed(0)
    if device.startswith("cuda") and torch.cuda.is_available():
        try:
            with torch.device(device):
                return factory().eval()
        except Exception as error:
            print(f"building on {device} failed ({error}); building on the CPU", flush=True)
    return factory().eval()


def _build_full(directory: Path, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, dict[str, int]]]:
    """The full-size architectures of `args`, random weights; returns ModelSpec paths and parameter counts.

    Detectors: grounding-dino-tiny (GroundingDinoConfig() defaults), mm_grounding_dino_tiny
    (MMGroundingDinoConfig() defaults: Swin-T), facebook/sam3 (Sam3VideoConfig() defaults: ViT-L/14 at 1008 px,
    CLIP text encoder, DETR encoder/decoder, tracker). Segmenters: SAM and SAM-HQ with the --sam-size ViT, SAM 2.1
    Hiera-L, SAM 3's tracker (Sam3TrackerConfig() defaults), EdgeTAM (RepViT-M1, needs timm).
    The image processors are the classes a hub checkpoint's config names (AutoProcessor resolves them on loading,
    as it would for the hub's files). Tokenizers are made up (no download) but of the real vocabulary sizes.
    """
    import transformers as hf

    made: dict[str, Path] = {}
    counts: dict[str, dict[str, int]] = {}
    if args.detector == "sam3":
        from safetensors.torch import save_model

        model = _create(lambda: hf.Sam3VideoModel(hf.Sam3VideoConfig()), args.device)
        made["detector"] = directory / "detector"
        made["detector"].mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(made["detector"])
        # As tests/tiny_models.py build_tiny_sam3: Sam3VideoModel.save_pretrained prefixes the tracker's keys twice
        # (transformers 5.24).
        save_model(model, str(made["detector"] / "model.safetensors"), metadata={"format": "pt"})
        tokenizer = tiny("clip_tokenizer")(CLIP_VOCAB)
        hf.Sam3Processor(image_processor=hf.Sam3ImageProcessor(), tokenizer=tokenizer).save_pretrained(made["detector"])
        counts["detector"] = _counted(model)
        return _paths(made, args.sam_size), counts
    detector_class, config_class = {
        "grounding-dino": (hf.GroundingDinoForObjectDetection, hf.GroundingDinoConfig),
        "mm-grounding-dino": (hf.MMGroundingDinoForObjectDetection, hf.MMGroundingDinoConfig),
    }[args.detector]
    model = _create(lambda: detector_class(config_class()), args.device)
    made["detector"] = directory / "detector"
    model.save_pretrained(made["detector"])
    processor = hf.GroundingDinoProcessor(
        image_processor=hf.GroundingDinoImageProcessor(), tokenizer=hf.BertTokenizer(vocab=_bert_vocab())
    )
    processor.save_pretrained(made["detector"])
    counts["detector"] = _counted(model)
    del model
    if args.segmenter == "sam" and args.sam == "pth":
        from segment_anything import sam_model_registry

        model = _create(lambda: sam_model_registry[args.sam_size](), args.device)
        made["sam"] = directory / "sam.pth"
        torch.save({key: value.cpu() for key, value in model.state_dict().items()}, made["sam"])
    else:
        model, sam_processor = _full_segmenter(args.segmenter, args.sam_size, args.device)
        made["sam"] = directory / "sam"
        model.save_pretrained(made["sam"])
        sam_processor.save_pretrained(made["sam"])
    counts["segmenter"] = _counted(model)
    return _paths(made, args.sam_size), counts


def _full_segmenter(segmenter: str, sam_size: str, device: str) -> tuple[Any, Any]:
    """A full-size segmenter of `segmenter`'s family with random weights, and its processor."""
    import transformers as hf

    if segmenter in ("sam", "sam_hq"):
        vit = SAM_SIZES[sam_size]
        if segmenter == "sam":
            config = hf.SamConfig(vision_config=hf.SamVisionConfig(**vit))
            return _create(lambda: hf.SamModel(config), device), hf.SamProcessor(image_processor=hf.SamImageProcessor())
        config = hf.SamHQConfig(
            vision_config=hf.SamHQVisionConfig(**vit),
            mask_decoder_config=hf.SamHQMaskDecoderConfig(vit_dim=vit["hidden_size"]),
        )
        processor = hf.SamHQProcessor(image_processor=hf.SamImageProcessor())
        return _create(lambda: hf.SamHQModel(config), device), processor
    if segmenter == "sam2":
        vision = hf.Sam2VisionConfig(
            backbone_config=hf.Sam2HieraDetConfig(**SAM2_HIERA_LARGE),
            backbone_channel_list=SAM2_HIERA_LARGE["embed_dim_per_stage"][::-1],
        )
        processor = hf.Sam2Processor(image_processor=hf.Sam2ImageProcessor())
        return _create(lambda: hf.Sam2Model(hf.Sam2Config(vision_config=vision)), device), processor
    if segmenter == "sam3_tracker":
        processor = hf.Sam3TrackerProcessor(image_processor=hf.Sam3ImageProcessor())
        return _create(lambda: hf.Sam3TrackerModel(hf.Sam3TrackerConfig()), device), processor
    backbone = hf.TimmWrapperConfig(
        architecture="repvit_m1", model_args={"in_chans": 3, "features_only": True, "out_indices": [0, 1, 2, 3]}
    )
    config = hf.EdgeTamConfig(vision_config=hf.EdgeTamVisionConfig(backbone_config=backbone))
    processor = hf.Sam2Processor(image_processor=hf.Sam2ImageProcessor())
    return _create(lambda: hf.EdgeTamModel(config), device), processor


def model_key(args: argparse.Namespace) -> dict[str, str]:
    """What decides the models built: a --model-dir folder built for the same key is reused."""
    segmenter = "-" if args.detector == "sam3" else args.segmenter
    return {
        "models": args.models,
        "detector": args.detector,
        "segmenter": segmenter,
        "sam": args.sam,
        "sam_size": args.sam_size,
    }


def ensure_models(args: argparse.Namespace) -> tuple[dict[str, Any], float, tempfile.TemporaryDirectory | None]:
    """Model folder for `args` (built in a child process, so this process's peak RSS is loading and running only).

    With --model-dir an earlier build of the same kind is reused. Returns paths, build seconds, temp dir holder.
    """
    key = model_key(args)
    holder = None
    if args.model_dir:
        directory = Path(args.model_dir) / "-".join(key.values())
    else:
        holder = tempfile.TemporaryDirectory(prefix="bench-models-")
        directory = Path(holder.name)
    marker = directory / "bench_models.json"
    if marker.is_file() and json.loads(marker.read_text())["key"] == key:
        return json.loads(marker.read_text())["paths"], 0.0, holder
    started = time.perf_counter()
    options = ["--models", args.models, "--detector", args.detector, "--segmenter", args.segmenter]
    options += ["--sam", args.sam, "--sam-size", args.sam_size, "--device", args.device]
    subprocess.run([sys.executable, __file__, "--build-into", str(directory), *options], check=True)
    return json.loads(marker.read_text())["paths"], time.perf_counter() - started, holder


# ---------------------------------------------------------------------------------------------- images


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for part in text.split(","):
        width, height = part.lower().split("x")
        sizes.append((int(width), int(height)))
    return sizes


def generate_images(count: int, sizes: Sequence[tuple[int, int]], objects: int, noise: float, seed: int) -> list[bytes]:
    """PNG bytes of `count` images (sizes in turn): a gradient, `objects` filled shapes, Gaussian pixel noise.

    The noise (sigma `noise` grey levels) gives the PNGs a photo-like size, so decoding costs what it would.
    Image i depends only on (seed, i); they are made in threads (numpy and zlib release the GIL).
    """

    def one(index: int) -> bytes:
        rng = np.random.default_rng([seed, index])
        shapes = random.Random(seed * 1_000_003 + index)
        width, height = sizes[index % len(sizes)]
        ramp_x = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
        ramp_y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
        base = rng.uniform(40, 200, size=3).astype(np.float32)
        pixels = base + 50 * ramp_x * rng.uniform(-1, 1, size=3) + 50 * ramp_y * rng.uniform(-1, 1, size=3)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(objects):
            w = shapes.randint(width // 10, width // 3)
            h = shapes.randint(height // 10, height // 3)
            x, y = shapes.randint(0, width - w), shapes.randint(0, height - h)
            colour = tuple(shapes.randint(0, 255) for _ in range(3))
            kind = shapes.choice(("rectangle", "ellipse", "triangle"))
            if kind == "rectangle":
                draw.rectangle((x, y, x + w, y + h), fill=colour)
            elif kind == "ellipse":
                draw.ellipse((x, y, x + w, y + h), fill=colour)
            else:
                draw.polygon([(x, y + h), (x + w // 2, y), (x + w, y + h)], fill=colour)
        array = np.asarray(image, dtype=np.int16)
        if noise > 0:
            array = array + rng.normal(0, noise, size=array.shape).astype(np.int16)
        buffer = io.BytesIO()
        # Level 1: fast to write; inflating costs about the same at any level, so decoding is unaffected.
        Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).save(buffer, format="PNG", compress_level=1)
        return buffer.getvalue()

    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        return list(pool.map(one, range(count)))


def images_for(args: argparse.Namespace, count: int, seed: int) -> list[bytes]:
    """`generate_images` for `args`, read from / written to --image-cache when given."""
    sizes = parse_sizes(args.size)
    if not args.image_cache:
        return generate_images(count, sizes, args.objects, args.noise, seed)
    key = f"{count}-{args.size.replace(',', '_')}-{args.objects}-{args.noise:g}-{seed}"
    folder = Path(args.image_cache) / key
    if folder.is_dir() and len(list(folder.glob("*.png"))) == count:
        return [(folder / f"{index:05d}.png").read_bytes() for index in range(count)]
    encoded = generate_images(count, sizes, args.objects, args.noise, seed)
    folder.mkdir(parents=True, exist_ok=True)
    for index, data in enumerate(encoded):
        (folder / f"{index:05d}.png").write_bytes(data)
    return encoded


# ---------------------------------------------------------------------------------------------- timing


class Stages:
    """The bench's StageTimer (backend.pipeline.timing): per stage name, inclusive and exclusive seconds and a
    call count, while `enabled`; on CUDA the device is synchronised at every stage boundary.

    Exclusive ("own") time is a stage's time minus the stages nested in it on the same thread. Thread-safe; the
    staged pass runs everything on one thread, so there the own times add up to the pass's wall time.
    """

    def __init__(self, device: torch.device) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.own: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.enabled = False
        self._cuda = device.type == "cuda"
        self._lock = threading.Lock()
        self._open = threading.local()  # per thread: the nested seconds of each open stage, innermost last

    def sync(self) -> None:
        if self._cuda:
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        nested: list[float] = self._open.__dict__.setdefault("nested", [])
        self.sync()
        nested.append(0.0)
        started = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            elapsed = time.perf_counter() - started
            inner = nested.pop()
            if nested:
                nested[-1] += elapsed
            with self._lock:
                self.seconds[name] += elapsed
                self.own[name] += elapsed - inner
                self.counts[name] += 1

    def reset(self) -> None:
        with self._lock:
            self.seconds.clear()
            self.own.clear()
            self.counts.clear()


class EllipseMasks:
    """A Segmenter composed around the real one, for --masks ellipse: SAM runs in full, then each mask is
    replaced by the filled ellipse inscribed in its box, so that cleanup, RLE and JSON see object-like shapes.

    The swap runs in its own stage ("ellipse", left out of the table) and its seconds are kept in `seconds`,
    which the bench takes out of every wall time.
    """

    def __init__(self, inner: Segmenter, timer: StageTimer) -> None:
        self._inner = inner
        self._timer = timer
        self._lock = threading.Lock()
        self.seconds = 0.0

    def describe(self) -> dict[str, str]:
        return self._inner.describe()

    def segment(self, image: Pixels, boxes_xyxy: Floats) -> tuple[Masks, Scores]:
        return self.swapped(self._inner.segment(image, boxes_xyxy), boxes_xyxy)

    def segment_stream(
        self,
        images: Sequence[Pixels],
        boxes_xyxy: Sequence[Floats],
        known: Sequence[ImageEmbedding | None] | None = None,
        keep: Callable[[int, ImageEmbedding], None] | None = None,
    ) -> Iterator[tuple[Masks, Scores]]:
        found_per_image = self._inner.segment_stream(images, boxes_xyxy, known, keep)
        for found, boxes in zip(found_per_image, boxes_xyxy, strict=True):
            yield self.swapped(found, boxes)

    def encode(self, image: Pixels) -> ImageEmbedding:
        return self._inner.encode(image)

    def segment_points(
        self, embedding: ImageEmbedding, points_xy: Floats, positive: Flags, box_xyxy: Floats | None
    ) -> tuple[PackedMask, float]:
        return self._inner.segment_points(embedding, points_xy, positive, box_xyxy)

    @property
    def device(self) -> torch.device:
        return self._inner.device

    @property
    def embedding_dtype(self) -> torch.dtype:
        return self._inner.embedding_dtype

    def swapped(self, found: tuple[Masks, Scores], boxes: Floats) -> tuple[Masks, Scores]:
        """`found` (masks, scores) with the masks replaced by the ellipses in `boxes` ((N, 4) xyxy pixels)."""
        started = time.perf_counter()
        with self._timer.stage("ellipse"):  # numpy on the host: nothing on the device to wait for
            masks = ellipse_masks(found[0], boxes)
        with self._lock:
            self.seconds += time.perf_counter() - started
        return masks, found[1]


def ellipse_masks(masks: Masks, boxes: Floats) -> Masks:
    """Each mask replaced by the filled ellipse inscribed in its box (same image size), drawn on the box's
    window only (the image is never allocated whole)."""
    import cv2

    out = []
    for mask, (x0, y0, x1, y1) in zip(masks, boxes, strict=True):
        centre = (round((x0 + x1) / 2), round((y0 + y1) / 2))
        axes = (max(round((x1 - x0) / 2), 1), max(round((y1 - y0) / 2), 1))
        top, left = max(centre[1] - axes[1], 0), max(centre[0] - axes[0], 0)
        bottom, right = min(centre[1] + axes[1] + 1, mask.height), min(centre[0] + axes[0] + 1, mask.width)
        if bottom <= top or right <= left:  # wholly outside the image
            out.append(PackedMask.empty(mask.shape))
            continue
        plane = np.zeros((bottom - top, right - left), dtype=np.uint8)
        cv2.ellipse(plane, (centre[0] - left, centre[1] - top), axes, 0, 0, 360, 1, -1)
        out.append(PackedMask.from_window(plane.view(bool), top, left, mask.shape))
    return tuple(out)


class EllipseDetector:
    """SAM 3 alone for --masks ellipse: the real detector's instances, their masks swapped by `swapper`."""

    def __init__(self, inner: Sam3TextDetector, swapper: EllipseMasks) -> None:
        self._inner = inner
        self._swapper = swapper

    def describe(self) -> dict[str, str]:
        return self._inner.describe()

    def prepare(self, classes: Sequence[TextClass]) -> Sam3Prompts:
        return self._inner.prepare(classes)

    def segment_batch(
        self,
        images: Sequence[Image.Image],
        plan: Sam3Prompts,
        thresholds: DetectionThresholds,
        class_box_thresholds: Sequence[float] | None = None,
    ) -> list[Segmented]:
        found = self._inner.segment_batch(images, plan, thresholds, class_box_thresholds)
        return [self._swapped(segmented) for segmented in found]

    def _swapped(self, segmented: Segmented) -> Segmented:
        if segmented.masks is None or segmented.scores is None:
            return segmented
        boxes = np.array([d.box_xyxy for d in segmented.detections], dtype=np.float32)
        masks, scores = self._swapper.swapped((segmented.masks, segmented.scores), boxes)
        return Segmented(segmented.detections, masks, scores)


def load_pipeline(
    spec: ModelSpec,
    thresholds: DetectionThresholds,
    masks: str,
    timer: StageTimer,
    detector_options: DetectorOptions | None = None,
) -> tuple[GroundedSam, EllipseMasks | None]:
    """The production pipeline as build_pipeline loads it; for --masks ellipse, or other `detector_options` than
    production's for the device (the straightforward path: STRAIGHTFORWARD), the same parts from build_pipeline's
    own loaders (build_detector, build_segmenter, build_sam3), with SAM (SAM 3 alone: its detector) composed in an
    EllipseMasks (returned too) that swaps the masks for --masks ellipse."""
    if masks == "model" and detector_options is None:
        return build_pipeline(spec, thresholds, PostprocessOptions(), timer=timer), None
    architecture = detector_architecture(spec.detector)
    swapper = None
    if architecture.segments_text:  # SAM 3 alone: no detector options, its dtype is spec's
        sam3, tracker = build_sam3(spec, architecture, timer)
        swapper = EllipseMasks(tracker, timer) if masks == "ellipse" else None
        segmenter: Segmenter = swapper or tracker
        detector: GroundingDinoDetector | EllipseDetector | Sam3TextDetector = (
            EllipseDetector(sam3, swapper) if swapper else sam3
        )
    else:
        segmenter = build_segmenter(spec, timer)
        if masks == "ellipse":
            segmenter = swapper = EllipseMasks(segmenter, timer)
        detector = build_detector(spec, timer, detector_options)
    pipeline = GroundedSam(detector, segmenter, thresholds, PostprocessOptions(), timer=timer)
    return pipeline, swapper


def stage_table(own: dict[str, float], wall: float, images: int) -> dict[str, float]:
    """ms per image of every row of STAGES: exclusive times; "unattributed" is the wall time outside them."""
    rows = {key: own.get(key, 0.0) for key, _ in STAGES if key != "unattributed"}
    rows["unattributed"] = wall - sum(rows.values())
    return {key: 1000 * value / images for key, value in rows.items()}


def prediction_counts(outputs: Sequence[str]) -> dict[str, float]:
    """What went into the predictions, read from their JSON once the timing has stopped: brush regions per
    image, RLE ints per brush region, the mean share of the image each brush mask covers."""
    from label_studio_sdk.converter.brush import decode_rle

    rles = [
        region["value"]["rle"]
        for text in outputs
        for region in json.loads(text)["result"]
        if region["type"] == "brushlabels"
    ]
    return {
        "regions_per_image": len(rles) / max(len(outputs), 1),
        "rle_ints_per_mask": float(np.mean([len(rle) for rle in rles])) if rles else 0.0,
        # RGBA bytes, all four 255 where painted: the share of painted bytes is the share of painted pixels.
        "mask_fill_mean": float(np.mean([(decode_rle(rle) > 0).mean() for rle in rles])) if rles else 0.0,
    }


# ---------------------------------------------------------------------------------------------- the two paths


class Bench:
    """The two paths over the production PredictionFlow, timed through its StageTimer hook."""

    def __init__(
        self, flow: PredictionFlow, args: argparse.Namespace, stages: Stages, ellipse: EllipseMasks | None
    ) -> None:
        self.flow = flow
        self.device = torch.device(args.device)
        self.config = parse_label_config(Path(args.label_config).read_text())
        self.version = flow.model_version(self.config)
        self.batch = args.batch
        self.stages = stages
        self.ellipse = ellipse
        self.preprocess_threads = threads_module.PREPROCESS_THREADS
        self.sam_boxes: list[int] = []  # per image of the batched path, from the Segmented the flow streams

    def _decode(self, data: bytes) -> Image.Image:
        with self.stages.stage("decode"):
            return decode_image(data, MAX_PIXELS, source="bench image")

    def _dumped(self, prediction: dict[str, Any]) -> str:
        with self.stages.stage("json"):
            return json.dumps(prediction)

    def single(self, encoded: Sequence[bytes]) -> list[str]:
        """The straightforward path: each image alone, decoded, then PredictionFlow.predict, then json.dumps."""
        return [self._dumped(self.flow.predict(self._decode(data), self.config, self.version)) for data in encoded]

    def batched(self, encoded: Sequence[bytes]) -> list[str]:
        """The worker's bulk path: the images decoded on FETCH_THREADS threads, through the models as one
        PredictionFlow.stream, each image's PredictionFlow.result (cleanup, Label Studio result) and json.dumps
        on DELIVER_THREADS threads while the models go on. With stage timers on, the same work runs in order
        on this thread (so that the stages' exclusive times add up to the wall time)."""
        if self.stages.enabled:
            images = [self._decode(data) for data in encoded]
            return [self._result(image, segmented) for image, segmented in self._stream(images)]
        with (
            ThreadPoolExecutor(prelabel.FETCH_THREADS) as decoders,
            ThreadPoolExecutor(prelabel.DELIVER_THREADS) as deliverers,
        ):
            images = list(decoders.map(self._decode, encoded))
            futures = [deliverers.submit(self._result, image, segmented) for image, segmented in self._stream(images)]
            return [future.result() for future in futures]

    def _stream(self, images: Sequence[Image.Image]) -> Iterator[tuple[Image.Image, Segmented]]:
        for image, segmented in zip(images, self.flow.stream(images, self.config), strict=True):
            if isinstance(segmented, BackendError):
                raise segmented  # an image that does not fit in device memory even alone: the bench stops
            self.sam_boxes.append(len(segmented.detections))
            yield image, segmented

    def _result(self, image: Image.Image, segmented: Segmented) -> str:
        return self._dumped(self.flow.result(image, segmented, self.config, self.version))


Lane = tuple[Bench, Callable[[Sequence[bytes]], list[str]]]  # a path: its Bench (flow, timer) and its call


def measure(
    lanes: dict[str, Lane], encoded: Sequence[bytes], staged: bool
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The paths of `lanes` over `encoded`, interleaved in rounds of --batch images (orders alternate: AB BA AB ...),
    so that load from other processes and clock drift fall on both alike. Returns results and outputs per path.

    Peak memory per path: torch.cuda.max_memory_allocated on CUDA; on Linux the process's peak RSS (VmHWM), reset
    before each of the path's rounds (/proc/self/clear_refs), the largest over its rounds.
    """
    first = next(iter(lanes.values()))[0]
    device, stages, batch = first.device, first.stages, first.batch
    wall = dict.fromkeys(lanes, 0.0)
    own: dict[str, dict[str, float]] = {path: defaultdict(float) for path in lanes}
    counts: dict[str, dict[str, int]] = {path: defaultdict(int) for path in lanes}
    cuda_peak = dict.fromkeys(lanes, 0)
    rss_peak = dict.fromkeys(lanes, 0.0)
    excluded = dict.fromkeys(lanes, 0.0)
    outputs: dict[str, list[str]] = {path: [] for path in lanes}
    stages.enabled = staged
    # The staged pass runs the processors' work in order too (threads.py: the knob for that).
    threads_module.PREPROCESS_THREADS = 1 if staged else first.preprocess_threads
    for bench, _ in lanes.values():
        bench.sam_boxes.clear()
    for round_index, start in enumerate(range(0, len(encoded), batch)):
        chunk = encoded[start : start + batch]
        order = list(lanes) if round_index % 2 == 0 else list(lanes)[::-1]
        for path in order:
            bench, call = lanes[path]
            ellipse = bench.ellipse
            stages.reset()
            swapped_before = ellipse.seconds if ellipse else 0.0
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            reset_peak_rss()
            started = time.perf_counter()
            outputs[path].extend(call(chunk))
            stages.sync()
            swapped = (ellipse.seconds if ellipse else 0.0) - swapped_before
            wall[path] += time.perf_counter() - started - swapped
            excluded[path] += swapped
            rss_peak[path] = max(rss_peak[path], peak_rss_mb())
            if device.type == "cuda":
                cuda_peak[path] = max(cuda_peak[path], torch.cuda.max_memory_allocated())
            for key, value in stages.own.items():
                own[path][key] += value
            for key, value in stages.counts.items():
                counts[path][key] += value
    stages.enabled = False
    threads_module.PREPROCESS_THREADS = first.preprocess_threads
    results = {}
    for path, (bench, call) in lanes.items():
        result: dict[str, Any] = {
            "wall_s": wall[path],
            "images_per_s": len(encoded) / wall[path],
            "ms_per_image": 1000 * wall[path] / len(encoded),
            "bench_overhead_excluded_s": excluded[path],
            "peak_rss_mb": rss_peak[path],
        }
        if device.type == "cuda":
            result["cuda_max_allocated_mb"] = cuda_peak[path] / 2**20
        if staged:
            result["stages_ms_per_image"] = stage_table(own[path], wall[path], len(encoded))
            result["calls"] = dict(counts[path])
            result |= prediction_counts(outputs[path])
            if bench.sam_boxes and getattr(call, "__func__", None) is Bench.batched:
                result["sam_boxes_per_image"] = sum(bench.sam_boxes) / len(encoded)
        results[path] = result
    return results, outputs


def image_processors(paths: dict[str, str]) -> dict[str, str]:
    """The image-processor classes AutoProcessor resolves for the model folders (as build_pipeline loads them)."""
    from transformers import AutoProcessor

    names = {"detector": type(AutoProcessor.from_pretrained(paths["detector"]).image_processor).__name__}
    if "sam_checkpoint" not in paths and paths["sam"] != paths["detector"]:
        names["sam"] = type(AutoProcessor.from_pretrained(paths["sam"]).image_processor).__name__
    return names


_PEAK_RSS_MB = [0.0]  # the largest peak seen: resetting VmHWM (reset_peak_rss) resets ru_maxrss too


def peak_rss_mb() -> float:
    """This process's peak RSS in MB since the last reset_peak_rss (VmHWM; elsewhere ru_maxrss)."""
    now = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                now = int(line.split()[1]) / 1024
    _PEAK_RSS_MB[0] = max(_PEAK_RSS_MB[0], now)
    return now


def peak_rss_all_mb() -> float:
    """The process's peak RSS in MB over the whole run, resets or not."""
    peak_rss_mb()
    return _PEAK_RSS_MB[0]


def reset_peak_rss() -> None:
    """Start peak RSS (VmHWM) afresh from the current RSS (Linux: clear_refs 5); a no-op elsewhere."""
    peak_rss_mb()
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def compare(single: Sequence[str], batched: Sequence[str]) -> dict[str, Any]:
    """How far the two paths' predictions agree (random weights: batch float noise may reorder near ties)."""
    same_json = sum(a == b for a, b in zip(single, batched, strict=True))
    same_regions = sum(
        len(json.loads(a)["result"]) == len(json.loads(b)["result"]) for a, b in zip(single, batched, strict=True)
    )
    return {
        "identical_json": same_json,
        "same_region_count": same_regions,
        "images": len(single),
        "json_bytes_per_image": float(np.mean([len(text) for text in batched])),
    }


# ---------------------------------------------------------------------------------------------- report


def machine(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],  # 1/5/15 min: other work on this machine
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {
            "gpu": props.name,
            "gpu_memory_gb": round(props.total_memory / 2**30, 1),
            "gpu_capability": f"{props.major}.{props.minor}",
            "gpu_multiprocessors": props.multi_processor_count,
            "cuda": torch.version.cuda,
        }
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            info["gpu_driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
    return info


def versions() -> dict[str, str | None]:
    names = [
        "torch",
        "transformers",
        "torchvision",
        "numpy",
        "pillow",
        "opencv-python-headless",
        "label-studio-sdk",
        "segment-anything",
        "safetensors",
        "tokenizers",
    ]
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "backend"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        out["repo_commit"] = commit + ("+dirty backend/" if dirty else "")
    return out


def print_report(report: dict[str, Any]) -> None:
    p = report["parameters"]
    m = report["machine"]
    hardware = m.get("gpu") or m["cpu"]
    print()
    families = report["models"]["families"]
    parameters = report["models"]["parameters"]
    print(
        f"pipeline bench: {p['images']} images {p['size']}, {p['objects']} objects, models {p['models']} "
        f"(detector {families['detector']}, segmenter {families['segmenter']}"
        f"{' ' + p['sam'] + ' ' + report['models']['sam_type'] if families['segmenter'] == 'sam' else ''}, "
        f"SAM {', '.join(f'{k} {v}' for k, v in report['sam_dtypes'].items())}), {p['device']}, batch {p['batch']}, "
        f"masks {p['masks']}"
    )
    print("parameters: " + ", ".join(f"{role} {count['total'] / 1e6:.1f} M" for role, count in parameters.items()))
    print(f"hardware: {hardware}; {m['cpus_usable']} CPUs usable, torch threads {m['torch_threads']}")
    print(
        f"thresholds: {report['thresholds']} -- random weights pass almost every query, so box/text thresholds "
        f"are 0 and max_detections = --objects: SAM gets the same box count on both paths"
    )
    runs = report["runs"]
    throughput = report["throughput_pass"]
    first, second = runs[throughput]
    one, two = runs[throughput][first], runs[throughput][second]
    print(
        f"\nthroughput ({throughput} pass): {first} {one['images_per_s']:.3f} img/s, "
        f"{second} {two['images_per_s']:.3f} img/s, ratio {second}/{first} {report['ratio']:.3f}"
    )
    if "staged" in runs:
        rows_one, rows_two = runs["staged"][first], runs["staged"][second]
        print(f"\nper stage, ms/img ('staged' pass{', synchronised at every stage' if p['device'] == 'cuda' else ''})")
        print(f"{'stage':<20}{first[:15]:>16}{second[:15]:>16}  what")
        for key, what in STAGES:
            ms_one, ms_two = rows_one["stages_ms_per_image"][key], rows_two["stages_ms_per_image"][key]
            print(f"{key:<20}{ms_one:>16.2f}{ms_two:>16.2f}  {what}")
        print(f"{'total':<20}{rows_one['ms_per_image']:>16.2f}{rows_two['ms_per_image']:>16.2f}")
        print(
            f"SAM boxes/img ({second}) {rows_two.get('sam_boxes_per_image', 0.0):.2f}, "
            f"regions/img {rows_one['regions_per_image']:.2f} / {rows_two['regions_per_image']:.2f}, "
            f"RLE ints/mask {rows_one['rle_ints_per_mask']:.0f}, mask fill {rows_one['mask_fill_mean']:.2f}"
        )
    memory = (
        f"\npeak RSS {report['memory']['peak_rss_mb']:.0f} MB "
        f"(after load {report['memory']['rss_after_load_mb']:.0f} MB; per path {first} {one['peak_rss_mb']:.0f} MB, "
        f"{second} {two['peak_rss_mb']:.0f} MB)"
    )
    if "cuda_max_allocated_mb" in one:
        memory += (
            f"; CUDA max allocated {first} {one['cuda_max_allocated_mb']:.0f} MB, "
            f"{second} {two['cuda_max_allocated_mb']:.0f} MB (weights {report['memory']['cuda_weights_mb']:.0f} MB)"
        )
    print(memory)
    print(f"agreement: {report['agreement']}")
    print(f"equivalence ({second} against {first}): {report['equivalence']}")


# ---------------------------------------------------------------------------------------------- detector fast path

# Rows of the detector comparison's stage table (exclusive times, as STAGES).
DETECTOR_STAGES = [
    ("decode", "decode PNG bytes (the CPU's only work on the fast path)"),
    ("detector_preprocess", "straightforward: processor on the CPU per image; fast: uint8 to the device, resize there"),
    ("detector_forward", "detector forward, host->device copies included (fast: the text backbone once per plan)"),
    ("detector", "scoring, NMS, boxes to pixels"),
    ("unattributed", "wall time of the pass not inside any stage"),
]


def detector_paths(spec: ModelSpec, args: argparse.Namespace, stages: Stages) -> dict[str, GroundingDinoDetector]:
    """Each its own copy: the straightforward detector (today's: the processor on the CPU, the whole model per
    row), the fast one (text features once, preprocessing on the device, compiled with --compile), and text
    features once alone (what production runs on the CPU: detector.device_options)."""
    options = {
        "straight": STRAIGHTFORWARD,
        "fast": DetectorOptions(compile=args.compile),
        "text_only": DetectorOptions(device_preprocess=False, compile=args.compile),
    }
    return {name: build_detector(spec, stages, chosen) for name, chosen in options.items()}


def detector_pass(
    detectors: dict[str, GroundingDinoDetector],
    encoded: Sequence[bytes],
    args: argparse.Namespace,
    stages: Stages,
    staged: bool,
) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """Both detectors over `encoded` in rounds of --batch images (decode, then detect_batch), orders alternating
    AB BA; the staged pass times the stages with the processors' work on this thread. Returns results, outputs."""
    config = parse_label_config(Path(args.label_config).read_text())
    classes = [TextClass(label.value, label.phrases) for label in config.labels]
    thresholds = DetectionThresholds(box=0.0, text=0.0, max_detections=args.objects)
    plans = {name: detector.prepare(classes) for name, detector in detectors.items()}
    wall = dict.fromkeys(detectors, 0.0)
    own: dict[str, dict[str, float]] = {name: defaultdict(float) for name in detectors}
    outputs: dict[str, list[Any]] = {name: [] for name in detectors}
    saved_threads = threads_module.PREPROCESS_THREADS
    threads_module.PREPROCESS_THREADS = 1 if staged else saved_threads
    stages.enabled = staged
    try:
        for round_index, start in enumerate(range(0, len(encoded), args.batch)):
            chunk = encoded[start : start + args.batch]
            order = list(detectors) if round_index % 2 == 0 else list(detectors)[::-1]  # ABC CBA ...
            for name in order:
                stages.reset()
                stages.sync()
                started = time.perf_counter()
                images = [_decoded(data, stages) for data in chunk]
                with torch.inference_mode():
                    outputs[name].extend(detectors[name].detect_batch(images, plans[name], thresholds))
                stages.sync()
                wall[name] += time.perf_counter() - started
                for key, value in stages.own.items():
                    own[name][key] += value
    finally:
        stages.enabled = False
        threads_module.PREPROCESS_THREADS = saved_threads
    results: dict[str, Any] = {}
    for name in detectors:
        result: dict[str, Any] = {"wall_s": wall[name], "images_per_s": len(encoded) / wall[name]}
        result["ms_per_image"] = 1000 * wall[name] / len(encoded)
        if staged:
            rows = {key: own[name].get(key, 0.0) for key, _ in DETECTOR_STAGES if key != "unattributed"}
            rows["unattributed"] = wall[name] - sum(rows.values())
            result["stages_ms_per_image"] = {key: 1000 * value / len(encoded) for key, value in rows.items()}
        results[name] = result
    return results, outputs


def _decoded(data: bytes, stages: Stages) -> Image.Image:
    with stages.stage("decode"):
        return decode_image(data, MAX_PIXELS, source="bench image")


def detector_agreement(straight: Sequence[Any], fast: Sequence[Any]) -> dict[str, Any]:
    """Images whose detections have the same labels and boxes within 1 px (compared in label, box order: random
    weights saturate many scores at 1.0), and the largest box difference over those."""
    same, largest = 0, 0.0
    for mine, theirs in zip(fast, straight, strict=True):
        order = sorted(mine, key=_place), sorted(theirs, key=_place)
        if [d.class_index for d in order[0]] != [d.class_index for d in order[1]]:
            continue
        pairs = zip(*order, strict=True)
        gap = max((abs(a - b) for x, y in pairs for a, b in zip(x.box_xyxy, y.box_xyxy, strict=True)), default=0.0)
        same += gap <= 1.0
        largest = max(largest, gap)
    return {"images": len(fast), "same_detections_within_1px": same, "max_box_difference_px": largest}


def _place(detection: Any) -> tuple[int, ...]:
    return (detection.class_index, *(round(value) for value in detection.box_xyxy))


def detector_main(args: argparse.Namespace) -> dict[str, Any]:
    """--detector-only: the detector's straightforward and fast paths side by side in one run (see DETECTOR_STAGES)."""
    if args.detector == "sam3":
        raise SystemExit("--detector-only compares the Grounding DINO family's paths; SAM 3 alone has no such path")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    paths, build_s, holder = ensure_models(args)
    spec = ModelSpec(detector=paths["detector"], sam=paths["sam"], device=args.device)
    stages = Stages(device)
    detectors = detector_paths(spec, args, stages)
    sizes = parse_sizes(args.size)
    encoded = images_for(args, args.images, args.seed)
    warm = images_for(args, max(args.batch, len(sizes)), args.seed + 1)
    started = time.perf_counter()
    detector_pass(detectors, warm, args, stages, staged=False)  # warm-up (and every compile) on other images
    warmup_s = time.perf_counter() - started
    passes = ["staged"] if args.passes == "staged" else ["clean", "staged"]
    runs, outputs = {}, {}
    for name in passes:
        runs[name], outputs = detector_pass(detectors, encoded, args, stages, staged=name == "staged")
        print(
            f"{name} pass: " + ", ".join(f"{k} {v['images_per_s']:.3f} img/s" for k, v in runs[name].items()),
            flush=True,
        )
    throughput = passes[0]
    report = header("pipeline --detector-only", args, device, load_at_start) | {
        "families": {"detector": paths["families"]["detector"]},
        "paths": {
            "straight": "today's: the checkpoint's processor per image on the CPU (PREPROCESS_THREADS), the whole "
            "model (BERT included) for every image x chunk row",
            "fast": "text backbone once per plan, uint8 pixels to the device and resized/normalised there"
            + (", forward torch.compiled (inductor, dynamic=False)" if args.compile else ""),
            "text_only": "text backbone once per plan, the processor on the CPU as straight (production on the CPU)",
        },
        "image_processors": {
            name: type(d._device_processor or d._processor.image_processor).__name__ for name, d in detectors.items()
        },
        "build_s": build_s,
        "warmup_s": warmup_s,
        "throughput_pass": throughput,
        "ratio": runs[throughput]["fast"]["images_per_s"] / runs[throughput]["straight"]["images_per_s"],
        "ratio_text_only": runs[throughput]["text_only"]["images_per_s"] / runs[throughput]["straight"]["images_per_s"],
        "ratio_per_pass": {
            name: {path: run[path]["images_per_s"] / run["straight"]["images_per_s"] for path in ("fast", "text_only")}
            for name, run in runs.items()
        },
        "runs": runs,
        "agreement": {path: detector_agreement(outputs["straight"], outputs[path]) for path in ("fast", "text_only")},
        "stage_keys": dict(DETECTOR_STAGES),
        "peak_rss_mb": peak_rss_mb(),
    }
    print_detector_report(report)
    return finished(report, args.out, holder)


def header(bench: str, args: argparse.Namespace, device: torch.device, load_at_start: list[float]) -> dict[str, Any]:
    """The fields every report of this script starts with: what ran, when, how, on what, with which versions."""
    return {
        "bench": bench,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "parameters": {k: v for k, v in vars(args).items() if k not in ("build_into",)},
        "machine": machine(device) | {"load_average_at_start": load_at_start},
        "versions": versions(),
    }


def finished(report: dict[str, Any], out: str | None, holder: tempfile.TemporaryDirectory | None) -> dict[str, Any]:
    """Write `report` to `out` (when given), remove the temporary model folder (when one was made); `report`."""
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")
    if holder is not None:
        holder.cleanup()
    return report


def print_detector_report(report: dict[str, Any]) -> None:
    p, runs = report["parameters"], report["runs"]
    family = report["families"]["detector"]
    print(
        f"\ndetector paths: {p['images']} images {p['size']}, {p['models']} {family}, {p['device']}, batch {p['batch']}"
    )
    print(
        f"ratio to straightforward ({report['throughput_pass']} pass): fast {report['ratio']:.3f}, "
        f"text_only {report['ratio_text_only']:.3f}"
    )
    if "staged" in runs:
        staged = runs["staged"]
        print(f"{'stage':<20}" + "".join(f"{name:>11}" for name in staged) + "  what (ms/img)")
        for key, what in DETECTOR_STAGES:
            print(
                f"{key:<20}"
                + "".join(f"{run['stages_ms_per_image'][key]:>11.2f}" for run in staged.values())
                + f"  {what}"
            )
        print(f"{'total':<20}" + "".join(f"{run['ms_per_image']:>11.2f}" for run in staged.values()))
    print(f"agreement: {report['agreement']}")


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=16, help="images per path")
    parser.add_argument(
        "--size", default="1920x1080", help="WxH, or several comma-separated (images take them in turn)"
    )
    parser.add_argument("--objects", type=int, default=5, help="shapes drawn per image = max detections (SAM boxes)")
    parser.add_argument("--models", choices=("tiny", "full"), default="tiny")
    parser.add_argument(
        "--detector",
        choices=DETECTORS,
        default="grounding-dino",
        help="text detector family; sam3: SAM 3 alone (its masks, its tracker for clicks; --segmenter unused)",
    )
    parser.add_argument(
        "--segmenter", choices=SEGMENTERS, default="sam", help="SAM family segmenting the detector's boxes"
    )
    parser.add_argument(
        "--family",
        choices=tuple(FAMILIES),
        help="a preset --detector/--segmenter pair: " + ", ".join(f"{k} = {d} + {s}" for k, (d, s) in FAMILIES.items()),
    )
    parser.add_argument(
        "--sam",
        choices=("hf", "pth"),
        default="hf",
        help="--segmenter sam: transformers SamModel or segment-anything .pth",
    )
    parser.add_argument(
        "--sam-size", choices=tuple(SAM_SIZES), default="vit_h", help="SAM / SAM-HQ encoder of --models full"
    )
    parser.add_argument(
        "--sam-dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="SAM_DTYPE: the segmenter's, and SAM 3's (Grounding DINO always runs in float32)",
    )
    parser.add_argument(
        "--sam-image-batch",
        type=int,
        default=1,
        help="images per SAM encoder forward on the batched path (SAM_IMAGE_BATCH)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--batch", type=int, default=8, help="images per run_batch call on the batched path")
    parser.add_argument("--label-config", default=str(ROOT / "label_config" / "brush.xml"))
    parser.add_argument(
        "--masks",
        choices=("model", "ellipse"),
        default="model",
        help="model: the random-weight SAM masks as they come; ellipse: after SAM has run, each "
        "mask is replaced by the ellipse in its box so that cleanup/RLE/JSON cost what "
        "object-like masks cost (the swap's time is excluded)",
    )
    parser.add_argument("--noise", type=float, default=8.0, help="pixel noise sigma of the generated images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up calls of each path (one batch each)")
    parser.add_argument(
        "--passes",
        choices=("both", "staged"),
        default="both",
        help="both: a pass without stage timers for images/s (the batched path overlapping CPU "
        "work with the models as the worker does), then one with them; staged: only that one",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (default: torch's choice). On a shared "
        "CPU, 1 avoids OpenMP threads waiting on each other, which slows many small ops (tiny models)",
    )
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmuls/convolutions (production does not)")
    parser.add_argument("--image-cache", help="keep generated PNGs here and reuse them (default: generate each run)")
    parser.add_argument("--model-dir", help="keep built models here and reuse them (default: a temporary folder)")
    parser.add_argument("--out", help="write the JSON report here")
    parser.add_argument(
        "--detector-only",
        action="store_true",
        help="time the detector alone: today's straightforward path against the fast path (text features once, "
        "preprocessing on the device) side by side; no SAM",
    )
    parser.add_argument(
        "--paths",
        choices=("single,batched", "straightforward,fast"),
        default="single,batched",
        help="single,batched: one production pipeline, predict per image against the bulk path; "
        "straightforward,fast: the straightforward fp32 path (STRAIGHTFORWARD detector, SAM float32, one image at a "
        "time) against the fast one (production's defaults for --device, the bulk path); --sam-dtype unused",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="the fast path's detector torch.compiled (DETECTOR_COMPILE): --detector-only, --paths ...,fast",
    )
    parser.add_argument("--build-into", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.family:
        args.detector, args.segmenter = FAMILIES[args.family]
    if args.sam == "pth" and (args.segmenter != "sam" or args.detector == "sam3"):
        parser.error("--sam pth is segment-anything's SAM: only with --segmenter sam and a box detector")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.build_into:
        directory = Path(args.build_into)
        paths = build_models(directory, args)
        (directory / "bench_models.json").write_text(json.dumps({"key": model_key(args), "paths": paths}))
        return {}
    if args.detector_only:
        return detector_main(args)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    load_at_start = [round(x, 2) for x in os.getloadavg()]
    paths, build_s, holder = ensure_models(args)
    spec = ModelSpec(
        detector=paths["detector"],
        sam=paths["sam"],
        sam_checkpoint=paths.get("sam_checkpoint"),
        sam_model_type=paths["sam_type"],
        device=args.device,
        sam_dtype=args.sam_dtype,
        sam_image_batch=args.sam_image_batch,
        detector_compile=args.compile,
    )
    thresholds = DetectionThresholds(box=0.0, text=0.0, max_detections=args.objects)
    stages = Stages(device)
    started = time.perf_counter()
    lanes, pipelines = make_lanes(spec, thresholds, args, stages)
    load_s = time.perf_counter() - started
    memory: dict[str, float] = {"rss_after_load_mb": peak_rss_mb()}
    if device.type == "cuda":
        memory["cuda_weights_mb"] = torch.cuda.memory_allocated() / 2**20

    sizes = parse_sizes(args.size)
    started = time.perf_counter()
    encoded = images_for(args, args.images, args.seed)
    warm = images_for(args, max(args.batch, len(sizes)), args.seed + 1)
    images_s = time.perf_counter() - started

    processors = image_processors(paths)
    for _ in range(args.warmup):
        for _bench, call in lanes.values():
            call(warm[: len(sizes)] if getattr(call, "__func__", None) is Bench.single else warm)

    names = list(lanes)
    passes = ["staged"] if args.passes == "staged" else ["clean", "staged"]
    runs: dict[str, dict[str, Any]] = {}
    for name in passes:
        runs[name], outputs = measure(lanes, encoded, staged=name == "staged")
        memory[f"peak_rss_mb_after_{name}_pass"] = peak_rss_all_mb()
        print(
            f"{name} pass: " + ", ".join(f"{path} {runs[name][path]['images_per_s']:.3f} img/s" for path in names),
            flush=True,
        )
    throughput = passes[0]
    memory["peak_rss_mb"] = peak_rss_all_mb()
    first, second = names

    report = header("pipeline", args, device, load_at_start) | {
        "families": paths["families"],
        "parameters_millions": {role: count["total"] / 1e6 for role, count in paths["parameters"].items()},
        "models": {
            **paths,
            "build_s": build_s,
            "load_s": load_s,
            "image_processors": processors,
            "describe": {path: pipeline.describe() for path, pipeline in pipelines.items()},
        },
        "paths": lane_descriptions(args),
        "sam_dtypes": (
            {"single,batched": args.sam_dtype}
            if args.paths == "single,batched"
            else {"straightforward": "float32", "fast": fast_sam_dtype(args.device)}
        ),
        "thresholds": asdict(thresholds),
        "note": "random weights: box/text thresholds 0 and max_detections = --objects, so SAM decodes the same "
        "number of boxes per image on both paths. "
        + (
            "Masks after SAM replaced by the ellipse in each box (--masks ellipse; swap time excluded), so "
            "cleanup, RLE and JSON see object-like shapes."
            if args.masks == "ellipse"
            else "Masks as the random-weight SAM gives them: cleanup, RLE and JSON cost differs from trained "
            "weights' masks."
        ),
        "image_bytes_mean": float(np.mean([len(data) for data in encoded])),
        "images_s": images_s,
        "throughput_pass": throughput,
        "ratio_of": f"{second}/{first} images/s",
        "ratio": runs[throughput][second]["images_per_s"] / runs[throughput][first]["images_per_s"],
        "ratio_per_pass": {
            name: run[second]["images_per_s"] / run[first]["images_per_s"] for name, run in runs.items()
        },
        "runs": runs,
        "memory": memory,
        "agreement": compare(outputs[first], outputs[second]),
        "equivalence": equivalence(outputs[first], outputs[second])
        | (
            {"masks": "--masks ellipse: both paths' masks are their boxes' ellipses, so the IoU compares the boxes"}
            if args.masks == "ellipse"
            else {}
        ),
        "stage_keys": dict(STAGES),
    }
    print_report(report)
    return finished(report, args.out, holder)


def make_lanes(
    spec: ModelSpec, thresholds: DetectionThresholds, args: argparse.Namespace, stages: Stages
) -> tuple[dict[str, Lane], dict[str, GroundedSam]]:
    """The two paths of --paths, and their pipelines, loaded from the same saved weights.

    single,batched: one production pipeline (spec as given), PredictionFlow.predict per image against the bulk
    path. straightforward,fast: the straightforward path (the detector's STRAIGHTFORWARD options, SAM in float32,
    predict per image) against the fast one (production's defaults for the device: device_options, SAM_DTYPE=auto
    resolved as Settings does, DETECTOR_COMPILE with --compile; the bulk path).
    """
    if args.paths == "single,batched":
        pipeline, ellipse = load_pipeline(spec, thresholds, args.masks, stages)
        bench = Bench(flow_of(pipeline, stages), args, stages, ellipse)
        return {"single": (bench, bench.single), "batched": (bench, bench.batched)}, {"single,batched": pipeline}
    straight_spec = dataclasses.replace(spec, sam_dtype="float32", detector_compile=False)
    straight, straight_ellipse = load_pipeline(straight_spec, thresholds, args.masks, stages, STRAIGHTFORWARD)
    fast_spec = dataclasses.replace(spec, sam_dtype=fast_sam_dtype(args.device))
    fast, fast_ellipse = load_pipeline(fast_spec, thresholds, args.masks, stages)
    straight_bench = Bench(flow_of(straight, stages), args, stages, straight_ellipse)
    fast_bench = Bench(flow_of(fast, stages), args, stages, fast_ellipse)
    lanes = {"straightforward": (straight_bench, straight_bench.single), "fast": (fast_bench, fast_bench.batched)}
    return lanes, {"straightforward": straight, "fast": fast}


def fast_sam_dtype(device: str) -> Literal["float32", "bfloat16", "float16"]:
    """SAM_DTYPE=auto on `device`, resolved as the worker's Settings resolves it."""
    return Settings.model_construct(sam_dtype="auto").resolved_sam_dtype(device)


def flow_of(pipeline: GroundedSam, stages: Stages) -> PredictionFlow:
    """The production flow of `pipeline`: images at hand (no fetcher), the models' description as fingerprint."""
    return PredictionFlow(pipeline, fingerprint={"bench": pipeline.describe()}, timer=stages)


def lane_descriptions(args: argparse.Namespace) -> dict[str, str]:
    """What each path of the report runs, in words."""
    if args.paths == "single,batched":
        return {
            "single": "PredictionFlow.predict per image (decode, models, cleanup, RLE, JSON in turn)",
            "batched": "the worker's bulk path: decode on FETCH_THREADS, PredictionFlow.stream, result + JSON on "
            "DELIVER_THREADS overlapped with the models",
        }
    return {
        "straightforward": "one image at a time through PredictionFlow.predict, the detector's STRAIGHTFORWARD "
        "options (processor on the CPU, the whole model per row), SAM in float32",
        "fast": "the bulk path (as single,batched's batched) with production's defaults for "
        f"{args.device}: detector {device_options(args.device, compile=args.compile)}, SAM_DTYPE=auto resolved: "
        + fast_sam_dtype(args.device),
    }


def equivalence(reference: Sequence[str], other: Sequence[str]) -> dict[str, Any]:
    """How far `other`'s predictions match `reference`'s: images with the same labels (the regions' label
    multisets), identical results, and for every brush region of `reference` the IoU of the best-matching brush
    region of `other` with the same label (0 when there is none): min, mean, share >= 0.98."""
    from label_studio_sdk.converter.brush import decode_rle

    same_labels = identical = 0
    ious: list[float] = []
    for mine, theirs in zip(reference, other, strict=True):
        a, b = json.loads(mine)["result"], json.loads(theirs)["result"]
        same_labels += sorted(map(_region_label, a)) == sorted(map(_region_label, b))
        identical += a == b
        masks = [(_region_label(r), decode_rle(r["value"]["rle"])[3::4] > 0) for r in b if r["type"] == "brushlabels"]
        for region in (r for r in a if r["type"] == "brushlabels"):
            label, mask = _region_label(region), decode_rle(region["value"]["rle"])[3::4] > 0
            ious.append(max((_iou(mask, m) for lab, m in masks if lab == label), default=0.0))
    return {
        "images": len(reference),
        "same_labels": same_labels,
        "identical_results": identical,
        "brush_regions": len(ious),
        "mask_iou_min": min(ious, default=1.0),
        "mask_iou_mean": float(np.mean(ious)) if ious else 1.0,
        "mask_iou_at_least_0_98": float(np.mean([iou >= 0.98 for iou in ious])) if ious else 1.0,
    }


def _region_label(region: dict[str, Any]) -> str:
    value = region["value"]
    labels = value.get(region["type"]) or value.get("labels") or []
    return f"{region['type']}:{','.join(labels)}"


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int(np.logical_or(a, b).sum())
    return int(np.logical_and(a, b).sum()) / union if union else 1.0


if __name__ == "__main__":
    main()
