"""`inflow bench scale`: one worker, then several in one consumer group, drain the same backlog;
the capacity formula of docs/capacity.md, fed by the one-worker run, predicts the others.

Each worker is pinned to its own core (worker i on core i mod cores; the engine sizes itself to
that one core), Kafka and the search server run unpinned on this machine. Per run: events/s
from the predictions' record timestamps, CPU seconds per event of the workers and of everything
else that shares the machine (Kafka, the search server and this bench's consumer of the
predictions; from /proc, over the drain). The formula (docs/capacity.md):

    events/s = min(workers x cores_per_worker / worker_cpu_per_event,
                   machine_cores / (worker_cpu_per_event + services_cpu_per_event))

i.e. the workers' own cores bound it, and so does the machine when the services share it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from streams.cli.bench.latency import ALL_CORES
from streams.cli.bench.machine import CpuSampler, cpu_description
from streams.cli.bench.processes import (
    isolated_run,
    service_pids,
    start_worker,
    stop_process,
    wait_ready,
)
from streams.cli.bench.traffic import collect, create_topics, produce_backlog
from streams.config import Settings
from streams.dev.process import free_port

SETTLE_S = 8.0  # after the last worker is ready: the group's last rebalance has ended


@dataclass
class ScaleRun:
    workers: int
    texts: str
    events: int
    events_per_s: float
    worker_cpu_ms_per_event: float  # all workers together
    services_cpu_ms_per_event: float  # Kafka, the search server and the bench's consumer
    predicted_per_s: float | None = None  # from the one-worker run, by the formula

    @property
    def error(self) -> float | None:
        if self.predicted_per_s is None:
            return None
        return self.predicted_per_s / self.events_per_s - 1


def predict(base: ScaleRun, workers: int, cores_per_worker: int, machine_cores: int) -> float:
    """The capacity formula, fed by a measured run (docs/capacity.md)."""
    worker_s = base.worker_cpu_ms_per_event / 1000
    services_s = base.services_cpu_ms_per_event / 1000
    own_cores = workers * cores_per_worker / worker_s
    machine = machine_cores / (worker_s + services_s)
    return min(own_cores, machine)


def texts_of(kind: str, n: int) -> list[str]:
    from engines.builder.data import review_examples, sample_texts

    if kind == "tweets":
        return sample_texts(n, seed=1)
    if kind == "reviews":
        reviews = [text for text, _ in review_examples(n, seed=3)]
        return (reviews * (n // max(1, len(reviews)) + 1))[:n]
    raise SystemExit(f"--texts must be tweets or reviews, got {kind!r}")


def run_workers(
    settings: Settings, texts: list[str], workers: int, kind: str, pids: dict[str, int]
) -> ScaleRun:
    s, tag = isolated_run(settings, f"scale{workers}")
    partitions = max(4, 2 * workers)
    asyncio.run(
        create_topics(
            s,
            [s.texts_topic, s.predictions_topic, s.texts_dlq_topic, s.predictions_dlq_topic],
            partitions,
        )
    )
    cores = sorted(ALL_CORES)
    procs: list[subprocess.Popen[bytes]] = []
    ports: list[int] = []
    for i in range(workers):
        ports.append(free_port())
        core = frozenset({cores[i % len(cores)]})
        procs.append(start_worker(s, ports[-1], f"{tag}-{i}", cores=core))
    names = {f"worker{i}": p.pid for i, p in enumerate(procs)}
    # The bench's own consumer of the predictions stands for the downstream consumers that share
    # this machine: its CPU per event counts with the services'.
    sampler = CpuSampler({**pids, **names, "bench": os.getpid()}).start()
    try:
        # Every worker in the group and the partitions shared out before the backlog arrives:
        # a rebalance inside the drain would count as slowness.
        for port, proc in zip(ports, procs, strict=True):
            wait_ready(port, proc, timeout_s=300)
        time.sleep(SETTLE_S)
        asyncio.run(produce_backlog(s, s.texts_topic, texts, tag))
        stamps = asyncio.run(
            collect(s, s.predictions_topic, len(texts), f"{workers} worker(s)", timeout_s=1800)
        )
    finally:
        for proc in procs:
            stop_process(proc)
        sampler.stop()
    times = sorted(stamps.values())
    start, end = times[0] / 1000, times[-1] / 1000
    events = len(times) - 1
    worker_cpu = sum(sampler.used(name, start, end) for name in names)
    services_cpu = sum(
        sampler.used(name, start, end) for name in ("kafka", "search") if name in pids
    )
    return ScaleRun(
        workers=workers,
        texts=kind,
        events=len(times),
        events_per_s=round(events / max(end - start, 1e-3), 1),
        worker_cpu_ms_per_event=round(1000 * worker_cpu / max(events, 1), 2),
        services_cpu_ms_per_event=round(1000 * services_cpu / max(events, 1), 2),
    )


def run_scale_bench(
    settings: Settings,
    *,
    n: int,
    workers: Sequence[int],
    kinds: Sequence[str],
    echo: Callable[[str], None] = print,
) -> list[ScaleRun]:
    pids = service_pids(settings)
    cpu = cpu_description()
    echo(f"cpu: {cpu['model']} ({cpu['cpus']} CPUs; {cpu['flags']})")
    results = []
    for kind in kinds:
        texts = texts_of(kind, n)
        base: ScaleRun | None = None
        for count in workers:
            run = run_workers(settings, texts, count, kind, pids)
            if base is None:
                base = run
            else:
                run.predicted_per_s = round(predict(base, count, 1, len(ALL_CORES)), 1)
            results.append(run)
            echo(format_run(run))
    return results


def format_run(r: ScaleRun) -> str:
    predicted = (
        f"predicted {r.predicted_per_s:7.1f}/s ({r.error:+.0%})"
        if r.predicted_per_s is not None and r.error is not None
        else "(the formula's input)"
    )
    return (
        f"{r.texts:<8} {r.workers} worker(s) {r.events_per_s:8.1f} events/s  worker CPU "
        f"{r.worker_cpu_ms_per_event:6.2f} ms/event, services {r.services_cpu_ms_per_event:5.2f}"
        f" ms/event  {predicted}"
    )


def as_json(results: Sequence[ScaleRun]) -> list[dict[str, object]]:
    return [{**asdict(r), "error": r.error} for r in results]
