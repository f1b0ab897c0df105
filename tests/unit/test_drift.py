"""The drift watch without services: distributions, the index, the window, the metric."""

from __future__ import annotations

import math

import pytest

from engines.drift import CONFIDENCE_EDGES, Distribution, confidence_bucket, psi
from streams.ops.drift import DriftWatch
from streams.ops.metrics import Metrics

LABELS = ["negative", "neutral", "positive"]
BASELINE = Distribution.of_scores(
    LABELS, [[0.8, 0.1, 0.1]] * 40 + [[0.2, 0.7, 0.1]] * 40 + [[0.05, 0.1, 0.85]] * 20
)


def test_psi_is_zero_for_the_same_shares_and_grows_with_the_shift() -> None:
    assert psi([0.5, 0.5], [0.5, 0.5]) == 0.0
    small, large = psi([0.5, 0.5], [0.55, 0.45]), psi([0.5, 0.5], [0.9, 0.1])
    assert 0 < small < 0.1 < 0.25 < large
    assert math.isfinite(psi([1.0, 0.0], [0.0, 1.0]))  # empty bins are floored, not infinite
    with pytest.raises(ValueError):
        psi([1.0], [0.5, 0.5])


def test_confidence_buckets_cover_zero_to_one() -> None:
    assert confidence_bucket(0.0) == 0 and confidence_bucket(0.34) == 0
    assert confidence_bucket(0.55) == 1
    assert confidence_bucket(1.0) == len(CONFIDENCE_EDGES) - 2


def test_a_baseline_round_trips_and_old_buckets_are_refused() -> None:
    data = BASELINE.to_dict()
    assert Distribution.from_dict(data) == BASELINE and Distribution.is_current(data)
    assert data["labels"] == {"negative": 0.4, "neutral": 0.4, "positive": 0.2}
    stale = {**data, "confidence_edges": [0.0, 0.4, 1.0]}
    assert not Distribution.is_current(stale) and not Distribution.is_current(None)
    with pytest.raises(ValueError, match="record it again"):
        Distribution.from_dict(stale)


def test_predictions_with_an_unknown_label_count_against_the_baseline() -> None:
    live = Distribution.of_predictions(LABELS, [("spam", {"spam": 0.9})] * 10)
    assert live.labels == (*LABELS, "spam")
    assert BASELINE.psi_labels(live) > 1


def _watch(metrics: Metrics, min_samples: int = 10) -> DriftWatch:
    watch = DriftWatch(
        lambda v: BASELINE if v == "v1" else None, window=100, min_samples=min_samples
    )
    metrics.watch_drift(watch)
    return watch


def test_the_metric_stays_flat_for_the_baseline_population_and_moves_for_another() -> None:
    metrics = Metrics()
    _watch(metrics)
    scores = [{"negative": 0.8, "neutral": 0.1, "positive": 0.1}] * 40
    scores += [{"negative": 0.2, "neutral": 0.7, "positive": 0.1}] * 40
    scores += [{"negative": 0.05, "neutral": 0.1, "positive": 0.85}] * 20
    for s in scores:
        metrics.observe_prediction("v1", max(s, key=lambda k: s[k]), s)
    sample = metrics.registry.get_sample_value
    assert sample("inflow_drift_psi", {"version": "v1", "signal": "label"}) == pytest.approx(0)
    assert sample("inflow_drift_psi", {"version": "v1", "signal": "confidence"}) == pytest.approx(0)
    for _ in range(100):  # another domain: everything neutral and unsure
        metrics.observe_prediction(
            "v1", "neutral", {"negative": 0.3, "neutral": 0.4, "positive": 0.3}
        )
    assert (sample("inflow_drift_psi", {"version": "v1", "signal": "label"}) or 0) > 0.25
    assert (sample("inflow_drift_psi", {"version": "v1", "signal": "confidence"}) or 0) > 0.25
    assert sample("inflow_drift_window_predictions", {"version": "v1"}) == 100


def test_no_index_before_min_samples_without_a_baseline_or_for_an_embedder() -> None:
    metrics = Metrics()
    watch = _watch(metrics, min_samples=10)
    for _ in range(9):
        metrics.observe_prediction("v1", "neutral", {"neutral": 0.9})
        metrics.observe_prediction("v2", "neutral", {"neutral": 0.9})  # no baseline
        metrics.observe_prediction("v1", None, {})  # an embedder's prediction
    assert (
        metrics.registry.get_sample_value("inflow_drift_psi", {"version": "v1", "signal": "label"})
        is None
    )
    metrics.observe_prediction("v1", "neutral", {"neutral": 0.9})
    assert [r.version for r in watch.readings()] == ["v1"]
    assert watch.window_sizes() == {"v1": 10, "v2": 9}
