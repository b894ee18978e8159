"""The `prelabel`, `status` and `retry` commands: whole-project pre-labelling through a running backend.

`prelabel` reads the project's tasks from Label Studio, keeps those nobody has annotated yet and, of them, those
without a prediction of the backend's current model_version (all of them with --force), queues them through the
backend's /prelabel and follows the run with a progress bar. Ctrl-C cancels the queued chunks (running ones
finish); running the command again resumes with what is left, without redoing or duplicating anything.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import httpx
from tqdm import tqdm

from backend.errors import BackendCallError
from backend.lsclient import LabelStudioApi
from backend.settings import Settings

POLL_S = 1.0
# Tasks per POST /prelabel: each request stays far below the backend's MAX_REQUEST_BYTES (16 MiB by default)
# for any ordinary task data; a project of any size goes in several requests.
TASKS_PER_REQUEST = 2000
_COUNTS = ("total", "queued", "running", "done", "failed")


class BackendClient:
    """The few routes of a running backend the commands use."""

    def __init__(self, url: str, auth: tuple[str, str] | None) -> None:
        self._http = httpx.Client(base_url=url.rstrip("/"), auth=auth, timeout=60)

    def call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise BackendCallError(f"backend at {self._http.base_url} unreachable: {exc}") from exc
        if response.status_code >= 400:
            raise BackendCallError(f"{method} {path}: {response.status_code} {response.text[:500]}")
        return dict(response.json())


def prelabel(
    settings: Settings,
    backend: BackendClient,
    project: int,
    query: Mapping[str, Any] | None,
    force: bool,
    embeddings: bool = False,
) -> int:
    """Queue the project's unlabelled tasks and follow them; exit code 0 when every task got a prediction.
    embeddings: every unlabelled task goes (those with a prediction too: workers skip its prediction and write only
    its embedding to their on-disk cache)."""
    studio = _studio(settings)
    label_config = studio.label_config(project)
    version = backend.call("POST", "/setup", json={"project": str(project), "schema": label_config})["model_version"]
    tasks = list(studio.tasks(project, query))
    untouched = [t for t in tasks if not t.annotations]  # what a reviewer annotated is theirs, --force or not
    todo = [t for t in untouched if force or embeddings or version not in t.prediction_versions]
    annotated = len(tasks) - len(untouched)
    print(
        f"project {project}: {len(tasks)} tasks, {len(untouched) - len(todo)} already have {version}, "
        f"{len(todo)} to pre-label, annotated: skipped {annotated}",
        file=sys.stderr,
    )
    if not todo:
        return 0
    run_ids = []
    for start in range(0, len(todo), TASKS_PER_REQUEST):
        body = {
            "project": project,
            "label_config": label_config,
            "force": force,
            "embeddings": embeddings,
            "tasks": [{"id": t.id, "data": t.data} for t in todo[start : start + TASKS_PER_REQUEST]],
        }
        run_ids.append(backend.call("POST", "/prelabel", json=body)["run_id"])
    try:
        progress = _follow(backend, run_ids, len(todo))
    except KeyboardInterrupt:
        canceled = backend.call("DELETE", "/jobs", params={"project": project})["canceled"]
        print(
            f"\nstopped: {canceled} queued chunks canceled, running ones finish; run again to resume", file=sys.stderr
        )
        return 130
    return _summary(progress, project, annotated)


def status(backend: BackendClient, project: int) -> int:
    print(json.dumps(backend.call("GET", "/jobs", params={"project": project}), indent=2))
    return 0


def retry(backend: BackendClient, project: int) -> int:
    requeued = backend.call("POST", "/jobs/retry", params={"project": project})["requeued"]
    print(f"{requeued} failed chunks queued again", file=sys.stderr)
    return 0


def _studio(settings: Settings) -> LabelStudioApi:
    if not (settings.label_studio_url and settings.label_studio_api_key):
        raise BackendCallError(
            "prelabel reads the project from Label Studio: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY"
        )
    return LabelStudioApi(settings.label_studio_url, settings.label_studio_api_key, settings.label_studio_timeout)


def _follow(backend: BackendClient, run_ids: Sequence[str], total: int) -> dict[str, Any]:
    """Poll the runs until nothing is queued or running; a bar shows tasks finished, rate and ETA."""
    with tqdm(total=total, unit="task", desc="pre-labelling", file=sys.stderr) as bar:
        while True:
            progress = _sum_progress([backend.call("GET", f"/runs/{run_id}") for run_id in run_ids])
            bar.update(progress["done"] + progress["failed"] - bar.n)
            bar.set_postfix(failed=progress["failed"], running=progress["running"])
            if progress["finished"]:
                return progress
            time.sleep(POLL_S)


def _sum_progress(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The counts of several runs (their tasks are disjoint) as one run's."""
    total: dict[str, Any] = {key: sum(run[key] for run in runs) for key in _COUNTS}
    total["failures"] = [line for run in runs for line in run["failures"]]
    total["finished"] = all(run["finished"] for run in runs)
    return total


def _summary(progress: Mapping[str, Any], project: int, annotated: int) -> int:
    print(
        f"done: {progress['done']} tasks, failed: {progress['failed']}, annotated: skipped {annotated}",
        file=sys.stderr,
    )
    for line in progress["failures"]:
        print(f"  {line}", file=sys.stderr)
    if progress["failed"]:
        print(f"retry the failed tasks with: grounded-sam retry --project {project}", file=sys.stderr)
        return 1
    return 0
