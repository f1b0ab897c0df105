"""docker-compose.yml is valid Compose and wires what the worker needs (no Docker engine here)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_compose_file_matches_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(compose))
    assert not errors, [f"{list(e.absolute_path)}: {e.message}" for e in errors]


@pytest.mark.parametrize("worker", ["worker", "worker-gpu"])
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
