"""The test suite's own layout: tiers marked by folder, helpers imported from tests/support only."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.paths import REPO
from tests.support.tiers import TESTS, TIER_MARKERS, tier_marker


def _python_files() -> Iterator[tuple[Path, ast.Module]]:
    for path in sorted([*TESTS.rglob("*.py"), *(REPO / "bench").rglob("*.py")]):
        yield path, ast.parse(path.read_text(), filename=str(path))


@pytest.mark.parametrize(
    ("relative", "marker"),
    [
        ("integration/test_cli.py", "integration"),
        ("e2e/test_label_studio.py", "e2e"),
        ("inprocess/test_predict.py", "inprocess"),
        ("inprocess/deeper/test_x.py", "inprocess"),
        ("unit/test_fetch.py", None),
        ("conftest.py", None),
        ("integration", None),  # the folder itself holds no test
    ],
)
def test_a_tests_tier_is_its_folder(relative: str, marker: str | None) -> None:
    assert tier_marker(TESTS / relative) == marker


def test_outside_tests_nothing_is_a_tier(tmp_path: Path) -> None:
    assert tier_marker(tmp_path / "integration" / "test_x.py") is None


def test_every_tier_marker_is_declared() -> None:
    declared = (REPO / "pyproject.toml").read_text()
    assert all(f'"{marker}: ' in declared for marker in TIER_MARKERS.values())


def test_helpers_come_from_tests_support_never_from_a_conftest_or_a_test_module() -> None:
    offending = []
    for path, module in _python_files():
        for node in ast.walk(module):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                last = name.rsplit(".", 1)[-1]
                if name.startswith("tests.") and (last == "conftest" or last.startswith("test_")):
                    offending.append(f"{path.relative_to(REPO)}:{node.lineno} imports {name}")
    assert offending == []


def test_one_free_port_and_no_tier_marker_set_by_hand() -> None:
    ports = TESTS / "support" / "ports.py"
    found = []
    for path, module in _python_files():
        for node in ast.walk(module):
            if isinstance(node, ast.FunctionDef) and node.name.endswith("free_port") and path != ports:
                found.append(f"{path.relative_to(REPO)}:{node.lineno} defines {node.name}")
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in node.targets):
                marks = {getattr(mark, "attr", "") for mark in ast.walk(node.value)}
                if marks & set(TIER_MARKERS.values()):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} sets a tier marker by hand")
    assert found == []


def test_test_module_names_are_unique_across_folders() -> None:
    # Without __init__.py files pytest imports test modules by basename: a repeated name fails collection.
    names = sorted(path.name for path in TESTS.rglob("test_*.py"))
    assert sorted({name for name in names if names.count(name) > 1}) == []
