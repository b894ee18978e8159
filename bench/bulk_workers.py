"""Whole-project pre-labelling throughput with 1 and with 2 workers, on this machine's CPU.

    python bench/bulk_workers.py --tasks 200

Uses the end-to-end harness (tests/e2e): a real Label Studio (cached tool environment), the loopback image
host with N small generated images, a Redis (embedded valkey, or $REDIS_URL), and the real commands:
`serve` (API only), `worker` x1 then x2, and `grounded-sam prelabel --project ID` timed from start to
exit. Each configuration gets a fresh project over the same images and a fresh queue. Models are the tiny
random test models on the CPU, so the numbers measure the bulk machinery (queueing, fetching, Label Studio
pushes, per-task model calls on a tiny network), not Grounding DINO or SAM. A benchmark: it asserts nothing.

Writes bench/results/bulk_workers_cpu.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["HF_HUB_OFFLINE"] = "1"

from backend.queueing.connection import embedded_redis  # noqa: E402
from tests.e2e.bulk import ScaledBackend, bulk_images, finish, scaled_environment, url_project  # noqa: E402
from tests.e2e.labelstudio import LabelStudio  # noqa: E402
from tests.e2e.tooling import LABEL_STUDIO_VERSION, ensure_environment  # noqa: E402
from tests.support.images import serve_images  # noqa: E402
from tests.support.processes import Processes  # noqa: E402
from tests.tiny_models import build_tiny_grounding_dino, build_tiny_hf_sam  # noqa: E402

CONFIG = REPO / "label_config" / "brush_and_rectangle.xml"
DEFAULT_OUT = REPO / "bench" / "results" / "bulk_workers_cpu.json"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def measure(
    ls: LabelStudio,
    env: dict[str, str],
    workdir: Path,
    image_host: Any,
    images: list[Any],
    workers: int,
) -> dict[str, Any]:
    """One configuration: a fresh project, API + `workers` workers, `prelabel` timed from start to exit."""
    project = url_project(ls, f"bench-{workers}w-{uuid.uuid4().hex[:6]}", CONFIG, image_host, images)
    processes = Processes(workdir)
    try:
        backend = ScaledBackend(processes, {**env, "QUEUE_NAME": f"bench-{uuid.uuid4().hex[:8]}"})
        backend.start(workers)
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        run = backend.command(["prelabel", "--project", str(project.id)])
        code = finish(run, timeout=3600)
        seconds = time.perf_counter() - started
        load_after = os.getloadavg()[0]
        stored = len(ls.predictions(project.id))
    finally:
        processes.stop_all()
    result = {
        "workers": workers,
        "project": project.id,
        "prelabel_exit_code": code,
        "seconds": round(seconds, 2),
        "tasks_per_s": round(len(images) / seconds, 3),
        "predictions_stored": stored,
        # Another process busy on the same cores shows here (this run's own processes add up to ~workers+1).
        "loadavg_1min_before_after": [round(load_before, 2), round(load_after, 2)],
        "logs": str(workdir),
    }
    print(json.dumps(result), file=sys.stderr)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=200, help="tasks per project (default 200)")
    parser.add_argument("--chunk-size", type=int, default=8, help="BULK_CHUNK_SIZE (default 8)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"result file (default {DEFAULT_OUT})")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs) instead of deleting it")
    args = parser.parse_args()

    with ExitStack() as stack:
        workdir = (
            Path(tempfile.mkdtemp(prefix="bench-bulk-"))
            if args.keep
            else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-bulk-")))
        )
        print(f"work folder: {workdir}", file=sys.stderr)
        detector = build_tiny_grounding_dino(workdir / "models" / "grounding_dino")
        sam = build_tiny_hf_sam(workdir / "models" / "sam")
        ls = LabelStudio(ensure_environment(), workdir / "label-studio")
        stack.callback(ls.stop)
        ls.start()
        image_host = stack.enter_context(serve_images(workdir / "images", slow_s=0))
        redis_url = os.environ.get("REDIS_URL") or stack.enter_context(embedded_redis())
        images = bulk_images(image_host, "bench", args.tasks)
        env = scaled_environment(ls.url, ls.credentials.legacy_token, detector, sam, redis_url, args.chunk_size)
        runs = []
        for workers in (1, 2):
            logs = workdir / f"{workers}-worker"
            logs.mkdir()
            runs.append(measure(ls, env, logs, image_host, images, workers))

    one, two = runs
    result = {
        "benchmark": "whole-project prelabel (grounded-sam prelabel), wall time from command start to exit",
        "tasks": args.tasks,
        "chunk_size": args.chunk_size,
        "label_config": CONFIG.name,
        "images": "generated PNG/JPEG, 64-118 x 48-96 px, absolute http URLs on a loopback image host",
        "models": "tiny random test models (tests/tiny_models.py), DEVICE=cpu",
        "label_studio": LABEL_STUDIO_VERSION,
        "machine": {
            "cpu_model": cpu_model(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
        },
        "date": time.strftime("%Y-%m-%d"),
        "runs": [{k: v for k, v in run.items() if k != "logs"} for run in runs],
        "ratio_2_to_1_workers": round(two["tasks_per_s"] / one["tasks_per_s"], 3),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
