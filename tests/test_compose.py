"""docker-compose.yml, Dockerfile and .env.example agree with the code: settings, `wkvq` commands and options,
queues, GPU reservations, health checks and start order. (No Docker engine is needed: the files are parsed.)"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from api.core.config import Settings
from worker.cli import app as wkvq_app

REPO = Path(__file__).resolve().parents[1]
WORKERS = ["worker-gpu0", "worker-gpu1"]
VARIABLE = re.compile(r"\bWKVQ_[A-Z0-9_]+\b")
ENV_LINE = re.compile(r"^\s*(#\s*)?(?P<name>[A-Z][A-Z0-9_]*)=(?P<value>.*)$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict[str, dict[str, Any]]:
    return compose["services"]


def env_example() -> dict[str, tuple[str, bool]]:
    """.env.example as {name: (value, active)}: commented-out lines document a default, active ones are set."""
    entries = {}
    for line in (REPO / ".env.example").read_text().splitlines():
        match = ENV_LINE.match(line)
        if match:
            value = match["value"].strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            entries[match["name"]] = (value, match[1] is None)
    return entries


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def container_env(service: dict[str, Any]) -> dict[str, str]:
    """What the service's process sees: its env_file (.env from .env.example), then its `environment`."""
    assert service.get("env_file") in (".env", [".env"]), "the service settings come from .env"
    active = {name: value for name, (value, on) in env_example().items() if on}
    return active | environment(service)


def dockerfile_json(instruction: str) -> list[str]:
    [line] = [line for line in (REPO / "Dockerfile").read_text().splitlines() if line.startswith(instruction + " ")]
    return json.loads(line.removeprefix(instruction + " "))


def wkvq_argv(service: dict[str, Any]) -> list[str]:
    """The service's full argv: the image's ENTRYPOINT (or the service's own) followed by its command."""
    entrypoint = service.get("entrypoint", dockerfile_json("ENTRYPOINT"))
    command = service.get("command", dockerfile_json("CMD"))
    entrypoint = shlex.split(entrypoint) if isinstance(entrypoint, str) else list(entrypoint)
    command = shlex.split(command) if isinstance(command, str) else list(command)
    return entrypoint + command


def check_wkvq_command(argv: list[str]) -> Any:
    """Parses argv with the real `wkvq` click command: an unknown command, a typo'd option or a bad value fails."""
    assert argv[0] == "wkvq", f"not a wkvq command: {argv}"
    group = typer.main.get_command(wkvq_app)
    name, args = argv[1], argv[2:]
    assert name in group.commands, f"`wkvq {name}` is not a command; there are {sorted(group.commands)}"
    command = group.commands[name]
    known = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    for arg in args:
        if arg.startswith("--"):
            assert arg.split("=", 1)[0] in known, f"`wkvq {name}` has no option {arg}; it has {sorted(known)}"
    return command.make_context(f"wkvq {name}", list(args))  # parses and converts; runs nothing


# ---------------------------------------------------------------------------------------------------- services


def test_services(services):
    assert {"postgres", "redis", "migrate", "api", *WORKERS} <= set(services)


def test_settings_variables_are_real_and_all_documented(compose):
    fields = set(Settings.model_fields)
    text = (REPO / "docker-compose.yml").read_text() + (REPO / ".env.example").read_text()
    used = {name.removeprefix("WKVQ_") for name in VARIABLE.findall(text)}
    assert used - fields == set(), "not settings of api.core.config.Settings"
    documented = {name.removeprefix("WKVQ_") for name in env_example() if name.startswith("WKVQ_")}
    assert fields - documented == set(), "settings missing from .env.example"


def test_env_example_defaults_match_settings():
    """A commented-out line documents the built-in default: it must be that default."""
    defaults = Settings.model_fields
    for name, (value, active) in env_example().items():
        field = name.removeprefix("WKVQ_")
        if active or not name.startswith("WKVQ_") or field not in defaults or field in ("MODELS_DIR", "STORAGE_URL"):
            continue  # MODELS_DIR's default is an installed path; STORAGE_URL's is resolved to an absolute one
        default = defaults[field].get_default(call_default_factory=True)
        if default is None:
            continue  # unset by default: the line shows an example value
        default = getattr(default, "value", default)
        expected = json.dumps(default, separators=(",", ":")) if isinstance(default, (dict, list)) else str(default)
        assert value in (expected, expected.removesuffix(".0")), f"{name}: .env.example says {value}, default {default}"


@pytest.mark.parametrize("name", ["migrate", "api", *WORKERS])
def test_service_settings_load(services, name, monkeypatch):
    """The settings a container gets (.env from .env.example + the service's environment) pass Settings' checks."""
    for key in [k for k in os.environ if k.startswith("WKVQ_")]:
        monkeypatch.delenv(key)
    for key, value in container_env(services[name]).items():
        monkeypatch.setenv(key, value)
    settings = Settings(_env_file=None)
    assert settings.DISPATCHER.value == "celery"
    assert settings.DATABASE_URL.startswith("postgresql+psycopg://") and "@postgres:5432/" in settings.DATABASE_URL
    assert settings.BROKER_URL.startswith("redis://redis:6379/")
    assert settings.STORAGE_URL == "file:///data/store" and str(settings.MODELS_DIR) == "/models"


# ---------------------------------------------------------------------------------------------------- commands


def test_dockerfile_entrypoint_and_cmd_are_a_wkvq_command():
    assert dockerfile_json("ENTRYPOINT") == ["wkvq"]
    check_wkvq_command(["wkvq", *dockerfile_json("CMD")])
    dockerfile = (REPO / "Dockerfile").read_text()
    assert dockerfile.startswith("#") and "FROM python:3.11-slim" in dockerfile
    torch_at = dockerfile.index("torch==2.13.0")
    lock_at = dockerfile.index("pip install --require-hashes -r requirements/service.txt")
    project_at = dockerfile.index("pip install --no-deps --no-build-isolation .")
    assert torch_at < lock_at < project_at, "torch, then the locked dependencies, then the project alone"


def test_image_gets_every_package():
    """`COPY . .` + `pip install .`: no package of pyproject.toml may be left out by .dockerignore."""
    import tomllib

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]]
    ignored = {line.strip().strip("/") for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert "COPY . ." in (REPO / "Dockerfile").read_text()
    assert not ignored & {*packages, "pyproject.toml", "README.md"}
    assert {".env", ".venv", ".git"} <= ignored


@pytest.mark.parametrize("name", ["migrate", "api", *WORKERS])
def test_commands_are_valid_wkvq_commands(services, name):
    context = check_wkvq_command(wkvq_argv(services[name]))
    assert context.command.name == {"migrate": "migrate", "api": "serve"}.get(name, "worker")


def test_api_command(services):
    params = check_wkvq_command(wkvq_argv(services["api"])).params
    assert (params["host"], params["port"], params["migrate_db"], params["workers"]) == ("0.0.0.0", 8000, False, 0)
    assert "8000:8000" in services["api"]["ports"]


def test_a_typo_fails():
    with pytest.raises(AssertionError, match="no option --gpu"):
        check_wkvq_command(["wkvq", "worker", "--queue", "gpu-a100", "--gpu", "0"])
    with pytest.raises(AssertionError, match="not a command"):
        check_wkvq_command(["wkvq", "wroker"])
    with pytest.raises(typer.BadParameter):
        check_wkvq_command(["wkvq", "serve", "--port", "eighty"])


def test_worker_queues_are_configured_gpu_classes(services):
    for name in WORKERS:
        params = check_wkvq_command(wkvq_argv(services[name])).params
        gpu_classes = json.loads(container_env(services[name])["WKVQ_GPU_CLASSES"])
        assert params["queue"] and set(params["queue"]) <= set(gpu_classes), (name, params["queue"], gpu_classes)


def test_one_reserved_gpu_per_worker(services):
    """Every worker reserves its own GPU(s); inside the container those are CUDA devices 0..n-1."""
    reserved: list[str] = []
    for name in WORKERS:
        [device] = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert device["device_ids"], name
        reserved += [str(d) for d in device["device_ids"]]
        gpus = check_wkvq_command(wkvq_argv(services[name])).params["gpus"]
        visible = [int(g) for g in gpus.split(",")]
        assert all(0 <= g < len(device["device_ids"]) for g in visible), f"{name}: --gpus {gpus} not reserved"
    assert len(reserved) == len(set(reserved)), f"a GPU reserved twice: {reserved}"


# ------------------------------------------------------------------------------------------- health and order


def test_healthchecks(services):
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert services["redis"]["healthcheck"]["test"][-2:] == ["redis-cli", "ping"] or \
        "redis-cli ping" in " ".join(services["redis"]["healthcheck"]["test"])
    api_check = " ".join(services["api"]["healthcheck"]["test"])
    assert "/readyz" in api_check and ":8000" in api_check


def test_start_order(services):
    def conditions(name: str) -> dict[str, str]:
        return {dep: spec["condition"] for dep, spec in services[name]["depends_on"].items()}

    assert conditions("migrate") == {"postgres": "service_healthy"}
    assert services["migrate"].get("restart", "no") == "no"
    for name in ("api", *WORKERS):
        assert conditions(name)["migrate"] == "service_completed_successfully"
        assert conditions(name)["redis"] == "service_healthy"
    for name in ("postgres", "redis"):
        assert "healthcheck" in services[name]


def test_shared_volumes(compose, services):
    def mounts(name: str) -> dict[str, str]:
        """{container path: source} of short-syntax mounts `source:target[:ro|rw]` (source may hold ${VAR:-x})."""
        found = {}
        for volume in services[name].get("volumes", []):
            parts = volume.rsplit(":", 2) if volume.endswith((":ro", ":rw")) else volume.rsplit(":", 1) + [""]
            found[parts[1]] = parts[0]
        return found

    store = mounts("api")["/data/store"]
    assert store in compose["volumes"]
    for name in WORKERS:
        assert mounts(name)["/data/store"] == store and mounts(name)["/models"] == mounts("api")["/models"]
    assert mounts("postgres")["/var/lib/postgresql/data"] in compose["volumes"]
