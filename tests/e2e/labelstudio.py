"""A real Label Studio process and the REST calls a user's clicks make, for end-to-end tests.

Each choice below follows how Label Studio 1.23 was seen to behave as a client (tokens, ML backend connection,
prediction retrieval); the comments say which behaviour.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.support.ports import free_port, port_is_free

START_TIMEOUT_S = 180.0  # ~30 s on a fresh data dir (SQLite migrations); more on a busy CI machine
STOP_TIMEOUT_S = 20.0
DATABASE = "label_studio.sqlite3"  # in the data dir
# Bare names Label Studio's get_env() falls back to (NAME after LABEL_STUDIO_NAME): a shell's USER or
# PORT must not become Label Studio's.
_FALLBACK_NAMES = ("USERNAME", "PASSWORD", "HOST", "PORT", "USER_TOKEN")
_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


class LabelStudioError(RuntimeError):
    """Label Studio did not start, or answered a call with an unexpected status (message has its log tail)."""


@dataclass
class Credentials:
    """The admin user Label Studio creates at first start, and its legacy API token."""

    email: str = "admin@example.com"
    password: str = "e2e-password-1"
    legacy_token: str = "e2e0legacy0token0for0tests0only0000000000"  # >5 chars; LS stores it as the user's key


@dataclass
class LabelStudio:
    """One Label Studio server on loopback with a throwaway data dir.

    venv: the tool environment holding `label-studio`; workdir: a fresh folder (data dir, documents, log).
    ml_timeout_predict: Label Studio's read timeout on /predict (LABEL_STUDIO_ML_TIMEOUT_PREDICT, default 100 s).
    """

    venv: Path
    workdir: Path
    ml_timeout_predict: float = 100.0
    credentials: Credentials = field(default_factory=Credentials)
    port: int = 0
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _client: httpx.Client | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def documents(self) -> Path:
        """LOCAL_FILES_DOCUMENT_ROOT: Local Files storages must point inside it."""
        return self.workdir / "documents"

    @property
    def log_path(self) -> Path:
        return self.workdir / "label-studio.log"

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- process -------------------------------------------------------------------------------------

    def start(self, seed: LabelStudio | None = None) -> None:
        """Start Label Studio and wait until /health answers and the legacy token works.

        seed: a running instance whose database (users, tokens, organization settings) this one starts
        from. That skips the ~30 s of migrations a fresh data dir costs; it must use the same credentials.
        """
        self.port = self.port or free_port()
        if not port_is_free(self.port):
            raise LabelStudioError(f"port {self.port} is in use; Label Studio would silently start on another one")
        self.data_dir.mkdir(parents=True)
        self.documents.mkdir(parents=True)
        if seed is not None:
            self._copy_database(seed)
        with open(self.log_path, "wb") as log:
            self._process = subprocess.Popen(
                [
                    str(self.venv / "bin" / "label-studio"),
                    "start",
                    "--no-browser",
                    "--internal-host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--data-dir",
                    str(self.data_dir),
                ],
                env=self._environment(),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        self._wait_ready()
        self._client = httpx.Client(
            base_url=self.url, headers=self.token_header(self.credentials.legacy_token), timeout=60
        )
        # Another server on the port would not know our token: this proves we talk to ours.
        whoami = self.call("GET", "/api/current-user/whoami")
        if whoami.get("email") != self.credentials.email:
            raise LabelStudioError(f"unexpected user {whoami!r}")

    def _copy_database(self, seed: LabelStudio) -> None:
        """A consistent copy of `seed`'s SQLite database (sqlite3's online backup), and its secret key file."""
        assert seed.credentials == self.credentials, "a seeded instance has the seed's users and tokens"
        with sqlite3.connect(seed.data_dir / DATABASE) as source, sqlite3.connect(self.data_dir / DATABASE) as copy:
            source.backup(copy)
        if (seed.data_dir / ".env").exists():
            shutil.copy2(seed.data_dir / ".env", self.data_dir / ".env")

    def _environment(self) -> dict[str, str]:
        inherited = {
            key: value
            for key, value in os.environ.items()
            if key not in _FALLBACK_NAMES and not key.startswith(("LABEL_STUDIO_", "HEARTEX_", "DJANGO_"))
        }
        creds = self.credentials
        return {
            **inherited,
            # Without it the CLI first sets up ~/.local/share/label-studio (settings load before --data-dir).
            "LABEL_STUDIO_BASE_DATA_DIR": str(self.data_dir),
            "LABEL_STUDIO_USERNAME": creds.email,
            "LABEL_STUDIO_PASSWORD": creds.password,
            "LABEL_STUDIO_USER_TOKEN": creds.legacy_token,
            # Legacy tokens are off by default in 1.23; this only applies when the organization is created,
            # i.e. on this fresh data dir.
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
            # The backend and the images live on loopback: both ML URL checks and the auto-created webhook
            # would refuse 127.0.0.1 otherwise.
            "LABEL_STUDIO_ML_BLOCK_LOCAL_IP": "false",
            "LABEL_STUDIO_SSRF_PROTECTION_ENABLED": "false",
            "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
            "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(self.documents),
            # The /setup `hostname` and Local Files task URLs are built from it.
            "LABEL_STUDIO_HOST": self.url,
            "LABEL_STUDIO_ML_TIMEOUT_PREDICT": str(self.ml_timeout_predict),
            # No calls out of the machine: version check, analytics, Sentry.
            "LATEST_VERSION_CHECK": "false",
            "LABEL_STUDIO_COLLECT_ANALYTICS": "false",
            "LABEL_STUDIO_SENTRY_DSN": "",
            "LABEL_STUDIO_FRONTEND_SENTRY_DSN": "",
        }

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise LabelStudioError(f"label-studio exited with {self._process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise LabelStudioError(f"Label Studio not healthy within {START_TIMEOUT_S:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Stop the server (one process: Django runserver without the reloader)."""
        if self._client is not None:
            self._client.close()
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    # -- REST ----------------------------------------------------------------------------------------

    @staticmethod
    def token_header(token: str) -> dict[str, str]:
        return {"Authorization": f"Token {token}"}

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """A call as the admin user (legacy token)."""
        assert self._client is not None, "start() first"
        return self._client.request(method, path, **kwargs)

    def call(self, method: str, path: str, *, expect: int | tuple[int, ...] = (200, 201), **kwargs: Any) -> Any:
        """A call whose status must be `expect`; its JSON body."""
        response = self.request(method, path, **kwargs)
        expected = (expect,) if isinstance(expect, int) else expect
        if response.status_code not in expected:
            raise LabelStudioError(
                f"{method} {path}: HTTP {response.status_code} {response.text[:2000]}\nLabel Studio log:\n"
                f"{self.log_tail(30)}"
            )
        return response.json() if response.content else None

    def create_project(self, title: str, label_config: str) -> int:
        return int(self.call("POST", "/api/projects", json={"title": title, "label_config": label_config})["id"])

    def import_uploads(self, project: int, files: list[Path]) -> int:
        """Upload image files as tasks; the number of tasks created.

        Each file gets its own form-field name: Label Studio iterates request.FILES.items(), so files
        sharing one name silently become a single task.
        """
        form = {
            f"file{index}": (path.name, path.read_bytes(), _MIME[path.suffix.lower()])
            for index, path in enumerate(files)
        }
        return int(self.call("POST", f"/api/projects/{project}/import", files=form)["task_count"])

    def import_tasks(self, project: int, tasks: list[dict[str, Any]]) -> int:
        """Import JSON tasks (e.g. {"data": {"image": url}}); the number of tasks created."""
        return int(self.call("POST", f"/api/projects/{project}/import", json=tasks)["task_count"])

    def add_local_storage(self, project: int, folder: Path, *, sync: bool) -> int:
        """Add a Local Files source storage over `folder` (inside `documents`); sync it to make tasks when asked."""
        storage = self.call(
            "POST",
            "/api/storages/localfiles",
            json={
                "project": project,
                "path": str(folder),
                "use_blob_urls": True,
                "title": folder.name,
                "regex_filter": r".*\.(png|jpe?g)$",
            },
        )
        if sync:
            self.call("POST", f"/api/storages/localfiles/{storage['id']}/sync")
        return int(storage["id"])

    def local_file_url(self, path: Path) -> str:
        """The task data value Label Studio uses for a Local Files image (relative to the document root)."""
        return f"/data/local-files/?d={path.relative_to(self.documents).as_posix()}"

    def tasks(self, project: int) -> list[dict[str, Any]]:
        """The project's tasks through the Data Manager list.

        Not GET /api/tasks/{id}: with the default show_collab_predictions that call itself asks the ML
        backend for a prediction. The list only does so with evaluate_predictions_automatically (off).
        """
        body = self.call("GET", "/api/tasks", params={"project": project, "page_size": 1000})
        return list(body["tasks"])

    def connect_ml(
        self, project: int, url: str, title: str = "grounded-sam", *, interactive: bool = False
    ) -> dict[str, Any]:
        """Settings → Model → Connect model ("Interactive preannotations" on when `interactive`). Label Studio calls
        /health and /setup before answering."""
        body = {"url": url, "project": project, "title": title, "is_interactive": interactive}
        return dict(self.call("POST", "/api/ml", json=body))

    def interactive_annotating(self, ml_id: int, task: int, context: dict[str, Any]) -> dict[str, Any]:
        """What the labeling UI asks when an annotator uses a smart tool or types a prompt: Label Studio sends
        `context` to the backend's /predict and answers {"data": <the first prediction>} or {"errors": [...]}."""
        body = {"task": task, "context": context}
        return dict(self.call("POST", f"/api/ml/{ml_id}/interactive-annotating", json=body))

    def ml_backend(self, ml_id: int) -> dict[str, Any]:
        """The connection's state (Label Studio re-runs /health and /setup for this)."""
        return dict(self.call("GET", f"/api/ml/{ml_id}"))

    def dm_action(self, project: int, action: str, task_ids: list[int] | None = None) -> httpx.Response:
        """Data Manager → select tasks (all when `task_ids` is None) → Actions → `action`.

        Synchronous: "retrieve_tasks_predictions" answers only after /predict answered or timed out.
        """
        selected = {"all": True, "excluded": []} if task_ids is None else {"all": False, "included": task_ids}
        return self.request(
            "POST",
            "/api/dm/actions",
            params={"id": action, "project": project},
            json={"selectedItems": selected},
            timeout=self.ml_timeout_predict + 60,
        )

    def retrieve_predictions(self, project: int, task_ids: list[int] | None = None) -> httpx.Response:
        """Data Manager → Retrieve predictions."""
        return self.dm_action(project, "retrieve_tasks_predictions", task_ids)

    def delete_predictions(self, project: int, task_ids: list[int]) -> None:
        """Data Manager → Delete predictions."""
        response = self.dm_action(project, "delete_tasks_predictions", task_ids)
        if response.status_code != 200:
            raise LabelStudioError(f"deleting predictions: HTTP {response.status_code} {response.text[:500]}")

    def predictions(self, project: int) -> list[dict[str, Any]]:
        """The predictions stored for the project, read without side effects."""
        return list(self.call("GET", "/api/predictions", params={"project": project}))

    def create_personal_access_token(self) -> str:
        """A personal access token (a JWT refresh token) for the admin user; one per user (else 409)."""
        return str(self.call("POST", "/api/token/")["token"])
