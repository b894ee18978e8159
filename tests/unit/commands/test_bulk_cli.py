"""`prelabel` sends a project of any size in requests that stay under the backend's body cap."""

from __future__ import annotations

from typing import Any

import pytest

from backend.commands import bulk as bulk_cli
from backend.lsclient import ProjectTask
from backend.settings import Settings


class _Studio:
    """Label Studio as `prelabel` reads it: a config and `count` tasks without predictions."""

    def __init__(self, count: int) -> None:
        self.count = count

    def label_config(self, project: int) -> str:
        return "<View/>"

    def tasks(self, project: int, query: object = None) -> list[ProjectTask]:
        return [
            ProjectTask(id=i, data={"image": f"/data/upload/{i}.png"}, prediction_versions=frozenset())
            for i in range(1, self.count + 1)
        ]


class _Backend:
    """Records /prelabel bodies; every run it started is finished with all its tasks done."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    def call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        if path == "/setup":
            return {"model_version": "v1"}
        if path == "/prelabel":
            self.bodies.append(kwargs["json"])
            return {"run_id": str(len(self.bodies) - 1)}
        run = self.bodies[int(path.rsplit("/", 1)[1])]
        done = len(run["tasks"])
        return {"total": done, "queued": 0, "running": 0, "done": done, "failed": 0, "failures": [], "finished": True}


def test_a_large_project_goes_in_several_requests_and_is_followed_as_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bulk_cli, "TASKS_PER_REQUEST", 3)
    monkeypatch.setattr(bulk_cli, "_studio", lambda settings: _Studio(8))
    backend = _Backend()
    code = bulk_cli.prelabel(Settings(), backend, 5, None, force=False)  # type: ignore[arg-type]
    assert code == 0
    assert [len(body["tasks"]) for body in backend.bodies] == [3, 3, 2]
    assert [t["id"] for body in backend.bodies for t in body["tasks"]] == list(range(1, 9))


def test_progress_of_several_runs_adds_up_and_is_finished_only_when_all_are() -> None:
    runs = [
        {"total": 3, "queued": 0, "running": 0, "done": 2, "failed": 1, "failures": ["a: x"], "finished": True},
        {"total": 2, "queued": 1, "running": 1, "done": 0, "failed": 0, "failures": [], "finished": False},
    ]
    total = bulk_cli._sum_progress(runs)
    assert total == {
        "total": 5,
        "queued": 1,
        "running": 1,
        "done": 2,
        "failed": 1,
        "failures": ["a: x"],
        "finished": False,
    }
