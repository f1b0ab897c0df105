"""Session-wide real services for the integration tests, and unique names per test.

Where the broker and search server come from, in order:
1. INFLOW_KAFKA_BOOTSTRAP / INFLOW_ES_URL when both are set (an external cluster);
2. testcontainers (apache/kafka, elasticsearch 8) when a Docker engine answers;
3. the local services of `inflow dev up` (genuine Apache Kafka from Maven Central when Java
   and Maven exist, noida-db otherwise), in a private state folder, stopped at session end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from streams.dev.services import DevServices


@dataclass(frozen=True)
class TestServices:
    kafka_bootstrap: str
    es_url: str
    broker: str  # human description, printed in the summary
    genuine_kafka: bool


_SERVED: list[TestServices] = []


def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestServices]:
    kafka = os.environ.get("INFLOW_KAFKA_BOOTSTRAP")
    es = os.environ.get("INFLOW_ES_URL")
    if kafka and es:
        served = TestServices(kafka, es, f"external broker at {kafka}", genuine_kafka=False)
        _SERVED.append(served)
        yield served
        return
    if _docker_answers():
        yield from _containers()
        return
    dev = DevServices.for_state_dir(tmp_path_factory.mktemp("inflow-services"))
    broker = os.environ.get("INFLOW_TEST_BROKER", "auto")
    try:
        endpoints = dev.up(broker=broker)  # type: ignore[arg-type]
        served = TestServices(
            endpoints.kafka_bootstrap,
            endpoints.es_url,
            endpoints.broker.description,
            genuine_kafka=endpoints.broker.kind == "apache-kafka",
        )
        _SERVED.append(served)
        yield served
    finally:
        dev.down()


def _containers() -> Iterator[TestServices]:
    from testcontainers.elasticsearch import ElasticSearchContainer
    from testcontainers.kafka import KafkaContainer

    with (
        KafkaContainer("apache/kafka:4.1.1").with_kraft() as kafka,
        ElasticSearchContainer("docker.elastic.co/elasticsearch/elasticsearch:8.15.3") as es,
    ):
        served = TestServices(
            kafka.get_bootstrap_server(),
            es.get_url(),
            "Apache Kafka 4.1.1 (genuine, KRaft) in a container",
            genuine_kafka=True,
        )
        _SERVED.append(served)
        yield served


@pytest.fixture(scope="session")
def kafka_bootstrap(services: TestServices) -> str:
    return services.kafka_bootstrap


@pytest.fixture(scope="session")
def es_url(services: TestServices) -> str:
    return services.es_url


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """unique_name("texts") -> "t-<test>-texts-<8 hex>": topic, group and index names per test."""

    def make(purpose: str) -> str:
        test = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:32]
        return f"t-{test.strip('-')}-{purpose}-{uuid.uuid4().hex[:8]}"

    return make


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for served in _SERVED:
        terminalreporter.write_line(f"Kafka tests served by: {served.broker}")
        if "INFLOW_BROKER_REPORT" in os.environ:
            Path(os.environ["INFLOW_BROKER_REPORT"]).write_text(
                f"{'genuine' if served.genuine_kafka else 'not-genuine'}\t{served.broker}\n"
            )
