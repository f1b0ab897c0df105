"""Session-wide real services for the integration tests, and unique names per test.

Where the broker and search server come from, in order:
1. INFLOW_KAFKA_BOOTSTRAP / INFLOW_ES_URL when both are set (an external cluster);
2. testcontainers (apache/kafka, elasticsearch 8) when a Docker engine answers;
3. the local services of `inflow dev up` (genuine Apache Kafka and genuine Elasticsearch from
   Maven Central when a JDK and Maven exist, noida-db otherwise), in a private state folder,
   stopped at session end. INFLOW_TEST_BROKER (auto|kafka|noida) and INFLOW_TEST_SEARCH
   (auto|elasticsearch|noida) pick them; naming the genuine one makes a missing tool an error.

INFLOW_BROKER_REPORT and INFLOW_SEARCH_REPORT name files that receive, at the end of the
session, "genuine" or "not-genuine", a tab, and which server served the tests (.ci/run reads
them).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from streams.dev.services import DevServices


@dataclass(frozen=True)
class TestServices:
    __test__ = False  # a fixture's value, not a test class (modules import it for type hints)

    kafka_bootstrap: str
    es_url: str
    broker: str  # human description, printed in the summary
    genuine_kafka: bool
    search: str  # human description, printed in the summary
    genuine_search: bool


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
        served = TestServices(
            kafka,
            es,
            f"external broker at {kafka}",
            genuine_kafka=False,
            search=f"external search server at {es}",
            genuine_search=False,
        )
        _SERVED.append(served)
        yield served
        return
    if _docker_answers():
        yield from _containers()
        return
    dev = DevServices.for_state_dir(tmp_path_factory.mktemp("inflow-services"))
    broker = os.environ.get("INFLOW_TEST_BROKER", "auto")
    search = os.environ.get("INFLOW_TEST_SEARCH", "auto")
    try:
        endpoints = dev.up(broker=broker, search=search)  # type: ignore[arg-type]
        served = TestServices(
            endpoints.kafka_bootstrap,
            endpoints.es_url,
            endpoints.broker.description,
            genuine_kafka=endpoints.broker.kind == "apache-kafka",
            search=endpoints.search.description,
            genuine_search=endpoints.search.kind == "elasticsearch",
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
            search="Elasticsearch 8.15.3 (genuine) in a container",
            genuine_search=True,
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


def _report(variable: str, genuine: bool, description: str) -> None:
    if variable in os.environ:
        Path(os.environ[variable]).write_text(
            f"{'genuine' if genuine else 'not-genuine'}\t{description}\n"
        )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for served in _SERVED:
        terminalreporter.write_line(f"Kafka tests served by: {served.broker}")
        terminalreporter.write_line(f"Search tests served by: {served.search}")
        _report("INFLOW_BROKER_REPORT", served.genuine_kafka, served.broker)
        _report("INFLOW_SEARCH_REPORT", served.genuine_search, served.search)


# A worker's log lines that say nothing about a failure (one per bulk request or lookup).
_LOG_NOISE = (" DEBUG ", "elastic_transport.transport", "Discovered coordinator")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test that started workers (tests/e2e, tests/chaos: `worker-N.log` in its
    tmp_path) shows the end of each worker's log: a CI failure then says what they did."""
    report: pytest.TestReport = yield
    tmp = getattr(item, "funcargs", {}).get("tmp_path")
    if report.failed and call.when == "call" and isinstance(tmp, Path):
        for log in sorted(tmp.glob("worker-*.log")):
            lines = log.read_text(errors="replace").splitlines()
            kept = [line[:300] for line in lines if not any(n in line for n in _LOG_NOISE)]
            report.sections.append(
                (f"{log.name} (last 80 of {len(kept)} lines)", "\n".join(kept[-80:]))
            )
    return report
