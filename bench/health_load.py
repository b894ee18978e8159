"""/health and /setup latency while N slow /predict requests wait, on this machine's CPU.

    python bench/health_load.py --waiting 100

Starts the real `serve` command (embedded Redis and one worker, tiny random test models on the CPU) and an
image server whose /slow/ images take --slow seconds, sends --waiting /predict requests at once (one slow
task each: the worker holds one, the rest queue), waits until they are all queued, then times --samples
/health and /setup calls one after the other, and finally collects every /predict answer (504 after
PREDICT_TIMEOUT, counted from each request's arrival). Bounded: N requests, then it stops. Label Studio
gives /health 1 s and /setup 3 s. A benchmark: it asserts nothing.

Writes bench/results/health_load_cpu.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["HF_HUB_OFFLINE"] = "1"

import httpx  # noqa: E402
from PIL import Image  # noqa: E402

from tests.support.images import ImageServer, serve_images  # noqa: E402
from tests.support.processes import Processes, tiny_backend_env  # noqa: E402
from tests.tiny_models import build_tiny_grounding_dino, build_tiny_hf_sam  # noqa: E402

CONFIG = (REPO / "label_config" / "brush_and_rectangle.xml").read_text()
DEFAULT_OUT = REPO / "bench" / "results" / "health_load_cpu.json"


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50_s": round(statistics.median(ordered), 4),
        "p99_s": round(ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))], 4),
        "max_s": round(ordered[-1], 4),
        "n": len(ordered),
    }


def timed(call: Any) -> tuple[float, int]:
    started = time.monotonic()
    status = call().status_code
    return time.monotonic() - started, status


def add_images(images: ImageServer, count: int) -> None:
    for index in range(count):
        images.add(f"w{index}.png", Image.new("RGB", (32, 32), (index % 256, 0, 0)))


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    detector = build_tiny_grounding_dino(workdir / "models" / "grounding_dino")
    sam = build_tiny_hf_sam(workdir / "models" / "sam")
    processes = Processes(workdir)
    env = {**tiny_backend_env(detector, sam), "PREDICT_TIMEOUT": str(args.timeout), "LOG_LEVEL": "WARNING"}
    with ExitStack() as stack:
        images = stack.enter_context(serve_images(workdir / "images", args.slow))
        stack.callback(processes.stop_all)
        add_images(images, args.waiting)
        serve = processes.serve(env)
        answers: list[tuple[float, int]] = []
        limits = httpx.Limits(max_connections=args.waiting + 10, max_keepalive_connections=0)
        with httpx.Client(timeout=args.timeout + 60, limits=limits) as waiting, httpx.Client(timeout=30) as probe:

            def wait_one(index: int) -> None:
                task = {"id": index + 1, "data": {"image": f"{images.url}/slow/w{index}.png"}}
                body = {"tasks": [task], "label_config": CONFIG, "project": "7.1"}
                answers.append(timed(lambda: waiting.post(f"{serve.url}/predict", json=body)))

            pool = ThreadPoolExecutor(args.waiting)
            sent = time.monotonic()
            futures = [pool.submit(wait_one, index) for index in range(args.waiting)]
            queued = 0
            while queued < args.waiting - 1 and time.monotonic() - sent < args.timeout:
                queued = sum(probe.get(f"{serve.url}/health").json()["queued"].values())
                time.sleep(0.2)
            all_queued_s = time.monotonic() - sent
            health: list[tuple[float, int]] = []
            setup: list[tuple[float, int]] = []
            for _ in range(args.samples):
                health.append(timed(lambda: probe.get(f"{serve.url}/health")))
                setup.append(timed(lambda: probe.post(f"{serve.url}/setup", json={"project": "7.1", "schema": CONFIG})))
            measured_while_waiting = len(answers) == 0
            for future in futures:
                future.result()
            pool.shutdown()
        load = os.getloadavg()[0]
    return {
        "waiting_predicts": args.waiting,
        "queued_before_sampling": queued,
        "seconds_until_all_queued": round(all_queued_s, 2),
        "all_samples_taken_while_every_predict_waited": measured_while_waiting,
        "predict_timeout_s": args.timeout,
        "health": {**percentiles([t for t, _ in health]), "statuses": sorted({s for _, s in health})},
        "setup": {**percentiles([t for t, _ in setup]), "statuses": sorted({s for _, s in setup})},
        "predict": {**percentiles([t for t, _ in answers]), "statuses": sorted({s for _, s in answers})},
        "load_avg_1min_at_end": round(load, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--waiting", type=int, default=100, help="slow /predict requests in flight")
    parser.add_argument("--samples", type=int, default=50, help="/health and /setup calls timed each")
    parser.add_argument("--timeout", type=float, default=30.0, help="PREDICT_TIMEOUT of the server")
    parser.add_argument("--slow", type=float, default=60.0, help="seconds each slow image takes")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        result = run(args, Path(workdir))
    result["machine"] = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "models": "tiny random test models, CPU",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
