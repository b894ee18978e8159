"""Settings errors name the environment variable and never print a value (secrets set in the wrong place)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from backend.settings import Settings, describe_settings_error

MARKER = "sekrit-MARKER-5f2e"


def _error(monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    for name in ("BASIC_AUTH_USER", "BASIC_AUTH_PASS", "LABEL_STUDIO_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as caught:
        Settings()
    assert MARKER in str(caught.value)  # what was printed before: pydantic's own text shows the values
    return describe_settings_error(caught.value)


def test_field_errors_name_the_variable_without_its_value(monkeypatch: pytest.MonkeyPatch) -> None:
    text = _error(
        monkeypatch,
        BOX_THRESHOLD=MARKER,
        DEVICE=MARKER,
        PORT=MARKER,
        LABEL_STUDIO_API_KEY=MARKER,
        BASIC_AUTH_PASS=MARKER,
        BASIC_AUTH_USER="ls",
    )
    assert MARKER not in text
    assert "\n" not in text  # one line, whatever the number of invalid settings
    assert {part.split(": ", 1)[0] for part in text.split("; ")} == {"BOX_THRESHOLD", "DEVICE", "PORT"}
    assert "box_threshold" not in text


def test_the_auth_pair_error_does_not_show_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    text = _error(monkeypatch, BASIC_AUTH_PASS=MARKER, LABEL_STUDIO_API_KEY=MARKER)
    assert MARKER not in text
    assert "BASIC_AUTH_USER and BASIC_AUTH_PASS" in text


@pytest.mark.parametrize("value", ["debug", "Warning", " error "])
def test_log_level_is_read_in_any_case(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("LOG_LEVEL", value)
    assert Settings().log_level == value.strip().upper()


def test_an_unknown_log_level_names_the_variable_and_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOG_LEVEL", MARKER)
    with pytest.raises(ValidationError) as caught:
        Settings()
    text = describe_settings_error(caught.value)
    assert text.startswith("LOG_LEVEL: ") and "DEBUG" in text and MARKER.upper() not in text.upper()
