"""Tiny randomly initialised models, saved where production loads them from.

Weights cannot be downloaded here, so tests build these from configs (seeded, a few seconds at most) and
load them back through `build_pipeline`: the same `from_pretrained` / `torch.load` code production runs.
Random weights give garbage scores: tests assert structure, never specific detections.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import (
    BertConfig,
    BertTokenizer,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    GroundingDinoImageProcessorPil,
    GroundingDinoProcessor,
    SamConfig,
    SamImageProcessorPil,
    SamMaskDecoderConfig,
    SamModel,
    SamProcessor,
    SamPromptEncoderConfig,
    SamVisionConfig,
    SwinConfig,
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
    torch.manual_seed(SEED)
    vocab = bert_vocab()
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(
            embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], out_features=["stage2", "stage3", "stage4"]
        ),
        text_config=BertConfig(
            vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
        ),
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,  # the shared bbox head needs at least 2
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_queries=300,  # at most the number of feature-map cells of a 160-px image (about 730)
    )
    model = GroundingDinoForObjectDetection(config).eval()
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessorPil(size={"shortest_edge": 160, "longest_edge": 256}),
        tokenizer=BertTokenizer(vocab=vocab),
    )
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def build_tiny_hf_sam(directory: Path) -> Path:
    """Save a tiny transformers SamModel (1024-px input, 16-wide 2-block ViT) and a SamProcessor; return it."""
    torch.manual_seed(SEED)
    config = SamConfig(
        vision_config=SamVisionConfig(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=1,
            output_channels=32,
            num_pos_feats=16,  # positional features: 2 x 16 = the prompt encoder width
            mlp_dim=32,
            global_attn_indexes=[1],
        ),
        prompt_encoder_config=SamPromptEncoderConfig(hidden_size=32),
        mask_decoder_config=SamMaskDecoderConfig(
            hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32
        ),
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
