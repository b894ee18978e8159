"""The only place weights load: Grounding DINO and SAM from hub ids, local folders or official .pth files.

Before anything loads, every configured model is located (`locate_models`): a local path, or a hub id already in
the Hugging Face cache (then loaded from the cache, with no hub request), or else the hub must answer one quick
request (HUB_CHECK_TIMEOUT_S); when it does not, one ModelLoadError names every model that could not be found and
how to get it, instead of minutes of download retries. Whether hub ids may be downloaded at all is up to
huggingface_hub (HF_HUB_OFFLINE, HF_ENDPOINT, HF_HOME: its own environment variables).
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import httpx
import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils._validators import validate_repo_id
from safetensors import SafetensorError
from transformers import (
    AutoModelForMaskGeneration,
    AutoModelForZeroShotObjectDetection,
    AutoProcessor,
    PreTrainedModel,
    ProcessorMixin,
    Sam3Model,
    Sam3Processor,
    Sam3TrackerModel,
    Sam3TrackerProcessor,
)
from transformers.models.auto.auto_factory import _BaseAutoModelClass

from backend.errors import ModelLoadError
from backend.pipeline.architectures import (
    Architecture,
    detector_architecture,
    segmenter_architecture,
)
from backend.pipeline.detector import DetectorOptions, GroundingDinoDetector, device_options
from backend.pipeline.grounded_sam import GroundedSam
from backend.pipeline.sam3_text import Sam3TextDetector
from backend.pipeline.sam_precision import lowered
from backend.pipeline.segmenter import (
    HfSamSegmenter,
    SegmentAnythingSegmenter,
    Segmenter,
)
from backend.pipeline.timing import NO_TIMER, StageTimer
from backend.pipeline.types import DetectionThresholds, ModelSpec, PostprocessOptions

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

# What from_pretrained raises for a missing id or folder, a bad config, unreadable weights, or a processor
# whose backend is not installed (SAM 2's image processor needs torchvision).
_HF_LOAD_ERRORS = (OSError, ValueError, RuntimeError, ImportError, SafetensorError, pickle.UnpicklingError)
# (ViT width, depth) of the official segment-anything checkpoints.
_OFFICIAL_SAM = {(768, 12): "vit_b", (1024, 24): "vit_l", (1280, 32): "vit_h"}
# Libraries that attach a stderr handler of their own to their root logger: huggingface_hub's also propagates,
# so with the application's handler each of its warnings printed twice.
_SELF_LOGGING_LIBRARIES = ("huggingface_hub", "transformers")
# The one request that tells whether the hub answers at all, before any download is tried.
HUB_CHECK_TIMEOUT_S = 3.0
# What torch.load raises for a file that is no checkpoint (a text file: KeyError from its legacy format reader).
_CHECKPOINT_ERRORS = (OSError, RuntimeError, EOFError, pickle.UnpicklingError, KeyError, ValueError, IndexError)


def build_pipeline(
    spec: ModelSpec,
    thresholds: DetectionThresholds,
    postprocess: PostprocessOptions = PostprocessOptions(),
    *,
    timer: StageTimer = NO_TIMER,
) -> GroundedSam:
    """Load both models on `spec.device` in eval mode; raises ModelLoadError saying what was tried.

    DETECTOR_MODEL decides the pipeline: a Grounding DINO family detector is followed by SAM_MODEL on its boxes;
    SAM 3 finds and segments the objects itself, and its own tracker (when the checkpoint holds one) answers
    interactive prompts instead of SAM_MODEL. `timer` times the pipeline's stages (backend.pipeline.timing).
    """
    log_through_the_application()
    spec = locate_models(spec)  # every model found (or one error naming all that are not) before any loads
    architecture = detector_architecture(spec.detector)  # a wrong kind of checkpoint is named before loading
    if not architecture.has_tracker and spec.sam_checkpoint is None:
        segmenter_architecture(spec.sam)
    if architecture.segments_text:
        text_detector, segmenter = build_sam3(spec, architecture, timer)
        return GroundedSam(text_detector, segmenter, thresholds, postprocess, timer=timer)
    detector = build_detector(spec, timer)  # first: a missing detector is reported before SAM is loaded
    return GroundedSam(detector, build_segmenter(spec, timer), thresholds, postprocess, timer=timer)


def build_detector(
    spec: ModelSpec, timer: StageTimer = NO_TIMER, options: DetectorOptions | None = None
) -> GroundingDinoDetector:
    """The Grounding DINO family detector of `spec`, float32 on `spec.device` (ModelLoadError when it cannot be
    loaded). `options` default to the fast path for `spec.device` (detector.device_options)."""
    model, processor = _load_hf(spec.detector, AutoModelForZeroShotObjectDetection, torch.float32, "detector")
    chosen = options or device_options(spec.device, compile=spec.detector_compile)
    # PreTrainedModel.to is wrapped with functools.wraps(nn.Module.to), which mypy takes for an unbound function.
    return GroundingDinoDetector(model.to(spec.device), processor, timer, chosen)  # type: ignore[arg-type]


def build_sam3(
    spec: ModelSpec, architecture: Architecture, timer: StageTimer = NO_TIMER
) -> tuple[Sam3TextDetector, Segmenter]:
    """SAM 3 from text in `spec.sam_dtype` on `spec.device`, and what answers interactive prompts: its tracker when
    the checkpoint holds one (sharing the detector's vision backbone: its weights are held once), else SAM_MODEL."""
    dtype = getattr(torch, spec.sam_dtype)
    model, processor = _load_hf(spec.detector, Sam3Model, dtype, "SAM 3 model", Sam3Processor)
    if architecture.has_tracker:
        tracker, tracker_processor = _load_hf(
            spec.detector, Sam3TrackerModel, torch.float32, "SAM 3 tracker", Sam3TrackerProcessor
        )
        tracker, decoder = lowered(tracker, dtype)  # its prompt decoder stays float32 (sam_precision.py)
        share_backbone(tracker, model)
        segmenter: Segmenter = HfSamSegmenter(
            tracker.to(spec.device),  # type: ignore[arg-type]
            tracker_processor,
            image_batch=spec.sam_image_batch,
            timer=timer,
            decoder=decoder.to(spec.device),  # type: ignore[arg-type]
        )
    else:
        segmenter = build_segmenter(spec, timer)
    return Sam3TextDetector(model.to(spec.device), processor, timer), segmenter  # type: ignore[arg-type]


def share_backbone(tracker: PreTrainedModel, detector: PreTrainedModel) -> None:
    """Point SAM 3's tracker at the detector's vision backbone (both on the CPU, just loaded), so the worker holds
    those weights once: a full SAM 3 checkpoint stores them once and transformers loads them into each model.
    ModelLoadError when the two differ (then the checkpoint is not one SAM 3)."""
    # nn.Module.__getattr__ is typed Tensor | Module; both SAM 3 classes hold a vision_encoder module.
    ours: torch.nn.Module = tracker.vision_encoder.backbone  # type: ignore[union-attr,assignment]
    theirs: torch.nn.Module = detector.vision_encoder.backbone  # type: ignore[union-attr,assignment]
    mine, shared = ours.state_dict(), theirs.state_dict()
    if mine.keys() != shared.keys() or not all(torch.equal(mine[key], shared[key]) for key in mine):
        raise ModelLoadError(
            "SAM 3's tracker and detector hold different vision backbones; the checkpoint is not one SAM 3"
        )
    tracker.vision_encoder.backbone = theirs  # type: ignore[union-attr]


def build_segmenter(spec: ModelSpec, timer: StageTimer = NO_TIMER) -> Segmenter:
    """The SAM of `spec` (official checkpoint when set, else transformers) in `spec.sam_dtype` on its device."""
    dtype = getattr(torch, spec.sam_dtype)
    if spec.sam_checkpoint is not None:
        sam = _load_sam_checkpoint(Path(spec.sam_checkpoint), spec.sam_model_type)
        return SegmentAnythingSegmenter(sam.to(spec.device), spec.sam_checkpoint, dtype, timer=timer)
    # Loaded in float32: `lowered` keeps a float32 prompt decoder made from those weights (sam_precision.py).
    if segmenter_architecture(spec.sam).is_sam3_tracker:
        model, processor = _load_hf(spec.sam, Sam3TrackerModel, torch.float32, "SAM 3 tracker", Sam3TrackerProcessor)
    else:
        model, processor = _load_hf(spec.sam, AutoModelForMaskGeneration, torch.float32, "SAM model")
    model, decoder = lowered(model, dtype)
    return HfSamSegmenter(
        model.to(spec.device),  # type: ignore[arg-type]
        processor,
        image_batch=spec.sam_image_batch,
        timer=timer,
        decoder=decoder.to(spec.device),  # type: ignore[arg-type]
    )


def log_through_the_application() -> None:
    """When the application configured logging (the root logger has a handler), the model libraries' records go
    through it alone: each warning once, in the application's format. Else the libraries keep their own."""
    if not logging.getLogger().handlers:
        return
    for name in _SELF_LOGGING_LIBRARIES:
        library = logging.getLogger(name)
        for handler in list(library.handlers):
            library.removeHandler(handler)
        library.propagate = True


def locate_models(spec: ModelSpec, *, endpoint: str | None = None, offline: bool | None = None) -> ModelSpec:
    """`spec`, checked before anything loads: local paths stay; hub ids stay while the hub answers (transformers
    then uses the Hugging Face cache and completes an interrupted download); when the hub cannot serve (it does not
    answer within HUB_CHECK_TIMEOUT_S at `endpoint`, default HF_ENDPOINT, or `offline`, default HF_HUB_OFFLINE),
    each hub id in the cache is replaced by its cached folder, loaded without asking the hub again.

    ModelLoadError naming every model that cannot be found (and one fix per kind of problem): a path that is no
    folder and no hub id, a hub id neither cached nor downloadable, a SAM_CHECKPOINT that is no file. A full SAM 3
    detector at hand brings its own tracker, so SAM_MODEL and SAM_CHECKPOINT are then neither looked for nor used.
    """
    wanted = [(f"the detector (DETECTOR_MODEL={spec.detector!r})", spec.detector)]
    sam_wanted = not _brings_tracker(spec.detector)
    if sam_wanted and spec.sam_checkpoint is None:
        wanted.append((f"the SAM model (SAM_MODEL={spec.sam!r})", spec.sam))
    remote = [(named, source) for named, source in wanted if not Path(source).expanduser().exists()]
    no_folder = [f"{named} is no local folder (and no hub id)" for named, source in remote if not _is_hub_id(source)]
    hub_ids = [(named, source) for named, source in remote if _is_hub_id(source)]
    why = hub_unreachable(endpoint, offline) if hub_ids else None
    cached = {source: folder for _, source in hub_ids if why and (folder := _cached(source)) is not None}
    uncached = [(named, source) for named, source in hub_ids if why and source not in cached]
    missing = no_folder + ([_not_found([named for named, _ in uncached], why)] if why and uncached else [])
    checkpoint_missing = (
        sam_wanted and spec.sam_checkpoint is not None and not Path(spec.sam_checkpoint).expanduser().is_file()
    )
    if checkpoint_missing:
        missing.append(f"SAM_CHECKPOINT={spec.sam_checkpoint!r} is not a file")
    if missing:
        fixes = _fixes([source for _, source in uncached], bool(no_folder), checkpoint_missing)
        raise ModelLoadError(f"cannot load the models: {'; '.join(missing)}. Fix: {'; '.join(fixes)}")
    checkpoint = None if spec.sam_checkpoint is None else str(Path(spec.sam_checkpoint).expanduser())
    return replace(
        spec,
        detector=cached.get(spec.detector, _expanded(spec.detector)),
        sam=cached.get(spec.sam, _expanded(spec.sam)),
        sam_checkpoint=checkpoint,
    )


def _brings_tracker(detector: str) -> bool:
    """Whether `detector`, as a local folder or in the Hugging Face cache, is a full SAM 3 (it has its tracker).
    Nothing is downloaded to tell; an unreadable or absent config answers False (locating it reports why)."""
    local = Path(detector).expanduser()
    folder = str(local) if local.exists() else (_cached(detector) if _is_hub_id(detector) else None)
    if folder is None:
        return False
    try:
        return detector_architecture(folder).has_tracker
    except ModelLoadError:
        return False


def _expanded(source: str) -> str:
    """A local path with `~` expanded (what was checked is what loads); a hub id as it is."""
    path = Path(source).expanduser()
    return str(path) if path.exists() else source


def hub_unreachable(endpoint: str | None = None, offline: bool | None = None) -> str | None:
    """None when the Hugging Face hub answers an HTTP request (any status) within HUB_CHECK_TIMEOUT_S, else why
    it will not serve downloads, in words."""
    if hub_constants.HF_HUB_OFFLINE if offline is None else offline:
        return "HF_HUB_OFFLINE=1 forbids downloads"
    url = endpoint or hub_constants.ENDPOINT
    try:
        httpx.head(url, timeout=HUB_CHECK_TIMEOUT_S)
    except httpx.HTTPError as error:
        return f"the Hugging Face hub at {url} does not answer ({type(error).__name__}: {error or 'no answer'})"
    return None


def _is_hub_id(source: str) -> bool:
    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True


def _cached(repo_id: str) -> str | None:
    """The folder of `repo_id`'s snapshot in the Hugging Face cache (loaded from there, no hub request), or None."""
    try:
        folder = snapshot_download(repo_id, local_files_only=True)
    except OSError:  # LocalEntryNotFoundError: not (fully) cached
        return None
    return folder if isinstance(folder, str) else None


def _not_found(named: list[str], why: str) -> str:
    where = "is neither a local folder nor a hub id" if len(named) == 1 else "are neither local folders nor hub ids"
    return f"{' and '.join(named)} {where} in the Hugging Face cache, and {why}"


def _fixes(hub_ids: list[str], no_folder: bool, checkpoint_missing: bool) -> list[str]:
    """One fix per kind of problem `locate_models` found."""
    fixes = []
    if hub_ids:
        download = " and ".join(f"`hf download {source}`" for source in hub_ids)
        fixes.append(
            f"on a machine with network run {download} (`huggingface-cli download` in older huggingface_hub) and "
            "copy the Hugging Face cache (~/.cache/huggingface, or HF_HOME) here, then set HF_HUB_OFFLINE=1; or set "
            "the variable to a local folder written by save_pretrained"
        )
    if no_folder:
        fixes.append("set DETECTOR_MODEL / SAM_MODEL to an existing folder written by save_pretrained, or a hub id")
    if checkpoint_missing:
        fixes.append("point SAM_CHECKPOINT at the official .pth file, or unset it to use SAM_MODEL")
    return fixes


def _load_hf(
    source: str,
    model_class: type[_BaseAutoModelClass] | type[PreTrainedModel],
    dtype: torch.dtype,
    what: str,
    processor_class: type[AutoProcessor] | type[ProcessorMixin] = AutoProcessor,
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Model (eval, on CPU) and processor from a hub id or a folder written by save_pretrained.

    ModelLoadError when the weights miss any of the model's tensors or hold them in other shapes: transformers
    would leave those randomly initialised with a warning, and every prediction would be noise."""
    try:
        processor = processor_class.from_pretrained(source)
        # With output_loading_info the return is (model, what loaded), which the stubs do not say.
        model, loaded = cast(
            tuple[PreTrainedModel, dict[str, list[Any]]],
            model_class.from_pretrained(source, dtype=dtype, output_loading_info=True),
        )
    except _HF_LOAD_ERRORS as error:
        tried = "local folder" if Path(source).is_dir() else "Hugging Face hub id (no local folder has that path)"
        raise ModelLoadError(
            f"could not load the {what} from {source!r}, tried as a {tried}: {type(error).__name__}: {error}. "
            "Fix: give a folder written by save_pretrained (config.json, weights and processor files) or a hub "
            "id; with HF_HUB_OFFLINE=1 a hub id loads only if it is already in the Hugging Face cache."
        ) from error
    absent = [*loaded["missing_keys"], *(str(key) for key in loaded["mismatched_keys"])]
    if absent:
        raise ModelLoadError(
            f"the {what} from {source!r} ({type(model).__name__}) lacks {len(absent)} of its weights or holds them "
            f"in other shapes (first: {', '.join(sorted(absent)[:3])}), so they would be random. Fix: give a "
            "checkpoint of this architecture saved whole by save_pretrained, or the hub id it was published under"
        )
    # A model built from a part of its checkpoint's config (SAM 3's detector and tracker) is not told its source.
    model.name_or_path = model.name_or_path or source
    return model.eval(), processor


def _load_sam_checkpoint(path: Path, model_type: str) -> Sam:
    """An official segment-anything state dict, in an architecture read from its tensor shapes."""
    if not path.is_file():
        raise ModelLoadError(
            f"SAM checkpoint {str(path)!r} is not a file. Fix: download the official .pth "
            "(sam_vit_h_4b8939.pth, sam_vit_l_0b3195.pth or sam_vit_b_01ec64.pth) to that path, or leave the "
            "checkpoint unset to use a transformers SAM model."
        )
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except _CHECKPOINT_ERRORS as error:
        raise ModelLoadError(
            f"SAM checkpoint {str(path)!r} cannot be read as a state dict, so it is no segment-anything checkpoint "
            f"({type(error).__name__}: {_first_line(error)}). "
            "Fix: point SAM_CHECKPOINT at the official .pth file"
        ) from error
    if not isinstance(state_dict, dict):
        raise ModelLoadError(f"SAM checkpoint {str(path)!r} holds a {type(state_dict).__name__}, not a state dict")
    architecture = SamArchitecture.from_state_dict(state_dict, path)
    if architecture.official_type not in (None, model_type):
        raise ModelLoadError(
            f"SAM checkpoint {str(path)!r} holds a {architecture.official_type} model, but the model type is set "
            f"to {model_type}. Fix: set the model type to {architecture.official_type} or use the {model_type} file."
        )
    sam = architecture.build()
    try:
        sam.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise ModelLoadError(f"SAM checkpoint {str(path)!r} does not fit a segment-anything model: {error}") from error
    return sam.eval()


@dataclass(frozen=True, slots=True)
class SamArchitecture:
    """A segment-anything model's sizes, as read from a state dict (see `_build_sam` in the package).

    image_size, patch_size: input side and ViT patch side in pixels. window_size: 0 when every block is global.
    prompt_dim: the image embedding's channels, shared by the prompt encoder and mask decoder.
    """

    image_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    window_size: int
    global_attn_indexes: tuple[int, ...]
    prompt_dim: int
    decoder_depth: int
    decoder_mlp_dim: int
    iou_head_hidden_dim: int

    @property
    def official_type(self) -> str | None:
        """The official name ("vit_b", "vit_l" or "vit_h") of these sizes, else None."""
        return _OFFICIAL_SAM.get((self.embed_dim, self.depth))

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], path: Path) -> SamArchitecture:
        """Read the sizes from tensor shapes; ModelLoadError when a key is missing."""
        try:
            return cls._from_shapes({key: tuple(tensor.shape) for key, tensor in state_dict.items()})
        except (KeyError, IndexError, AttributeError) as error:
            raise ModelLoadError(
                f"SAM checkpoint {str(path)!r} is not a segment-anything state dict ({type(error).__name__}: {error})"
            ) from error

    @classmethod
    def _from_shapes(cls, shapes: dict[str, tuple[int, ...]]) -> SamArchitecture:
        embed_dim, _, patch_size, _ = shapes["image_encoder.patch_embed.proj.weight"]
        grid = shapes["image_encoder.pos_embed"][1]
        depth = _count_layers(shapes, "image_encoder.blocks.")
        # rel_pos tables are (2 * attended side - 1, head_dim): the full grid for global blocks, else the window.
        rel_pos = [shapes[f"image_encoder.blocks.{i}.attn.rel_pos_h"] for i in range(depth)]
        windows = {(length + 1) // 2 for length, _ in rel_pos} - {grid}
        return cls(
            image_size=grid * patch_size,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=embed_dim // rel_pos[0][1],
            mlp_ratio=shapes["image_encoder.blocks.0.mlp.lin1.weight"][0] / embed_dim,
            window_size=windows.pop() if windows else 0,
            global_attn_indexes=tuple(i for i, (length, _) in enumerate(rel_pos) if length == 2 * grid - 1),
            prompt_dim=shapes["image_encoder.neck.0.weight"][0],
            decoder_depth=_count_layers(shapes, "mask_decoder.transformer.layers."),
            decoder_mlp_dim=shapes["mask_decoder.transformer.layers.0.mlp.lin1.weight"][0],
            iou_head_hidden_dim=shapes["mask_decoder.iou_prediction_head.layers.0.weight"][0],
        )

    def build(self) -> Sam:
        """A randomly initialised `Sam` of these sizes; constants as in the package's `_build_sam`."""
        try:
            from segment_anything.modeling import (
                ImageEncoderViT,
                MaskDecoder,
                PromptEncoder,
                Sam,
                TwoWayTransformer,
            )
        except ImportError as error:  # the package's __init__ imports torchvision
            raise ModelLoadError(
                f"the segment-anything package cannot be imported ({error}); it needs torchvision: "
                "install the torchvision that matches your torch (README: Set up)"
            ) from error
        grid = self.image_size // self.patch_size
        encoder = ImageEncoderViT(
            img_size=self.image_size,
            patch_size=self.patch_size,
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            out_chans=self.prompt_dim,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=self.window_size,
            global_attn_indexes=self.global_attn_indexes,
        )
        decoder = MaskDecoder(
            transformer_dim=self.prompt_dim,
            transformer=TwoWayTransformer(
                depth=self.decoder_depth, embedding_dim=self.prompt_dim, mlp_dim=self.decoder_mlp_dim, num_heads=8
            ),
            num_multimask_outputs=3,
            iou_head_depth=3,
            iou_head_hidden_dim=self.iou_head_hidden_dim,
        )
        prompts = PromptEncoder(
            embed_dim=self.prompt_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(self.image_size, self.image_size),
            mask_in_chans=16,
        )
        return Sam(
            image_encoder=encoder,
            prompt_encoder=prompts,
            mask_decoder=decoder,
            pixel_mean=[123.675, 116.28, 103.53],
            pixel_std=[58.395, 57.12, 57.375],
        )


def _first_line(error: BaseException) -> str:
    """The first line of an error's message (torch.load's run on for paragraphs)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""


def _count_layers(shapes: dict[str, tuple[int, ...]], prefix: str) -> int:
    """Number of numbered sub-modules `prefix{i}.` in the state dict's keys."""
    return len({key[len(prefix) :].split(".", 1)[0] for key in shapes if key.startswith(prefix)})
