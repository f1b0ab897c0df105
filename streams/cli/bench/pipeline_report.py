"""The pipeline bench's report: its rows, the ratios between them, the table and the chart."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from streams.cli.bench.engine_only import EngineOnly


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


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def fill_ratios(r: Report) -> None:
    if r.engine_only and r.drain:
        r.ratios["drain / engine-only texts/s"] = ratio(
            r.drain.events_per_s, r.engine_only.texts_per_s
        )
        r.ratios["worker CPU per event / engine CPU per text"] = ratio(
            r.drain.cpu_s_per_event, r.engine_only.cpu_s_per_text
        )
    if r.engine_by_length and r.drain:
        r.ratios["drain / engine-only by length texts/s"] = ratio(
            r.drain.events_per_s, r.engine_by_length.texts_per_s
        )
    for b in r.baselines:
        if r.drain:
            r.ratios[f"inflow / {b.name} events/s"] = ratio(r.drain.events_per_s, b.events_per_s)
        if r.engine_by_length:
            # What no worker on this machine can beat: the engine alone, with the cores to itself.
            r.ratios[f"engine by length / {b.name} (ceiling)"] = ratio(
                r.engine_by_length.texts_per_s, b.events_per_s
            )
    if r.padding.get("length_aware"):
        r.ratios["padding fifo / length-aware"] = ratio(
            r.padding["fifo"], r.padding["length_aware"]
        )
    for lat in r.latency:
        r.ratios[f"p99 / bound at {lat.fraction:.0%}"] = ratio(lat.p99_ms, lat.bound_ms)


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
