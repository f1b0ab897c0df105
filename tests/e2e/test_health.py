"""/health/ready and /health/live of real workers, and workers that never build engines."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from engines.builder.data import sample_texts
from engines.registry import Registry
from schemas import encode_event
from streams.dev.process import free_port
from tests.chaos.harness import read_all
from tests.e2e.conftest import ROOT, Names, Worker, WorkerFactory, read_topic
from tests.e2e.test_pipeline import _indexed_ids, _produce

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]


async def _until(
    worker: Worker, path: str, accept: Callable[[int, dict[str, object]], bool], timeout_s: float
) -> tuple[int, dict[str, object]]:
    deadline = time.monotonic() + timeout_s
    answer = None
    while time.monotonic() < deadline:
        answer = await asyncio.to_thread(worker.probe, path)
        if answer is not None and accept(*answer):
            return answer
        await asyncio.sleep(0.5)
    raise AssertionError(f"{path} never met the expectation; last answer {answer}")


class TcpProxy:
    """A loopback TCP forwarder in front of a real server, which the test can cut and restore:
    Elasticsearch 'goes down' for the worker while it keeps running for everyone else."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen()
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            self._conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


@pytest.fixture
def es_proxy(es_url: str) -> Iterator[TcpProxy]:
    parts = urlsplit(es_url)
    proxy = TcpProxy((parts.hostname or "127.0.0.1", parts.port or 9200))
    proxy.up()
    yield proxy
    proxy.down()


async def test_ready_follows_elasticsearch_and_live_stays_up(
    workers: WorkerFactory, es_proxy: TcpProxy
) -> None:
    worker = workers.start(
        INFLOW_ES_URL=f"http://127.0.0.1:{es_proxy.port}", INFLOW_HEALTH_POLL_S="1"
    )
    answer = worker.probe("/health/ready")
    assert answer is not None and answer[0] == 200, answer
    es_proxy.down()
    _status, body = await _until(worker, "/health/ready", lambda s, _: s == 503, 60)
    checks = body["checks"]
    assert isinstance(checks, dict) and "unreachable" in str(checks["elasticsearch"]), body
    assert checks["engine"] == "ok" and checks["partitions"] == "ok", body
    live = await asyncio.to_thread(worker.probe, "/health/live")
    assert live is not None and live[0] == 200, f"a dependency outage is not death: {live}"
    es_proxy.up()  # same port
    await _until(worker, "/health/ready", lambda s, _: s == 200, 60)


async def test_a_worker_without_partitions_is_not_ready(
    workers: WorkerFactory,
) -> None:
    # One partition, two workers: the group gives it to one of them.
    first = workers.start(INFLOW_TOPIC_PARTITIONS="1", INFLOW_HEALTH_POLL_S="1")
    second = workers.start(INFLOW_TOPIC_PARTITIONS="1", wait_ready=False)

    async def split() -> list[tuple[int, dict[str, object]]]:
        deadline = time.monotonic() + 90
        while True:
            answers = [await asyncio.to_thread(w.probe, "/health/ready") for w in (first, second)]
            codes = sorted(a[0] for a in answers if a is not None)
            settled = all(  # both engines loaded: only the partitions can differ
                isinstance(a[1]["checks"], dict) and a[1]["checks"]["engine"] == "ok"
                for a in answers
                if a is not None
            )
            if (codes == [200, 503] and settled) or time.monotonic() > deadline:
                return [a for a in answers if a is not None]
            await asyncio.sleep(0.5)

    answers = await split()
    assert sorted(code for code, _ in answers) == [200, 503], answers
    idle = next(body for code, body in answers if code == 503)
    checks = idle["checks"]
    assert isinstance(checks, dict) and "no partitions assigned" in str(checks["partitions"])
    assert checks["engine"] == "ok", "only the partitions are missing"


async def test_workers_wait_for_the_build_job_and_never_build(
    workers: WorkerFactory,
    names: Names,
    kafka_bootstrap: str,
    engine_dir: Path,  # trains the default model once per session; the job below reuses it
    tmp_path: Path,
) -> None:
    registry_dir = tmp_path / "empty-registry"
    env = {"INFLOW_ENGINE_DIR": str(registry_dir), "INFLOW_HEALTH_POLL_S": "1"}
    pair = [workers.start(wait_ready=False, **env) for _ in range(2)]
    for worker in pair:
        status, _body = await _until(
            worker, "/health/ready", lambda _, b: "no active engine" in str(b.get("reason")), 60
        )
        assert status == 503
        live = await asyncio.to_thread(worker.probe, "/health/live")
        assert live is not None and live[0] == 200, live
    texts = sample_texts(20, seed=11)
    events = [
        (f"wait-{i}".encode(), encode_event(text, id=f"wait-{i}")) for i, text in enumerate(texts)
    ]
    await _produce(kafka_bootstrap, names.texts, events)
    await asyncio.sleep(3)
    assert all(w.proc.poll() is None for w in pair), "waiting is not crashing"
    assert Registry(registry_dir).list() == [], "a worker built or registered an engine"
    # The engine-build job: one `inflow engine ensure`, as the compose service and the Job run it.
    job = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "streams.cli.main",
            "--registry",
            str(registry_dir),
            "engine",
            "ensure",
            "--quiet",
        ],
        cwd=ROOT,
        env={**os.environ, "INFLOW_ENGINE_DIR": str(registry_dir)},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert job.returncode == 0, job.stderr[-3000:]
    built = Registry(registry_dir).list()
    assert len(built) == 1, [m.version for m in built]
    for worker in pair:
        await _until(worker, "/health/ready", lambda s, _: s == 200, 120)
    predictions = await read_topic(kafka_bootstrap, names.predictions, len(events))
    assert sorted(k or b"" for k, _, _ in predictions) == sorted(key for key, _ in events)
    assert len(Registry(registry_dir).list()) == 1, "the workers built nothing after the job"


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
async def test_live_fails_when_the_consumer_stalls_with_lag(
    workers: WorkerFactory, names: Names, kafka_bootstrap: str, es_url: str, guarantee: str
) -> None:
    # The index stage holds its batch (a size above the events sent, a wait far beyond the
    # test): it indexes nothing and its group commits nothing, so lag on the predictions topic
    # stays above zero while the texts are answered. Exactly once, those predictions lie among
    # transaction markers: real records behind markers are lag, and the stall is not excused.
    # Engine and Elasticsearch are fine, so nothing excuses it. (A predictions topic that
    # refuses every record no longer stalls the worker: each prediction becomes a dead letter.)
    worker = workers.start(
        INFLOW_STALL_AFTER_S="4",
        INFLOW_HEALTH_POLL_S="1",
        INFLOW_PROCESSING_GUARANTEE=guarantee,
        INFLOW_INDEX_BATCH_SIZE="500",
        INFLOW_INDEX_MAX_WAIT_MS="600000",
    )
    live = await asyncio.to_thread(worker.probe, "/health/live")
    assert live is not None and live[0] == 200, live
    texts = sample_texts(8, seed=3)
    sent = [f"s-{i}" for i in range(len(texts))]
    await _produce(
        kafka_bootstrap,
        names.texts,
        [(eid.encode(), encode_event(t, id=eid)) for eid, t in zip(sent, texts, strict=True)],
    )
    _status, body = await _until(worker, "/health/live", lambda s, _: s == 503, 90)
    reason = str(body["reason"])
    assert f"{names.predictions}[" in reason and "no progress" in reason, body
    assert f"{names.texts}[" not in reason, f"the texts are answered: {body}"
    ready = await asyncio.to_thread(worker.probe, "/health/ready")
    assert ready is not None and ready[0] == 200, "its dependencies are fine: only live fails"
    predicted = await read_all(kafka_bootstrap, names.predictions, read_committed=True)
    assert sorted(key or b"" for key, _, _ in predicted) == sorted(e.encode() for e in sent)

    # Stopped, the worker indexes what it held (its buffer flushes on the way out): each
    # event is indexed, none lost.
    assert await asyncio.to_thread(worker.stop, signal.SIGTERM, 60) == 0
    indexed = await _indexed_ids(es_url, names.alias, len(sent), timeout_s=60)
    assert sorted(indexed) == sorted(sent)


async def _end_offsets(bootstrap: str, topic: str) -> int:
    """The sum of a topic's log-end offsets: its records plus any transaction markers."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()  # of every topic, as read_all does
        partitions = consumer.partitions_for_topic(topic)
        assert partitions, f"topic {topic} has no partitions"
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in partitions])
        return sum(ends.values())
    finally:
        await consumer.stop()


def _lag_metric(worker: Worker, topic: str) -> float | None:
    """inflow_consumer_lag summed over `topic`'s partitions (None: no sample exposed)."""
    with urllib.request.urlopen(f"{worker.url}/metrics", timeout=5) as response:
        text = response.read().decode()
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("inflow_consumer_lag{") and f'topic="{topic}"' in line
    ]
    return sum(values) if values else None


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
async def test_an_idle_worker_stays_live_after_traffic(
    workers: WorkerFactory, names: Names, kafka_bootstrap: str, es_url: str, guarantee: str
) -> None:
    # Exactly once, each transaction leaves a marker past the last prediction of each partition
    # it wrote; the index group commits last record + 1 and never reaches the log end. Those
    # markers are not lag: idle for three times the stall limit, the worker stays live.
    stall_after_s = 5
    worker = workers.start(
        INFLOW_PROCESSING_GUARANTEE=guarantee,
        INFLOW_STALL_AFTER_S=str(stall_after_s),
        INFLOW_HEALTH_POLL_S="1",
    )
    texts = sample_texts(40, seed=5)
    sent = [f"idle-{i}" for i in range(len(texts))]
    await _produce(
        kafka_bootstrap,
        names.texts,
        [(eid.encode(), encode_event(t, id=eid)) for eid, t in zip(sent, texts, strict=True)],
    )
    indexed = await _indexed_ids(es_url, names.alias, len(sent), timeout_s=180)
    assert sorted(indexed) == sorted(sent)
    predictions = await read_all(kafka_bootstrap, names.predictions, read_committed=True)
    assert sorted({key or b"" for key, _, _ in predictions}) == sorted(e.encode() for e in sent)
    if guarantee == "exactly_once":  # the case in question: the log runs past the last record
        assert await _end_offsets(kafka_bootstrap, names.predictions) > len(predictions)

    failures: list[tuple[float, object]] = []
    start = time.monotonic()
    while (idle := time.monotonic() - start) < 3 * stall_after_s + 2:
        answer = await asyncio.to_thread(worker.probe, "/health/live")
        if answer is None or answer[0] != 200:
            failures.append((round(idle, 1), answer))
        await asyncio.sleep(0.5)
    assert failures == [], f"/health/live failed while idle: {failures[:3]}"
    assert await asyncio.to_thread(_lag_metric, worker, names.predictions) == 0
    ready = await asyncio.to_thread(worker.probe, "/health/ready")
    assert ready is not None and ready[0] == 200, ready


async def test_a_worker_waits_not_ready_until_kafka_answers(
    workers: WorkerFactory, kafka_bootstrap: str
) -> None:
    host, _, port = kafka_bootstrap.rpartition(":")
    proxy = TcpProxy((host, int(port)))  # Kafka "down" for this worker until the proxy is up
    proxy.port = free_port()
    worker = workers.start(wait_ready=False, INFLOW_KAFKA_BOOTSTRAP=f"127.0.0.1:{proxy.port}")
    try:
        _status, body = await _until(worker, "/health/ready", lambda s, _: s == 503, 60)
        checks = body["checks"]
        assert isinstance(checks, dict) and "cannot reach Kafka" in str(checks["kafka"]), body
        live = await asyncio.to_thread(worker.probe, "/health/live")
        assert live is not None and live[0] == 200, live
        proxy.up()
        await _until(worker, "/health/ready", lambda s, _: s == 200, 120)
    finally:
        proxy.down()
    assert worker.proc.poll() is None
    assert "attempt 1;" in worker.log.read_text()
