"""SAM masks: one per box at the image's size, one image embedding per image, boxes decoded together;
official-checkpoint architecture inference and load errors."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from backend.errors import ModelLoadError
from backend.packed_mask import stacked
from backend.pipeline.build import SamArchitecture, _load_sam_checkpoint, build_pipeline
from backend.pipeline.segmenter import (
    SegmentAnythingSegmenter,
    Segmenter,
)
from backend.pipeline.types import DetectionThresholds
from tests.support.models import checkpoint_spec, hf_segmenter
from tests.support.synthetic import random_rgb
from tests.tiny_models import TINY_SAM_ARCHITECTURE

HEIGHT, WIDTH = 48, 64
BOXES = np.array([[1, 2, 30, 40], [5, 5, 60, 44], [0, 0, 64, 48], [10, 20, 12, 22], [40, 1, 63, 9]], np.float32)
needs_segment_anything = pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is None, reason="segment-anything imports torchvision"
)


def count_calls(module: torch.nn.Module) -> list[int]:
    """A list that grows by one at every forward of `module`."""
    calls: list[int] = []
    module.register_forward_hook(lambda _module, args, kwargs, _output: calls.append(1), with_kwargs=True)
    return calls


def assert_masks(segmenter: Segmenter, boxes: np.ndarray) -> None:
    with torch.inference_mode():
        packed, scores = segmenter.segment(random_rgb(HEIGHT, WIDTH), boxes)
    masks = stacked(packed, (HEIGHT, WIDTH))
    assert masks.shape == (len(boxes), HEIGHT, WIDTH) and masks.dtype == np.bool_
    assert scores.shape == (len(boxes),) and scores.dtype == np.float32
    assert ((scores >= 0) & (scores <= 1)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hf_sam_gives_one_mask_per_box_at_the_image_size(tiny_hf_sam_dir: Path, dtype: torch.dtype) -> None:
    assert_masks(hf_segmenter(tiny_hf_sam_dir, dtype), BOXES)


@pytest.mark.parametrize(("box_batch", "decoder_calls"), [(64, 1), (2, 3)])
def test_hf_sam_embeds_once_and_decodes_boxes_together(
    tiny_hf_sam_dir: Path, monkeypatch: pytest.MonkeyPatch, box_batch: int, decoder_calls: int
) -> None:
    segmenter = hf_segmenter(tiny_hf_sam_dir, box_batch=box_batch)
    model = segmenter._model
    embeddings: list[int] = []
    embed = model.get_image_embeddings
    monkeypatch.setattr(model, "get_image_embeddings", lambda pixels: embeddings.append(1) or embed(pixels))
    decodes = count_calls(model)

    assert_masks(segmenter, BOXES)
    assert len(embeddings) == 1 and len(decodes) == decoder_calls


def test_zero_boxes_skip_the_model(tiny_hf_sam_dir: Path) -> None:
    segmenter = hf_segmenter(tiny_hf_sam_dir)
    calls = count_calls(segmenter._model.vision_encoder)

    assert_masks(segmenter, np.zeros((0, 4), np.float32))
    assert calls == []


@pytest.fixture(scope="module")
def official_segmenter(tiny_sam_checkpoint: Path) -> Callable[[torch.dtype], SegmentAnythingSegmenter]:
    sam = _load_sam_checkpoint(tiny_sam_checkpoint, "vit_h")
    return lambda dtype: SegmentAnythingSegmenter(sam, str(tiny_sam_checkpoint), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segment_anything_gives_one_mask_per_box(
    official_segmenter: Callable[[torch.dtype], SegmentAnythingSegmenter], dtype: torch.dtype
) -> None:
    assert_masks(official_segmenter(dtype), BOXES)


def test_segment_anything_embeds_once_and_decodes_boxes_together(
    official_segmenter: Callable[[torch.dtype], SegmentAnythingSegmenter],
) -> None:
    segmenter = official_segmenter(torch.float32)
    sam = segmenter._predictor.model
    encodes, decodes = count_calls(sam.image_encoder), count_calls(sam.mask_decoder)

    assert_masks(segmenter, BOXES)
    assert len(encodes) == 1 and len(decodes) == 1


def test_architecture_is_read_back_from_a_tiny_state_dict(tiny_sam_checkpoint: Path) -> None:
    state_dict = torch.load(tiny_sam_checkpoint, map_location="cpu", weights_only=True)

    assert SamArchitecture.from_state_dict(state_dict, tiny_sam_checkpoint) == TINY_SAM_ARCHITECTURE


@needs_segment_anything
@pytest.mark.parametrize("model_type", ["vit_b", "vit_l", "vit_h"])
def test_architecture_of_official_sizes_matches_the_package(model_type: str) -> None:
    from segment_anything import sam_model_registry

    with torch.device("meta"):  # shapes only, no weights
        reference = sam_model_registry[model_type]().state_dict()
        architecture = SamArchitecture.from_state_dict(reference, Path(model_type))
        built = architecture.build().state_dict()

    assert architecture.official_type == model_type
    assert {k: v.shape for k, v in built.items()} == {k: v.shape for k, v in reference.items()}


def vit_b_shaped_state_dict() -> dict[str, torch.Tensor]:
    """The tensors whose shapes identify an official vit_b checkpoint, on the meta device (no data)."""
    shapes = {
        "image_encoder.patch_embed.proj.weight": (768, 3, 16, 16),
        "image_encoder.pos_embed": (1, 64, 64, 768),
        "image_encoder.blocks.0.mlp.lin1.weight": (3072, 768),
        "image_encoder.neck.0.weight": (256, 768, 1, 1),
        "mask_decoder.transformer.layers.0.mlp.lin1.weight": (2048, 256),
        "mask_decoder.transformer.layers.1.mlp.lin1.weight": (2048, 256),
        "mask_decoder.iou_prediction_head.layers.0.weight": (256, 256),
    }
    shapes |= {f"image_encoder.blocks.{i}.attn.rel_pos_h": (127 if i in (2, 5, 8, 11) else 27, 64) for i in range(12)}
    return {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}


def build_with_checkpoint(detector_dir: Path, checkpoint: Path, model_type: str = "vit_h") -> None:
    build_pipeline(checkpoint_spec(detector_dir, checkpoint, model_type), DetectionThresholds())


def test_a_model_type_that_disagrees_with_the_checkpoint_is_refused(tiny_detector_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "sam_vit_b.pth"
    torch.save(vit_b_shaped_state_dict(), path)

    with pytest.raises(ModelLoadError, match=r"holds a vit_b model.*set to vit_h"):
        build_with_checkpoint(tiny_detector_dir, path, "vit_h")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "is not a file"),
        (b"not a checkpoint", "cannot be read"),
        ({"some.weight": torch.zeros(2)}, "not a segment-anything state dict"),
    ],
)
def test_unusable_checkpoints_raise_model_load_error(
    tiny_detector_dir: Path, tmp_path: Path, content: object, message: str
) -> None:
    path = tmp_path / "sam.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)

    with pytest.raises(ModelLoadError, match=message):
        build_with_checkpoint(tiny_detector_dir, path)
