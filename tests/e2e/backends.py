"""The backend as a user runs it for Label Studio: the real `serve` command, tiny random models, LS credentials."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil

from tests.support.processes import Proc, Processes, tiny_backend_env

# The model families users pick (issue 12) that the e2e runs, as tiny random models (tests/e2e/conftest.py
# family_models): Grounding DINO → SAM v1, Grounding DINO → SAM 2 (2.1), SAM 3 alone from text.
MODEL_FAMILIES = ("grounding-dino+sam", "grounding-dino+sam2", "sam3")


def models_of_family(family: str, fixture: Callable[[str], Any]) -> tuple[Path, Path]:
    """(DETECTOR_MODEL, SAM_MODEL) of `family` (one of MODEL_FAMILIES), from the tiny model folder fixtures
    (tests/conftest.py, tests/e2e/conftest.py) that `fixture` (pytest's request.getfixturevalue) builds on first use.

    SAM 3 alone answers smart clicks with its own tracker, so its SAM_MODEL names a folder that does not exist:
    a backend that loaded or used SAM_MODEL would fail.
    """
    if family == "sam3":
        sam3 = Path(fixture("tiny_family_dirs")["sam3"])
        return sam3, sam3.with_name("no-sam-model-sam3-brings-its-tracker")
    sam = fixture("tiny_family_dirs")["sam2"] if family == "grounding-dino+sam2" else fixture("tiny_hf_sam_dir")
    return Path(fixture("tiny_detector_dir")), Path(sam)


def backend_environment(label_studio_url: str, api_key: str, detector: Path, sam: Path) -> dict[str, str]:
    """Environment of one `serve`: embedded Redis and worker, tiny models on the CPU, offline.

    LOCAL_FILES_DOCUMENT_ROOT stays unset so that Local Files images, like uploads, are fetched from
    Label Studio with LABEL_STUDIO_API_KEY: the path a backend on another machine takes.
    """
    shell_label_studio = tuple(key for key in os.environ if key.startswith("LABEL_STUDIO_"))
    env = tiny_backend_env(detector, sam, drop=("LOCAL_FILES_DOCUMENT_ROOT", *shell_label_studio))
    env.update(LABEL_STUDIO_URL=label_studio_url, LABEL_STUDIO_API_KEY=api_key)
    return env


class BackendPool:
    """`serve` processes by API key kind ("legacy", "pat") and models: started on first use, stopped at the end."""

    def __init__(
        self, workdir: Path, label_studio_url: str, api_keys: dict[str, str], detector: Path, sam: Path
    ) -> None:
        self._processes = Processes(workdir)
        self._label_studio_url = label_studio_url
        self._api_keys = api_keys
        self._models = (detector, sam)
        self._running: dict[tuple[str, tuple[Path, Path]], Proc] = {}
        self._children: list[psutil.Process] = []

    def get(self, key_kind: str, models: tuple[Path, Path] | None = None) -> Proc:
        """The shared backend using the `key_kind` API key and `models` (DETECTOR_MODEL, SAM_MODEL; default the
        pool's tiny Grounding DINO and SAM)."""
        key = (key_kind, models or self._models)
        if key not in self._running:
            self._running[key] = self.start(key_kind, models=models)
        return self._running[key]

    def start(
        self, key_kind: str, label_studio_url: str | None = None, models: tuple[Path, Path] | None = None
    ) -> Proc:
        """A new backend of its own (for a test that keeps its worker busy), healthy with one worker."""
        url, key = label_studio_url or self._label_studio_url, self._api_keys[key_kind]
        env = backend_environment(url, key, *(models or self._models))
        proc = self._processes.serve(env)
        self._children += psutil.Process(proc.popen.pid).children(recursive=True)
        return proc

    def stop_all(self) -> None:
        """Stop every `serve`, then any of their children still running.

        A `serve` stopped while its worker is busy can leave the worker and the embedded Redis behind
        (reported to the backend's owners); the tests must not leave them running either way.
        """
        self._processes.stop_all()
        survivors = [child for child in self._children if child.is_running()]
        for child in survivors:
            child.terminate()
        _, alive = psutil.wait_procs(survivors, timeout=10)
        for child in alive:
            child.kill()


def setup_model_version(backend: Proc, project: str, label_config: str) -> str:
    """The model_version the backend reports from /setup for this labeling config."""
    response = httpx.post(f"{backend.url}/setup", json={"project": project, "schema": label_config}, timeout=10)
    response.raise_for_status()
    return str(response.json()["model_version"])
