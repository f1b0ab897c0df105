"""Fixtures of the chaos suite: private genuine services for the scenarios that kill them, and
workers started as real subprocesses (the e2e suite's `WorkerFactory`)."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from streams.dev.services import DevServices, Endpoints
from tests.chaos.harness import RESULTS
from tests.e2e.conftest import Names, WorkerFactory, engine_dir, names

__all__ = ["engine_dir", "names"]  # fixtures shared with the e2e suite


class PrivateServices:
    """A broker and a search server of this test alone, in its own state folder: killing them
    touches no other test. `up()` after a kill brings them back on the same ports, with their
    data (what `inflow dev up` does after a crash)."""

    def __init__(self, state_dir: Path) -> None:
        self.dev = DevServices.for_state_dir(state_dir)
        self.endpoints: Endpoints | None = None

    def up(self) -> Endpoints:
        broker = os.environ.get("INFLOW_TEST_BROKER", "auto")
        search = os.environ.get("INFLOW_TEST_SEARCH", "auto")
        self.endpoints = self.dev.up(broker=broker, search=search)  # type: ignore[arg-type]
        return self.endpoints

    def kill(self, name: str) -> int:
        """kill -9 the broker ("kafka") or the search server ("search"); its PID."""
        record = self.dev.running(name)
        assert record is not None, f"{name} is not running"
        os.kill(record.pid, signal.SIGKILL)
        with_reaping(record.pid)
        return record.pid

    def stop(self, name: str) -> None:
        """A clean stop of one service (SIGTERM, data flushed)."""
        from streams.dev.services import stop_service

        record = self.dev.running(name)
        assert record is not None, f"{name} is not running"
        assert stop_service(record)


def with_reaping(pid: int) -> None:
    """Wait for a killed child of ours to be gone (services are started in-process here)."""
    import contextlib
    import time

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
        except (OSError, IndexError):
            return
        if state in "ZX":
            return
        time.sleep(0.1)


@pytest.fixture
def private_services(tmp_path: Path) -> Iterator[PrivateServices]:
    services = PrivateServices(tmp_path / "services")
    services.up()
    try:
        yield services
    finally:
        services.dev.down()


WorkerEnv = Callable[[str, str], WorkerFactory]


@pytest.fixture
def chaos_workers(engine_dir: Path, names: Names, tmp_path: Path) -> Iterator[WorkerEnv]:
    """chaos_workers(bootstrap, es_url) -> a WorkerFactory; every worker is killed at the end."""
    factories: list[WorkerFactory] = []

    def make(bootstrap: str, es_url: str) -> WorkerFactory:
        env = {k: v for k, v in os.environ.items() if not k.startswith("INFLOW_")}
        env.update(
            names.env(),
            INFLOW_KAFKA_BOOTSTRAP=bootstrap,
            INFLOW_ES_URL=es_url,
            INFLOW_ENGINE_DIR=str(engine_dir),
            INFLOW_STATE_DIR=str(tmp_path / "state"),
            INFLOW_ENGINE_POLL_S="0.5",
            INFLOW_HEALTH_POLL_S="2",
        )
        factory = WorkerFactory(env, tmp_path)
        factories.append(factory)
        return factory

    yield make
    for factory in factories:
        for worker in factory.started:
            worker.stop(signal.SIGKILL, timeout=30)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if RESULTS:
        terminalreporter.section("chaos figures")
        for figures in RESULTS:
            terminalreporter.write_line(figures.line())
