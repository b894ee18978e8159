"""Click latency end to end: Label Studio's smart-keypoint requests through the HTTP API, queue and worker.

    python bench/interactive.py --models tiny                 # tiny random models, CPU (~2 min on 2 cores)
    python bench/interactive.py --models full-vitb --clicks 3 # full-size SAM ViT-B, random weights (~20 s a click)
    python bench/interactive.py --models full-sam-h --device cuda --sam-dtype bfloat16   # a GPU machine
    python bench/interactive.py --models full-sam-h --dry-run # the GPU models' path, tiny stand-ins, on the CPU

Starts the real stack: an embedded Redis (valkey), one `serve` (API only, on that Redis), one `worker`, and an
image server that counts the GET requests per path and the body bytes it sent, with a strong ETag and a
Last-Modified on every image, answering If-None-Match / If-Modified-Since with 304 when they match. One 1920x1080
PNG (photo-like: gradient, shapes, pixel noise; 4.6 MB) is the task's data.image. Each click is one POST /predict
as Label Studio sends it (task, label_config/interactive.xml, params.context with keypointlabels regions in
percent of the image), timed from sending to the whole answer read. Per worker configuration: one warm-up click
on another image of the same size (untimed figures: the worker's first forward), the first click on the
benchmark image, then --clicks following clicks on the same task at other points (the first point plus one more,
alternately background and foreground, as an annotator refines a mask).

Two worker configurations in ONE run, the worker restarted in between (same Redis, same API): the embedding cache
on (EMBEDDING_CACHE_MB unset: its default) and off (EMBEDDING_CACHE_MB=0). Each gets its own project id, so no
job of one is re-used by the other. Models (--models): `tiny` (tests/tiny_models.py: Grounding DINO + SAM),
`full-vitb` (SAM ViT-B), and for a GPU `full-sam-h`, `full-sam2.1-l`, `full-sam3-tracker`: full-size
architectures with random weights (bench/pipeline.py's `_full_segmenter`), saved once to a temporary folder and
loaded by the worker through the production loader; the detector is always the tiny Grounding DINO (a click runs
SAM alone). --dry-run swaps a full-size model for the tiny one of its family (SAM, SAM 2, SAM 3's tracker) and
caps the clicks at 2, to smoke-test a GPU model's path on a CPU.

Writes bench/results/<cpu|gpu name>_interactive_<models>.json (or --out; a dry run writes only with --out):
hardware (CPU model, cores, torch version; the GPU), first-click ms, following clicks' p50/p95 ms, image GETs
(200s and 304s) and body bytes per click, both configurations side by side and the ratio cached/uncached of the
following clicks' p50. A benchmark: it asserts nothing. Bounded: a fixed number of requests, every process
stopped at the end (also on Ctrl-C, SIGTERM and errors), no network (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import argparse
import dataclasses
import email.utils
import hashlib
import http.server
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["HF_HUB_OFFLINE"] = "1"

import httpx  # noqa: E402

from backend.queueing.connection import embedded_redis  # noqa: E402
from tests.support.processes import Proc, Processes, tiny_backend_env  # noqa: E402
from tests.support.serving import serving  # noqa: E402

CONFIG = (REPO / "label_config" / "interactive.xml").read_text()
RESULTS = REPO / "bench" / "results"
WIDTH, HEIGHT = 1920, 1080
LABEL = "Car"  # a Label of interactive.xml's smart KeyPointLabels "click"
TASK_ID = 101
WAIT_S = 900.0  # longest wait for a worker to load its models (a full-size model on a busy CPU) or to leave
CONFIGURATIONS = (("cache_on", None), ("cache_off", "0"))  # (name, EMBEDDING_CACHE_MB; None: unset = default)


@dataclass(frozen=True)
class Models:
    """One --models choice: the segmenter's family (bench/pipeline.py's names) and, for SAM, its ViT size; full:
    the released architecture with random weights (else the tests' tiny model); gpu: meant for a GPU machine."""

    segmenter: str
    sam_size: str | None = None
    full: bool = True
    gpu: bool = False


MODELS = {
    "tiny": Models("sam", full=False),
    "full-vitb": Models("sam", "vit_b"),
    "full-sam-h": Models("sam", "vit_h", gpu=True),
    "full-sam2.1-l": Models("sam2", gpu=True),
    "full-sam3-tracker": Models("sam3_tracker", gpu=True),
}


# ---------------------------------------------------------------------------------------------- image server


@dataclass(frozen=True)
class Served:
    """One image as the server gives it: bytes, a strong ETag (a content hash) and Last-Modified (HTTP date)."""

    body: bytes
    etag: str
    modified: float  # seconds since the epoch, whole seconds (what an HTTP date holds)

    @property
    def last_modified(self) -> str:
        return email.utils.formatdate(self.modified, usegmt=True)


@dataclass
class CountingImages:
    """Images by path, and per path the GET (and HEAD) answers given and the body bytes sent."""

    files: dict[str, Served] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def add(self, name: str, body: bytes) -> str:
        """Serve `body` at /<name> (Last-Modified: now, whole seconds); return its absolute URL."""
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        self.files[f"/{name}"] = Served(body, etag, float(int(time.time())))
        return f"{self.url}/{name}"

    def count(self, path: str, answer: str, sent: int) -> None:
        with self.lock:
            entry = self.counts.setdefault(path, {"200": 0, "304": 0, "404": 0, "head": 0, "bytes": 0})
            entry[answer] += 1
            entry["bytes"] += sent

    def snapshot(self, path: str) -> dict[str, int]:
        with self.lock:
            return dict(self.counts.get(path, {"200": 0, "304": 0, "404": 0, "head": 0, "bytes": 0}))


def not_modified(served: Served, headers: Any) -> bool:
    """RFC 9110's conditional GET: If-None-Match (weak comparison, "*" matches) decides when present, else
    If-Modified-Since (the image not modified after that date)."""
    tags = headers.get("If-None-Match")
    if tags is not None:
        wanted = {tag.strip().removeprefix("W/") for tag in tags.split(",")}
        return "*" in wanted or served.etag in wanted
    since = headers.get("If-Modified-Since")
    if since is None:
        return False
    try:
        return served.modified <= email.utils.parsedate_to_datetime(since).timestamp()
    except (TypeError, ValueError):
        return False  # an invalid date is ignored (RFC 9110 13.1.3)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        images: CountingImages = self.server.images  # type: ignore[attr-defined]
        path = self.path.split("?", 1)[0]
        served = images.files.get(path)
        if served is None:
            images.count(path, "404", 0)
            self.send_error(404)
            return
        unchanged = not_modified(served, self.headers)
        images.count(
            path, "304" if unchanged else "200" if body else "head", 0 if unchanged or not body else len(served.body)
        )
        self.send_response(304 if unchanged else 200)
        self.send_header("ETag", served.etag)
        self.send_header("Last-Modified", served.last_modified)
        if not unchanged:
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(served.body)))
        self.end_headers()
        if body and not unchanged:
            with suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(served.body)

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def counting_images() -> Iterator[CountingImages]:
    """A CountingImages served on a free loopback port for the block."""
    images = CountingImages()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.images = images  # type: ignore[attr-defined]
    httpd.daemon_threads = True
    with serving(httpd) as url:
        images.url = url
        yield images


# ---------------------------------------------------------------------------------------------- models


def build_into(directory: Path, models: Models, dry_run: bool, device: str) -> dict[str, str]:
    """Save the tiny Grounding DINO and the segmenter of `models` under `directory` (random weights); return the
    worker's DETECTOR_MODEL and SAM_MODEL. Runs in a child process (see `ensure_models`)."""
    from bench import pipeline

    detector = pipeline.tiny("build_tiny_grounding_dino")(directory / "detector")
    sam = directory / "sam"
    if models.full and not dry_run:
        model, processor = pipeline._full_segmenter(models.segmenter, models.sam_size or "vit_h", device)
        model.save_pretrained(sam)
        processor.save_pretrained(sam)
        del model
    else:
        pipeline.tiny(pipeline.TINY_BUILDERS[models.segmenter])(sam)
    return {"DETECTOR_MODEL": str(detector), "SAM_MODEL": str(sam)}


def ensure_models(args: argparse.Namespace, directory: Path) -> tuple[dict[str, str], float]:
    """The models of `args` under `directory`, built by a child process (the bench process stays small and never
    holds the GPU); a folder built earlier for the same choice (--model-dir) is reused. Returns the paths and
    the build seconds (0 when reused)."""
    key = {"models": args.models, "dry_run": args.dry_run}
    marker = directory / "bench_models.json"
    if marker.is_file() and json.loads(marker.read_text())["key"] == key:
        return dict(json.loads(marker.read_text())["paths"]), 0.0
    started = time.perf_counter()
    command = [
        sys.executable,
        __file__,
        "--build-into",
        str(directory),
        "--models",
        args.models,
        "--device",
        args.device,
    ]
    subprocess.run([*command, *(["--dry-run"] if args.dry_run else [])], check=True)
    return dict(json.loads(marker.read_text())["paths"]), time.perf_counter() - started


def make_images(seed: int) -> dict[str, bytes]:
    """Two photo-like 1920x1080 PNGs (bench/pipeline.py's generator, 5 shapes, noise sigma 8): the warm-up's and
    the benchmark's."""
    from bench import pipeline

    warmup, clicked = pipeline.generate_images(2, [(WIDTH, HEIGHT)], 5, 8.0, seed)
    return {"warmup.png": warmup, "clicked.png": clicked}


# ---------------------------------------------------------------------------------------------- requests


def point(index: int) -> tuple[float, float]:
    """The index-th click's (x, y) in percent of the image: a low-discrepancy sequence within 10..90 %."""
    return (10 + 80 * ((0.5 + index * 0.6180340) % 1.0), 10 + 80 * ((0.5 + index * 0.7548777) % 1.0))


def keypoint(index: int, positive: bool) -> dict[str, Any]:
    """A smart keypoint region as Label Studio's editor sends it in params.context.result."""
    x, y = point(index)
    return {
        "id": f"kp{index}",
        "original_width": WIDTH,
        "original_height": HEIGHT,
        "image_rotation": 0,
        "is_positive": positive,
        "value": {"x": round(x, 4), "y": round(y, 4), "width": 0.5, "keypointlabels": [LABEL]},
        "from_name": "click",
        "to_name": "image",
        "type": "keypointlabels",
        "origin": "manual",
    }


def click_context(index: int) -> dict[str, Any]:
    """Click 0: one foreground point; click k: point 0 and point k, alternately background and foreground."""
    regions = [keypoint(0, True)] if index == 0 else [keypoint(0, True), keypoint(index, index % 2 == 0)]
    return {"result": regions}


@dataclass(frozen=True)
class Click:
    """One timed /predict: wall ms, HTTP status, regions returned, and what the image server answered meanwhile."""

    ms: float
    status: int
    regions: int
    gets_200: int
    gets_304: int
    body_bytes: int
    error: str | None = None


def click(client: httpx.Client, api: str, images: CountingImages, image: str, project: str, index: int) -> Click:
    """POST one click on task TASK_ID (data.image = the image's URL) and time the whole request."""
    path = "/" + image.rsplit("/", 1)[-1]
    body = {
        "tasks": [{"id": TASK_ID, "data": {"image": image}}],
        "label_config": CONFIG,
        "project": project,
        "params": {"login": None, "password": None, "context": click_context(index)},
    }
    before = images.snapshot(path)
    started = time.perf_counter()
    answer = client.post(f"{api}/predict", json=body)
    ms = (time.perf_counter() - started) * 1000
    after = images.snapshot(path)
    results = answer.json().get("results", []) if answer.status_code == 200 else []
    return Click(
        ms=round(ms, 2),
        status=answer.status_code,
        regions=len(results[0]["result"]) if results else 0,
        gets_200=after["200"] - before["200"],
        gets_304=after["304"] - before["304"],
        body_bytes=after["bytes"] - before["bytes"],
        error=None if answer.status_code == 200 and results else answer.text[:300],
    )


# ---------------------------------------------------------------------------------------------- the stack


def wait_workers(api: str, count: int, worker: Proc | None, timeout: float = WAIT_S) -> None:
    """Until /health counts `count` live workers (with `count` >= 1: that announced their models), or raise with
    the worker's log when it exits or the deadline passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker is not None and worker.popen.poll() is not None:
            raise RuntimeError(f"worker exited with {worker.popen.returncode}:\n{worker.log()[-3000:]}")
        try:
            health = httpx.get(f"{api}/health", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            health = {}
        live = int(health.get("workers", -1))
        announced = sum(int(group["workers"]) for group in health.get("fingerprints", []))
        if live == count and (count == 0 or announced >= count):
            return
        time.sleep(0.25)
    log = worker.log()[-3000:] if worker is not None else ""
    raise RuntimeError(f"/health did not count {count} worker(s) within {timeout:.0f} s\n{log}")


def cache_lines(client: httpx.Client, api: str) -> list[str]:
    """The /metrics samples about caches or embeddings (the embedding cache's hits, misses, bytes once it lands)."""
    try:
        text = client.get(f"{api}/metrics").text
    except httpx.HTTPError as exc:
        return [f"/metrics failed: {exc}"]
    words = ("cache", "embedding")
    return [line for line in text.splitlines() if not line.startswith("#") and any(w in line for w in words)]


def percentile(values: Sequence[float], fraction: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return round(ordered[low] + (ordered[high] - ordered[low]) * (position - low), 2)


def summary(first: Click, following: Sequence[Click], warmup: Click) -> dict[str, Any]:
    """One configuration's figures: the first click, the following clicks' p50/p95 and per-click image traffic."""
    times = [c.ms for c in following]
    n = max(1, len(following))
    return {
        "warmup_click_ms": warmup.ms,
        "first_click_ms": first.ms,
        "first_click_image_gets": {"200": first.gets_200, "304": first.gets_304, "body_bytes": first.body_bytes},
        "following_clicks": len(following),
        "following_p50_ms": percentile(times, 0.5) if times else None,
        "following_p95_ms": percentile(times, 0.95) if times else None,
        "following_mean_ms": round(statistics.fmean(times), 2) if times else None,
        "following_image_gets_200_per_click": round(sum(c.gets_200 for c in following) / n, 3),
        "following_image_gets_304_per_click": round(sum(c.gets_304 for c in following) / n, 3),
        "following_body_bytes_per_click": round(sum(c.body_bytes for c in following) / n, 1),
        "statuses": sorted({c.status for c in (warmup, first, *following)}),
        "regions_per_click": [c.regions for c in (first, *following)],
        "errors": [c.error for c in (warmup, first, *following) if c.error][:3],
        "clicks_ms": [c.ms for c in following],
    }


def measure(
    stack: BenchStack, name: str, cache_mb: str | None, urls: dict[str, str], project: str, clicks: int
) -> dict[str, Any]:
    """Start a worker with EMBEDDING_CACHE_MB=`cache_mb` (None: unset), run the warm-up, first and following
    clicks, read /metrics, stop the worker; return the figures."""
    worker = stack.start_worker(cache_mb)
    try:
        load = os.getloadavg()[0]
        warmup = click(stack.client, stack.api, stack.images, urls["warmup.png"], project, 0)
        first = click(stack.client, stack.api, stack.images, urls["clicked.png"], project, 0)
        following = [
            click(stack.client, stack.api, stack.images, urls["clicked.png"], project, index)
            for index in range(1, clicks + 1)
        ]
        # Only the samples this configuration added or changed: Redis keeps the earlier workers' figures too.
        metrics = [line for line in cache_lines(stack.client, stack.api) if line not in stack.seen_metrics]
        stack.seen_metrics.update(metrics)
    finally:
        stack.stop_worker(worker)
    figures = summary(first, following, warmup)
    print(f"{name}: first {first.ms:.0f} ms, following p50 {figures['following_p50_ms']} ms", file=sys.stderr)
    setting = "unset (default)" if cache_mb is None else cache_mb
    loads = [round(load, 2), round(os.getloadavg()[0], 2)]
    return {"EMBEDDING_CACHE_MB": setting, **figures, "metrics": metrics, "load_avg_1min_start_end": loads}


@dataclass
class BenchStack:
    """The running API and image server; workers come and go (one at a time)."""

    processes: Processes
    env: dict[str, str]
    api: str
    images: CountingImages
    client: httpx.Client
    seen_metrics: set[str] = field(default_factory=set)

    def start_worker(self, cache_mb: str | None) -> Proc:
        env = {k: v for k, v in self.env.items() if k != "EMBEDDING_CACHE_MB"}
        worker = self.processes.start(["worker"], env if cache_mb is None else {**env, "EMBEDDING_CACHE_MB": cache_mb})
        wait_workers(self.api, 1, worker)
        return worker

    def stop_worker(self, worker: Proc) -> None:
        """SIGTERM (rq's warm shutdown unregisters it), then until /health counts no worker."""
        worker.stop(timeout=60)
        wait_workers(self.api, 0, None, timeout=120)


def backend_env(paths: dict[str, str], args: argparse.Namespace, redis_url: str) -> dict[str, str]:
    """The shared environment of `serve` and the workers: tiny_backend_env's (offline, loopback images allowed,
    a fresh queue), these models, device and dtype, the Redis, and a PREDICT_TIMEOUT for slow CPU clicks."""
    env = tiny_backend_env(Path(paths["DETECTOR_MODEL"]), Path(paths["SAM_MODEL"]))
    shutil.rmtree(env.pop("EMBEDDED_REDIS_DIR"), ignore_errors=True)  # REDIS_URL is given: serve embeds none
    env.pop("EMBEDDING_CACHE_MB", None)
    inherited = os.environ.get("PYTHONPATH")  # gpu_run.sh's wheels (/tmp/site): tiny_backend_env sets the repo only
    env.update(
        PYTHONPATH=os.pathsep.join([str(REPO), *([inherited] if inherited else [])]),
        REDIS_URL=redis_url,
        DEVICE=args.device,
        SAM_DTYPE=args.sam_dtype,
        PREDICT_TIMEOUT=str(args.timeout),
        JOB_TIMEOUT=str(int(args.timeout) + 60),
        LOG_LEVEL="WARNING",
    )
    return env


def run(args: argparse.Namespace, workdir: Path, model_dir: Path) -> dict[str, Any]:
    """Build the models and images, start Redis, the image server and `serve`, measure each configuration."""
    paths, build_s = ensure_models(args, model_dir)
    data = make_images(args.seed)
    processes = Processes(workdir)
    with ExitStack() as stack:
        images = stack.enter_context(counting_images())
        urls = {name: images.add(name, body) for name, body in data.items()}
        redis_url = stack.enter_context(embedded_redis())
        stack.callback(processes.stop_all)
        env = backend_env(paths, args, redis_url)
        serve = processes.serve(env, wait_workers=0)
        client = stack.enter_context(httpx.Client(timeout=args.timeout + 120))
        bench = BenchStack(processes, env, serve.url, images, client)
        runs = {
            name: measure(bench, name, cache_mb, urls, f"{position + 1}.{int(time.time())}", args.clicks)
            for position, (name, cache_mb) in enumerate(CONFIGURATIONS)
        }
    on, off = runs["cache_on"]["following_p50_ms"], runs["cache_off"]["following_p50_ms"]
    return {
        "image": {"size": f"{WIDTH}x{HEIGHT}", "png_bytes": len(data["clicked.png"])},
        "models_build_s": round(build_s, 1),
        "configurations": runs,
        "ratio_cached_to_uncached_p50": round(on / off, 3) if on and off else None,
    }


# ---------------------------------------------------------------------------------------------- report


def machine(device: str) -> dict[str, Any]:
    """The hardware and versions: CPU model (/proc/cpuinfo), cores, torch and transformers; the GPU by nvidia-smi."""
    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}
    for package in ("torch", "transformers"):
        info[package] = importlib.metadata.version(package)
    info["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS", "unset")
    if device.startswith("cuda"):
        query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
        try:
            info["gpu"] = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            info["gpu"] = f"nvidia-smi failed: {exc}"
    return info


def repo_commit() -> str | None:
    """HEAD's short hash, "+dirty" when backend/ differs from it; None outside a git checkout."""
    try:
        git = ["git", "-C", str(REPO)]
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "backend"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if head.returncode == 0 else None


def default_out(args: argparse.Namespace, hardware: dict[str, Any]) -> Path:
    """bench/results/<cpu|gpu>_interactive_<models>.json, the GPU named by its family (h100, h200, ...)."""
    where = "cpu"
    if args.device.startswith("cuda"):
        name = str(hardware.get("gpu", "gpu")).split(",")[0].lower()
        where = next((g for g in ("h200", "h100", "a100", "l40s", "l4") if g in name), "gpu")
    return RESULTS / f"{where}_interactive_{args.models}.json"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--clicks", type=int, default=20, help="following clicks after the first (default 20)")
    parser.add_argument("--device", default="cpu", help="DEVICE of the worker: cpu, cuda, cuda:N (default cpu)")
    parser.add_argument("--sam-dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--dry-run", action="store_true", help="tiny stand-ins of the family, at most 2 clicks")
    parser.add_argument("--timeout", type=float, default=600.0, help="PREDICT_TIMEOUT of the API, seconds")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--model-dir", type=Path, help="keep the built models here and reuse them next time")
    parser.add_argument("--out", type=Path, help="result file (default bench/results/<hw>_interactive_<models>.json)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (process logs)")
    parser.add_argument("--note", help="a line stored in the JSON (which code ran, what else loaded the machine)")
    parser.add_argument("--build-into", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.clicks < 1:
        parser.error("--clicks must be at least 1")
    if args.dry_run:
        args.clicks = min(args.clicks, 2)
    return args


def _stop_on_sigterm() -> None:
    """SIGTERM (`timeout`, a scheduler) unwinds like Ctrl-C, so every started process is stopped."""

    def raise_exit(signum: int, _: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, raise_exit)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    models = MODELS[args.models]
    if args.build_into:
        args.build_into.mkdir(parents=True, exist_ok=True)
        paths = build_into(args.build_into, models, args.dry_run, args.device)
        key = {"models": args.models, "dry_run": args.dry_run}
        (args.build_into / "bench_models.json").write_text(json.dumps({"key": key, "paths": paths}))
        return 0
    _stop_on_sigterm()
    hardware = machine(args.device)
    with ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="bench-interactive-"))
        if not args.keep:
            stack.callback(shutil.rmtree, workdir, True)
        print(f"work folder: {workdir}", file=sys.stderr)
        folder = f"{args.models}{'-dry-run' if args.dry_run else ''}"
        model_dir = (args.model_dir or workdir / "models") / folder
        result = run(args, workdir, model_dir)
    report = {
        "benchmark": "Label Studio smart-keypoint clicks, POST /predict end to end (API, queue, worker)",
        "models": args.models,
        "model_choice": dataclasses.asdict(models) | {"dry_run_tiny_stand_in": args.dry_run},
        "detector": "tiny Grounding DINO (tests/tiny_models.py; clicks do not run it)",
        "device": args.device,
        "sam_dtype": args.sam_dtype,
        "label_config": "label_config/interactive.xml",
        "machine": hardware,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "repo_commit": repo_commit(),
        "note": args.note,
        **result,
    }
    text = json.dumps(report, indent=2) + "\n"
    out = args.out or (None if args.dry_run else default_out(args, hardware))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
