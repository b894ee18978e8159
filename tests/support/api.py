"""Calls of the backend's HTTP API that several tests make."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient


def queueing_answers(client: TestClient, config: str, task: dict[str, Any], project: int) -> list[tuple[int, str]]:
    """What /setup, /predict and /prelabel (the routes that need a ready worker) answer for one task of
    `project`, as (status, detail)."""
    answers = [
        client.post("/setup", json={"project": f"{project}.1", "schema": config}),
        client.post("/predict", json={"tasks": [task], "label_config": config, "project": f"{project}.1"}),
        client.post("/prelabel", json={"project": project, "label_config": config, "tasks": [task]}),
    ]
    return [(answer.status_code, answer.json()["detail"]) for answer in answers]
