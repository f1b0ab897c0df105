"""WorkerHealth: what /health/ready and /health/live decide from conditions and lag samples."""

from __future__ import annotations

from streams.ops.health import WorkerHealth
from streams.ops.lag import LagSample, LagTracker

TP = ("inflow.texts", 0)


def _health(samples: list[LagSample | None], assigned: set[object] | None = None) -> WorkerHealth:
    return WorkerHealth(
        assignment=lambda: assigned if assigned is not None else {TP},
        lag=lambda: samples[-1] if samples else None,
        stall_after_s=60,
    )


def _all_met(health: WorkerHealth) -> None:
    for name in ("engine", "elasticsearch", "agents"):
        health.set(name, None)


def test_not_ready_until_every_condition_is_met_and_reasons_are_given() -> None:
    health = _health([])
    report = health.ready()
    assert report.status == 503
    assert "no engine loaded yet" in str(report.body()["reason"])
    _all_met(health)
    assert health.ready().status == 200
    health.set("elasticsearch", "Elasticsearch unreachable: ConnectionError")
    report = health.ready()
    assert report.status == 503
    assert report.checks["elasticsearch"] == "Elasticsearch unreachable: ConnectionError"
    assert report.checks["engine"] == "ok"


def test_not_ready_without_partitions_or_before_the_consumer_exists() -> None:
    health = _health([], assigned=set())
    _all_met(health)
    report = health.ready()
    assert report.status == 503 and "no partitions assigned" in report.checks["partitions"]

    def not_started() -> set[object]:
        raise RuntimeError("consumer not started")

    health = WorkerHealth(assignment=not_started, lag=lambda: None, stall_after_s=60)
    _all_met(health)
    assert "consumer not started" in health.ready().checks["partitions"]


def test_live_fails_only_when_lag_stands_still_past_the_limit() -> None:
    tracker = LagTracker()
    samples: list[LagSample | None] = []
    health = _health(samples)
    _all_met(health)
    assert health.live().status == 200, "no sample yet is not a stall"
    samples.append(tracker.update(0.0, {TP: 100}, {TP: 40}))
    assert health.live().status == 200
    samples.append(tracker.update(59.0, {TP: 120}, {TP: 40}))
    assert health.live().status == 200, "within the limit"
    samples.append(tracker.update(61.0, {TP: 130}, {TP: 40}))
    report = health.live()
    assert report.status == 503
    assert "inflow.texts[0] lag 90" in report.checks["consumer"]
    samples.append(tracker.update(62.0, {TP: 130}, {TP: 41}))
    assert health.live().status == 200, "one committed record is progress"
    samples.append(tracker.update(200.0, {TP: 41}, {TP: 41}))
    assert health.live().status == 200, "caught up: lag 0 never stalls"


def test_a_stall_that_readiness_explains_is_not_a_liveness_failure() -> None:
    tracker = LagTracker()
    samples = [tracker.update(0.0, {TP: 10}, {TP: 0})]
    samples.append(tracker.update(500.0, {TP: 10}, {TP: 0}))
    health = _health(samples)
    _all_met(health)
    assert health.live().status == 503
    health.set("elasticsearch", "Elasticsearch unreachable")
    assert health.live().status == 200, "restarting would not bring Elasticsearch back"
    health.set("elasticsearch", None)
    health.set("engine", "no active engine")
    assert health.live().status == 200


def test_an_idle_exactly_once_worker_stays_live_but_a_stall_behind_markers_does_not() -> None:
    # The index group committed last data + 1 on each predictions partition; the commit marker
    # after it keeps the log end one further, for good once traffic stops.
    preds = [("inflow.predictions", p) for p in range(2)]
    tracker = LagTracker()
    samples: list[LagSample | None] = []
    health = _health(samples)
    _all_met(health)
    ends, committed = {p: 41 for p in preds}, {p: 40 for p in preds}
    for key, gap in tracker.to_probe(ends, committed).items():
        tracker.record_probe(key, gap, markers_only=True)
    for now in (0.0, 100.0, 200.0):
        samples.append(tracker.update(now, ends, committed))
        assert health.live().status == 200, health.live().checks

    # Traffic again, and the index stage stops committing: real records behind the marker.
    ends = {p: 60 for p in preds}
    for key, gap in tracker.to_probe(ends, committed).items():
        tracker.record_probe(key, gap, markers_only=False)
    samples.append(tracker.update(250.0, ends, committed))
    assert health.live().status == 200, "within the limit"
    samples.append(tracker.update(400.0, ends, committed))
    report = health.live()
    assert report.status == 503
    assert "inflow.predictions[0] lag 20" in report.checks["consumer"], report.checks
