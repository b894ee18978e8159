"""The README stays true to the code: its configuration table is the Settings, its test command is CI's."""

from __future__ import annotations

import re

from backend.settings import Settings
from tests.support.paths import REPO

README = (REPO / "README.md").read_text()


def _table_rows() -> dict[str, tuple[str, str]]:
    section = README.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([A-Z_]+)` \| (.+?) \| (.+?) \|$", section, re.M)
    return {name: (default, meaning) for name, default, meaning in rows}


def test_configuration_table_lists_every_setting_with_its_default() -> None:
    rows = _table_rows()
    assert set(rows) == {name.upper() for name in Settings.model_fields}
    for name, field in Settings.model_fields.items():
        default, meaning = rows[name.upper()]
        expected = "unset" if field.default is None else f"`{field.default}`"
        assert default == expected, name
        assert meaning == field.description, name


def test_ci_runs_the_readme_test_command() -> None:
    test_block = README.split("**Test**", 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0].strip()
    ci = (REPO / ".ci" / "run").read_text()
    assert test_block in ci.splitlines()
