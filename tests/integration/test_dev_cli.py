"""`inflow dev`: lifecycle, and one-line errors for a taken port, missing tools, a bad fetch."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
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


def test_failed_jar_fetch_is_a_one_line_error(env: dict[str, str], tmp_path: Path) -> None:
    env = {**env, "INFLOW_KAFKA_VERSION": "0.0.404", "INFLOW_CACHE_DIR": str(tmp_path / "cache")}
    result = inflow("dev", "up", "--broker", "kafka", env=env)
    _one_line_error(result, "could not fetch Apache Kafka 0.0.404")
    assert not list((tmp_path / "cache").glob("kafka-0.0.404/libs*")), "no partial cache kept"


def test_up_is_idempotent_and_down_leaves_nothing(env: dict[str, str]) -> None:
    first = inflow("dev", "up", "--broker", "noida", env=env)
    assert first.returncode == 0, first.stderr
    second = inflow("dev", "up", "--broker", "noida", env=env)
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
