"""docker-compose.yml is valid Compose and wires what the worker needs; the Dockerfile has the
stages it names (checked statically: no Docker engine here)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKERS = ["worker", "worker-gpu"]
ENGINE_BUILDS = {"worker": "engine-build", "worker-gpu": "engine-build-gpu"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_compose_file_matches_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(compose))
    assert not errors, [f"{list(e.absolute_path)}: {e.message}" for e in errors]


@pytest.mark.parametrize("worker", WORKERS)
def test_worker_is_wired_to_kafka_and_elasticsearch(compose: dict[str, Any], worker: str) -> None:
    services = compose["services"]
    spec = services[worker]
    env = spec["environment"]
    host, _, port = env["INFLOW_KAFKA_BOOTSTRAP"].partition(":")
    assert host in services, "bootstrap must name the kafka service"
    listeners = services[host]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    assert f"//{host}:{port}" in listeners, "bootstrap must match an advertised listener"
    es_host = env["INFLOW_ES_URL"].split("//")[1].split(":")[0]
    assert es_host in services
    for dependency in (host, es_host):
        assert spec["depends_on"][dependency]["condition"] == "service_healthy"
        assert "healthcheck" in services[dependency], f"{dependency} needs a healthcheck"
    assert "healthcheck" in spec
    assert (ROOT / spec["build"]["dockerfile"]).exists()
    # the topics exist before any worker consumes
    assert spec["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    assert services["topics"]["command"] == ["inflow", "topics"]


def test_gpu_worker_is_behind_a_profile_and_asks_for_a_gpu(compose: dict[str, Any]) -> None:
    gpu = compose["services"]["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert "profiles" not in compose["services"]["worker"]


def test_published_ports_bind_loopback_only(compose: dict[str, Any]) -> None:
    for name, spec in compose["services"].items():
        for mapping in spec.get("ports", []):
            assert str(mapping).startswith("127.0.0.1:"), f"{name} publishes {mapping} publicly"


def _mounts(spec: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Container path -> (source, mode) for short-syntax volumes."""
    out = {}
    for entry in spec.get("volumes", []):
        source, target, *mode = str(entry).split(":")
        out[target] = (source, mode[0] if mode else "rw")
    return out


@pytest.mark.parametrize("worker", WORKERS)
def test_worker_serves_engines_it_never_builds(compose: dict[str, Any], worker: str) -> None:
    services = compose["services"]
    spec = services[worker]
    assert spec["build"]["target"] == "serving"
    assert "INFLOW_EXTRAS" not in spec["build"].get("args", {}) or worker == "worker-gpu"
    command = " ".join(spec.get("command", []))  # none: the image's `inflow worker`
    assert "engine" not in command and "ensure" not in command
    assert "test" in spec["healthcheck"]
    assert "http://localhost:6066/health/ready" in " ".join(spec["healthcheck"]["test"])
    # the registry: read-only here, written by the one-shot build service
    engine_dir = spec["environment"]["INFLOW_ENGINE_DIR"]
    volume, mode = _mounts(spec)[engine_dir]
    assert mode == "ro" and volume in compose["volumes"]
    builder_name = ENGINE_BUILDS[worker]
    assert spec["depends_on"][builder_name]["condition"] == "service_completed_successfully"
    builder = services[builder_name]
    assert builder["build"]["target"] == "build"
    assert builder["restart"] == "no"
    assert builder["environment"]["INFLOW_ENGINE_DIR"] == engine_dir
    assert _mounts(builder)[engine_dir] == (volume, "rw")
    assert "inflow engine" in " ".join(builder["command"])
    assert "ports" not in builder


def test_engine_build_runs_ensure_once(compose: dict[str, Any]) -> None:
    builder = compose["services"]["engine-build"]
    assert builder["command"][:3] == ["inflow", "engine", "ensure"]
    assert "profiles" not in builder and "depends_on" not in builder  # needs no Kafka or ES
    # no other service builds engines
    for name, spec in compose["services"].items():
        if name not in ENGINE_BUILDS.values():
            assert "engine" not in " ".join(map(str, spec.get("command", []))), name


@pytest.mark.parametrize("worker", WORKERS)
def test_worker_can_scale(compose: dict[str, Any], worker: str) -> None:
    spec = compose["services"][worker]
    assert "container_name" not in spec
    for mapping in spec.get("ports", []):
        _host_ip, host_port, container_port = str(mapping).split(":")
        assert host_port == "" and container_port == "6066", f"{worker}: fixed host port {mapping}"
    # no writable volume shared between replicas
    assert all(mode == "ro" for _, mode in _mounts(spec).values())


# --- Dockerfile (static) ---------------------------------------------------------------------


def _stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for line in joined.splitlines():
        if not line.strip():
            continue
        instruction, _, rest = line.strip().partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            name = rest.split(" AS ")[-1].strip() if " AS " in rest else f"#{len(stages)}"
            current = stages[name] = []
        current.append((instruction, " ".join(rest.split())))
    return stages


def _args(stage: list[tuple[str, str]], instruction: str) -> list[str]:
    return [rest for ins, rest in stage if ins == instruction]


def test_dockerfile_has_the_targets_compose_builds(compose: dict[str, Any]) -> None:
    stages = _stages()
    assert list(stages)[-1] == "serving", "serving must be the default (last) stage"
    targets = {spec["build"]["target"] for spec in compose["services"].values() if "build" in spec}
    assert targets == {"serving", "build"} and targets <= set(stages)


def test_serving_stage_is_the_slim_non_root_worker() -> None:
    serving = _stages()["serving"]
    (install,) = [run for run in _args(serving, "RUN") if "pip install" in run]
    assert "--no-cache-dir" in install
    # no extras unless INFLOW_EXTRAS (gpu) asks for them: never build or dev
    assert "[build" not in install and "dev" not in install
    assert _args(serving, "ARG")[0] == 'INFLOW_EXTRAS=""'
    (user,) = _args(serving, "USER")
    assert user.split(":")[0] not in ("root", "0")
    assert _args(serving, "EXPOSE") == ["6066"]
    (health,) = _args(serving, "HEALTHCHECK")
    assert "/health/live" in health
    assert _args(serving, "CMD") == ['["inflow", "worker"]']


def test_build_stage_installs_the_build_extra_and_runs_ensure() -> None:
    stages = _stages()
    build = stages["build"]
    (install,) = [run for run in _args(build, "RUN") if "pip install" in run]
    assert "[build" in install and "--no-cache-dir" in install
    assert 'TORCH_INDEX_URL=""' in _args(build, "ARG"), "no extra index unless asked"
    assert "--extra-index-url $TORCH_INDEX_URL" in install
    assert _args(build, "CMD") == ['["inflow", "engine", "ensure", "--quiet"]']
    (user,) = _args(build, "USER")
    assert user.split(":")[0] not in ("root", "0")
    # both install the one wheel, built from the four packages and the project metadata
    copied = {rest.split()[0] for rest in _args(stages["wheel"], "COPY")}
    assert copied == {"pyproject.toml", "streams", "engines", "indexer", "schemas"}
    assert "README.md" in " ".join(_args(stages["wheel"], "COPY"))
    state = [rest for rest in _args(stages["runtime"], "RUN") if "/var/lib/inflow" in rest]
    assert state and "chown" in state[0]
