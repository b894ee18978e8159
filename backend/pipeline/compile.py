"""DETECTOR_COMPILE: the detector's forward through torch.compile, static shapes, its compile time logged.

Grounding DINO launches thousands of small kernels per forward (launch- and memory-bound on a GPU); inductor fuses
them. Shapes are static (dynamic=False): one compiled graph per input shape, i.e. per (rows = images x prompt
chunks, padded height, width, prompt length). The detector already groups images by their preprocessed size, so
a worker compiles once per size bucket and batch size it meets; the first call of each shape pays the compile
and is logged once, with its seconds. Past torch._dynamo's recompile limit (8 shapes per function by default)
dynamo runs the rest eagerly (and warns): outputs stay the same, only the speed-up is lost for those shapes.
The text backbone (text_cache.TextFeatureCache) is left out of the graph (a graph break), so it runs eagerly;
transformers' multi-scale deformable attention checks its inputs with `.item()`, another break per layer.
On the 2-core CPU (load 10) inductor took 514 s to compile the tiny model's first shape, aot_eager 131 s:
a cost for a long-lived GPU worker, not for the CPU.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)


class CompiledForward:
    """`forward` (a model's bound forward) compiled with torch.compile(dynamic=False), called with keyword tensors;
    the first call of every input shape is timed and logged (compile included). `backend`: torch.compile's
    (production: inductor; the CPU test takes aot_eager, the same graph capture without code generation)."""

    def __init__(self, forward: Callable[..., Any], name: str = "detector", backend: str = "inductor") -> None:
        self._compiled = torch.compile(forward, dynamic=False, backend=backend)
        self._name = name
        self._seen: set[tuple[tuple[str, tuple[int, ...]], ...]] = set()
        self._lock = threading.Lock()
        self.compile_seconds: dict[tuple[tuple[str, tuple[int, ...]], ...], float] = {}

    def __call__(self, **inputs: torch.Tensor) -> Any:
        bucket = tuple(sorted((key, tuple(value.shape)) for key, value in inputs.items()))
        with self._lock:
            first = bucket not in self._seen
            self._seen.add(bucket)
        if not first:
            return self._compiled(**inputs)
        started = time.perf_counter()
        output = self._compiled(**inputs)
        seconds = time.perf_counter() - started
        self.compile_seconds[bucket] = seconds
        shapes = ", ".join(f"{key} {'x'.join(map(str, shape))}" for key, shape in bucket)
        log.info("compiled the %s for %s: first call %.1f s (compile included)", self._name, shapes, seconds)
        return output
