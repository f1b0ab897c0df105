"""`inflow bench pipeline`: the whole worker against the engine alone and against what users
would write instead, in one run, on the same real texts, with Kafka and the search server
running beside it on the same machine.

Phases (a progress bar on stderr for each):
  1. engine only: the active engine in this process, batches of the worker's size in arrival
     order, then the same texts in batches of similar length (as the worker's batcher forms
     them, the engine at its best on these texts): texts/s and CPU seconds per text;
  2. padding: the same texts through the Batcher first-in-first-out and by length (the engine
     stubbed out, the real tokenizer), padded tokens per real token;
  3. drain: a backlog of N events on fresh topics, one `inflow worker` process drains it:
     events/s (from the predictions' record timestamps), worker CPU seconds per event, and the
     CPU of Kafka and the search server over the same window (from /proc); then the bench
     waits until the worker has indexed them all;
  4. latency: events offered at fixed fractions of the measured drain rate; produce ->
     prediction latency (the prediction record's timestamp minus the send time) p50/p95/p99;
  5. baselines (`streams.cli.baselines`): a per-event torch fp32 agent and a `take()`
     batching torch fp32 agent drain their own backlog of the same texts.
Prints a table of figures and ratios, writes JSON and a PNG chart (latency against offered
load). Figures are noisy on a shared machine: run it more than once and report the spread.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from engines.runtime import run_batches
from engines.types import BatchResult, Engine, ModelIdentity, TokenizedText
from streams.delivery.batcher import Batcher, BatchPolicy
from streams.config import Settings

CLK_TCK = os.sysconf("SC_CLK_TCK")
DEFAULT_RATES = (0.25, 0.5, 0.75, 1.0)


# ------------------------------------------------------------------------ small helpers


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class CpuSampler:
    """Samples the CPU seconds of some processes every `interval_s`, to read any window."""

    def __init__(self, pids: dict[str, int], interval_s: float = 0.1) -> None:
        self.pids = pids
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> CpuSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            now = time.time()
            reading = {}
            for name, pid in self.pids.items():
                try:
                    reading[name] = cpu_seconds(pid)
                except (OSError, IndexError, ValueError):
                    continue
            self.samples.append((now, reading))
            self._stop.wait(self._interval)

    def at(self, name: str, when: float) -> float:
        """CPU seconds of `name` at wall time `when`, interpolated between samples."""
        points = [(t, r[name]) for t, r in self.samples if name in r]
        if not points:
            return float("nan")
        if when <= points[0][0]:
            return points[0][1]
        for (t0, c0), (t1, c1) in itertools.pairwise(points):
            if t0 <= when <= t1:
                return c0 + (c1 - c0) * (when - t0) / max(t1 - t0, 1e-9)
        return points[-1][1]

    def used(self, name: str, start: float, end: float) -> float:
        return self.at(name, end) - self.at(name, start)


def cpu_description() -> dict[str, str]:
    """The CPU model and the flags that decide INT8 speed, from `lscpu`."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    info = {}
    for line in out.splitlines():
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    flags = set(info.get("Flags", "").split())
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"]
    return {
        "model": info.get("Model name", platform.processor() or "unknown"),
        "cpus": info.get("CPU(s)", str(os.cpu_count())),
        "flags": " ".join(f for f in wanted if f in flags) or "none of " + ",".join(wanted),
    }


def other_load() -> str:
    """What else runs here (load average and the busiest other processes), for the report."""
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    try:
        top = subprocess.run(
            ["ps", "-eo", "pcpu,comm", "--sort=-pcpu", "--no-headers"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.splitlines()[:5]
    except (OSError, subprocess.TimeoutExpired):
        top = []
    return f"load average {load}; busiest: " + "; ".join(" ".join(t.split()) for t in top)


def progress(total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)


# ------------------------------------------------------------------------ phase 1 and 2


@dataclass(frozen=True, slots=True)
class EngineOnly:
    texts_per_s: float
    cpu_s_per_text: float
    median_batch_ms: float
    batch_size: int


def measure_engine(
    engine: Engine, texts: list[str], batch_size: int, desc: str = "engine only"
) -> EngineOnly:
    """The engine alone on consecutive batches of `texts`, as many at once as the worker runs."""
    batches = [texts[i : i + batch_size] for i in range(0, len(texts), batch_size)]
    engine.predict(batches[0])  # warm
    bar = progress(len(texts), desc)
    cpu0 = time.process_time()
    wall, seconds = run_batches(engine, batches, bar.update)
    cpu = time.process_time() - cpu0
    bar.close()
    times = [s * 1000 for s in seconds]
    return EngineOnly(len(texts) / wall, cpu / len(texts), statistics.median(times), batch_size)


class _TokenizeOnly:
    """The engine's tokenizer with an instant predict: batch selection without the model."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @property
    def identity(self) -> ModelIdentity:
        return self._engine.identity

    @property
    def concurrent_batches(self) -> int:
        return 1

    @property
    def max_batch_size(self) -> int:
        return self._engine.max_batch_size

    @property
    def max_seq_len(self) -> int:
        return self._engine.max_seq_len

    def count_tokens(self, texts: list[str]) -> list[int]:
        return self._engine.count_tokens(texts)

    def tokenize(self, texts: list[str]) -> list[TokenizedText]:
        return self._engine.tokenize(texts)

    def predict(
        self, texts: list[str], tokens: Sequence[TokenizedText] | None = None
    ) -> BatchResult:
        import numpy as np

        n = len(texts)
        return BatchResult(
            ["x"] * n,
            [{"x": 1.0}] * n,
            np.zeros((n, 384), dtype=np.float32),
            [False] * n,
            self._engine.identity,
        )

    def close(self) -> None:
        pass


def padding_ratio(engine: Engine, texts: list[str], policy: BatchPolicy, in_flight: int) -> float:
    """Padded tokens per real token when a backlog flows through the Batcher, `in_flight`
    texts queued at a time (as the infer stage keeps them)."""

    async def run() -> float:
        batcher = Batcher(_TokenizeOnly(engine), policy)
        await batcher.start()
        slots = asyncio.Semaphore(in_flight)

        async def one(text: str) -> None:
            async with slots:
                await batcher.submit(text)

        await asyncio.gather(*(one(t) for t in texts))
        await batcher.stop()
        return batcher.stats.padding_ratio

    return asyncio.run(run())


# ------------------------------------------------------------------------ Kafka side


@dataclass(slots=True)
class Drain:
    name: str
    events: int
    events_per_s: float
    cpu_s_per_event: float
    kafka_cores: float
    search_cores: float
    seconds: float
    load_average: float = 0.0  # this machine's 1-minute load average when the phase ended


@dataclass(slots=True)
class Latency:
    fraction: float
    offered_per_s: float
    events: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    median_batch_ms: float
    bound_ms: float  # max wait + 3 x median batch time
    load_average: float = 0.0  # this machine's 1-minute load average when the phase ended
    # Where the p99 went, from the worker's own histograms over the phase (coarse buckets):
    # waiting in the batcher for a batch, a batch on the engine, the input record's Kafka
    # timestamp to the prediction acknowledged (everything the worker and Kafka did).
    queue_p99_ms: float = float("nan")
    batch_p99_ms: float = float("nan")
    worker_p99_ms: float = float("nan")
    # Cores each process used during the phase: the two vCPUs are shared by all of them.
    cores: dict[str, float] = field(default_factory=dict)


def event_bytes(i: int, text: str, run: str) -> tuple[bytes, bytes]:
    key = f"{run}-{i}"
    return key.encode(), msgspec.json.encode(
        {"id": key, "text": text, "ts": int(time.time() * 1000)}
    )


async def create_topics(settings: Settings, names: list[str], partitions: int) -> None:
    from aiokafka.admin import NewTopic

    from streams.kafka import admin_client

    admin = admin_client(settings)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(n, partitions, settings.topic_replication) for n in names]
        )
    finally:
        await admin.close()


async def produce_backlog(settings: Settings, topic: str, texts: list[str], run: str) -> None:
    from aiokafka import AIOKafkaProducer

    from streams.kafka import client_options

    bar = progress(len(texts), f"backlog {topic}")
    prod = AIOKafkaProducer(**client_options(settings), linger_ms=20, max_batch_size=256 * 1024)
    await prod.start()
    try:
        pending = []
        for i, text in enumerate(texts):
            key, value = event_bytes(i, text, run)
            pending.append(await prod.send(topic, value, key=key))
            if len(pending) >= 500:
                await asyncio.gather(*pending)
                bar.update(len(pending))
                pending = []
        await asyncio.gather(*pending)
        bar.update(len(pending))
    finally:
        await prod.stop()
        bar.close()


async def collect(
    settings: Settings, topic: str, expected: int, desc: str, timeout_s: float
) -> dict[bytes, int]:
    """Read `topic` from the start until `expected` distinct keys arrived: key -> record ms."""
    from aiokafka import AIOKafkaConsumer

    from streams.kafka import client_options

    consumer = AIOKafkaConsumer(
        topic,
        **client_options(settings),
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_wait_ms=50,
    )
    await consumer.start()
    seen: dict[bytes, int] = {}
    bar = progress(expected, desc)
    deadline = time.monotonic() + timeout_s
    try:
        while len(seen) < expected and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200, max_records=2000)
            for records in batches.values():
                for record in records:
                    if record.key is not None and record.key not in seen:
                        seen[record.key] = record.timestamp
                        bar.update(1)
    finally:
        bar.close()
        await consumer.stop()
    if len(seen) < expected:
        raise RuntimeError(
            f"{desc}: {len(seen)} of {expected} predictions within {timeout_s:.0f} s"
        )
    return seen


def drain_figures(name: str, stamps: dict[bytes, int], sampler: CpuSampler, proc: str) -> Drain:
    times = sorted(stamps.values())
    start, end = times[0] / 1000, times[-1] / 1000
    seconds = max(end - start, 1e-3)
    rate = (len(times) - 1) / seconds
    cpu = sampler.used(proc, start, end)
    return Drain(
        name,
        len(times),
        rate,
        cpu / max(len(times) - 1, 1),
        sampler.used("kafka", start, end) / seconds,
        sampler.used("search", start, end) / seconds,
        seconds,
        os.getloadavg()[0],
    )


async def offer_load(
    settings: Settings, topic: str, texts: list[str], rate: float, run: str
) -> dict[bytes, float]:
    """Send `texts` at `rate` events/s; returns key -> send time (epoch ms)."""
    from aiokafka import AIOKafkaProducer

    from streams.kafka import client_options

    prod = AIOKafkaProducer(**client_options(settings), linger_ms=0)
    await prod.start()
    sent: dict[bytes, float] = {}
    bar = progress(len(texts), f"offer {rate:.0f}/s")
    try:
        started = time.perf_counter()
        futures = []
        for i, text in enumerate(texts):
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            key, value = event_bytes(i, text, run)
            sent[key] = time.time() * 1000
            futures.append(await prod.send(topic, value, key=key))
            bar.update(1)
        await asyncio.gather(*futures)
    finally:
        bar.close()
        await prod.stop()
    return sent


SCRAPED = (
    "inflow_batch_",
    "inflow_queue_ms",
    "inflow_produced_to_published_seconds",
    "inflow_taken_to_acked_seconds",
)


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(SCRAPED) and " " in line:
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def histogram_quantile(
    before: dict[str, float], after: dict[str, float], name: str, q: float = 0.5
) -> float:
    """Quantile `q` of a Prometheus histogram between two scrapes (linear inside the bucket)."""
    buckets = []
    for key, value in after.items():
        if key.startswith(f"{name}_bucket"):
            le = key.split('le="')[1].split('"')[0]
            bound = float("inf") if le == "+Inf" else float(le)
            buckets.append((bound, value - before.get(key, 0.0)))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return float("nan")
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= total * q:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (total * q - below) / max(count - below, 1e-9)
        lower, below = bound, count
    return lower


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the worker exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"the worker was not ready within {timeout_s:.0f} s")


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------ the run


@dataclass
class Report:
    cpu: dict[str, str]
    engine: dict[str, str]
    texts: int
    baseline_texts: int
    policy: dict[str, int]
    other_load_before: str
    engine_only: EngineOnly | None = None
    engine_by_length: EngineOnly | None = None  # the same texts, batches of similar length
    padding: dict[str, float] = field(default_factory=dict)
    drain: Drain | None = None
    latency: list[Latency] = field(default_factory=list)
    baselines: list[Drain] = field(default_factory=list)
    ratios: dict[str, float] = field(default_factory=dict)
    other_load_after: str = ""


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


@contextlib.contextmanager
def local_services(settings: Settings) -> Iterator[Settings]:
    """`settings` pointed at Kafka and the search server: the configured ones, else the dev
    services, started here (and stopped after) unless they already run."""
    if settings.kafka_bootstrap and settings.es_url:
        yield settings
        return
    from streams.dev.services import DevServices

    dev = DevServices.for_state_dir(settings.state_dir)
    started_here = not dev.running("kafka") or not dev.running("search")
    endpoints = dev.up()
    try:
        yield settings.with_overrides(
            kafka_bootstrap=endpoints.kafka_bootstrap, es_url=endpoints.es_url
        )
    finally:
        if started_here:
            dev.down()  # else someone else's services: leave them running


def run_pipeline_bench(
    settings: Settings,
    *,
    n: int,
    baseline_n: int,
    rates: Sequence[float],
    latency_events: int,
    baselines: Sequence[str],
    json_path: Path,
    png_path: Path | None,
    echo: Callable[[str], None] = print,
    study: dict[str, Any] | None = None,
) -> int:
    """The whole bench; with `study` (`--pin`/`--policies`), phases 3-4 only, per placement and
    batching policy (streams.cli.latency_bench)."""
    with local_services(settings) as settings:
        if study is not None:
            return _run_study(settings, study, latency_events, json_path, echo)
        report = measure_all(
            settings,
            n=n,
            baseline_n=baseline_n,
            rates=rates,
            latency_events=latency_events,
            baselines=baselines,
            echo=echo,
        )
    fill_ratios(report)
    echo(format_report(report))
    json_path.write_text(json.dumps(asdict(report), indent=2) + "\n")
    echo(f"results written to {json_path}")
    if png_path is not None and report.latency:
        chart(report, png_path)
        echo(f"chart written to {png_path}")
    return 0


def _run_study(
    settings: Settings,
    study: dict[str, Any],
    latency_events: int,
    json_path: Path,
    echo: Callable[[str], None],
) -> int:
    from streams.cli.latency_bench import as_json, parse_policies, run_latency_study, summary

    results = run_latency_study(
        settings,
        n=study["n"],
        latency_events=latency_events,
        fraction=study["fraction"],
        policies=parse_policies(study["policies"]),
        pin=study["pin"],
        target=study["target"],
        runs=study["runs"],
        echo=echo,
    )
    echo("\n".join(summary(results)))
    json_path.write_text(
        json.dumps({"cpu": cpu_description(), "runs": as_json(results)}, indent=2) + "\n"
    )
    echo(f"results written to {json_path}")
    return 0


def measure_all(
    settings: Settings,
    *,
    n: int,
    baseline_n: int,
    rates: Sequence[float],
    latency_events: int,
    baselines: Sequence[str],
    echo: Callable[[str], None],
) -> Report:
    from engines.builder.data import sample_texts
    from engines.load import load_engine

    pids = service_pids(settings)
    texts = sample_texts(n, seed=1)
    policy = BatchPolicy(settings.max_batch_size, settings.max_batch_tokens, settings.max_wait_ms)
    engine = load_engine(settings.engine_dir, settings.engine_version or None)
    report = Report(
        cpu=cpu_description(),
        engine=asdict(engine.identity),
        texts=n,
        baseline_texts=baseline_n,
        policy={
            "max_batch_size": policy.max_batch_size,
            "max_batch_tokens": policy.max_batch_tokens,
            "max_wait_ms": policy.max_wait_ms,
        },
        other_load_before=other_load(),
    )
    echo(f"cpu: {report.cpu['model']} ({report.cpu['cpus']} CPUs; {report.cpu['flags']})")
    echo(f"engine: {engine.identity.version}; {n} real tweets; {report.other_load_before}")
    try:
        batch = min(policy.max_batch_size, engine.max_batch_size)
        report.engine_only = measure_engine(engine, texts, batch)
        by_length = [
            text for _, text in sorted(zip(engine.count_tokens(texts), texts, strict=True))
        ]
        report.engine_by_length = measure_engine(engine, by_length, batch, "engine by length")
        fifo = BatchPolicy(batch, policy.max_batch_tokens, policy.max_wait_ms, length_aware=False)
        aware = BatchPolicy(batch, policy.max_batch_tokens, policy.max_wait_ms, length_aware=True)
        report.padding = {
            "fifo": padding_ratio(engine, texts, fifo, settings.max_in_flight),
            "length_aware": padding_ratio(engine, texts, aware, settings.max_in_flight),
        }
    finally:
        engine.close()
    report.drain, report.latency, worker_padding = run_worker_phases(
        settings, texts, rates, latency_events, pids
    )
    report.padding["worker_drain"] = worker_padding
    for mode in baselines:
        report.baselines.append(run_baseline(settings, mode, texts[:baseline_n], pids))
    report.other_load_after = other_load()
    return report


def service_pids(settings: Settings) -> dict[str, int]:
    """PIDs of the broker and the search server when they run on this machine."""
    from streams.dev.services import DevServices

    dev = DevServices.for_state_dir(settings.state_dir)
    pids = {}
    for name, record in dev.status().items():
        if (
            record is not None
            and record.address
            and (record.address in settings.kafka_bootstrap or record.address in settings.es_url)
        ):
            pids["kafka" if name == "kafka" else "search"] = record.pid
    return pids


def _unique(settings: Settings, tag: str) -> tuple[Settings, str]:
    run = f"bench-{tag}-{uuid.uuid4().hex[:8]}"
    return (
        settings.with_overrides(
            app_id=run,
            texts_topic=f"{run}.texts",
            predictions_topic=f"{run}.predictions",
            texts_dlq_topic=f"{run}.texts.dlq",
            predictions_dlq_topic=f"{run}.predictions.dlq",
            es_alias=run,
            web_port=free_port(),
        ),
        run,
    )


def run_worker_phases(
    settings: Settings,
    texts: list[str],
    rates: Sequence[float],
    latency_events: int,
    pids: dict[str, int],
) -> tuple[Drain, list[Latency], float]:
    from streams.topics import ensure_topics_sync

    s, run = _unique(settings, "inflow")
    ensure_topics_sync(s)
    asyncio.run(produce_backlog(s, s.texts_topic, texts, run))
    proc = start_worker(s, s.web_port, run)
    sampler = CpuSampler({**pids, "worker": proc.pid, "bench": os.getpid()}).start()
    try:
        wait_ready(s.web_port, proc, timeout_s=300)
        stamps = asyncio.run(collect(s, s.predictions_topic, len(texts), "drain", timeout_s=1800))
        drain = drain_figures("inflow", stamps, sampler, "worker")
        metrics = scrape(s.web_port)
        real = metrics.get("inflow_batch_real_tokens_total", 0.0)
        padded = metrics.get("inflow_batch_padded_tokens_total", 0.0)
        # The worker's index agent is still writing the drained predictions: let it finish,
        # so the first rate measures that rate, not the end of the drain.
        wait_indexed(s, len(texts), timeout_s=300)
        latencies = []
        for fraction in rates:
            rate = fraction * drain.events_per_s
            count = max(20, min(latency_events, int(rate * 20)))
            before = scrape(s.web_port)
            began = time.time()
            tag = f"{run}-r{fraction}"
            sent = asyncio.run(offer_load(s, s.texts_topic, texts[:count], rate, tag))
            got = asyncio.run(
                collect_keys(s, s.predictions_topic, set(sent), f"latency {fraction:.0%}")
            )
            after = scrape(s.web_port)
            ended = time.time()
            cores = {
                name: round(sampler.used(name, began, ended) / max(ended - began, 1e-3), 2)
                for name in ("worker", "kafka", "search", "bench")
            }
            lat = [got[k] - sent[k] for k in sent]
            median_batch = histogram_quantile(before, after, "inflow_batch_infer_ms")
            latencies.append(
                Latency(
                    fraction,
                    rate,
                    count,
                    percentile(lat, 0.5),
                    percentile(lat, 0.95),
                    percentile(lat, 0.99),
                    median_batch,
                    s.max_wait_ms + 3 * median_batch,
                    os.getloadavg()[0],
                    histogram_quantile(before, after, "inflow_queue_ms", 0.99),
                    histogram_quantile(before, after, "inflow_batch_infer_ms", 0.99),
                    1000
                    * histogram_quantile(
                        before, after, "inflow_produced_to_published_seconds", 0.99
                    ),
                    cores,
                )
            )
    finally:
        stop_process(proc)
        sampler.stop()
    return drain, latencies, _ratio(padded, real)


def wait_indexed(settings: Settings, expected: int, timeout_s: float) -> None:
    """Until the search server counts `expected` documents behind the bench's alias (or the
    timeout passes, or the count cannot be read: then the bench goes on)."""
    url = f"{settings.es_url.rstrip('/')}/{settings.es_alias}/_count"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if int(json.loads(response.read())["count"]) >= expected:
                    return
        except (OSError, ValueError, KeyError):
            return
        time.sleep(0.5)


async def collect_keys(
    settings: Settings, topic: str, keys: set[bytes], desc: str
) -> dict[bytes, int]:
    """Record timestamps (ms) of the predictions for `keys` (the topic holds older ones too)."""
    from aiokafka import AIOKafkaConsumer

    from streams.kafka import client_options

    consumer = AIOKafkaConsumer(
        topic,
        **client_options(settings),
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_wait_ms=50,
    )
    await consumer.start()
    got: dict[bytes, int] = {}
    bar = progress(len(keys), desc)
    deadline = time.monotonic() + 600
    try:
        while len(got) < len(keys) and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200, max_records=5000)
            for records in batches.values():
                for record in records:
                    if record.key in keys and record.key not in got:
                        got[record.key] = record.timestamp
                        bar.update(1)
    finally:
        bar.close()
        await consumer.stop()
    if len(got) < len(keys):
        raise RuntimeError(f"{desc}: {len(got)} of {len(keys)} predictions arrived")
    return got


def start_worker(
    settings: Settings,
    port: int,
    log_name: str,
    *,
    env: Mapping[str, str] | None = None,
    cores: frozenset[int] | None = None,
) -> subprocess.Popen[bytes]:
    """An `inflow worker` process on `settings`' topics, alias and engine, serving `port`,
    logging to `<tmp>/<log_name>.log`. With `cores`, it is pinned to them before exec, so its
    engine sizes itself to those cores."""
    full = {
        **os.environ,
        **{f"INFLOW_{k.upper()}": str(v) for k, v in _env_fields(settings).items()},
        "INFLOW_WEB_PORT": str(port),
        **(env or {}),
    }

    def place() -> None:
        if cores is not None:
            os.sched_setaffinity(0, cores)

    log = Path(tempfile.gettempdir()) / f"{log_name}.log"
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "streams.cli.main", "worker", "--web-port", str(port)],
            env=full,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=None if cores is None else place,
        )


def _env_fields(s: Settings) -> dict[str, Any]:
    names = [
        "kafka_bootstrap",
        "es_url",
        "engine_dir",
        "app_id",
        "texts_topic",
        "predictions_topic",
        "texts_dlq_topic",
        "predictions_dlq_topic",
        "es_alias",
        "web_port",
        "state_dir",
    ]
    return {name: getattr(s, name) for name in names}


def run_baseline(settings: Settings, mode: str, texts: list[str], pids: dict[str, int]) -> Drain:
    s, run = _unique(settings, mode)
    asyncio.run(create_topics(s, [s.texts_topic, s.predictions_topic], s.topic_partitions))
    asyncio.run(produce_backlog(s, s.texts_topic, texts, run))
    datadir = Path(tempfile.mkdtemp(prefix=f"{run}-"))
    log = datadir / "baseline.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "streams.cli.baselines",
                mode,
                s.require_kafka(),
                s.texts_topic,
                s.predictions_topic,
                run,
                str(datadir),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    sampler = CpuSampler({**pids, "baseline": proc.pid}).start()
    try:
        stamps = asyncio.run(
            collect(s, s.predictions_topic, len(texts), f"baseline {mode}", timeout_s=1800)
        )
        return drain_figures(f"torch fp32 {mode}", stamps, sampler, "baseline")
    finally:
        stop_process(proc)
        sampler.stop()


def fill_ratios(r: Report) -> None:
    if r.engine_only and r.drain:
        r.ratios["drain / engine-only texts/s"] = _ratio(
            r.drain.events_per_s, r.engine_only.texts_per_s
        )
        r.ratios["worker CPU per event / engine CPU per text"] = _ratio(
            r.drain.cpu_s_per_event, r.engine_only.cpu_s_per_text
        )
    if r.engine_by_length and r.drain:
        r.ratios["drain / engine-only by length texts/s"] = _ratio(
            r.drain.events_per_s, r.engine_by_length.texts_per_s
        )
    for b in r.baselines:
        if r.drain:
            r.ratios[f"inflow / {b.name} events/s"] = _ratio(r.drain.events_per_s, b.events_per_s)
        if r.engine_by_length:
            # What no worker on this machine can beat: the engine alone, with the cores to itself.
            r.ratios[f"engine by length / {b.name} (ceiling)"] = _ratio(
                r.engine_by_length.texts_per_s, b.events_per_s
            )
    if r.padding.get("length_aware"):
        r.ratios["padding fifo / length-aware"] = _ratio(
            r.padding["fifo"], r.padding["length_aware"]
        )
    for lat in r.latency:
        r.ratios[f"p99 / bound at {lat.fraction:.0%}"] = _ratio(lat.p99_ms, lat.bound_ms)


def format_report(r: Report) -> str:
    lines = [
        f"cpu: {r.cpu['model']}, {r.cpu['cpus']} CPUs, flags {r.cpu['flags']}",
        f"engine {r.engine['version']}; policy {r.policy}",
    ]
    for e, order in ((r.engine_only, "in arrival order"), (r.engine_by_length, "by length")):
        if e is None:
            continue
        lines.append(
            f"engine only     {e.texts_per_s:8.1f} texts/s  "
            f"{e.cpu_s_per_text * 1000:6.2f} ms CPU/text"
            f"  (batches of {e.batch_size} {order}, median {e.median_batch_ms:.1f} ms)"
        )
    for d in [r.drain, *r.baselines]:
        if d is None:
            continue
        lines.append(
            f"{d.name:<15} {d.events_per_s:8.1f} events/s "
            f"{d.cpu_s_per_event * 1000:6.2f} ms CPU/event  kafka {d.kafka_cores:.2f} cores, "
            f"search {d.search_cores:.2f} cores ({d.events} events, load {d.load_average:.1f})"
        )
    if r.padding:
        lines.append(
            "padded tokens per real token: "
            + ", ".join(f"{k} {v:.3f}" for k, v in r.padding.items())
        )
    if r.latency:
        lines.append(
            f"{'load':>5} {'events/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
            f"{'bound ms':>9} {'machine load':>13}   worker p99 ms: {'queue':>6} {'batch':>6} "
            f"{'record->acked':>13}"
        )
        for lat in r.latency:
            lines.append(
                f"{lat.fraction:>5.0%} {lat.offered_per_s:>9.1f} {lat.p50_ms:>8.0f} "
                f"{lat.p95_ms:>8.0f} {lat.p99_ms:>8.0f} {lat.bound_ms:>9.0f} "
                f"{lat.load_average:>13.1f}   {'':>14}{lat.queue_p99_ms:>6.0f} "
                f"{lat.batch_p99_ms:>6.0f} {lat.worker_p99_ms:>13.0f}   cores: "
                + ", ".join(f"{name} {used:.2f}" for name, used in lat.cores.items())
            )
    lines.append("ratios:")
    lines += [f"  {name}: {value:.2f}" for name, value in r.ratios.items()]
    lines.append(f"other load after: {r.other_load_after}")
    return "\n".join(lines)


def chart(r: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = [lat.offered_per_s for lat in r.latency]
    for attr, label in (("p50_ms", "p50"), ("p95_ms", "p95"), ("p99_ms", "p99")):
        ax.plot(x, [getattr(lat, attr) for lat in r.latency], marker="o", label=label)
    ax.plot(
        x, [lat.bound_ms for lat in r.latency], linestyle="--", label="max wait + 3 x median batch"
    )
    ax.set_xlabel("offered load (events/s)")
    ax.set_ylabel("produce -> prediction latency (ms)")
    ax.set_title(f"inflow worker, {r.engine['version']}\n{r.cpu['model']}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
