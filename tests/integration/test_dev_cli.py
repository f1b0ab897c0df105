"""`inflow dev`: lifecycle, and one-line errors for a taken port, missing tools, a bad fetch."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def inflow(
    *args: str, env: dict[str, str], timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streams.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, str]]:
    environment = {
        k: v for k, v in os.environ.items() if not k.startswith(("INFLOW_KAFKA", "INFLOW_ES"))
    }
    environment["INFLOW_STATE_DIR"] = str(tmp_path / "state")
    yield environment
    inflow("dev", "down", env=environment)  # never leave a process behind, whatever failed


def _gone(pid: int) -> bool:
    """True when the PID has exited (a zombie waiting for init to reap it has exited too)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] in "ZX"
    except (OSError, IndexError):
        return True


def _endpoints(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    assert result.returncode == 0, result.stderr
    return dict(line.split("=", 1) for line in result.stdout.split())


def _es(method: str, url: str, body: object | None = None) -> dict[str, object]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        result: dict[str, object] = json.loads(response.read())
        return result


def _one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("inflow: error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_port_in_use_is_a_one_line_error(env: dict[str, str]) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = inflow("dev", "up", "--broker", "noida", "--es-port", str(port), env=env)
    _one_line_error(result, f"port {port}", "already in use")
    assert not (Path(env["INFLOW_STATE_DIR"]) / "pids" / "search.json").exists()


def test_missing_java_and_maven_is_a_one_line_error(env: dict[str, str], tmp_path: Path) -> None:
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    env = {**env, "PATH": str(empty_bin), "INFLOW_CACHE_DIR": str(tmp_path / "cache")}
    result = inflow("dev", "up", "--broker", "kafka", env=env)
    _one_line_error(result, "java and mvn not found", "--broker noida")
    result = inflow("dev", "up", "--broker", "noida", "--search", "elasticsearch", env=env)
    _one_line_error(result, "java, javac and mvn not found", "--search noida")


def test_without_a_jdk_auto_falls_back_to_noida_and_says_so(
    env: dict[str, str], tmp_path: Path
) -> None:
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    env = {**env, "PATH": str(empty_bin), "INFLOW_CACHE_DIR": str(tmp_path / "cache")}
    result = inflow("dev", "up", env=env)
    assert result.returncode == 0, result.stderr
    assert "so the broker is noida-db" in result.stderr
    assert "so the search server is noida-db (an Elasticsearch 8 API imitation)" in result.stderr
    assert "for genuine Elasticsearch 8.15.3, install a JDK 17+ and Maven" in result.stderr
    status = inflow("dev", "status", env=env)
    assert "search: noida-db" in status.stdout and "kafka: noida-db" in status.stdout


def test_failed_jar_fetch_is_a_one_line_error(env: dict[str, str], tmp_path: Path) -> None:
    env = {**env, "INFLOW_KAFKA_VERSION": "0.0.404", "INFLOW_CACHE_DIR": str(tmp_path / "cache")}
    result = inflow("dev", "up", "--broker", "kafka", env=env)
    _one_line_error(result, "could not fetch Apache Kafka 0.0.404")
    assert not list((tmp_path / "cache").glob("kafka-0.0.404/libs*")), "no partial cache kept"


def test_failed_elasticsearch_fetch_is_a_one_line_error(
    env: dict[str, str], tmp_path: Path
) -> None:
    if shutil.which("mvn") is None:
        pytest.skip("needs Maven")
    env = {**env, "INFLOW_ES_VERSION": "0.0.404", "INFLOW_CACHE_DIR": str(tmp_path / "cache")}
    result = inflow("dev", "up", "--broker", "noida", "--search", "elasticsearch", env=env)
    _one_line_error(result, "could not fetch Elasticsearch 0.0.404", "INFLOW_ES_VERSION")
    assert not list((tmp_path / "cache").glob("elasticsearch-0.0.404/libs*")), "no partial cache"
    assert not (Path(env["INFLOW_STATE_DIR"]) / "pids" / "search.json").exists()


def test_up_is_idempotent_and_down_leaves_nothing(env: dict[str, str]) -> None:
    first = inflow("dev", "up", "--broker", "noida", "--search", "noida", env=env)
    assert first.returncode == 0, first.stderr
    second = inflow("dev", "up", "--broker", "noida", "--search", "noida", env=env)
    assert second.stdout == first.stdout  # same endpoints: nothing new started
    endpoints = dict(line.split("=", 1) for line in first.stdout.split())
    assert endpoints["INFLOW_KAFKA_BOOTSTRAP"].startswith("127.0.0.1:")
    assert endpoints["INFLOW_ES_URL"].startswith("http://127.0.0.1:")
    state = Path(env["INFLOW_STATE_DIR"])
    assert (state / "dev.env").read_text().split() == first.stdout.split()
    status = inflow("dev", "status", env=env)
    assert status.returncode == 0 and status.stdout.count("pid") == 2
    pids = [int(pid) for pid in re.findall(r"pid (\d+)", status.stdout)]
    assert len(pids) == 2

    down = inflow("dev", "down", env=env)
    assert down.returncode == 0 and down.stdout.count("stopped") == 2
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
    assert inflow("dev", "status", env=env).returncode == 1


def _genuine_tools() -> None:
    missing = [tool for tool in ("java", "javac", "mvn") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"genuine Kafka and Elasticsearch need {', '.join(missing)}")


@pytest.mark.slow
def test_genuine_kafka_and_elasticsearch_keep_search_data_across_down_and_up(
    env: dict[str, str],
) -> None:
    _genuine_tools()
    first = inflow("dev", "up", "--broker", "kafka", "--search", "elasticsearch", env=env)
    es_url = _endpoints(first)["INFLOW_ES_URL"]
    assert "search: Elasticsearch 8.15.3 (genuine)" in first.stderr
    root = _es("GET", es_url)
    assert root["tagline"] == "You Know, for Search"
    version = root["version"]
    assert isinstance(version, dict)
    assert (version["number"], version["build_flavor"]) == ("8.15.3", "default")
    status = inflow("dev", "status", env=env)
    assert status.returncode == 0
    assert "kafka: Apache Kafka 4.1.1 (genuine, KRaft) pid" in status.stdout
    assert "search: Elasticsearch 8.15.3 (genuine) pid" in status.stdout
    pids = [int(pid) for pid in re.findall(r"pid (\d+)", status.stdout)]
    assert len(pids) == 2
    doc = {"text": "kept across restarts"}
    _es("PUT", f"{es_url}/dev-cli-keep/_doc/1?refresh=true", doc)

    down = inflow("dev", "down", env=env)
    assert down.returncode == 0 and down.stdout.count("stopped") == 2
    assert all(_gone(pid) for pid in pids), "a service outlived `inflow dev down`"
    assert inflow("dev", "status", env=env).returncode == 1

    again = inflow("dev", "up", "--broker", "kafka", "--search", "elasticsearch", env=env)
    es_url = _endpoints(again)["INFLOW_ES_URL"]
    assert _es("GET", f"{es_url}/dev-cli-keep/_doc/1")["_source"] == doc
    status = inflow("dev", "status", env=env)
    new_pids = [int(pid) for pid in re.findall(r"pid (\d+)", status.stdout)]
    down = inflow("dev", "down", env=env)
    assert down.returncode == 0 and down.stdout.count("stopped") == 2
    assert all(_gone(pid) for pid in new_pids)


@pytest.mark.slow
def test_a_failed_elasticsearch_start_is_a_one_line_error(env: dict[str, str]) -> None:
    _genuine_tools()
    home = Path(env["INFLOW_STATE_DIR"]) / "elasticsearch"
    home.mkdir(parents=True)
    (home / "data").write_text("a file where the data folder should be")
    result = inflow("dev", "up", "--broker", "noida", "--search", "elasticsearch", env=env)
    _one_line_error(result, "Elasticsearch exited with code 1 at start-up", "elasticsearch/data")
    assert not (Path(env["INFLOW_STATE_DIR"]) / "pids" / "search.json").exists()


def _kill_9(pid: int) -> None:
    import signal
    import time

    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.1)


@pytest.mark.slow
def test_up_after_a_crash_brings_both_back_with_their_data_on_the_same_ports(
    env: dict[str, str],
) -> None:
    _genuine_tools()
    first = inflow("dev", "up", "--broker", "kafka", "--search", "elasticsearch", env=env)
    endpoints = _endpoints(first)
    es_url, bootstrap = endpoints["INFLOW_ES_URL"], endpoints["INFLOW_KAFKA_BOOTSTRAP"]
    doc = {"text": "kept across a crash"}
    _es("PUT", f"{es_url}/dev-cli-crash/_doc/1?refresh=true", doc)
    produced = subprocess.run(
        [sys.executable, "-c", _PRODUCE_ONE, bootstrap], capture_output=True, text=True, timeout=60
    )
    assert produced.returncode == 0, produced.stderr
    status = inflow("dev", "status", env=env)
    pids = [int(pid) for pid in re.findall(r"pid (\d+)", status.stdout)]
    assert len(pids) == 2
    for pid in pids:
        _kill_9(pid)

    down = inflow("dev", "down", env=env)  # nothing runs: nothing is reported as stopped
    assert down.returncode == 0 and "stopped" not in down.stdout, down.stdout
    again = inflow("dev", "up", "--broker", "kafka", "--search", "elasticsearch", env=env)
    assert _endpoints(again) == endpoints, "the same ports after a crash"
    assert _es("GET", f"{es_url}/dev-cli-crash/_doc/1")["_source"] == doc
    read = subprocess.run(
        [sys.executable, "-c", _READ_ALL, bootstrap], capture_output=True, text=True, timeout=60
    )
    assert read.returncode == 0 and read.stdout.split() == ["kept-across-a-crash"], read

    # After a clean down too: same ports, same data.
    assert inflow("dev", "down", env=env).stdout.count("stopped") == 2
    third = inflow("dev", "up", "--broker", "kafka", "--search", "elasticsearch", env=env)
    assert _endpoints(third) == endpoints
    read = subprocess.run(
        [sys.executable, "-c", _READ_ALL, bootstrap], capture_output=True, text=True, timeout=60
    )
    assert read.stdout.split() == ["kept-across-a-crash"], read


_PRODUCE_ONE = """
import asyncio, sys
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

async def main():
    admin = AIOKafkaAdminClient(bootstrap_servers=sys.argv[1])
    await admin.start()
    await admin.create_topics([NewTopic("dev-cli-crash", 1, 1)])
    await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=sys.argv[1], acks="all")
    await producer.start()
    await producer.send_and_wait("dev-cli-crash", b"kept-across-a-crash")
    await producer.stop()

asyncio.run(main())
"""

_READ_ALL = """
import asyncio, sys
from aiokafka import AIOKafkaConsumer, TopicPartition

async def main():
    consumer = AIOKafkaConsumer(bootstrap_servers=sys.argv[1])
    await consumer.start()
    tp = TopicPartition("dev-cli-crash", 0)
    consumer.assign([tp])
    await consumer.seek_to_beginning(tp)
    batch = await consumer.getmany(timeout_ms=5000)
    for records in batch.values():
        for record in records:
            print(record.value.decode())
    await consumer.stop()

asyncio.run(main())
"""
