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
  5. baselines (`streams.cli.bench.baselines`): a per-event torch fp32 agent and a `take()`
     batching torch fp32 agent drain their own backlog of the same texts.
Prints a table of figures and ratios, writes JSON and a PNG chart (latency against offered
load). Figures are noisy on a shared machine: run it more than once and report the spread.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from streams.cli.bench.engine_only import measure_engine, padding_ratio
from streams.cli.bench.machine import CpuSampler, cpu_description, other_load
from streams.cli.bench.metrics import histogram_quantile, percentile, scrape
from streams.cli.bench.pipeline_report import (
    Drain,
    Latency,
    Report,
    chart,
    fill_ratios,
    format_report,
    ratio,
)
from streams.cli.bench.processes import (
    isolated_run,
    local_services,
    service_pids,
    start_worker,
    stop_process,
    wait_ready,
)
from streams.cli.bench.traffic import (
    collect,
    collect_keys,
    create_topics,
    offer_load,
    produce_backlog,
    wait_indexed,
)
from streams.config import Settings
from streams.delivery.batcher import BatchPolicy


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
    batching policy (streams.cli.bench.latency)."""
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
    from streams.cli.bench.latency import as_json, parse_policies, run_latency_study, summary

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


def run_worker_phases(
    settings: Settings,
    texts: list[str],
    rates: Sequence[float],
    latency_events: int,
    pids: dict[str, int],
) -> tuple[Drain, list[Latency], float]:
    from streams.topics import ensure_topics_sync

    s, run = isolated_run(settings, "inflow")
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
    return drain, latencies, ratio(padded, real)


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


def run_baseline(settings: Settings, mode: str, texts: list[str], pids: dict[str, int]) -> Drain:
    s, run = isolated_run(settings, mode)
    asyncio.run(create_topics(s, [s.texts_topic, s.predictions_topic], s.topic_partitions))
    asyncio.run(produce_backlog(s, s.texts_topic, texts, run))
    datadir = Path(tempfile.mkdtemp(prefix=f"{run}-"))
    log = datadir / "baseline.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "streams.cli.bench.baselines",
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
