"""Command-line mistakes get one line on stderr ("error: ...") and exit code 2 (usage) or 1 (runtime); help lists
the settings each command reads; --version prints the package version. In process: no model is loaded."""

from __future__ import annotations

import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from backend.commands import usage
from backend.commands.main import main
from backend.settings import Settings

# Settings that would change what these commands do, taken from the environment of whoever runs the tests.
_CLEARED = ("REDIS_URL", "BASIC_AUTH_USER", "BASIC_AUTH_PASS", "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY")


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No backend settings from outside; a missing model (never needed here); main's SIGTERM handler undone."""
    for name in _CLEARED:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DETECTOR_MODEL", str(tmp_path / "no-such-detector"))
    monkeypatch.setenv("EMBEDDED_REDIS_DIR", str(tmp_path / "redis"))
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("labels", ["", " , ", ",,"])
def test_predict_without_label_names_says_so(labels: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)

    assert main(["predict", str(image), f"--labels={labels}"]) == 2

    line = _one_error_line(capsys.readouterr().err)
    assert "--labels" in line and "no label" in line
    assert "XML" not in line and "<" not in line  # never the generated config the user did not write


def test_predict_with_a_config_that_cannot_be_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)

    assert main(["predict", str(image), "--config", str(tmp_path / "nope.xml")]) == 1

    line = _one_error_line(capsys.readouterr().err)
    assert "nope.xml" in line and "No such file" in line


def test_a_missing_image_is_refused_before_the_models_load(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """DETECTOR_MODEL does not exist: had the models been loaded first, the error would name it."""
    assert main(["predict", str(tmp_path / "missing.png"), "--labels", "cat", "--out", str(tmp_path / "out")]) == 1

    line = _one_error_line(capsys.readouterr().err)
    assert "missing.png" in line and "no-such-detector" not in line
    assert not (tmp_path / "out").exists()


def test_a_model_that_cannot_load_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)

    assert main(["predict", str(image), "--labels", "cat", "--out", str(tmp_path / "out")]) == 1

    assert "no-such-detector" in _one_error_line(capsys.readouterr().err)


def test_an_out_folder_that_is_a_file_is_one_line_before_the_models_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)

    assert main(["predict", str(image), "--labels", "cat", "--out", str(image)]) == 1

    line = _one_error_line(capsys.readouterr().err)
    assert "--out" in line and "cannot be a folder" in line and "no-such-detector" not in line


def test_a_runtime_error_at_the_command_boundary_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """prelabel without LABEL_STUDIO_URL: a BackendError raised inside the command."""
    assert main(["prelabel", "--project", "1"]) == 1

    assert "LABEL_STUDIO_URL" in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        ([], "COMMAND"),
        (["predict", "--labels", "cat"], "IMAGE"),
        (["predict", "a.png"], "--labels"),
        (["prelabel"], "--project"),
        (["prelabel", "--project", "x"], "--project"),
        (["prelabel", "--project", "1", "--filter", "{nope"], "--filter"),
        (["prelabel", "--project", "1", "--filter", "[1]"], "JSON object"),
        (["serve", "--bogus"], "--bogus"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(argv: list[str], named: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)

    assert exited.value.code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert named in line and "--help" in line


def test_invalid_settings_name_their_variables_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BOX_THRESHOLD", "1.5")
    monkeypatch.setenv("PORT", "not-a-port")

    assert main(["health"]) == 2

    line = _one_error_line(capsys.readouterr().err)
    assert "BOX_THRESHOLD: " in line and "PORT: " in line
    assert "box_threshold" not in line and "not-a-port" not in line and "1.5" not in line


def test_serve_on_a_busy_port_says_so_in_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused before the embedded Redis and the worker start (no Redis data folder is made)."""
    with socket.create_server(("127.0.0.1", 0)) as busy:
        monkeypatch.setenv("HOST", "127.0.0.1")
        monkeypatch.setenv("PORT", str(busy.getsockname()[1]))

        assert main(["serve"]) == 1

    line = _one_error_line(capsys.readouterr().err)
    assert "in use" in line and "PORT" in line
    assert not (tmp_path / "redis").exists()


def test_top_level_help_is_for_users(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])

    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert "Label Studio" in text and "environment variable" in text and "README" in text
    for command in ("serve", "worker", "predict", "prelabel", "status", "retry", "health"):
        assert f"    {command} " in text
    assert "Every command builds one Settings" not in text  # the module docstring is for developers


@pytest.mark.parametrize("command", sorted(usage.COMMAND_SETTINGS))
def test_each_commands_help_lists_the_settings_it_reads(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])

    text = capsys.readouterr().out
    listed = usage.command_fields(command)
    assert listed
    for name in listed:
        field = Settings.model_fields[name]
        default = "unset" if field.default is None else f"default {field.default}"
        assert f"  {name.upper()} ({default})" in text
        assert (field.description or "").split()[0] in text
    for name in set(Settings.model_fields) - set(listed):
        assert f"  {name.upper()} (" not in text


def test_serve_reads_every_setting_and_predict_no_label_studio_one() -> None:
    assert usage.command_fields("serve") == list(Settings.model_fields)
    assert "box_threshold" in usage.command_fields("worker")
    predict = usage.command_fields("predict")
    assert "sam_checkpoint" in predict and "label_studio_url" not in predict and "port" not in predict


def test_every_setting_is_in_a_section() -> None:
    sections = usage.settings_by_section()
    assert [name for names in sections.values() for name in names] == list(Settings.model_fields)
    assert all(sections.values())


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])

    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"grounded-sam {usage.package_version()}"
    assert usage.package_version() != ""
