"""Dockerfile and docker-compose.yml match the CLI and the settings (no Docker engine runs here, so: parse)."""

from __future__ import annotations

import json
import re

import yaml

from backend.commands.main import _parser
from backend.settings import Settings
from tests.support.paths import REPO

# Variables read by libraries, not by Settings, that the deployment files may set on purpose.
LIBRARY_ENV = {
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "PYTHONUNBUFFERED",
    "PIP_NO_CACHE_DIR",
    "VIRTUAL_ENV",
    "PATH",
    "DEBIAN_FRONTEND",
}


def _commands() -> set[str]:
    subparsers = next(a for a in _parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    return set(subparsers.choices)


def _dockerfile() -> str:
    return (REPO / "Dockerfile").read_text()


def test_dockerfile_runs_the_cli_as_non_root_with_a_model_volume() -> None:
    text = _dockerfile()
    assert re.search(r"^FROM nvidia/cuda:\S+-runtime-", text, re.M)
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (.+)$", text, re.M).group(1))
    cmd = json.loads(re.search(r"^CMD (.+)$", text, re.M).group(1))
    assert entrypoint == ["grounded-sam"] and cmd[0] in _commands()
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and user[-1] not in {"root", "0"}
    assert re.search(r'^VOLUME \["/models"\]$', text, re.M)


def test_dockerfile_env_names_are_settings_or_library_variables() -> None:
    names = set(re.findall(r"^\s+([A-Z_]+)=", _dockerfile(), re.M))
    unknown = names - {name.upper() for name in Settings.model_fields} - LIBRARY_ENV
    assert not unknown, unknown


def test_compose_services_use_existing_commands_and_settings() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "api", "worker"} <= set(services)
    settings = {name.upper() for name in Settings.model_fields}
    for name in ("api", "worker"):
        service = services[name]
        assert service["command"][0] in _commands(), name
        unknown = set(service["environment"]) - settings - LIBRARY_ENV
        assert not unknown, (name, unknown)
        assert service["environment"]["REDIS_URL"].startswith("redis://redis:")
    assert services["api"]["command"] == ["serve"] and services["worker"]["command"] == ["worker"]
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert any(v.endswith(":/models") for v in services["worker"]["volumes"])


def test_compose_label_studio_is_optional_and_wired_to_the_backend() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    label_studio = compose["services"]["label-studio"]
    assert label_studio["profiles"] == ["labelstudio"]
    assert compose["services"]["worker"]["environment"]["LABEL_STUDIO_URL"].endswith("label-studio:8080}")
    model_keys = {
        "DETECTOR_MODEL",
        "SAM_MODEL",
        "SAM_CHECKPOINT",
        "BOX_THRESHOLD",
        "TEXT_THRESHOLD",
        "SAM_DTYPE",
        "MAX_DETECTIONS",
        "NMS_IOU",
    }
    api_env, worker_env = (compose["services"][s]["environment"] for s in ("api", "worker"))
    # model_version is computed on both sides: their model settings must agree.
    assert {k: api_env.get(k) for k in model_keys} == {k: worker_env.get(k) for k in model_keys}


def test_compose_rq_dashboard_is_optional_and_reads_the_same_redis() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    dashboard = compose["services"]["rq-dashboard"]
    assert dashboard["profiles"] == ["dashboard"]
    redis_url = compose["x-backend-env"]["REDIS_URL"]
    assert dashboard["environment"]["RQ_DASHBOARD_REDIS_URL"] == redis_url


def test_compose_restarts_services_and_persists_a_bounded_redis() -> None:
    """Crashed containers come back; Redis keeps its data in a volume, has a memory limit and never evicts."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    for name in services:
        assert services[name]["restart"] == "unless-stopped", name
    command = services["redis"]["command"]
    options = dict(zip(command[1::2], command[2::2], strict=True))
    assert options["--appendonly"] == "yes"
    assert options["--maxmemory-policy"] == "noeviction"
    assert re.fullmatch(r"\$\{REDIS_MAXMEMORY:-\d+[kmg]b\}", options["--maxmemory"])
    [volume] = services["redis"]["volumes"]
    name, path = volume.split(":")
    assert path == "/data" and name in compose["volumes"]
    assert services["worker"]["healthcheck"] == {"disable": True}


def test_dockerfile_healthcheck_is_the_health_command() -> None:
    """The HEALTHCHECK runs `grounded-sam health`, which reads PORT and basic auth from the settings."""
    match = re.search(r"^HEALTHCHECK (.+?)\\\n\s+CMD (.+)$", _dockerfile(), re.M)
    assert match is not None
    options = dict(re.findall(r"--([a-z-]+)=(\S+)", match.group(1)))
    assert int(options["timeout"].rstrip("s")) >= 5
    command = json.loads(match.group(2))
    assert command == ["grounded-sam", "health"] and command[1] in _commands()
