"""SAM's GPU path, checked on the CPU: preprocessing on the model's device (backend.pipeline.sam_device) and
SAM_DTYPE=auto (bfloat16 on CUDA, float32 on the CPU, named in model_version's fingerprint).

Every transformers SAM family (tiny random models, loaded by production's build_segmenter) against the
straightforward path: the processor given the numpy image, the model's encoder and decoder called directly, the
processor's post_process_masks; masks IoU >= 0.99 per box and predicted IoU within 1e-3, at a non-square, a
small and a `sam_input`-padded (very wide) size. Masks leave the device only as bool crops.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import torch
import transformers
from torch.overrides import TorchFunctionMode

from backend.flow import PredictionFlow
from backend.packed_mask import stacked
from backend.pipeline.build import build_segmenter
from backend.pipeline.sam_device import device_processor, pixels_on
from backend.pipeline.segmenter import HfSamSegmenter
from backend.pipeline.shapes import sam_input
from backend.pipeline.types import ModelSpec
from backend.settings import Settings
from tests.support.models import SAM_FAMILY_BUILDERS, sam_family_dir
from tests.support.synthetic import random_rgb

FAMILIES = ["sam", *SAM_FAMILY_BUILDERS]
# (H, W): non-square, small, and one so wide that sam_input pads it (3x1000 -> 4x1000).
SIZES = [(90, 37), (9, 12), (3, 1000)]
MASK_IOU = 0.99
SCORE_ATOL = 1e-3


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request: pytest.FixtureRequest, tiny_models_dir: Path) -> Path:
    """One family's tiny model folder (SAM v1: the session's tiny SamModel)."""
    return sam_family_dir(request, tiny_models_dir, request.param)


def built(folder: Path, dtype: Literal["float32", "bfloat16"] = "float32") -> HfSamSegmenter:
    segmenter = build_segmenter(ModelSpec(detector="unused", sam=str(folder), sam_dtype=dtype))
    assert isinstance(segmenter, HfSamSegmenter)
    return segmenter


@pytest.fixture(scope="module")
def segmenter(family_dir: Path) -> HfSamSegmenter:
    """The family's tiny model as production builds it, float32."""
    return built(family_dir)


def boxes_of(height: int, width: int) -> np.ndarray:
    """Four boxes (4, 4) xyxy inside an image of (height, width): all of it, halves, a small one."""
    w, h = float(width), float(height)
    return np.array(
        [[0, 0, w, h], [0, 0, w / 2, h], [w / 2, h / 3, w, h], [w / 4, h / 4, max(w / 2, 1.0), max(h / 2, 1.0)]],
        np.float32,
    )


def straightforward(segmenter: HfSamSegmenter, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The path without this module: the processor on the numpy image (CPU), encoder, decoder, post_process_masks.
    Masks (N, H, W) bool and predicted IoU (N,) clamped to [0, 1]."""
    model: Any = segmenter._model
    processor: Any = segmenter._processor
    inputs = processor(
        images=image, input_boxes=[boxes.tolist()], input_data_format="channels_last", return_tensors="pt"
    )
    with torch.inference_mode():
        encoded = model.get_image_embeddings(inputs["pixel_values"])
        given: dict[str, Any] = {"image_embeddings": encoded}
        if isinstance(encoded, tuple):  # SAM-HQ: with its ViT's intermediate features
            given = {"image_embeddings": encoded[0], "intermediate_embeddings": list(encoded[1])}
        out = model(**given, input_boxes=inputs["input_boxes"].float(), multimask_output=False)
        reshaped = {"reshaped_input_sizes": inputs["reshaped_input_sizes"]} if "reshaped_input_sizes" in inputs else {}
        masks = processor.post_process_masks(out.pred_masks, inputs["original_sizes"], **reshaped)[0][:, 0]
    return masks.numpy(), out.iou_scores[0, :, 0].clamp(0, 1).numpy()


def ious(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Per mask IoU of two (N, H, W) bool stacks (1 where both are empty)."""
    inter = (first & second).sum(axis=(1, 2))
    union = (first | second).sum(axis=(1, 2))
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_device_preprocessing_gives_the_numpy_processor_path_masks_and_scores(
    segmenter: HfSamSegmenter, size: tuple[int, int]
) -> None:
    image = sam_input(random_rgb(*size, seed=size[1]))
    shape = image.shape[:2]
    boxes = boxes_of(*size)
    expected_masks, expected_scores = straightforward(segmenter, image, boxes)

    with torch.inference_mode():
        masks, scores = segmenter.segment(image, boxes)

    found = ious(stacked(masks, shape), expected_masks)
    print(f"{type(segmenter._model).__name__} {shape}: mask IoU min {found.min():.4f} mean {found.mean():.4f}")
    assert (found >= MASK_IOU).all(), found
    np.testing.assert_allclose(scores, expected_scores, atol=SCORE_ATOL)


def test_the_encoded_embedding_answers_boxes_as_the_numpy_path(segmenter: HfSamSegmenter) -> None:
    """`encode` prepares on the device too: its embedding's boxes decode as the straightforward path's."""
    image = random_rgb(90, 37, seed=3)
    boxes = boxes_of(90, 37)
    expected_masks, expected_scores = straightforward(segmenter, image, boxes)

    embedding = segmenter.encode(image)
    (masks, scores), *_ = segmenter.segment_stream([image], [boxes], known=[embedding])

    assert (ious(stacked(masks, (90, 37)), expected_masks) >= MASK_IOU).all()
    np.testing.assert_allclose(scores, expected_scores, atol=SCORE_ATOL)


def test_pixels_reach_the_processor_as_uint8_tensors_on_the_models_device(
    segmenter: HfSamSegmenter, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[torch.dtype, torch.device, tuple[int, ...]]] = []
    image_processor: Any = segmenter._processor.image_processor  # type: ignore[attr-defined]
    preprocess = image_processor.preprocess

    def recorded(images: list[torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        seen.extend((image.dtype, image.device, tuple(image.shape)) for image in images)
        assert kwargs["device"] == segmenter.device
        return preprocess(images, *args, **kwargs)

    monkeypatch.setattr(image_processor, "preprocess", recorded)
    with torch.inference_mode():
        segmenter.segment(random_rgb(20, 30), boxes_of(20, 30))
    segmenter.encode(random_rgb(21, 31))

    assert seen == [(torch.uint8, segmenter.device, (20, 30, 3)), (torch.uint8, segmenter.device, (21, 31, 3))]


class _HostCopies(TorchFunctionMode):
    """Records (dtype, element count) of every tensor copied to host memory: .cpu() and .tolist() (a device
    tensor's .numpy() raises, so it follows a .cpu())."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[tuple[torch.dtype, int]] = []

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        if func in (torch.Tensor.cpu, torch.Tensor.tolist) and isinstance(args[0], torch.Tensor):
            self.copies.append((args[0].dtype, args[0].numel()))
        return func(*args, **(kwargs or {}))


def test_masks_leave_the_device_only_as_bool_crops(segmenter: HfSamSegmenter) -> None:
    """No float tensor of the image's size (a full-resolution mask or its logits) is copied to the host; bool
    copies are each mask's painted crop at most."""
    height, width = 300, 400  # 120,000 px: more than the decoder's low-resolution logits (<= 288 x 288)
    boxes = np.array([[10, 10, 60, 50], [200, 100, 260, 180], [0, 0, 400, 300]], np.float32)
    image = random_rgb(height, width)
    with torch.inference_mode():
        embedding = segmenter.encode(image)
        with _HostCopies() as recorder:
            (masks, _), *_ = segmenter.segment_stream([image], [boxes], known=[embedding])
            click, _ = segmenter.segment_points(embedding, np.array([[30.0, 30.0]]), np.array([True]), None)

    floats = [count for dtype, count in recorder.copies if dtype.is_floating_point]
    bools = [count for dtype, count in recorder.copies if dtype == torch.bool]
    assert floats and max(floats) < height * width  # the predicted IoU scores
    crops = [mask.rows * mask.cols for mask in (*masks, click) if mask.area]
    assert sorted(bools) == sorted(crops)  # each painted mask's crop, once


def test_bfloat16_encodes_in_bfloat16_and_decodes_in_float32_from_the_loaded_weights(
    family_dir: Path, segmenter: HfSamSegmenter
) -> None:
    """SAM_DTYPE=bfloat16: the encoder and its embeddings in bfloat16, boxes decoded by a float32 copy of the
    prompt decoder holding the checkpoint's float32 weights (not bfloat16-rounded ones): the float32 masks."""
    low = built(family_dir, "bfloat16")
    image, boxes = random_rgb(90, 37, seed=7), boxes_of(90, 37)

    embedding = low.encode(image)
    with torch.inference_mode():
        masks, scores = low.segment_stream([image], [boxes], known=[embedding]).__next__()
        exact_masks, exact_scores = segmenter.segment(image, boxes)

    assert low._model.dtype == low.embedding_dtype == torch.bfloat16
    assert {tensor.dtype for tensor in embedding.tensors.values()} == {torch.bfloat16}
    assert low._decoder.dtype == torch.float32 and low._decoder is not low._model
    exact_decoder = dict(segmenter._model.named_parameters())
    for name, weight in low._decoder.named_parameters():
        assert torch.equal(weight, exact_decoder[name]), name
    found = ious(stacked(masks, (90, 37)), stacked(exact_masks, (90, 37)))
    print(f"{type(low._model).__name__} bf16 vs fp32: mask IoU min {found.min():.4f} mean {found.mean():.4f}")
    assert found.mean() >= MASK_IOU
    np.testing.assert_allclose(scores, exact_scores, atol=0.02)


def test_pixels_on_the_cpu_share_the_arrays_memory_and_copy_a_flipped_view() -> None:
    image = random_rgb(5, 7)

    same = pixels_on(image, torch.device("cpu"))
    flipped = pixels_on(image[..., ::-1], torch.device("cpu"))

    assert same.dtype == torch.uint8 and same.shape == (5, 7, 3)
    assert same.data_ptr() == image.ctypes.data
    np.testing.assert_array_equal(flipped.numpy(), image[..., ::-1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")
def test_pixels_on_cuda_arrive_whole_from_pinned_memory() -> None:
    image = random_rgb(1080, 1920)

    pixels = pixels_on(image, torch.device("cuda"))

    assert pixels.device.type == "cuda" and pixels.dtype == torch.uint8
    np.testing.assert_array_equal(pixels.cpu().numpy(), image)


def test_a_pil_backend_processor_is_replaced_by_its_torchvision_class_with_its_settings() -> None:
    slow = transformers.SamProcessor(image_processor=transformers.SamImageProcessorPil(size={"longest_edge": 256}))

    fast: Any = device_processor(slow)

    assert type(fast.image_processor) is transformers.SamImageProcessor
    assert fast.image_processor.size["longest_edge"] == 256
    assert type(slow.image_processor) is transformers.SamImageProcessorPil  # the given processor is left alone
    already: Any = device_processor(fast)
    assert already is fast


def test_a_pil_backend_processor_segments_through_the_device_path(tiny_hf_sam_dir: Path) -> None:
    """A checkpoint whose processor loads as the PIL backend still gives the numpy path's masks (PIL's resize and
    torchvision's antialiased bilinear differ by rounding)."""
    built = build_segmenter(ModelSpec(detector="unused", sam=str(tiny_hf_sam_dir)))
    assert isinstance(built, HfSamSegmenter)
    settings = built._processor.image_processor.to_dict()  # type: ignore[attr-defined]
    slow = transformers.SamProcessor(image_processor=transformers.SamImageProcessorPil.from_dict(settings))
    segmenter = HfSamSegmenter(built._model, slow)
    image, boxes = random_rgb(90, 37, seed=5), boxes_of(90, 37)
    expected, _ = straightforward(built, image, boxes)

    with torch.inference_mode():
        masks, _ = segmenter.segment(image, boxes)

    assert ious(stacked(masks, (90, 37)), expected).mean() >= 0.98


# ------------------------------------------------------------------------------------------------ SAM_DTYPE


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    monkeypatch.delenv("SAM_DTYPE", raising=False)
    yield monkeypatch


def test_sam_dtype_auto_is_the_default_bfloat16_on_cuda_and_float32_on_the_cpu(env: pytest.MonkeyPatch) -> None:
    settings = Settings()

    assert settings.sam_dtype == "auto"
    assert settings.model_spec("cpu").sam_dtype == "float32"
    assert settings.model_spec("cuda").sam_dtype == "bfloat16"
    assert settings.model_spec("cuda:1").sam_dtype == "bfloat16"


@pytest.mark.parametrize("value", ["float32", "bfloat16", "float16"])
def test_an_explicit_sam_dtype_is_kept_on_every_device(env: pytest.MonkeyPatch, value: str) -> None:
    env.setenv("SAM_DTYPE", value)
    settings = Settings()

    assert settings.model_spec("cpu").sam_dtype == settings.model_spec("cuda").sam_dtype == value
    assert settings.model_fingerprint("cpu") == settings.model_fingerprint("cuda")
    assert settings.model_fingerprint("cuda")["sam_dtype"] == value


def test_the_fingerprint_names_the_resolved_dtype_so_cpu_and_gpu_workers_differ(env: pytest.MonkeyPatch) -> None:
    settings = Settings()

    on_cpu, on_gpu = settings.model_fingerprint("cpu"), settings.model_fingerprint("cuda")

    assert on_cpu["sam_dtype"] == "float32" and on_gpu["sam_dtype"] == "bfloat16"
    assert {key for key in on_cpu if on_cpu[key] != on_gpu[key]} == {"sam_dtype"}
    assert settings.model_fingerprint() == on_cpu  # the CPU unless told


def test_a_loaded_flow_announces_the_dtype_its_segmenter_runs_in(
    env: pytest.MonkeyPatch, tiny_detector_dir: Path, tiny_hf_sam_dir: Path
) -> None:
    env.setenv("DEVICE", "cpu")
    env.setenv("DETECTOR_MODEL", str(tiny_detector_dir))
    env.setenv("SAM_MODEL", str(tiny_hf_sam_dir))

    flow = PredictionFlow.load(Settings())

    assert flow.fingerprint["sam_dtype"] == "float32" == str(flow.pipeline.segmenter_dtype).removeprefix("torch.")
