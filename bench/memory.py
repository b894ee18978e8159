"""Peak memory of one worker-like process per image size: the real pipeline (Grounding DINO -> SAM -> cleanup ->
RLE -> Label Studio JSON) with the tiny random test models, on 12, 24 and 48 MP images with 100 objects each.

Each size runs in a fresh child process (so one size's peak cannot hide another's): it loads the models, runs a
small warm-up image, records its RSS (the loaded-models baseline), then predicts one large image while a thread
samples RSS every 5 ms; the kernel's own peak (getrusage ru_maxrss) is reported too. Thresholds are 0 and
MAX_DETECTIONS 100, so the random detector gives SAM 100 boxes (checked: the count is in the report). Where a GPU
is used, torch's peak CUDA allocation is reported as well.

    python bench/memory.py --out bench/results/memory_cpu.json                  # 12, 24, 48 MP, this tree
    python bench/memory.py --sizes 4000x3000 --code /tmp/base --out before.json  # another checkout (git archive)

`--code` runs the child against another checkout's `backend` (the code before a change, say): only public APIs
that checkout has too are used (build_pipeline, GroundedSam.prepare, .stream and .postprocess, build_prediction,
text_classes from backend.flow or, before it existed, backend.jobs): commit 331edde or later.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: the models are built here
ROOT = Path(__file__).resolve().parent.parent
SIZES = ("4000x3000", "5657x4243", "8000x6000")  # 12, 24 and 48 MP, 4:3 like phone photos
LABEL_CONFIG = ROOT / "label_config" / "brush.xml"


def build_models(directory: Path) -> dict[str, str]:
    """The tests' tiny random Grounding DINO and transformers SAM, saved into `directory`."""
    sys.path.insert(0, str(ROOT))
    from tests.tiny_models import (
        build_tiny_grounding_dino,
        build_tiny_hf_sam,
        build_tiny_sam_checkpoint,
    )

    return {
        "detector": str(build_tiny_grounding_dino(directory / "grounding_dino")),
        "sam": str(build_tiny_hf_sam(directory / "sam")),
        "sam_checkpoint": str(build_tiny_sam_checkpoint(directory / "sam_tiny.pth")),
    }


class PeakSampler:
    """RSS of this process sampled every `interval` seconds on a thread, between start() and stop()."""

    def __init__(self, interval: float = 0.005) -> None:
        import psutil

        self._process = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.peak = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._stop.wait(self._interval)

    def start(self) -> None:
        self.peak = self._process.memory_info().rss
        self._thread.start()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self._process.memory_info().rss)


def test_image(width: int, height: int, seed: int) -> Any:
    """A photo-like RGB image: a gradient with blocks of colour and noise (content does not steer random weights)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[..., 0] = (np.arange(width) * 255 // max(width - 1, 1)).astype(np.uint8)[None, :]
    pixels[..., 1] = (np.arange(height) * 255 // max(height - 1, 1)).astype(np.uint8)[:, None]
    pixels[..., 2] = 128
    for _ in range(40):
        y, x = int(rng.integers(0, height)), int(rng.integers(0, width))
        pixels[y : y + height // 10, x : x + width // 10] = rng.integers(0, 256, 3)
    return Image.fromarray(pixels)


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One size in this process: load, warm up, baseline, then one image under the RSS sampler."""
    sys.path.insert(0, str(Path(args.code).resolve()))
    import torch

    try:
        from backend.flow import text_classes
    except ImportError:  # a checkout from before backend/flow.py
        from backend.jobs import text_classes
    from backend.labelstudio.config import parse_label_config
    from backend.labelstudio.results import PredictedObject, build_prediction
    from backend.pipeline.build import build_pipeline
    from backend.pipeline.types import (
        DetectionThresholds,
        ModelSpec,
        PostprocessOptions,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    models = json.loads(args.models)
    checkpoint = models["sam_checkpoint"] if args.sam == "pth" else None
    spec = ModelSpec(
        detector=models["detector"],
        sam=models["sam"],
        sam_checkpoint=checkpoint,
        sam_model_type="vit_b",
        device=args.device,
    )
    thresholds = DetectionThresholds(box=0.0, text=0.0, max_detections=args.objects)
    pipeline = build_pipeline(spec, thresholds, PostprocessOptions())
    config = parse_label_config(LABEL_CONFIG.read_text())
    classes = text_classes(config)
    plan = pipeline.prepare(classes)
    width, height = (int(v) for v in args.size.split("x"))

    def predict(image: Any) -> tuple[int, int, bytes]:
        """What GroundedSam.run does (stream, then postprocess), keeping the boxes SAM got: the number of
        detections, of objects returned, and the prediction's JSON."""
        segmented = next(pipeline.stream([image], plan))
        instances = pipeline.postprocess(segmented, plan)
        objects = [
            PredictedObject(classes[i.detection.class_index].name, i.score, i.detection.box_xyxy, i.mask)
            for i in instances
        ]
        prediction = build_prediction(objects, config, image.width, image.height, "bench")
        return len(segmented.detections), len(instances), json.dumps(prediction).encode()

    predict(test_image(320, 240, 1))  # warm-up: lazy imports, allocator pools, thread pools
    image = test_image(width, height, 0)
    image_bytes = width * height * 3
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    baseline = PeakSampler()
    baseline_rss = baseline._process.memory_info().rss
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    baseline.start()
    started = time.perf_counter()
    detections, objects, encoded = predict(image)
    seconds = time.perf_counter() - started
    sampled = baseline.stop()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak = max(sampled, maxrss if maxrss > maxrss_before else 0)
    return {
        "size": args.size,
        "megapixels": round(width * height / 1e6, 2),
        "code": str(Path(args.code).resolve()),
        "sam": args.sam,
        "detections": detections,
        "objects_returned": objects,
        "seconds": round(seconds, 2),
        "baseline_rss_mb": round(baseline_rss / 2**20),
        "peak_rss_mb": round(peak / 2**20),
        "peak_above_baseline_mb": round((peak - baseline_rss) / 2**20),
        "image_rgb_mb": round(image_bytes / 2**20),
        "prediction_json_bytes": len(encoded),
        "prediction_sha256": hashlib.sha256(encoded).hexdigest(),  # equal across checkouts: the same prediction
        "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None,
    }


def run_size(size: str, models: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--child",
        "--size",
        size,
        "--models",
        json.dumps(models),
        "--code",
        args.code,
        "--sam",
        args.sam,
        "--objects",
        str(args.objects),
        "--device",
        args.device,
    ]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=args.timeout)
    if done.returncode != 0:
        return {"size": size, "code": args.code, "failed": done.returncode, "stderr_tail": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(SIZES), help="WxH, comma-separated; one child process each")
    parser.add_argument("--objects", type=int, default=100, help="MAX_DETECTIONS (thresholds are 0)")
    parser.add_argument("--sam", choices=("hf", "pth"), default="hf", help="transformers SamModel or segment-anything")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch intra-op threads of the child")
    parser.add_argument("--code", default=str(ROOT), help="checkout whose backend the child runs")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per size")
    parser.add_argument("--out", help="write the JSON report here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--models", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    with tempfile.TemporaryDirectory() as folder:
        models = build_models(Path(folder))
        rows = []
        for size in args.sizes.split(","):
            row = run_size(size, models, args)
            print(json.dumps(row), flush=True)
            rows.append(row)
    report = {
        "what": "peak RSS of one worker-like process per image (tiny random models, thresholds 0)",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "objects": args.objects,
        "sam": args.sam,
        "device": args.device,
        "rows": rows,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
