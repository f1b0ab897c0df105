"""Calibrating a classifier head on held-out data: class-prior offsets and a temperature.

A head trained on a mixture of domains learns the mixture's class priors (tweets bring the
only "neutral" examples) and, fine-tuned, tends to be over- or under-confident. `calibrate`
fits one offset per label and one temperature, `softmax((logits + offset) / T)`, by minimising
the negative log-likelihood of each domain's validation split, every domain weighing the same
whatever its size: the offsets correct for the priors, the temperature makes the scores usable
as confidences. Both fold into the linear head (`fold`), so the served graph, its speed and its
parity are unchanged. `expected_calibration_error` is the usual top-label ECE over equal-width
confidence bins.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
ECE_BINS = 10


@dataclass(frozen=True, slots=True)
class Calibration:
    temperature: float
    offsets: list[float]  # one per label, added to the logits before the temperature

    def fold(
        self, weight: npt.NDArray[np.float32], bias: npt.NDArray[np.float32]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """The linear head `weight @ x + bias` with this calibration built in."""
        t = self.temperature
        return (
            (weight / t).astype(np.float32),
            ((bias + np.asarray(self.offsets, dtype=np.float32)) / t).astype(np.float32),
        )


def softmax(logits: npt.ArrayLike) -> FloatArray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: FloatArray = e / e.sum(axis=1, keepdims=True)
    return out


def _nll(logits: FloatArray, targets: npt.NDArray[np.int64]) -> float:
    probs = softmax(logits)
    return float(-np.log(probs[np.arange(len(targets)), targets] + 1e-12).mean())


def calibrate(domains: Sequence[tuple[npt.ArrayLike, Sequence[int]]], labels: int) -> Calibration:
    """Offsets and a temperature minimising the mean over `domains` of each domain's NLL on
    its (logits, target index) validation data. The first label's offset stays 0 (softmax is
    unchanged by a shift of all of them)."""
    from scipy.optimize import minimize

    data = [
        (np.asarray(z, dtype=np.float64), np.asarray(t, dtype=np.int64))
        for z, t in domains
        if len(t)
    ]
    if not data:
        return Calibration(1.0, [0.0] * labels)

    def objective(params: FloatArray) -> float:
        t = float(np.exp(params[0]))
        offsets = np.concatenate([[0.0], params[1:]])
        return sum(_nll((z + offsets) / t, y) for z, y in data) / len(data)

    start = np.zeros(labels)
    result = minimize(objective, start, method="L-BFGS-B", bounds=[(-3.0, 3.0)] * labels)
    params = result.x if result.fun <= objective(start) else start
    return Calibration(float(np.exp(params[0])), [0.0, *(float(v) for v in params[1:])])


def expected_calibration_error(
    probs: npt.ArrayLike, targets: Sequence[int], bins: int = ECE_BINS
) -> float:
    """Top-label ECE: the confidence-weighted gap between confidence and accuracy."""
    p = np.asarray(probs, dtype=np.float64)
    if not len(p):
        return 0.0
    confidence = p.max(axis=1)
    correct = p.argmax(axis=1) == np.asarray(targets)
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for low, high in itertools.pairwise(edges):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(ece)
