"""What a classifier predicts, as distributions to compare: its labels and its confidence.

A `Distribution` is the share of each label and the share of each confidence bucket (the top
score) over some predictions. An engine's build records one on the evaluation split of the
data its model was trained on (`Manifest.baseline`); a worker keeps one over its latest live
predictions (`streams.ops.drift`); the population-stability index (`psi`) says how far apart they
are. Rules of thumb: below 0.1 the same population, 0.1 to 0.25 a moderate shift, above 0.25
a different population.

Numpy-free and torch-free: serving code and the build both use it.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# Top-score buckets, coarse on purpose: with a few hundred predictions on each side, finer
# buckets (0.95, 0.99, below 0.4) held a few percent each and their sampling noise alone moved
# the index to 0.2 on in-domain tweets; with these it stays below 0.1 (tests/e2e/test_drift.py).
CONFIDENCE_EDGES = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# A share of 0 in either distribution would make the index infinite: shares are floored here.
PSI_FLOOR = 1e-3
BASELINE_FORMAT = 1


def confidence_bucket(confidence: float) -> int:
    """The bucket of a top score: [edge_i, edge_i+1), the last one closed at 1.0."""
    index = bisect_right(CONFIDENCE_EDGES, confidence) - 1
    return min(max(index, 0), len(CONFIDENCE_EDGES) - 2)


def psi(expected: Sequence[float], actual: Sequence[float], floor: float = PSI_FLOOR) -> float:
    """Population-stability index of `actual` against `expected` (shares over the same bins):
    sum of (a - e) * ln(a / e), each share floored at `floor`."""
    if len(expected) != len(actual):
        raise ValueError(f"{len(expected)} expected bins but {len(actual)} actual ones")
    total = 0.0
    for e, a in zip(expected, actual, strict=True):
        e, a = max(e, floor), max(a, floor)
        total += (a - e) * math.log(a / e)
    return total


def _shares(counts: Sequence[int]) -> list[float]:
    n = sum(counts)
    return [c / n if n else 0.0 for c in counts]


@dataclass(frozen=True, slots=True)
class Distribution:
    """Shares of labels (in `labels` order) and of confidence buckets over `n` predictions."""

    labels: tuple[str, ...]
    label_shares: tuple[float, ...]
    confidence_shares: tuple[float, ...]
    n: int
    source: str = ""

    @classmethod
    def from_counts(
        cls,
        labels: Sequence[str],
        label_counts: Sequence[int],
        confidence_counts: Sequence[int],
        source: str = "",
    ) -> Distribution:
        if len(label_counts) != len(labels):
            raise ValueError("one count per label")
        if len(confidence_counts) != len(CONFIDENCE_EDGES) - 1:
            raise ValueError("one count per confidence bucket")
        return cls(
            tuple(labels),
            tuple(_shares(label_counts)),
            tuple(_shares(confidence_counts)),
            sum(label_counts),
            source,
        )

    @classmethod
    def of_scores(
        cls, labels: Sequence[str], scores: Iterable[Sequence[float]], source: str = ""
    ) -> Distribution:
        """From rows of class probabilities in `labels` order (an engine's output)."""
        label_counts = [0] * len(labels)
        confidence_counts = [0] * (len(CONFIDENCE_EDGES) - 1)
        for row in scores:
            best = max(range(len(labels)), key=lambda i: row[i])
            label_counts[best] += 1
            confidence_counts[confidence_bucket(float(row[best]))] += 1
        return cls.from_counts(labels, label_counts, confidence_counts, source)

    @classmethod
    def of_predictions(
        cls,
        labels: Sequence[str],
        predictions: Iterable[tuple[str | None, Mapping[str, float]]],
        source: str = "",
    ) -> Distribution:
        """From (label, scores) pairs (published predictions); labels outside `labels` are
        added after them, predictions without a label (an embedder's) are skipped."""
        order = list(labels)
        label_counts = [0] * len(order)
        confidence_counts = [0] * (len(CONFIDENCE_EDGES) - 1)
        for label, scores in predictions:
            if label is None or label not in scores:
                continue
            if label not in order:
                order.append(label)
                label_counts.append(0)
            label_counts[order.index(label)] += 1
            confidence_counts[confidence_bucket(float(scores[label]))] += 1
        return cls.from_counts(order, label_counts, confidence_counts, source)

    def psi_labels(self, live: Distribution) -> float:
        """PSI of `live`'s labels against these; a label only `live` has counts against 0."""
        labels = list(self.labels) + [lb for lb in live.labels if lb not in self.labels]
        return psi(self.shares_for(labels), live.shares_for(labels))

    def psi_confidence(self, live: Distribution) -> float:
        return psi(self.confidence_shares, live.confidence_shares)

    def shares_for(self, labels: Sequence[str]) -> list[float]:
        """This distribution's label shares in another label order (0 for a label it lacks)."""
        mine = dict(zip(self.labels, self.label_shares, strict=True))
        return [mine.get(label, 0.0) for label in labels]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": BASELINE_FORMAT,
            "source": self.source,
            "n": self.n,
            "labels": dict(zip(self.labels, self.label_shares, strict=True)),
            "confidence_edges": list(CONFIDENCE_EDGES),
            "confidence": list(self.confidence_shares),
        }

    @staticmethod
    def is_current(data: Mapping[str, Any] | None) -> bool:
        """Whether a recorded baseline uses today's buckets (else: record it again)."""
        return data is not None and list(data.get("confidence_edges", ())) == list(CONFIDENCE_EDGES)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Distribution:
        """A recorded baseline; raises ValueError when it was recorded with other buckets."""
        if list(data.get("confidence_edges", ())) != list(CONFIDENCE_EDGES):
            raise ValueError("baseline recorded with other confidence buckets: record it again")
        labels: Mapping[str, float] = data["labels"]
        return cls(
            tuple(labels),
            tuple(float(v) for v in labels.values()),
            tuple(float(v) for v in data["confidence"]),
            int(data["n"]),
            str(data.get("source", "")),
        )
