"""The end-to-end tests' own tooling: Label Studio and Playwright in a virtual environment of their own.

Label Studio pins Django, numpy, Pillow and label-studio-sdk versions of its own, so it never goes into the
project's environment. The environment is built once per machine under ~/.cache/grounded-sam-e2e/ (or
$GROUNDED_SAM_E2E_CACHE), keyed by the pinned requirements and the Python version, and reused while its
`ready` marker exists. Building it needs PyPI (about 1-3 minutes); when that fails the tests fail, with
pip's output, rather than skip.

Playwright comes from PyPI like any package; its browser downloads are never used: the browser is
Debian's /usr/bin/chromium.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

LABEL_STUDIO_VERSION = "1.23.2"
PLAYWRIGHT_VERSION = "1.65.2"
REQUIREMENTS = (f"label-studio=={LABEL_STUDIO_VERSION}", f"playwright=={PLAYWRIGHT_VERSION}")
CHROMIUM = Path("/usr/bin/chromium")
PIP_TIMEOUT_S = 900


def cache_root() -> Path:
    """Where tool environments are kept between runs on this machine."""
    configured = os.environ.get("GROUNDED_SAM_E2E_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "grounded-sam-e2e"


def environment_dir() -> Path:
    """The folder of the environment for these exact requirements and this Python (major.minor)."""
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    digest = hashlib.sha256("\n".join(REQUIREMENTS).encode()).hexdigest()[:8]
    return cache_root() / f"label-studio-{LABEL_STUDIO_VERSION}-{python}-{digest}"


class ToolingError(RuntimeError):
    """The e2e tooling could not be installed; the message says why and what to do."""


def ensure_environment() -> Path:
    """The ready tool environment, built first if needed. Safe when two test runs start at once."""
    target = environment_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second run waits here for the first one's install
        if not (target / "ready").exists():
            _build(target)
    return target


def _build(target: Path) -> None:
    """Create the venv in place (venv scripts hold absolute paths, so it cannot be built elsewhere and moved)."""
    if target.exists():
        shutil.rmtree(target)  # a half-built environment from an interrupted run
    log = target.with_name(target.name + ".install.log")
    subprocess.run([sys.executable, "-m", "venv", str(target)], check=True)
    command = [str(target / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", *REQUIREMENTS]
    with open(log, "wb") as out:
        try:
            code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=PIP_TIMEOUT_S).returncode
        except subprocess.TimeoutExpired:
            code = -1
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise ToolingError(
            f"could not install {' '.join(REQUIREMENTS)} into {target} (pip exit {code}; needs PyPI). "
            f"Full log: {log}\n{tail}\nSet SKIP_E2E=1 to skip the end-to-end tests on purpose."
        )
    (target / "ready").write_text("\n".join(REQUIREMENTS) + "\n")


def chromium_problem() -> str | None:
    """Why Debian's Chromium cannot be used, or None when it is installed."""
    if CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK):
        return None
    return (
        f"{CHROMIUM} is missing: install Debian's package (apt-get install -y chromium), "
        "or set SKIP_E2E=1 to skip the end-to-end tests on purpose"
    )
