"""Dockerfile and docker-compose.yml match the CLI and the settings (no Docker engine runs here, so: parse)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from typing import Any, cast

import pytest
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


# Variables compose itself fills in (`${NAME}`) that are no backend setting.
COMPOSE_ONLY = {"REDIS_MAXMEMORY"}
WORKER_HEALTHCHECK = ["CMD", "grounded-sam", "health", "--worker"]


def _compose() -> dict[str, Any]:
    return cast(dict[str, Any], yaml.safe_load((REPO / "docker-compose.yml").read_text()))


def _workers(compose: dict[str, Any]) -> list[str]:
    """The compose services that run `grounded-sam worker`."""
    return [name for name, service in compose["services"].items() if service.get("command") == ["worker"]]


def _settings() -> set[str]:
    return {name.upper() for name in Settings.model_fields}


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
    assert all(services[name]["healthcheck"]["test"] == WORKER_HEALTHCHECK for name in _workers(compose))


def test_dockerfile_healthcheck_is_the_health_command() -> None:
    """The HEALTHCHECK runs `grounded-sam health`, which reads PORT and basic auth from the settings."""
    match = re.search(r"^HEALTHCHECK (.+?)\\\n\s+CMD (.+)$", _dockerfile(), re.M)
    assert match is not None
    options = dict(re.findall(r"--([a-z-]+)=(\S+)", match.group(1)))
    assert int(options["timeout"].rstrip("s")) >= 5
    command = json.loads(match.group(2))
    assert command == ["grounded-sam", "health"] and command[1] in _commands()


def test_every_setting_can_be_passed_to_api_and_workers_and_every_named_variable_exists() -> None:
    """Any setting goes into `.env` (read whole by API and workers; optional); every ${NAME} compose fills in and
    every variable the Dockerfile sets is a setting (or a library's, or compose's own)."""
    compose = _compose()
    for name in ["api", *_workers(compose)]:
        assert {"path": ".env", "required": False} in compose["services"][name]["env_file"], name
    text = (REPO / "docker-compose.yml").read_text()
    named = set(re.findall(r"\$\{([A-Z_]+)", text)) | set(re.findall(r"^\s+([A-Z_]+):", text, re.M))
    label_studio = set(compose["services"]["label-studio"]["environment"])
    dashboard = set(compose["services"]["rq-dashboard"]["environment"])
    unknown = named - _settings() - LIBRARY_ENV - COMPOSE_ONLY - label_studio - dashboard
    assert not unknown, unknown


def test_each_worker_service_reserves_its_own_gpu() -> None:
    """One GPU per worker in a way compose supports: an explicit device id per service, never a shared `count`."""
    compose = _compose()
    ids = []
    for name in _workers(compose):
        [device] = compose["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert "count" not in device and device["capabilities"] == ["gpu"], name
        ids += device["device_ids"]
    assert len(_workers(compose)) >= 2 and len(ids) == len(set(ids)) == len(_workers(compose)), ids


def test_the_worker_healthcheck_is_a_heartbeat_the_worker_writes() -> None:
    """The image names the file (a setting), the worker services check it with `health --worker` (a real flag)."""
    env = dict(re.findall(r"^\s+([A-Z_]+)=(\S+?)(?: \\)?$", _dockerfile(), re.M))
    assert env["WORKER_HEARTBEAT_FILE"].startswith("/tmp/") and "WORKER_HEARTBEAT_FILE" in _settings()
    args = _parser().parse_args(WORKER_HEALTHCHECK[2:])
    assert args.worker is True
    compose = _compose()
    for name in _workers(compose):
        check = compose["services"][name]["healthcheck"]
        assert check["test"] == WORKER_HEALTHCHECK and "disable" not in check, name


def test_label_studio_may_reach_the_backend_on_private_addresses() -> None:
    """Both Label Studio variables the README names for a backend on a private address are set."""
    environment = _compose()["services"]["label-studio"]["environment"]
    assert environment["LABEL_STUDIO_ML_BLOCK_LOCAL_IP"] == "false"
    assert environment["LABEL_STUDIO_SSRF_PROTECTION_ENABLED"] == "false"
    readme = (REPO / "README.md").read_text()
    assert "`LABEL_STUDIO_ML_BLOCK_LOCAL_IP=false`, `LABEL_STUDIO_SSRF_PROTECTION_ENABLED=false`" in readme


def test_the_build_context_leaves_out_history_environments_and_secrets_but_not_what_the_image_copies() -> None:
    rules = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    rules = [rule for rule in rules if rule and not rule.startswith("#")]
    assert rules[0] == "*", "an allowlist: everything is left out first (history, environments, .env, models)"
    allowed = {rule[1:] for rule in rules if rule.startswith("!")}
    copied = {part for line in re.findall(r"^COPY (.+) \S+$", _dockerfile(), re.M) for part in line.split()}
    assert copied == {"pyproject.toml", "README.md", "backend", "label_config"}
    assert allowed == copied, "exactly what the Dockerfile copies is let back in"


def _ci_torch_pair() -> tuple[str, str]:
    match = re.search(r"pip install .*torch==(\S+) torchvision==(\S+)", (REPO / ".ci" / "run").read_text())
    assert match is not None
    return match.group(1), match.group(2)


def test_one_torch_and_torchvision_pair_everywhere() -> None:
    """.ci/run, the Dockerfile and the README's install commands name the same pair; pyproject only bounds it
    from below, so installing the project (any extra) keeps the torch build installed first."""
    torch, torchvision = _ci_torch_pair()
    text = _dockerfile()
    assert re.search(rf"^ARG TORCH_VERSION={re.escape(torch)}$", text, re.M)
    assert re.search(rf"^ARG TORCHVISION_VERSION={re.escape(torchvision)}$", text, re.M)
    assert '"torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" --index-url' in text
    readme = (REPO / "README.md").read_text()
    pair = f"pip install torch=={torch} torchvision=={torchvision} --index-url https://download.pytorch.org/whl/"
    assert f"{pair}cpu" in readme and re.search(rf"{re.escape(pair)}cu\d+", readme)
    requirements = re.findall(r'"(torch(?:vision)?(?![\w-])[^"]*)"', (REPO / "pyproject.toml").read_text())
    for name in ("torch", "torchvision"):
        pins = [r for r in requirements if re.match(rf"{name}(?![\w-])", r)]
        assert pins and all(re.fullmatch(rf"{name}>=[\d.]+", r) for r in pins), pins


def test_docker_compose_config_accepts_the_file() -> None:
    """`docker compose config` (no engine needed) where a docker CLI with the compose plugin exists."""
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("no docker CLI with the compose plugin on this machine")
    for profile in ([], ["--profile", "gpu2", "--profile", "labelstudio", "--profile", "dashboard"]):
        result = subprocess.run([docker, "compose", *profile, "config", "--quiet"], cwd=REPO, capture_output=True)
        assert result.returncode == 0, result.stderr.decode()
