"""Quantiles the benches report: of latency samples, and of the worker's Prometheus histograms."""

from __future__ import annotations

import urllib.request
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


SCRAPED = (
    "inflow_batch_",
    "inflow_queue_ms",
    "inflow_produced_to_published_seconds",
    "inflow_taken_to_acked_seconds",
)


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(SCRAPED) and " " in line:
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def histogram_quantile(
    before: dict[str, float], after: dict[str, float], name: str, q: float = 0.5
) -> float:
    """Quantile `q` of a Prometheus histogram between two scrapes (linear inside the bucket)."""
    buckets = []
    for key, value in after.items():
        if key.startswith(f"{name}_bucket"):
            le = key.split('le="')[1].split('"')[0]
            bound = float("inf") if le == "+Inf" else float(le)
            buckets.append((bound, value - before.get(key, 0.0)))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return float("nan")
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= total * q:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (total * q - below) / max(count - below, 1e-9)
        lower, below = bound, count
    return lower
