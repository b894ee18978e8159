"""Tiny randomly initialised models of every family the backend runs, saved where production loads them from.

Weights cannot be downloaded here, so tests build these from configs (seeded, a few seconds at most) and
load them back through `build_pipeline`: the same `from_pretrained` / `torch.load` code production runs.
Random weights give garbage scores: tests assert structure, never specific detections.

Each `build_tiny_<family>(directory) -> Path` saves a model and its processor (tokenizers built here) into
`directory` and returns it, to pass as DETECTOR_MODEL or SAM_MODEL:
- detectors: Grounding DINO (`build_tiny_grounding_dino`), MM-Grounding-DINO and LLMDet (one transformers class,
  MMGroundingDinoForObjectDetection: `build_tiny_mm_grounding_dino`, `build_tiny_llmdet`), and the large
  checkpoints' layout (four Swin stages feeding five feature levels: `build_tiny_mm_grounding_dino_large`);
  Grounding DINO base has tiny's layout with wider layers, so it needs no builder of its own;
- SAM 3 alone (`build_tiny_sam3`: detector and tracker in one "sam3_video" checkpoint, like facebook/sam3);
- segmenters: SAM (`build_tiny_hf_sam`; the official .pth: `build_tiny_sam_checkpoint`), SAM-HQ, SAM 2, SAM 3's
  tracker and EdgeTAM (its backbone is a timm RepViT, so it needs timm). SAM-HQ and SAM 3's tracker keep their
  input size (1024, 1008 px); SAM 2 and EdgeTAM take 512 px (see _SIDE); SAM 3 alone 168 px.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_model
from transformers import (
    BertConfig,
    BertTokenizer,
    CLIPTextConfig,
    CLIPTokenizer,
    EdgeTamConfig,
    EdgeTamMaskDecoderConfig,
    EdgeTamModel,
    EdgeTamPromptEncoderConfig,
    EdgeTamVisionConfig,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    GroundingDinoImageProcessorPil,
    GroundingDinoProcessor,
    MMGroundingDinoConfig,
    MMGroundingDinoForObjectDetection,
    PretrainedConfig,
    PreTrainedModel,
    Sam2Config,
    Sam2HieraDetConfig,
    Sam2ImageProcessor,
    Sam2MaskDecoderConfig,
    Sam2Model,
    Sam2Processor,
    Sam2PromptEncoderConfig,
    Sam2VisionConfig,
    Sam3Config,
    Sam3ImageProcessor,
    Sam3Processor,
    Sam3TrackerConfig,
    Sam3TrackerMaskDecoderConfig,
    Sam3TrackerModel,
    Sam3TrackerProcessor,
    Sam3TrackerPromptEncoderConfig,
    Sam3TrackerVideoConfig,
    Sam3VideoConfig,
    Sam3VideoModel,
    Sam3VisionConfig,
    Sam3ViTConfig,
    SamConfig,
    SamHQConfig,
    SamHQMaskDecoderConfig,
    SamHQModel,
    SamHQProcessor,
    SamHQPromptEncoderConfig,
    SamHQVisionConfig,
    SamImageProcessorPil,
    SamMaskDecoderConfig,
    SamModel,
    SamProcessor,
    SamPromptEncoderConfig,
    SamVisionConfig,
    SwinConfig,
    TimmWrapperConfig,
)
from transformers.models.sam3.configuration_sam3 import (
    Sam3DETRDecoderConfig,
    Sam3DETREncoderConfig,
    Sam3GeometryEncoderConfig,
    Sam3MaskDecoderConfig,
)
from transformers.models.sam3_tracker_video.configuration_sam3_tracker_video import (
    Sam3TrackerVideoMaskDecoderConfig,
    Sam3TrackerVideoPromptEncoderConfig,
)

from backend.pipeline.build import SamArchitecture

SEED = 0

# Grounding DINO hard-codes these bert-base-uncased ids ([CLS], [SEP], '.', '?') in a buffer.
_FIXED_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, ".": 1012, "?": 1029}
_WORDS = [
    "a",
    "an",
    "the",
    "of",
    "and",
    "with",
    "on",
    "in",
    "red",
    "green",
    "blue",
    "small",
    "large",
    "left",
    "right",
    "car",
    "cat",
    "dog",
    "person",
    "traffic",
    "light",
    "cone",
    "tree",
    "sign",
    "road",
    "bus",
    "truck",
    "bicycle",
    "bird",
    "label",
    "object",
    "thing",
]


def bert_vocab(words: Sequence[str] = _WORDS, size: int | None = None) -> dict[str, int]:
    """A BERT vocabulary with the real special ids; any lower-case ASCII text tokenizes without [UNK].

    Words outside `words` split into one word piece per character, so labels span several tokens. size: the
    vocabulary's size (bert-base-uncased: 30522; the rest are [unusedN]); None: just large enough.
    """
    chars = [c for c in string.ascii_lowercase + string.digits + string.punctuation if c not in ".?"]
    pieces = [*chars, *(f"##{c}" for c in string.ascii_lowercase + string.digits), *words]
    size = max(_FIXED_IDS.values()) + 1 + len(pieces) if size is None else size
    free = (i for i in range(size) if i not in _FIXED_IDS.values())
    vocab = dict(_FIXED_IDS)
    vocab.update(zip(pieces, free, strict=False))
    vocab.update((f"[unused{i}]", i) for i in free)
    return vocab


def build_tiny_grounding_dino(directory: Path) -> Path:
    """Save a ~0.5 M-parameter Grounding DINO and its processor to `directory`; return it.

    The processor resizes to a 160-px shortest edge so that a forward takes tens of milliseconds.
    """
    return build_tiny_dino(directory, GroundingDinoConfig, GroundingDinoForObjectDetection, *TINY_LAYOUT)


# The ViT and mask decoder of the tiny SAM and SAM-HQ (1024-px input, 16-wide 2-block ViT).
_SAM_VIT = {
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 1,
    "output_channels": 32,
    "num_pos_feats": 16,  # positional features: 2 x 16 = the prompt encoder width
    "mlp_dim": 32,
    "global_attn_indexes": [1],
}
_SAM_DECODER = {"hidden_size": 32, "mlp_dim": 64, "num_attention_heads": 2, "iou_head_hidden_dim": 32}


def build_tiny_hf_sam(directory: Path) -> Path:
    """Save a tiny transformers SamModel (1024-px input, 16-wide 2-block ViT) and a SamProcessor; return it."""
    torch.manual_seed(SEED)
    config = SamConfig(
        vision_config=SamVisionConfig(**_SAM_VIT),
        prompt_encoder_config=SamPromptEncoderConfig(hidden_size=32),
        mask_decoder_config=SamMaskDecoderConfig(**_SAM_DECODER),
    )
    SamModel(config).eval().save_pretrained(directory)
    SamProcessor(image_processor=SamImageProcessorPil()).save_pretrained(directory)
    return directory


# 256-px input (official: 1024) keeps the package's full-matrix global attention fast on a CPU.
TINY_SAM_ARCHITECTURE = SamArchitecture(
    image_size=256,
    patch_size=16,
    embed_dim=16,
    depth=2,
    num_heads=1,
    mlp_ratio=2.0,
    window_size=14,
    global_attn_indexes=(1,),
    prompt_dim=32,
    decoder_depth=2,
    decoder_mlp_dim=64,
    iou_head_hidden_dim=32,
)


def build_tiny_sam_checkpoint(path: Path) -> Path:
    """Save the state dict of a tiny segment-anything `Sam` to `path` (a .pth file); return it.

    Needs the segment-anything package importable (it imports torchvision).
    """
    torch.manual_seed(SEED)
    torch.save(TINY_SAM_ARCHITECTURE.build().state_dict(), path)
    return path


# The Swin stages a layout feeds to the detector, and its feature level count: tiny and base checkpoints,
# and the large ones (mm_grounding_dino_large_*, llmdet_large).
TINY_LAYOUT = (("stage2", "stage3", "stage4"), 4)
LARGE_LAYOUT = (("stage1", "stage2", "stage3", "stage4"), 5)
# One box and class head per decoder layer (MM-Grounding-DINO drops Grounding DINO's decoder sharing); the tiny
# Grounding DINO keeps them shared, so the tests run both.
_MM = {"decoder_bbox_embed_share": False, "decoder_cls_embed_share": False}


def build_tiny_mm_grounding_dino(directory: Path) -> Path:
    """Save a ~0.5 M-parameter MM-Grounding-DINO (tiny/base layout) and its processor to `directory`; return it."""
    return build_tiny_dino(directory, MMGroundingDinoConfig, MMGroundingDinoForObjectDetection, *TINY_LAYOUT, **_MM)


build_tiny_llmdet = build_tiny_mm_grounding_dino  # LLMDet checkpoints are MM-Grounding-DINO models


def build_tiny_mm_grounding_dino_large(directory: Path) -> Path:
    """Save a tiny MM-Grounding-DINO in the large checkpoints' layout (four Swin stages, five feature levels)."""
    return build_tiny_dino(directory, MMGroundingDinoConfig, MMGroundingDinoForObjectDetection, *LARGE_LAYOUT, **_MM)


def build_tiny_dino(
    directory: Path,
    config_class: type[PretrainedConfig],
    model_class: type[PreTrainedModel],
    stages: tuple[str, ...],
    feature_levels: int,
    **options: bool,
) -> Path:
    """Save a tiny random Grounding DINO family model and its processor to `directory`; return it.

    stages: the Swin stages fed to the detector; feature_levels: their count plus the extra downsampled levels;
    options: more config fields. The processor resizes to a 160-px shortest edge so that a forward takes tens of
    milliseconds. With GroundingDinoConfig, GroundingDinoForObjectDetection and TINY_LAYOUT it builds exactly
    tests.tiny_models.build_tiny_grounding_dino's model.
    """
    torch.manual_seed(SEED)
    vocab = bert_vocab()
    config = config_class(
        backbone_config=SwinConfig(
            embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], out_features=list(stages)
        ),
        text_config=BertConfig(
            vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
        ),
        num_feature_levels=feature_levels,
        d_model=32,  # GroupNorm(32, d_model) in the input projections
        encoder_layers=1,
        decoder_layers=2,  # the shared bbox head needs at least 2
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_queries=300,  # at most the number of feature-map cells of a 160-px image (about 730)
        **options,
    )
    model = model_class(config).eval()
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessorPil(size={"shortest_edge": 160, "longest_edge": 256}),
        tokenizer=BertTokenizer(vocab=vocab),
    )
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


# The prompt encoder's and mask decoder's width in every tiny model (the FPN's too, where there is one).
_WIDTH = 32
# SAM 2 and EdgeTAM take 1024-px images (feature maps of 256, 128 and 64 px); their tiny models take 512 px,
# a quarter of the pixels through the stride-4 backbone's first stage, the slowest part on a CPU.
_SIDE = 512
_SAM3_SIDE = 504  # SAM 3: 1008 px, patches of 14


def build_tiny_sam_hq(directory: Path) -> Path:
    """Save a tiny SamHQModel (the tiny SAM's ViT and decoder, plus HQ's) and a SamHQProcessor; return it."""
    torch.manual_seed(SEED)
    config = SamHQConfig(
        vision_config=SamHQVisionConfig(**_SAM_VIT),
        prompt_encoder_config=SamHQPromptEncoderConfig(hidden_size=_WIDTH),
        mask_decoder_config=SamHQMaskDecoderConfig(**_SAM_DECODER, vit_dim=16),
    )
    SamHQModel(config).eval().save_pretrained(directory)
    SamHQProcessor(image_processor=SamImageProcessorPil()).save_pretrained(directory)
    return directory


def build_tiny_sam2(directory: Path) -> Path:
    """Save a tiny Sam2Model (512-px input, 4-stage Hiera of 1, 1, 2, 1 blocks, 8 to 64 wide) and a
    Sam2Processor; return `directory`."""
    torch.manual_seed(SEED)
    backbone = Sam2HieraDetConfig(
        image_size=[_SIDE, _SIDE],
        hidden_size=8,
        embed_dim_per_stage=[8, 16, 32, 64],
        blocks_per_stage=[1, 1, 2, 1],
        num_attention_heads_per_stage=[1, 1, 1, 1],
        global_attention_blocks=[3],  # the third stage's second block (a stage's first block pools)
    )
    parts = (Sam2VisionConfig, Sam2PromptEncoderConfig, Sam2MaskDecoderConfig)
    Sam2Model(Sam2Config(**_sam2_style(backbone, *parts))).eval().save_pretrained(directory)
    return _save_sam2_processor(directory)


def build_tiny_sam3_tracker(directory: Path) -> Path:
    """Save a tiny Sam3TrackerModel (504-px input, the vision encoder of `_sam3_vision`) and a
    Sam3TrackerProcessor; return `directory`."""
    torch.manual_seed(SEED)
    config = Sam3TrackerConfig(
        vision_config=_sam3_vision(_SAM3_SIDE),
        prompt_encoder_config=Sam3TrackerPromptEncoderConfig(hidden_size=_WIDTH, image_size=_SAM3_SIDE),
        mask_decoder_config=Sam3TrackerMaskDecoderConfig(
            hidden_size=_WIDTH, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32
        ),
    )
    Sam3TrackerModel(config).eval().save_pretrained(directory)
    Sam3TrackerProcessor(
        image_processor=Sam3ImageProcessor(size={"height": _SAM3_SIDE, "width": _SAM3_SIDE})
    ).save_pretrained(directory)
    return directory


def build_tiny_edgetam(directory: Path) -> Path:
    """Save a tiny EdgeTamModel (512-px input, a timm RepViT of one block per stage, 8 to 64 wide) and its
    Sam2Processor; return `directory`. Needs timm."""
    torch.manual_seed(SEED)
    backbone = TimmWrapperConfig(
        architecture="repvit_m1",
        model_args={
            "in_chans": 3,
            "features_only": True,
            "out_indices": [0, 1, 2, 3],
            "embed_dim": (8, 16, 32, 64),
            "depth": (1, 1, 1, 1),
        },
    )
    parts = (EdgeTamVisionConfig, EdgeTamPromptEncoderConfig, EdgeTamMaskDecoderConfig)
    EdgeTamModel(EdgeTamConfig(**_sam2_style(backbone, *parts))).eval().save_pretrained(directory)
    return _save_sam2_processor(directory)


def _sam2_style(
    backbone: PretrainedConfig,
    vision: type[PretrainedConfig],
    prompt_encoder: type[PretrainedConfig],
    mask_decoder: type[PretrainedConfig],
) -> dict[str, PretrainedConfig]:
    """The sub-configs of a tiny SAM 2-style model (SAM 2, EdgeTAM) around `backbone`, whose four stages are
    8, 16, 32 and 64 wide: `_SIDE`-px input, an FPN, prompt encoder and mask decoder `_WIDTH` wide."""
    return {
        "vision_config": vision(
            backbone_config=backbone,
            backbone_channel_list=[64, 32, 16, 8],
            backbone_feature_sizes=[[_SIDE // 4] * 2, [_SIDE // 8] * 2, [_SIDE // 16] * 2],
            fpn_hidden_size=_WIDTH,
        ),
        "prompt_encoder_config": prompt_encoder(hidden_size=_WIDTH, image_size=_SIDE),
        "mask_decoder_config": mask_decoder(
            hidden_size=_WIDTH, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32
        ),
    }


def _save_sam2_processor(directory: Path) -> Path:
    """Save a Sam2Processor for `_SIDE`-px input (SAM 2's and EdgeTAM's) into `directory`; return it."""
    Sam2Processor(image_processor=Sam2ImageProcessor(size={"height": _SIDE, "width": _SIDE})).save_pretrained(directory)
    return directory


_SAM3_ALONE_SIDE = 168  # SAM 3 alone: 12 x 12 patches of 14 px (real: 1008)
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


def clip_tokenizer(size: int | None = None) -> CLIPTokenizer:
    """A CLIP BPE tokenizer with one token per character (word-final ones with "</w>") and no merges: any ASCII
    phrase tokenizes, each word into its letters. size: the vocabulary's size with the start and end tokens last,
    where CLIP has them (SAM 3: 49408; the rest are unused tokens); None: just large enough, those two first."""
    symbols = string.ascii_lowercase + string.digits + string.punctuation
    vocab = {} if size else {_BOS: 0, _EOS: 1}
    for symbol in symbols:
        vocab.setdefault(symbol, len(vocab))
        vocab.setdefault(f"{symbol}</w>", len(vocab))
    if size:
        vocab.update((f"<|unused{i}|>", i) for i in range(len(vocab), size - 2))
        vocab |= {_BOS: size - 2, _EOS: size - 1}
    return CLIPTokenizer(vocab=vocab, merges=[])


def _sam3_vision(side: int) -> Sam3VisionConfig:
    """SAM 3's tiny vision encoder for `side`-px images: a 2-block ViT `_WIDTH` wide with 14-px patches (one
    windowed block, one global), its FPN at 4x, 2x and 1x the patch grid. A fresh config each call: sub-configs
    are mutated by the configs that hold them."""
    vit = Sam3ViTConfig(
        hidden_size=_WIDTH,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=side,
        patch_size=14,
        window_size=6,
        global_attn_indexes=[1],
        pretrain_image_size=side,
    )
    grid = side // 14
    sizes = [[grid * 4, grid * 4], [grid * 2, grid * 2], [grid, grid]]
    return Sam3VisionConfig(backbone_config=vit, fpn_hidden_size=_WIDTH, backbone_feature_sizes=sizes)


def _detector_config(vocab_size: int) -> Sam3Config:
    layers = {"hidden_size": _WIDTH, "num_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    return Sam3Config(
        vision_config=_sam3_vision(_SAM3_ALONE_SIDE),
        text_config=CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=_WIDTH,
            intermediate_size=64,
            projection_dim=_WIDTH,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=32,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        geometry_encoder_config=Sam3GeometryEncoderConfig(**layers),
        detr_encoder_config=Sam3DETREncoderConfig(**layers),
        detr_decoder_config=Sam3DETRDecoderConfig(**layers, num_queries=20),
        mask_decoder_config=Sam3MaskDecoderConfig(hidden_size=_WIDTH, num_attention_heads=2),
    )


def _tracker_config() -> Sam3TrackerVideoConfig:
    side = _SAM3_ALONE_SIDE // 14
    return Sam3TrackerVideoConfig(
        vision_config=_sam3_vision(_SAM3_ALONE_SIDE),
        image_size=_SAM3_ALONE_SIDE,
        prompt_encoder_config=Sam3TrackerVideoPromptEncoderConfig(
            hidden_size=_WIDTH, image_size=_SAM3_ALONE_SIDE, patch_size=14, mask_input_channels=4
        ),
        mask_decoder_config=Sam3TrackerVideoMaskDecoderConfig(
            hidden_size=_WIDTH, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32
        ),
        memory_attention_hidden_size=_WIDTH,
        memory_attention_num_layers=1,
        memory_attention_feed_forward_hidden_size=64,
        memory_attention_rope_feat_sizes=[side, side],
        memory_encoder_hidden_size=_WIDTH,
        memory_encoder_output_channels=16,
        mask_downsampler_embed_dim=_WIDTH,
        memory_fuser_embed_dim=_WIDTH,
        memory_fuser_intermediate_dim=64,
        memory_fuser_num_layers=1,
    )


def build_tiny_sam3(directory: Path) -> Path:
    """Save a ~0.5 M-parameter SAM 3 (detector + tracker, "sam3_video" config) and a Sam3Processor; return it.

    The weights are written from the model's own state dict (keys as in facebook/sam3): transformers 5.24's
    Sam3VideoModel.save_pretrained prefixes the tracker's keys twice (tracker_model.tracker_model.*), which
    Sam3TrackerModel.from_pretrained then does not find.
    """
    torch.manual_seed(SEED)
    tokenizer = clip_tokenizer()
    config = Sam3VideoConfig(
        detector_config=_detector_config(len(tokenizer)),
        tracker_config=_tracker_config(),
        low_res_mask_size=_SAM3_ALONE_SIDE // 14 * 4,
    )
    model = Sam3VideoModel(config).eval()
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    save_model(model, str(directory / "model.safetensors"), metadata={"format": "pt"})
    image_processor = Sam3ImageProcessor(size={"height": _SAM3_ALONE_SIDE, "width": _SAM3_ALONE_SIDE})
    Sam3Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory
