"""End-to-end fixtures: one real Label Studio per session, real backend processes, a loopback image host.

Skipping is an explicit choice: SKIP_E2E=1 skips every e2e test with a reason in the -ra summary.
Without it, a missing prerequisite (no PyPI for the tool environment, no Chromium) fails the tests.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.backends import MODEL_FAMILIES, BackendPool, models_of_family
from tests.e2e.labelstudio import LabelStudio
from tests.e2e.tooling import CHROMIUM, ToolingError, chromium_problem, ensure_environment
from tests.support.images import ImageServer, serve_images
from tests.tiny_models import build_tiny_sam2, build_tiny_sam3

# LABEL_STUDIO_ML_TIMEOUT_PREDICT of the second, impatient Label Studio: the slow-backend test then waits
# seconds, not the default 100 s. The session's main instance keeps the default, as users have it.
IMPATIENT_TIMEOUT_S = 5.0
SKIP_REASON = "SKIP_E2E=1: end-to-end tests against a real Label Studio were skipped on request"


def e2e_skipped() -> bool:
    return os.environ.get("SKIP_E2E", "").strip().lower() in {"1", "true", "yes"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not e2e_skipped():
        return
    for item in items:
        if item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


@pytest.fixture(scope="session")
def tool_env() -> Path:
    """The cached virtual environment with label-studio and playwright (built on first use)."""
    try:
        return ensure_environment()
    except ToolingError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium, which the browser check drives; missing is a failure, not a skip."""
    problem = chromium_problem()
    if problem:
        pytest.fail(problem, pytrace=False)
    return str(CHROMIUM)


@pytest.fixture(scope="session")
def label_studio(tool_env: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudio]:
    """One Label Studio for the session, on a fresh data dir (legacy tokens are only enabled at creation)."""
    server = LabelStudio(tool_env, tmp_path_factory.mktemp("label-studio"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture()
def impatient_label_studio(label_studio: LabelStudio, tool_env: Path, tmp_path: Path) -> Iterator[LabelStudio]:
    """A second Label Studio with LABEL_STUDIO_ML_TIMEOUT_PREDICT=5, started from a copy of the first's database."""
    server = LabelStudio(tool_env, tmp_path / "impatient-label-studio", ml_timeout_predict=IMPATIENT_TIMEOUT_S)
    try:
        server.start(seed=label_studio)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def api_keys(label_studio: LabelStudio) -> dict[str, str]:
    """Both kinds of LABEL_STUDIO_API_KEY a user can give the backend: the legacy token and a personal access token."""
    return {"legacy": label_studio.credentials.legacy_token, "pat": label_studio.create_personal_access_token()}


@pytest.fixture(scope="session")
def backends(
    label_studio: LabelStudio,
    api_keys: dict[str, str],
    tiny_detector_dir: Path,
    tiny_hf_sam_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[BackendPool]:
    """Backend `serve` processes with tiny random models, one per API key kind, started on first use."""
    workdir = tmp_path_factory.mktemp("backends")
    pool = BackendPool(workdir, label_studio.url, api_keys, tiny_detector_dir, tiny_hf_sam_dir)
    yield pool
    pool.stop_all()


@pytest.fixture(scope="session")
def image_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageServer]:
    """Absolute http:// image URLs on loopback; /slow/<name> answers after Label Studio has given up."""
    with serve_images(tmp_path_factory.mktemp("image-host"), slow_s=2 * IMPATIENT_TIMEOUT_S) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_family_dirs(tiny_models_dir: Path) -> dict[str, Path]:
    """Folders of the tiny random models of the newer families: "sam2" (a Sam2Model, the SAM 2 / 2.1
    architecture, and its processor) and "sam3" (a full SAM 3: a "sam3_video" checkpoint, text detector and tracker)."""
    return {"sam2": build_tiny_sam2(tiny_models_dir / "sam2"), "sam3": build_tiny_sam3(tiny_models_dir / "sam3")}


@pytest.fixture()
def family() -> str:
    """The model family a test runs: Grounding DINO → SAM unless the test parametrizes `family` over MODEL_FAMILIES."""
    return MODEL_FAMILIES[0]


@pytest.fixture()
def family_models(family: str, request: pytest.FixtureRequest) -> tuple[Path, Path]:
    """(DETECTOR_MODEL, SAM_MODEL) of `family`: tiny random models, built on first use."""
    return models_of_family(family, request.getfixturevalue)
