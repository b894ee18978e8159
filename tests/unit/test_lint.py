"""The code stays lint-clean, formatted and type-checked: ruff and mypy as configured in pyproject.toml.

They run here, as part of the test command, so that CI (which runs the README's test command) runs them
too. Each runs on the repository root, where pyproject.toml is, so the project's settings apply.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.paths import REPO

# mypy on backend/ takes about 20-60 s without a cache; the bound is for a loaded machine.
TIMEOUT_S = 600


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


@pytest.mark.parametrize(
    "command",
    [
        ("ruff", "check", "."),
        ("ruff", "format", "--check", "."),
        ("mypy",),
    ],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_the_tree_passes(command: tuple[str, ...]) -> None:
    result = _run(*command)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
