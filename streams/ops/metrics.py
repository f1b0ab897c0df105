"""The worker's Prometheus metrics (prometheus_client), in one registry per app, served at /metrics.

One `CollectorRegistry` per `Metrics` (never the process-global one), so tests can build
several apps in one process. Names, types and labels are listed in `README.md` and used by
`deploy/grafana/inflow-dashboard.json` and `deploy/prometheus/alerts.yml`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from engines.types import ModelIdentity
from schemas import ErrorCode
from streams.delivery.batcher import BatchCost
from streams.delivery.latency import LatencyTarget
from streams.ops.drift import DriftCollector, DriftWatch
from streams.ops.lag import LagSample

# No `*_created` series beside every counter and histogram: nothing here reads them.
disable_created_metrics()

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

LATENCY_BUCKETS_MS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# End to end: from milliseconds on an idle worker to minutes behind a backlog.
E2E_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# The worker's own latency, fine enough to read a p99 against a target of tens of ms.
TAKEN_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06, 0.075,
    0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 10, 30,
)  # fmt: skip
# Shadow and canary comparisons (streams.rollout.canary).
SCORE_DELTA_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
COSINE_BUCKETS = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9999, 1.0)
BULK_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _LagCollector(Collector):
    """Consumer lag and idle time per assigned partition, from the latest lag sample.

    Read at scrape time, so partitions this worker lost disappear with the next sample; a
    sample older than `max_age_s` (the broker stopped answering) is not shown as current.
    """

    def __init__(
        self,
        latest: Callable[[], LagSample | None],
        max_age_s: float,
        drain_rate: Callable[[], float | None],
    ) -> None:
        self._latest = latest
        self._max_age_s = max_age_s
        self._drain_rate = drain_rate

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        sample = self._latest()
        backlog, lag, idle = self._families()
        rate = self._drain_rate()
        if sample is not None and time.monotonic() - sample.taken_at <= self._max_age_s:
            for p in sorted(sample.partitions.values(), key=lambda p: (p.topic, p.partition)):
                labels = [p.topic, str(p.partition)]
                lag.add_metric(labels, p.lag)
                idle.add_metric(labels, p.idle_s)
                if p.lag == 0:
                    backlog.add_metric(labels, 0.0)
                elif rate is not None:  # else unknown (absent): no drain measured yet, or stalled
                    backlog.add_metric(labels, p.lag / rate)
        yield lag
        yield idle
        yield backlog

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        labels = ["topic", "partition"]
        return (
            GaugeMetricFamily(
                "inflow_backlog_seconds",
                "Seconds this worker needs to drain the partition's lag at its recently "
                "measured drain rate (records/s while busy); summed over partitions: the "
                "worker's backlog",
                labels=labels,
            ),
            GaugeMetricFamily(
                "inflow_consumer_lag",
                "Records not yet processed: log-end offset minus the group's committed offset",
                labels=labels,
            ),
            GaugeMetricFamily(
                "inflow_consumer_stalled_seconds",
                "Seconds since a lagging partition last advanced (0 when caught up)",
                labels=labels,
            ),
        )


class _LatencyTargetCollector(Collector):
    """The latency target's state (streams.delivery.latency), read at scrape time."""

    def __init__(self, target: LatencyTarget) -> None:
        self._target = target

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        t = self._target
        target, p99, size, tokens, hold, overloaded = self._families()
        target.add_metric([], t.target_ms / 1000)
        if t.measured_p99_ms is not None:
            p99.add_metric([], t.measured_p99_ms / 1000)
        size.add_metric([], t.chosen.max_batch_size)
        tokens.add_metric([], t.chosen.max_batch_tokens)
        hold.add_metric([], t.chosen.hold_ms / 1000)
        overloaded.add_metric([], 1.0 if t.overloaded else 0.0)
        yield from (target, p99, size, tokens, hold, overloaded)

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily(
                "inflow_latency_target_seconds",
                "INFLOW_LATENCY_TARGET_MS: the p99 of taken -> acknowledged the batcher holds",
            ),
            GaugeMetricFamily(
                "inflow_latency_p99_seconds",
                "The p99 of taken -> acknowledged the batcher measured over the last 30 s",
            ),
            GaugeMetricFamily(
                "inflow_batch_size_chosen", "The batch size limit the latency target chose"
            ),
            GaugeMetricFamily(
                "inflow_batch_tokens_chosen",
                "The padded-token limit per batch the latency target chose",
            ),
            GaugeMetricFamily(
                "inflow_batch_hold_seconds",
                "How long an idle engine waits for company, as the latency target chose",
            ),
            GaugeMetricFamily(
                "inflow_batch_overloaded",
                "1 while the queue holds more work than the target allows: batches at the bounds",
            ),
        )


class _EngineCollector(Collector):
    """`inflow_engine_info{model,version,backend,precision} 1` for the engine serving now, read
    at scrape time, so a swap shows at the next scrape (nothing while no engine is loaded)."""

    def __init__(self, identity: Callable[[], ModelIdentity | None]) -> None:
        self._identity = identity

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        identity = self._identity()
        if identity is not None:
            family.add_metric(
                [],
                {
                    "model": identity.name,
                    "version": identity.version,
                    "backend": identity.backend,
                    "precision": identity.precision,
                },
            )
        yield family

    @staticmethod
    def _family() -> InfoMetricFamily:
        return InfoMetricFamily("inflow_engine", "The engine serving now")


class Metrics:
    """Every metric of one worker, registered in `self.registry`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        counter, gauge, histogram = self._counter, self._gauge, self._histogram
        self.events_in = counter("inflow_events_consumed", "Input records taken")
        self.predictions = counter("inflow_predictions", "Predictions published", ["label"])
        self.dead_letters = counter("inflow_dead_letters", "Records dead-lettered", ["code"])
        for code in ErrorCode:  # every code present from the start, at 0
            self.dead_letters.labels(code=code.value)
        self.publish_retries = counter("inflow_publish_retries", "Publish retries")
        self.indexed = counter("inflow_documents_indexed", "Documents indexed")
        self.index_rejected = counter(
            "inflow_documents_rejected", "Documents rejected by the index for good"
        )
        self.engine_swaps = counter("inflow_engine_swaps", "Engine versions activated")
        self.engine_swap_failures = counter(
            "inflow_engine_swap_failures",
            "Engine versions that failed to load; the previous one keeps serving",
        )
        self.queue_ms = histogram(
            "inflow_queue_ms", "Time from batch queue to inference start (ms)", LATENCY_BUCKETS_MS
        )
        self.infer_ms = histogram(
            "inflow_batch_infer_ms", "Engine time of the batch (ms)", LATENCY_BUCKETS_MS
        )
        self.batch_size = histogram("inflow_batch_size", "Texts per batch", BATCH_BUCKETS)
        # Padding waste = rate(padded) / rate(real): padded tokens per real token (1 = none).
        self.batch_real_tokens = counter(
            "inflow_batch_real_tokens", "Tokens of the texts the engine ran"
        )
        self.batch_padded_tokens = counter(
            "inflow_batch_padded_tokens",
            "Token positions the engine computed, padding included (longest text x texts)",
        )
        self.event_to_published = histogram(
            "inflow_event_to_published_seconds",
            "From the event's own time (its ts field) to its prediction acknowledged by Kafka",
            E2E_BUCKETS_S,
        )
        self.produced_to_published = histogram(
            "inflow_produced_to_published_seconds",
            "From the input record's Kafka timestamp to its prediction acknowledged by Kafka",
            E2E_BUCKETS_S,
        )
        self.taken_to_acked = histogram(
            "inflow_taken_to_acked_seconds",
            "From the worker taking a record to its prediction acknowledged by the broker: "
            "the latency INFLOW_LATENCY_TARGET_MS holds at p99",
            TAKEN_BUCKETS_S,
        )
        self.es_bulk_seconds = histogram(
            "inflow_es_bulk_seconds",
            "Duration of one Elasticsearch bulk request (successful or not)",
            BULK_BUCKETS_S,
        )
        self.es_bulk_retries = counter(
            "inflow_es_bulk_retries",
            "Bulk rounds retried after a failed request or retriable item errors",
        )
        self.similar_rejected = counter(
            "inflow_similar_rejected",
            "/similar requests refused with 429: every engine slot for searches was taken",
        )
        self.ready = gauge("inflow_ready", "1 when the worker is ready to serve, else 0")
        self.drift: DriftWatch | None = None
        self._rollout_metrics()

    def _rollout_metrics(self) -> None:
        """A candidate served beside the active engine (streams.rollout.canary), labelled by its
        version. Live agreement over a window: rate(agreed) / rate(compared)."""
        counter, gauge, histogram = self._counter, self._gauge, self._histogram
        c = ["candidate"]
        self.rollout_share = gauge(
            "inflow_rollout_share",
            "Share of keys routed to the candidate (absent without a rollout)",
            ["mode", "candidate"],
        )
        self.rollout_routed = counter(
            "inflow_rollout_routed",
            "Events of the candidate's share of keys",
            ["mode", "candidate"],
        )
        self.rollout_compared = counter(
            "inflow_rollout_compared", "Events both engines predicted", c
        )
        self.rollout_agreed = counter(
            "inflow_rollout_agreed", "Compared events given the same label", c
        )
        self.rollout_agreement = gauge(
            "inflow_rollout_agreement",
            "Label agreement of the candidate with the active engine since the rollout began",
            c,
        )
        self.rollout_skipped = counter(
            "inflow_rollout_skipped", "Routed events not compared (too many comparisons open)", c
        )
        self.rollout_score_delta = histogram(
            "inflow_rollout_score_delta",
            "Largest |probability difference| over the labels, candidate against active",
            SCORE_DELTA_BUCKETS,
            c,
        )
        self.rollout_cosine = histogram(
            "inflow_rollout_embedding_cosine",
            "Cosine between the candidate's and the active engine's embedding of one text",
            COSINE_BUCKETS,
            c,
        )
        self.rollout_latency_ms = histogram(
            "inflow_rollout_candidate_latency_ms",
            "From submit to the candidate's answer, queue included (ms)",
            LATENCY_BUCKETS_MS,
            c,
        )
        self.rollout_errors = counter(
            "inflow_rollout_candidate_errors", "Texts the candidate failed on", c
        )
        self.rollout_auto_rollbacks = counter(
            "inflow_rollout_auto_rollbacks",
            "Rollouts this worker ended because their rule was breached",
            ["candidate", "rule"],
        )

    # ---------------------------------------------------------------------- declarations

    def _counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
        return Counter(name, doc, labels, registry=self.registry)

    def _gauge(self, name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
        return Gauge(name, doc, labels, registry=self.registry)

    def _histogram(
        self, name: str, doc: str, buckets: Sequence[float], labels: Sequence[str] = ()
    ) -> Histogram:
        return Histogram(name, doc, labels, buckets=buckets, registry=self.registry)

    # ---------------------------------------------------------------------- updates

    def observe_batch(self, batch: BatchCost) -> None:
        self.batch_size.observe(batch.size)
        self.infer_ms.observe(batch.infer_ms)
        self.batch_real_tokens.inc(batch.real_tokens)
        self.batch_padded_tokens.inc(batch.padded_tokens)

    def observe_prediction(self, version: str, label: str | None, scores: dict[str, float]) -> None:
        """A prediction was published: count its label, and feed the drift watch."""
        self.predictions.labels(label=label).inc()
        if self.drift is not None:
            self.drift.observe(version, label, scores)

    def watch_latency_target(self, target: LatencyTarget) -> None:
        """Expose the target, the limits it chose and the p99 it measured, at every scrape."""
        self.registry.register(_LatencyTargetCollector(target))

    def watch_drift(self, watch: DriftWatch) -> None:
        """Expose `inflow_drift_psi` and the window sizes of `watch` at every scrape."""
        self.drift = watch
        self.registry.register(DriftCollector(watch))

    def observe_published(
        self, event_ts_ms: int | None, record_ts_s: float | None, now_s: float | None = None
    ) -> None:
        """A prediction was acknowledged: observe its end-to-end latencies (clamped at 0 for
        clock skew between producers and this worker)."""
        now = time.time() if now_s is None else now_s
        if event_ts_ms is not None:
            self.event_to_published.observe(max(0.0, now - event_ts_ms / 1000))
        if record_ts_s is not None and record_ts_s > 0:
            self.produced_to_published.observe(max(0.0, now - record_ts_s))

    def watch_engine(self, identity: Callable[[], ModelIdentity | None]) -> None:
        """Expose `inflow_engine_info` from `identity()` (`Batcher.identity`) at every scrape."""
        self.registry.register(_EngineCollector(identity))

    def set_ready(self, ready: bool) -> None:
        """For the health code: 1 while the worker is ready, 0 otherwise."""
        self.ready.set(1 if ready else 0)

    def watch_lag(
        self,
        latest: Callable[[], LagSample | None],
        max_age_s: float,
        drain_rate: Callable[[], float | None] = lambda: None,
    ) -> None:
        """Expose consumer lag from `latest()` (e.g. `ConsumerLag.last`) at every scrape, and
        backlog seconds from it and `drain_rate()` (`DrainRate.per_second`)."""
        self.registry.register(_LagCollector(latest, max_age_s, drain_rate))

    # indexer.BulkObserver: the bulk writer reports through these, knowing nothing of us.
    def on_bulk_request(self, seconds: float) -> None:
        self.es_bulk_seconds.observe(seconds)

    def on_bulk_retry(self, pending: int) -> None:
        self.es_bulk_retries.inc()

    # ---------------------------------------------------------------------- reading

    def render(self) -> bytes:
        """The Prometheus text exposition (content type `CONTENT_TYPE_LATEST`)."""
        return generate_latest(self.registry)

    def total(self, sample_name: str) -> float:
        """Sum of every sample called `sample_name` over all label values (tests, CLI)."""
        return sum(
            sample.value
            for family in self.registry.collect()
            for sample in family.samples
            if sample.name == sample_name
        )
