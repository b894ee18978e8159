"""`prelabel` sends a project of any size in requests that stay under the backend's body cap, and never the
tasks a reviewer has annotated."""

from __future__ import annotations

from typing import Any

import pytest

from backend.commands import bulk as bulk_cli
from backend.lsclient import ProjectTask
from backend.settings import Settings


class _Studio:
    """Label Studio as `prelabel` reads it: a config and `count` tasks without predictions."""

    def __init__(self, count: int, annotated: frozenset[int] = frozenset(), predicted: frozenset[int] = frozenset()):
        self.count = count
        self.annotated = annotated  # tasks with a submitted annotation
        self.predicted = predicted  # tasks holding a prediction of v1

    def label_config(self, project: int) -> str:
        return "<View/>"

    def tasks(self, project: int, query: object = None) -> list[ProjectTask]:
        return [
            ProjectTask(
                id=i,
                data={"image": f"/data/upload/{i}.png"},
                prediction_versions=frozenset({"v1"} if i in self.predicted else ()),
                annotations=int(i in self.annotated),
            )
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


@pytest.mark.parametrize("force", [False, True])
def test_annotated_tasks_are_skipped_and_said_so(
    force: bool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Tasks 2 and 5 are annotated (5 also holds a prediction of v1), task 3 holds one: --force recomputes 3,
    never 2 or 5."""
    studio = _Studio(6, annotated=frozenset({2, 5}), predicted=frozenset({3, 5}))
    monkeypatch.setattr(bulk_cli, "_studio", lambda settings: studio)
    backend = _Backend()

    assert bulk_cli.prelabel(Settings(), backend, 5, None, force=force) == 0  # type: ignore[arg-type]

    sent = [t["id"] for body in backend.bodies for t in body["tasks"]]
    assert sent == ([1, 3, 4, 6] if force else [1, 4, 6])
    err = capsys.readouterr().err
    have = 0 if force else 1
    assert f"project 5: 6 tasks, {have} already have v1, {len(sent)} to pre-label, annotated: skipped 2" in err
    assert f"done: {len(sent)} tasks, failed: 0, annotated: skipped 2" in err


def test_embeddings_send_every_unannotated_task_the_predicted_ones_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """--embeddings: task 3 holds a prediction of v1 and goes anyway (its worker only encodes its image); the
    annotated tasks 2 and 5 never go."""
    studio = _Studio(6, annotated=frozenset({2, 5}), predicted=frozenset({3, 5}))
    monkeypatch.setattr(bulk_cli, "_studio", lambda settings: studio)
    backend = _Backend()

    assert bulk_cli.prelabel(Settings(), backend, 5, None, force=False, embeddings=True) == 0  # type: ignore[arg-type]

    assert [t["id"] for body in backend.bodies for t in body["tasks"]] == [1, 3, 4, 6]
    assert all(body["embeddings"] is True and body["force"] is False for body in backend.bodies)


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
