"""Request bodies as Label Studio sends them: /predict (tasks, label_config, params with the editor's context)
and /setup (project, schema, hostname, access_token), as label_studio/ml/api_connector.py posts them.

Unknown fields are kept out of the way (`extra="ignore"` on bodies, kept as they are on tasks): Label Studio
adds keys between versions.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from backend.errors import RequestDataError

# A DNS name or IPv4 address as found in URLs (underscores: Docker service names).
_HOST_NAME = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?)*\.?$")


class _LabelStudioBody(BaseModel):
    model_config = ConfigDict(extra="ignore")


class PredictTask(BaseModel):
    """A task as Label Studio sends it: its integer id (a JSON integer: not "7", 7.5 or true) and its data.

    `data` stays untyped: odd data fails only its own task (an empty prediction), never the request.
    Other keys (annotations, predictions, ...) are kept and ignored.
    """

    model_config = ConfigDict(extra="allow")

    id: StrictInt
    data: Any = None


class PredictRequest(_LabelStudioBody):
    """POST /predict: the tasks to predict, in the order results must come back."""

    tasks: list[PredictTask]
    label_config: str = Field(min_length=1)
    project: str | None = None
    params: dict[str, Any] | None = None

    def task_dicts(self) -> list[dict[str, Any]]:
        return [task.model_dump() for task in self.tasks]


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


def http_origin(hostname: str | None) -> str | None:
    """/setup's `hostname` (Label Studio's LABEL_STUDIO_HOST) as "scheme://host[:port][/path]" without a trailing
    slash, or None when it is unset or empty. Raises RequestDataError unless it is an http(s) URL: a host, an
    optional port and path, no user info, query or fragment."""
    if hostname is None or not hostname.strip():
        return None
    text = hostname.strip()
    problem = _origin_problem(text)
    if problem:
        raise RequestDataError(f"hostname {text[:200]!r} is not an http(s) URL like https://ls.example:8080: {problem}")
    return text.rstrip("/")


def _origin_problem(text: str) -> str | None:
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        return str(exc)
    if parts.scheme.lower() not in ("http", "https"):
        return "the scheme must be http or https"
    if "@" in parts.netloc:
        return "user info is not allowed"
    # A path is kept: Label Studio may be served under one (LABEL_STUDIO_HOST=https://example.com/label-studio).
    if parts.query or parts.fragment or text.endswith(("?", "#")):
        return "no query or fragment is allowed"
    host = parts.hostname or ""
    if port == 0 or not host:
        return "it needs a host (and a port from 1 to 65535 if any)"
    if parts.netloc.startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return "the bracketed host is no IPv6 address"
    elif not _HOST_NAME.match(host):
        return "the host is no DNS name or IP address"
    return None


class BulkTask(_LabelStudioBody):
    """A task to pre-label: Label Studio's id and data."""

    id: StrictInt
    data: dict[str, Any]


class PrelabelRequest(_LabelStudioBody):
    """POST /prelabel (sent by the `prelabel` command): queue these tasks of a project as bulk work."""

    project: int
    label_config: str = Field(min_length=1)
    tasks: list[BulkTask]
    force: bool = False
    embeddings: bool = False
