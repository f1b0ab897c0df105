"""Counters and histograms, exposed in the Prometheus text format at GET /metrics."""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field

LATENCY_BUCKETS_MS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class Counter:
    name: str
    help: str
    label: str = ""
    values: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = labels.get(self.label, "") if self.label else ""
        with self._lock:
            self.values[key] = self.values.get(key, 0.0) + amount

    @property
    def total(self) -> float:
        return sum(self.values.values())

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        if not self.values:
            lines.append(f"{self.name} 0")
        for key, value in sorted(self.values.items()):
            labels = f'{{{self.label}="{key}"}}' if self.label else ""
            lines.append(f"{self.name}{labels} {value:g}")
        return lines


@dataclass
class Histogram:
    name: str
    help: str
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        running = 0
        for bound, n in zip(self.buckets, self.counts, strict=False):
            running += n
            lines.append(f'{self.name}_bucket{{le="{bound:g}"}} {running}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
        lines.append(f"{self.name}_sum {self.total:g}")
        lines.append(f"{self.name}_count {self.count}")
        return lines


@dataclass
class Metrics:
    events_in: Counter = field(
        default_factory=lambda: Counter("inflow_events_consumed_total", "Input records taken")
    )
    predictions: Counter = field(
        default_factory=lambda: Counter(
            "inflow_predictions_total", "Predictions published", "label"
        )
    )
    dead_letters: Counter = field(
        default_factory=lambda: Counter(
            "inflow_dead_letters_total", "Records dead-lettered", "code"
        )
    )
    publish_retries: Counter = field(
        default_factory=lambda: Counter("inflow_publish_retries_total", "Publish retries")
    )
    indexed: Counter = field(
        default_factory=lambda: Counter("inflow_documents_indexed_total", "Documents indexed")
    )
    index_rejected: Counter = field(
        default_factory=lambda: Counter(
            "inflow_documents_rejected_total", "Documents rejected by the index for good"
        )
    )
    engine_swaps: Counter = field(
        default_factory=lambda: Counter("inflow_engine_swaps_total", "Engine versions activated")
    )
    queue_ms: Histogram = field(
        default_factory=lambda: Histogram(
            "inflow_queue_ms", "Time from batch queue to inference start", LATENCY_BUCKETS_MS
        )
    )
    infer_ms: Histogram = field(
        default_factory=lambda: Histogram(
            "inflow_batch_infer_ms", "Engine time of the batch", LATENCY_BUCKETS_MS
        )
    )
    batch_size: Histogram = field(
        default_factory=lambda: Histogram("inflow_batch_size", "Texts per batch", BATCH_BUCKETS)
    )

    def observe_batch(self, size: int, infer_ms: float) -> None:
        self.batch_size.observe(size)
        self.infer_ms.observe(infer_ms)

    def render(self) -> str:
        lines: list[str] = []
        for metric in vars(self).values():
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"
