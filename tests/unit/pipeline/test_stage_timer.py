"""The pipeline's stage-timer hook: a tiny pipeline loaded by build_pipeline reports its stages to the timer it
was given, for one image, a batch and an interactive prompt, with either SAM, inside the flow's own stages
when a PredictionFlow shares the timer; the default timer changes nothing."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.class_options import ClassOptions
from backend.flow import PredictionFlow
from backend.labelstudio.config import parse_label_config
from backend.pipeline.build import build_pipeline
from backend.pipeline.grounded_sam import GroundedSam
from backend.pipeline.timing import NO_TIMER
from backend.pipeline.types import DetectionThresholds, Instance, ModelSpec, TextClass

CLASSES = (TextClass("Cat", ("cat",)), TextClass("Traffic light", ("traffic light",)))
# Random weights pass almost every query: thresholds 0 give SAM max_detections boxes per image.
LOW = DetectionThresholds(box=0.0, text=0.0, max_detections=3)
SAM_STAGES = {"sam", "sam_preprocess", "sam_encoder", "sam_decoder", "sam_upsample"}
DETECTOR_STAGES = {"detector", "detector_preprocess", "detector_forward"}
RUN_STAGES = DETECTOR_STAGES | SAM_STAGES | {"negatives", "cleanup"}
BRUSH = """<View><Image name="image" value="$image"/><BrushLabels name="mask" toName="image">
<Label value="Cat"/><Label value="Traffic light"/></BrushLabels></View>"""


class RecordingTimer:
    """Counts every stage entered and remembers, per thread, which stages were open when it was entered."""

    def __init__(self) -> None:
        self.entered: Counter[str] = Counter()
        self.inside: dict[str, set[str]] = {}
        self._open = threading.local()
        self._lock = threading.Lock()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        stack: list[str] = self._open.__dict__.setdefault("stack", [])
        with self._lock:
            self.entered[name] += 1
            self.inside.setdefault(name, set()).update(stack)
        stack.append(name)
        try:
            yield
        finally:
            stack.pop()

    def reset(self) -> None:
        self.entered.clear()
        self.inside.clear()


def image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=["hf", "pth"])
def sam_spec(request: pytest.FixtureRequest, tiny_detector_dir: Path, tiny_hf_sam_dir: Path) -> ModelSpec:
    if request.param == "hf":
        return ModelSpec(detector=str(tiny_detector_dir), sam=str(tiny_hf_sam_dir))
    checkpoint = request.getfixturevalue("tiny_sam_checkpoint")
    return ModelSpec(detector=str(tiny_detector_dir), sam="", sam_checkpoint=str(checkpoint), sam_model_type="vit_b")


@pytest.fixture(scope="module")
def timed(sam_spec: ModelSpec) -> tuple[GroundedSam, RecordingTimer]:
    timer = RecordingTimer()
    return build_pipeline(sam_spec, LOW, timer=timer), timer


def test_one_image_reports_every_stage_nested_in_its_step(timed: tuple[GroundedSam, RecordingTimer]) -> None:
    pipeline, timer = timed
    plan = pipeline.prepare(CLASSES)
    timer.reset()

    assert pipeline.run(image(64, 48), plan)

    assert set(timer.entered) == RUN_STAGES
    assert timer.entered["detector"] == timer.entered["detector_forward"] == timer.entered["detector_preprocess"] == 1
    assert timer.entered["sam_encoder"] == 1 and timer.entered["cleanup"] == 1
    # One image: everything ran on this thread, so each inner stage was entered inside its step.
    assert {"detector"} <= timer.inside["detector_preprocess"] and {"detector"} <= timer.inside["detector_forward"]
    for inner in SAM_STAGES - {"sam"}:
        assert "sam" in timer.inside[inner], inner
    assert not timer.inside["detector"] and not timer.inside["sam"] and not timer.inside["cleanup"]


def test_a_batch_reports_one_detector_step_per_call_and_sam_per_image(
    timed: tuple[GroundedSam, RecordingTimer],
) -> None:
    pipeline, timer = timed
    plan = pipeline.prepare(CLASSES)
    timer.reset()

    found = pipeline.run_batch([image(64, 48, 1), image(64, 48, 2), image(40, 96, 3)], plan)

    assert all(found)
    assert set(timer.entered) == RUN_STAGES
    assert timer.entered["detector"] == 1 and timer.entered["detector_preprocess"] == 3
    assert timer.entered["detector_forward"] == 2  # one forward per group of same-size inputs
    assert timer.entered["sam_encoder"] == 3 and timer.entered["cleanup"] == 3
    assert timer.entered["sam_decoder"] >= 3 and timer.entered["sam_upsample"] >= 3


def test_nothing_detected_runs_no_sam_stage(timed: tuple[GroundedSam, RecordingTimer]) -> None:
    pipeline, timer = timed
    plan = pipeline.prepare((TextClass("Cat", ("cat",), ClassOptions(threshold=1.01)),))  # no box passes
    timer.reset()

    assert pipeline.run(image(64, 48), plan) == []

    assert set(timer.entered) == DETECTOR_STAGES | {"negatives", "sam"}  # "sam": no image handed to SAM
    assert timer.entered["sam"] == 1


def test_an_interactive_prompt_reports_sam_stages_and_cleanup(timed: tuple[GroundedSam, RecordingTimer]) -> None:
    pipeline, timer = timed
    timer.reset()

    pipeline.segment_points(image(64, 48), np.array([[30.0, 20.0]]), np.array([True]), None)

    assert set(timer.entered) == SAM_STAGES | {"cleanup"}
    assert timer.entered["sam"] == timer.entered["sam_encoder"] == timer.entered["sam_decoder"] == 1


def test_the_default_timer_changes_no_output(sam_spec: ModelSpec, timed: tuple[GroundedSam, RecordingTimer]) -> None:
    untimed = build_pipeline(sam_spec, LOW)  # NO_TIMER
    images = [image(64, 48, 4), image(96, 40, 5)]

    def outputs(pipeline: GroundedSam) -> list[list[tuple[object, ...]]]:
        return [[summary(found) for found in per_image] for per_image in pipeline.run_batch(images, plan)]

    plan = untimed.prepare(CLASSES)
    assert outputs(untimed) == outputs(timed[0])


def summary(instance: Instance) -> tuple[object, ...]:
    return instance.detection, instance.mask_score, instance.mask.to_array().tobytes()


def test_no_timer_is_one_stateless_context_for_every_stage() -> None:
    with NO_TIMER.stage("sam"), NO_TIMER.stage("sam_encoder"), NO_TIMER.stage("sam"):
        pass
    assert NO_TIMER.stage("detector") is NO_TIMER.stage("cleanup")


def test_the_flow_and_its_pipeline_report_to_one_timer(timed: tuple[GroundedSam, RecordingTimer]) -> None:
    pipeline, timer = timed
    flow = PredictionFlow(pipeline, fingerprint={"test": "tiny"}, timer=timer)
    config = parse_label_config(BRUSH)
    version = flow.model_version(config)
    timer.reset()

    assert flow.predict(image(64, 48), config, version)["result"]

    assert set(timer.entered) == RUN_STAGES | {"model", "postprocess"}
    assert {"model"} <= timer.inside["detector"] and {"model"} <= timer.inside["sam"]
    assert "postprocess" in timer.inside["cleanup"]
