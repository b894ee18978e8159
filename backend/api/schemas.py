"""Request bodies as Label Studio sends them (shared/reference/label-studio-protocol.md §1.2, §1.4).

Unknown fields are kept out of the way (`extra="ignore"`): Label Studio adds keys between versions.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _LabelStudioBody(BaseModel):
    model_config = ConfigDict(extra="ignore")


class PredictRequest(_LabelStudioBody):
    """POST /predict: the tasks to predict, in the order results must come back."""

    tasks: list[dict[str, Any]]
    label_config: str = Field(min_length=1)
    project: str | None = None
    params: dict[str, Any] | None = None


class SetupRequest(_LabelStudioBody):
    """POST /setup: sent when a backend is connected and before every batch of predictions."""

    schema_: str = Field(alias="schema", min_length=1)
    project: str | None = None
    hostname: str | None = None
    access_token: str | None = None
    extra_params: dict[str, Any] | str | None = None


def project_key(project: str | None) -> str:
    """Label Studio sends project as "<id>.<created_at unix>"; the id part names the project."""
    if not project:
        return "none"
    return project.split(".", 1)[0]


class BulkTask(_LabelStudioBody):
    """A task to pre-label: Label Studio's id and data."""

    id: int
    data: dict[str, Any]


class PrelabelRequest(_LabelStudioBody):
    """POST /prelabel (sent by the `prelabel` command): queue these tasks of a project as bulk work."""

    project: int
    label_config: str = Field(min_length=1)
    tasks: list[BulkTask]
    force: bool = False
