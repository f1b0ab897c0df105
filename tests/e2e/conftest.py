"""A built engine, and workers started as real `inflow worker` subprocesses."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from streams.dev.process import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def engine_dir() -> Path:
    """An engine registry with an active version (built once; `make demo` shares it)."""
    registry = Path(os.environ.get("INFLOW_ENGINE_DIR", ROOT / ".inflow" / "engines"))
    result = subprocess.run(
        [sys.executable, "-m", "streams.cli.main", "--registry", str(registry), "engine", "ensure"],
        cwd=ROOT,
        timeout=1800,
    )
    assert result.returncode == 0, "inflow engine ensure failed"
    return registry


@dataclass
class Names:
    app_id: str
    texts: str
    predictions: str
    texts_dlq: str
    predictions_dlq: str
    alias: str

    def env(self) -> dict[str, str]:
        return {
            "INFLOW_APP_ID": self.app_id,
            "INFLOW_TEXTS_TOPIC": self.texts,
            "INFLOW_PREDICTIONS_TOPIC": self.predictions,
            "INFLOW_TEXTS_DLQ_TOPIC": self.texts_dlq,
            "INFLOW_PREDICTIONS_DLQ_TOPIC": self.predictions_dlq,
            "INFLOW_ES_ALIAS": self.alias,
        }


@pytest.fixture
def names(unique_name: Callable[[str], str]) -> Names:
    base = unique_name("e2e")
    return Names(
        app_id=base,
        texts=f"{base}.texts",
        predictions=f"{base}.predictions",
        texts_dlq=f"{base}.texts.dlq",
        predictions_dlq=f"{base}.predictions.dlq",
        alias=base,
    )


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def probe(self, path: str = "/health") -> tuple[int, dict[str, object]] | None:
        """(HTTP status, JSON body) of a health view; None while the web server is not up."""
        try:
            with urllib.request.urlopen(f"{self.url}{path}", timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:  # 503 carries the reason in its body
            with error:
                return error.code, json.loads(error.read())
        except OSError:
            return None

    def health(self) -> dict[str, object] | None:
        answer = self.probe("/health")
        return None if answer is None else answer[1]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 90) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode


@dataclass
class WorkerFactory:
    env: dict[str, str]
    tmp: Path
    started: list[Worker] = field(default_factory=list)

    def start(
        self, *, wait_ready: bool = True, inflow: list[str] | None = None, **extra_env: str
    ) -> Worker:
        """Start a worker; return once /health/ready says 200 (or, with wait_ready=False,
        once its web server answers at all). `inflow` is the command that runs the CLI
        (default: this interpreter on the checkout)."""
        port = free_port()
        env = {**self.env, "INFLOW_WEB_PORT": str(port), **extra_env}
        log = self.tmp / f"worker-{len(self.started)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [*(inflow or [sys.executable, "-m", "streams.cli.main"]), "worker"],
                env=env,
                cwd=ROOT if inflow is None else self.tmp,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        worker = Worker(proc, f"http://127.0.0.1:{port}", log)
        self.started.append(worker)
        deadline = time.monotonic() + 180
        while True:
            answer = worker.probe("/health/ready")
            if answer is not None and (answer[0] == 200 or not wait_ready):
                return worker
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"worker did not start ({answer}):\n{log.read_text()[-3000:]}")
            time.sleep(0.5)


@pytest.fixture
def workers(
    services: object,
    kafka_bootstrap: str,
    es_url: str,
    engine_dir: Path,
    names: Names,
    tmp_path: Path,
) -> Iterator[WorkerFactory]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFLOW_")}
    env.update(
        names.env(),
        INFLOW_KAFKA_BOOTSTRAP=kafka_bootstrap,
        INFLOW_ES_URL=es_url,
        INFLOW_ENGINE_DIR=str(engine_dir),
        INFLOW_STATE_DIR=str(tmp_path / "state"),
        INFLOW_ENGINE_POLL_S="0.5",
    )
    factory = WorkerFactory(env, tmp_path)
    yield factory
    for worker in factory.started:
        worker.stop(signal.SIGKILL, timeout=30)


async def read_topic(
    bootstrap: str, topic: str, expected: int, timeout_s: float = 300
) -> list[tuple[bytes | None, bytes | None, dict[str, bytes]]]:
    """All records of a topic from the beginning, until `expected` are read or time runs out."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    records: list[tuple[bytes | None, bytes | None, dict[str, bytes]]] = []
    try:
        deadline = time.monotonic() + timeout_s
        partitions: set[int] | None = None
        while partitions is None and time.monotonic() < deadline:
            partitions = consumer.partitions_for_topic(topic)
            if partitions is None:
                await consumer._client.force_metadata_update()
                await asyncio.sleep(0.2)
        assert partitions, f"topic {topic} does not exist"
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        while len(records) < expected and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=1000)
            for items in batch.values():
                for item in items:
                    records.append((item.key, item.value, dict(item.headers or ())))
        # Read a little longer: duplicates would arrive after the expected count.
        batch = await consumer.getmany(timeout_ms=1500)
        for items in batch.values():
            records.extend((i.key, i.value, dict(i.headers or ())) for i in items)
    finally:
        await consumer.stop()
    return records
