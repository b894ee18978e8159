"""Micro-benchmark of the CPU work after SAM, old and new code on the same masks in one run:

- RLE: label_studio_sdk's `mask2rle` (what `mask_to_rle` called before) vs our `mask_to_rle`;
- cleanup: the three steps on the whole image (what `clean_mask` did before) vs `clean_mask` (on a window).

    python bench/postprocess.py --size 1920x1080 --masks 20 --passes 3 --out bench/results/cpu_postprocess.json

Masks, generated per family (see `FAMILIES`): "object", one filled shape of the size the pipeline bench draws
(a tenth to a third of each side) with small holes and specks, as SAM gives for a real object; "ragged", smooth
noise covering 93% of the image, calibrated on what the tiny random-weight SAM gives in `pipeline.py --masks
model` (93% fill, ~48k RLE ints per 1080p mask). Every pass runs old and new alternately, mask by mask, and
checks that they agree exactly; the report gives ms per mask, median and best over passes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from functools import partial
from importlib.metadata import version
from pathlib import Path
from statistics import median
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import cv2
import numpy as np
from label_studio_sdk.converter.brush import mask2rle

from backend.labelstudio.rle import mask_to_rle
from backend.pipeline.masks import clean_mask, fill_holes, remove_islands, smooth
from backend.pipeline.types import PostprocessOptions

Mask = np.ndarray  # bool (H, W)


def object_mask(size: tuple[int, int], rng: np.random.Generator) -> Mask:
    """One filled ellipse, rectangle or triangle (a tenth to a third of each side) with 0-5 small holes
    (discs of radius 2-6 px, 13-113 px: about half of them under the cleanup's 100 px) near its centre and
    0-5 specks of the same sizes around it; size is (width, height)."""
    width, height = size
    w, h = int(rng.integers(width // 10, width // 3)), int(rng.integers(height // 10, height // 3))
    x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
    plane = np.zeros((height, width), np.uint8)
    kind = rng.integers(3)
    if kind == 0:
        cv2.ellipse(plane, (x + w // 2, y + h // 2), (w // 2, h // 2), 0, 0, 360, 1, -1)
    elif kind == 1:
        cv2.rectangle(plane, (x, y), (x + w, y + h), 1, -1)
    else:
        cv2.fillPoly(plane, [np.array([(x, y + h), (x + w // 2, y), (x + w, y + h)], np.int32)], 1)
    for value, count in ((0, rng.integers(6)), (1, rng.integers(6))):
        for _ in range(count):  # centres spread by 0.2 (holes) or 1 (specks) times the shape's size
            spread = 0.2 if value == 0 else 1.0
            cx = int(np.clip(x + w / 2 + rng.normal(0, spread * w), 0, width - 1))
            cy = int(np.clip(y + h / 2 + rng.normal(0, spread * h), 0, height - 1))
            cv2.circle(plane, (cx, cy), int(rng.integers(2, 7)), value, -1)
    return plane.astype(bool)


def ragged_mask(size: tuple[int, int], rng: np.random.Generator) -> Mask:
    """Smooth noise (Gaussian, sigma 9 px) thresholded to cover 93% of the image; size is (width, height)."""
    width, height = size
    noise = cv2.GaussianBlur(rng.random((height, width)).astype(np.float32), (0, 0), 9.0)
    return noise < np.quantile(noise, 0.93)


FAMILIES: dict[str, Callable[[tuple[int, int], np.random.Generator], Mask]] = {
    "object": object_mask,
    "ragged": ragged_mask,
}


def sdk_rle(mask: Mask) -> list[int]:
    """The previous `mask_to_rle`: label_studio_sdk's encoder on the mask as uint8 0/255."""
    return mask2rle(mask.astype(np.uint8) * 255)


def whole_image_cleanup(mask: Mask, options: PostprocessOptions) -> Mask:
    """The previous `clean_mask`: the three steps on the whole image."""
    return smooth(remove_islands(fill_holes(mask, options.fill_holes), options.min_island), options.smoothing)


def timed(function: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds one call of `function` took, and its result."""
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def compare(
    masks: Sequence[Mask], old: Callable[[Mask], Any], new: Callable[[Mask], Any], passes: int
) -> dict[str, Any]:
    """ms per mask of `old` and `new` over `masks` (alternating, mask by mask), per pass; and whether they agree."""
    seconds: dict[str, list[float]] = {"old": [], "new": []}
    agree = True
    for _ in range(passes):
        total = {"old": 0.0, "new": 0.0}
        for mask in masks:
            old_s, old_out = timed(partial(old, mask))
            new_s, new_out = timed(partial(new, mask))
            total["old"] += old_s
            total["new"] += new_s
            agree = agree and bool(np.array_equal(old_out, new_out))
        for key, value in total.items():
            seconds[key].append(1000 * value / len(masks))
    summary = {f"{key}_ms_per_mask": {"median": median(v), "best": min(v), "passes": v} for key, v in seconds.items()}
    return summary | {"speedup_median": median(seconds["old"]) / median(seconds["new"]), "identical": agree}


def cpu_model() -> str:
    """lscpu's model name (falls back on the platform's processor string)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return platform.processor()
    names = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")]
    return names[0] if names else platform.processor()


def machine(load_at_start: list[float]) -> dict[str, Any]:
    """What ran it: CPU, cores, OpenCV's threads, load averages, library versions."""
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "opencv_threads": cv2.getNumThreads(),
        "load_average_at_start": load_at_start,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: version(name) for name in ("numpy", "opencv-python-headless", "label-studio-sdk")},
    }


def masks_stats(masks: Sequence[Mask]) -> dict[str, float]:
    """Mean fraction of pixels painted and mean RLE length of a family's masks."""
    return {
        "fill_mean": float(np.mean([mask.mean() for mask in masks])),
        "rle_ints_mean": float(np.mean([len(mask_to_rle(mask)) for mask in masks])),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1920x1080", help="WIDTHxHEIGHT of every mask")
    parser.add_argument("--masks", type=int, default=20, help="masks per family")
    parser.add_argument("--passes", type=int, default=3, help="timed passes over every family's masks")
    parser.add_argument(
        "--smoothing", type=float, default=0.0, help="sigma of the cleanup's smoothing (production's default 0: off)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the JSON report here")
    return parser.parse_args(argv)


def measure_family(masks: Sequence[Mask], options: PostprocessOptions, passes: int) -> dict[str, Any]:
    """Old vs new RLE and cleanup on one family's masks."""
    return {
        "masks": masks_stats(masks),
        "rle": compare(masks, sdk_rle, mask_to_rle, passes),
        "cleanup": compare(
            masks, partial(whole_image_cleanup, options=options), partial(clean_mask, options=options), passes
        ),
    }


def print_family(family: str, result: dict[str, Any]) -> None:
    """One line per step: old and new median ms per mask, speed-up, agreement."""
    for step in ("rle", "cleanup"):
        r = result[step]
        print(
            f"{family:7s} {step:8s} old {r['old_ms_per_mask']['median']:8.2f} ms/mask, "
            f"new {r['new_ms_per_mask']['median']:7.2f} ms/mask, x{r['speedup_median']:.1f}, "
            f"identical: {r['identical']}"
        )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    width, height = (int(part) for part in args.size.lower().split("x"))
    options = PostprocessOptions(smoothing=args.smoothing)
    results: dict[str, Any] = {}
    for index, (family, make) in enumerate(FAMILIES.items()):
        rng = np.random.default_rng([args.seed, index])
        results[family] = measure_family([make((width, height), rng) for _ in range(args.masks)], options, args.passes)
        print_family(family, results[family])
    report = {
        "bench": "postprocess",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "parameters": vars(args) | {"cleanup_options": asdict(options)},
        "machine": machine(load_at_start),
        "results": results,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
