"""The only place weights load: Grounding DINO and SAM from hub ids, local folders or official .pth files.

Whether hub ids may be downloaded is up to huggingface_hub (HF_HUB_OFFLINE, set by the environment).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from transformers import (
    AutoModelForMaskGeneration,
    AutoModelForZeroShotObjectDetection,
    AutoProcessor,
    PreTrainedModel,
    ProcessorMixin,
)
from transformers.models.auto.auto_factory import _BaseAutoModelClass

from backend.errors import ModelLoadError
from backend.pipeline.detector import GroundingDinoDetector
from backend.pipeline.grounded_sam import GroundedSam
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


def build_pipeline(
    spec: ModelSpec,
    thresholds: DetectionThresholds,
    postprocess: PostprocessOptions = PostprocessOptions(),
    *,
    timer: StageTimer = NO_TIMER,
) -> GroundedSam:
    """Load both models on `spec.device` in eval mode; raises ModelLoadError saying what was tried.

    `timer` times the pipeline's stages (backend.pipeline.timing); the default measures nothing.
    """
    detector = build_detector(spec, timer)  # first: a missing detector is reported before SAM is loaded
    return GroundedSam(detector, build_segmenter(spec, timer), thresholds, postprocess, timer=timer)


def build_detector(spec: ModelSpec, timer: StageTimer = NO_TIMER) -> GroundingDinoDetector:
    """The Grounding DINO of `spec`, float32 on `spec.device` (ModelLoadError when it cannot be loaded)."""
    model, processor = _load_hf(spec.detector, AutoModelForZeroShotObjectDetection, torch.float32, "detector")
    # PreTrainedModel.to is wrapped with functools.wraps(nn.Module.to), which mypy takes for an unbound function.
    return GroundingDinoDetector(model.to(spec.device), processor, timer)  # type: ignore[arg-type]


def build_segmenter(spec: ModelSpec, timer: StageTimer = NO_TIMER) -> Segmenter:
    """The SAM of `spec` (official checkpoint when set, else transformers) in `spec.sam_dtype` on its device."""
    dtype = getattr(torch, spec.sam_dtype)
    if spec.sam_checkpoint is not None:
        sam = _load_sam_checkpoint(Path(spec.sam_checkpoint), spec.sam_model_type)
        return SegmentAnythingSegmenter(sam.to(spec.device), spec.sam_checkpoint, dtype, timer=timer)
    model, processor = _load_hf(spec.sam, AutoModelForMaskGeneration, dtype, "SAM model")
    return HfSamSegmenter(
        model.to(spec.device),  # type: ignore[arg-type]
        processor,
        image_batch=spec.sam_image_batch,
        timer=timer,
    )


def _load_hf(
    source: str, auto_model: type[_BaseAutoModelClass], dtype: torch.dtype, what: str
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Model (eval, on CPU) and processor from a hub id or a folder written by save_pretrained."""
    try:
        processor = AutoProcessor.from_pretrained(source)
        model = auto_model.from_pretrained(source, dtype=dtype)
    except _HF_LOAD_ERRORS as error:
        tried = "local folder" if Path(source).is_dir() else "Hugging Face hub id (no local folder has that path)"
        raise ModelLoadError(
            f"could not load the {what} from {source!r}, tried as a {tried}: {type(error).__name__}: {error}. "
            "Fix: give a folder written by save_pretrained (config.json, weights and processor files) or a hub "
            "id; with HF_HUB_OFFLINE=1 a hub id loads only if it is already in the Hugging Face cache."
        ) from error
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
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise ModelLoadError(f"SAM checkpoint {str(path)!r} cannot be read as a state dict: {error}") from error
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
                "pip install 'label-studio-grounded-sam[checkpoints]' or a torchvision matching your torch"
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


def _count_layers(shapes: dict[str, tuple[int, ...]], prefix: str) -> int:
    """Number of numbered sub-modules `prefix{i}.` in the state dict's keys."""
    return len({key[len(prefix) :].split(".", 1)[0] for key in shapes if key.startswith(prefix)})
