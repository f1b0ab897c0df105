"""The drift watch: per engine version, what the worker predicted lately against what the engine
predicted on its evaluation split (the baseline its build recorded, `Manifest.baseline`).

Each published classification adds its label and top score to a window of the last `window`
predictions of its engine version. At every scrape, for each version with a baseline and at
least `min_samples` predictions in its window, the population-stability index of the window
against the baseline is exposed (`engines.drift`):

  inflow_drift_psi{version, signal="label"|"confidence"}   0: as at evaluation; > 0.25: shifted
  inflow_drift_window_predictions{version}                  predictions in the window

Live texts from another domain than the model's training data move both; texts like the
evaluation split keep them near 0 (tests/e2e/test_drift.py).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engines.drift import CONFIDENCE_EDGES, Distribution, confidence_bucket

log = logging.getLogger(__name__)

BaselineSource = Callable[[str], Distribution | None]


@dataclass(frozen=True, slots=True)
class DriftReading:
    version: str
    live: Distribution
    baseline: Distribution

    @property
    def psi_labels(self) -> float:
        return self.baseline.psi_labels(self.live)

    @property
    def psi_confidence(self) -> float:
        return self.baseline.psi_confidence(self.live)


class DriftWatch:
    """Windows of recent (label, confidence bucket) per engine version. `observe` is called on
    the event loop, `readings` at scrape time from the web server: a lock guards the windows."""

    def __init__(self, baseline_for: BaselineSource, window: int = 1000, min_samples: int = 100):
        if window < 1 or not 1 <= min_samples <= window:
            raise ValueError("drift window must be >= 1 and min_samples within 1..window")
        self._baseline_for = baseline_for
        self._window = window
        self.min_samples = min_samples
        self._recent: dict[str, deque[tuple[str, int]]] = {}
        self._baselines: dict[str, Distribution | None] = {}
        self._lock = threading.Lock()

    def observe(self, version: str, label: str | None, scores: dict[str, float]) -> None:
        if label is None or label not in scores:  # an embedder: no labels to watch
            return
        bucket = confidence_bucket(scores[label])
        with self._lock:
            recent = self._recent.get(version)
            if recent is None:
                recent = self._recent[version] = deque(maxlen=self._window)
            recent.append((label, bucket))

    def baseline(self, version: str) -> Distribution | None:
        if version not in self._baselines:
            try:
                self._baselines[version] = self._baseline_for(version)
            except Exception as exc:  # a missing or unreadable manifest: no drift for it
                log.warning("drift: no baseline for engine %s: %s", version, exc)
                self._baselines[version] = None
        return self._baselines[version]

    def live(self, version: str) -> Distribution | None:
        with self._lock:
            recent = list(self._recent.get(version, ()))
        baseline = self.baseline(version)
        if baseline is None or not recent:
            return None
        labels = list(baseline.labels) + sorted({lb for lb, _ in recent} - set(baseline.labels))
        index = {label: i for i, label in enumerate(labels)}
        label_counts = [0] * len(labels)
        confidence_counts = [0] * (len(CONFIDENCE_EDGES) - 1)
        for label, bucket in recent:
            label_counts[index[label]] += 1
            confidence_counts[bucket] += 1
        return Distribution.from_counts(labels, label_counts, confidence_counts, "live")

    def readings(self) -> list[DriftReading]:
        """One reading per version with a baseline and at least `min_samples` in its window."""
        with self._lock:
            sizes = {version: len(recent) for version, recent in self._recent.items()}
        out = []
        for version, size in sorted(sizes.items()):
            baseline = self.baseline(version)
            live = self.live(version) if size >= self.min_samples else None
            if baseline is not None and live is not None:
                out.append(DriftReading(version, live, baseline))
        return out

    def window_sizes(self) -> dict[str, int]:
        with self._lock:
            return {version: len(recent) for version, recent in self._recent.items()}


class DriftCollector(Collector):
    def __init__(self, watch: DriftWatch) -> None:
        self._watch = watch

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        psi, window = self._families()
        for reading in self._watch.readings():
            psi.add_metric([reading.version, "label"], reading.psi_labels)
            psi.add_metric([reading.version, "confidence"], reading.psi_confidence)
        for version, size in sorted(self._watch.window_sizes().items()):
            window.add_metric([version], size)
        yield psi
        yield window

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "inflow_drift_psi",
                "Population-stability index of the recent predictions' labels or confidence "
                "against the engine's evaluation split (0 same; > 0.25 shifted)",
                labels=["version", "signal"],
            ),
            GaugeMetricFamily(
                "inflow_drift_window_predictions",
                "Recent predictions per engine version that the drift index is computed on",
                labels=["version"],
            ),
        )
