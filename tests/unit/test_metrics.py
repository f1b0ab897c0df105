"""Metrics: one registry per app, escaped labels, lag and engine read at scrape time."""

from __future__ import annotations

import math
import time

from prometheus_client.parser import text_string_to_metric_families

from engines.types import ModelIdentity
from streams.ops.lag import DrainRate, LagSample, LagTracker
from streams.ops.metrics import Metrics


def _samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse the exposition as Prometheus would: (name, sorted labels) -> value."""
    text = metrics.render().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_each_app_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()  # would raise "Duplicated timeseries" if shared
    first.events_in.inc(3)
    assert first.total("inflow_events_consumed_total") == 3
    assert second.total("inflow_events_consumed_total") == 0


def test_label_values_are_escaped() -> None:
    metrics = Metrics()
    label = 'say "hi"\\ back\nnow'
    metrics.predictions.labels(label=label).inc(2)
    assert _samples(metrics)[("inflow_predictions_total", (("label", label),))] == 2


def test_every_dead_letter_code_is_exposed_from_the_start() -> None:
    samples = _samples(Metrics())
    assert samples[("inflow_dead_letters_total", (("code", "invalid_json"),))] == 0
    assert samples[("inflow_dead_letters_total", (("code", "index_rejected"),))] == 0


class _Latest:
    lag: LagSample | None = None
    engine: ModelIdentity | None = None


def test_lag_and_engine_are_read_at_scrape_time() -> None:
    metrics = Metrics()
    tracker = LagTracker()
    latest = _Latest()
    metrics.watch_lag(lambda: latest.lag, max_age_s=60)
    metrics.watch_engine(lambda: latest.engine)
    ends, committed = {("t", 0): 9, ("t", 1): 4}, {("t", 0): 2, ("t", 1): 4}
    latest.lag = tracker.update(time.monotonic(), ends, committed)
    samples = _samples(metrics)
    assert samples[("inflow_consumer_lag", (("partition", "0"), ("topic", "t")))] == 7
    assert samples[("inflow_consumer_lag", (("partition", "1"), ("topic", "t")))] == 0
    assert not [k for k in samples if k[0] == "inflow_engine_info"]  # nothing loaded yet

    latest.engine = ModelIdentity("minilm", "v2-onnxruntime-int8-ab", "onnxruntime", "int8")
    latest.lag = tracker.update(time.monotonic(), {("t", 1): 6}, {("t", 1): 4})  # t/0 revoked
    samples = _samples(metrics)
    info = {"model": "minilm", "version": "v2-onnxruntime-int8-ab"}
    info |= {"backend": "onnxruntime", "precision": "int8"}
    assert samples[("inflow_engine_info", tuple(sorted(info.items())))] == 1
    lag = {k: v for k, v in samples.items() if k[0] == "inflow_consumer_lag"}
    assert lag == {("inflow_consumer_lag", (("partition", "1"), ("topic", "t"))): 2}


def test_an_old_lag_sample_is_not_shown_as_current() -> None:
    metrics = Metrics()
    old = LagTracker().update(time.monotonic() - 120, {("t", 0): 9}, {("t", 0): 2})
    metrics.watch_lag(lambda: old, max_age_s=30)
    assert not [k for k in _samples(metrics) if k[0] == "inflow_consumer_lag"]


def test_end_to_end_latency_is_never_negative() -> None:
    metrics = Metrics()
    now = 1_700_000_000.0
    metrics.observe_published(event_ts_ms=int((now + 5) * 1000), record_ts_s=now - 2, now_s=now)
    metrics.observe_published(event_ts_ms=None, record_ts_s=None, now_s=now)  # nothing known
    sample = metrics.registry.get_sample_value
    assert sample("inflow_event_to_published_seconds_count") == 1
    assert sample("inflow_event_to_published_seconds_sum") == 0  # producer clock ahead: 0
    assert sample("inflow_produced_to_published_seconds_sum") == 2


def test_ready_gauge_and_bulk_observer() -> None:
    metrics = Metrics()
    assert metrics.registry.get_sample_value("inflow_ready") == 0
    metrics.set_ready(True)
    metrics.on_bulk_request(0.2)
    metrics.on_bulk_retry(pending=3)
    sample = metrics.registry.get_sample_value
    assert sample("inflow_ready") == 1
    assert sample("inflow_es_bulk_seconds_bucket", {"le": "0.25"}) == 1
    assert sample("inflow_es_bulk_retries_total") == 1


def test_bench_reads_quantiles_from_two_scrapes_of_a_histogram() -> None:
    """`inflow bench pipeline` takes a phase's quantiles from the worker's histograms: the
    counts between two scrapes, linear inside the bucket that holds the quantile."""
    from streams.cli.bench.metrics import histogram_quantile

    before = {'x_bucket{le="10"}': 5.0, 'x_bucket{le="100"}': 5.0, 'x_bucket{le="+Inf"}': 5.0}
    # 100 observations in the phase: 50 below 10 ms, 48 in (10, 100], 2 above 100
    after = {'x_bucket{le="10"}': 55.0, 'x_bucket{le="100"}': 103.0, 'x_bucket{le="+Inf"}': 105.0}
    assert histogram_quantile(before, after, "x") == 10.0
    assert histogram_quantile(before, after, "x", 0.25) == 5.0
    assert abs(histogram_quantile(before, after, "x", 0.97) - (10 + 90 * 47 / 48)) < 1e-9
    assert histogram_quantile(before, after, "x", 0.99) == 100.0  # the +Inf bucket: its floor
    assert math.isnan(histogram_quantile(after, after, "x"))  # nothing observed


def test_backlog_seconds_are_lag_over_the_rate_drained_while_busy() -> None:
    metrics, tracker, drain = Metrics(), LagTracker(), DrainRate(window_s=60)
    latest = _Latest()
    metrics.watch_lag(lambda: latest.lag, max_age_s=600, drain_rate=drain.per_second)

    def sample(
        at: float, ends: dict[tuple[str, int], int], done: dict[tuple[str, int], int]
    ) -> None:
        latest.lag = tracker.update(at, ends, done)
        drain.observe(latest.lag)

    def backlog() -> dict[int, float]:
        found = _samples(metrics)
        return {
            int(dict(k[1])["partition"]): v
            for k, v in found.items()
            if k[0] == "inflow_backlog_seconds"
        }

    now = time.monotonic()
    sample(now - 20, {("t", 0): 1000, ("t", 1): 5}, {("t", 0): 0, ("t", 1): 5})
    assert backlog() == {1: 0.0}  # caught up: 0; lagging but no rate measured yet: absent
    # 10 s later: 400 records drained on the busy partition (40/s); t/1 got and drained 50
    # new records while caught up, which says nothing about capacity.
    sample(now - 10, {("t", 0): 1000, ("t", 1): 55}, {("t", 0): 400, ("t", 1): 55})
    assert drain.per_second() == 40
    assert backlog() == {0: 600 / 40, 1: 0.0}
    # Another 10 s at 60/s: the window's rate is (400 + 600) / 20 s.
    sample(now, {("t", 0): 1600, ("t", 1): 55}, {("t", 0): 1000, ("t", 1): 55})
    assert drain.per_second() == 50
    assert backlog() == {0: 600 / 50, 1: 0.0}
    # Busy intervals older than the window drop out.
    sample(now + 70, {("t", 0): 1600, ("t", 1): 55}, {("t", 0): 1600, ("t", 1): 55})
    assert drain.per_second() == 600 / 70
    assert backlog() == {0: 0.0, 1: 0.0}


def test_a_stalled_worker_exports_no_backlog_guess() -> None:
    drain, tracker = DrainRate(), LagTracker()
    for at in (0.0, 5.0, 10.0):
        drain.observe(tracker.update(at, {("t", 0): 100}, {("t", 0): 10}))
    assert drain.per_second() is None
