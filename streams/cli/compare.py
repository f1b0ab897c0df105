"""`inflow engine compare`: what each engine version predicts live against what it predicted on
its evaluation split (the baseline its build recorded): label shares, confidence histogram and
the population-stability index, the same figures the workers export as `inflow_drift_psi`.

Live predictions are the latest `--sample` documents of each version in Elasticsearch (every
worker's, not one worker's window).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engines.drift import CONFIDENCE_EDGES, Distribution
from engines.registry import Registry, RolloutRecord
from indexer import Searcher
from streams.app import es_settings
from streams.config import Settings
from streams.errors import ConfigError
from streams.rollout.canary import LiveComparison

SHIFTED_PSI = 0.25  # the alert's threshold (deploy/prometheus/alerts.yml)
MODERATE_PSI = 0.1


@dataclass(frozen=True, slots=True)
class Comparison:
    version: str
    baseline: Distribution | None
    live: Distribution
    # When `version` is the latest rollout's candidate: that rollout, and the workers' live
    # comparison of the candidate with the active engine on the same events.
    rollout: RolloutRecord | None = None
    against_active: LiveComparison | None = None

    @property
    def psi_labels(self) -> float | None:
        """None without a baseline, or without live predictions (a shadow's candidate)."""
        if self.baseline is None or not self.live.n:
            return None
        return self.baseline.psi_labels(self.live)

    @property
    def psi_confidence(self) -> float | None:
        if self.baseline is None or not self.live.n:
            return None
        return self.baseline.psi_confidence(self.live)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "live": self.live.to_dict(),
            "baseline": None if self.baseline is None else self.baseline.to_dict(),
            "psi_labels": self.psi_labels,
            "psi_confidence": self.psi_confidence,
            "rollout": None
            if self.rollout is None or self.against_active is None
            else {
                "mode": self.rollout.mode,
                "active": self.rollout.active,
                "share": self.rollout.share,
                "status": self.rollout.status,
                **self.against_active.to_dict(),
            },
        }


def verdict(value: float | None) -> str:
    if value is None:
        return "no baseline"
    if value > SHIFTED_PSI:
        return "shifted"
    return "moderate shift" if value > MODERATE_PSI else "as at evaluation"


def live_comparison(registry: Registry, record: RolloutRecord) -> LiveComparison:
    """Every worker's totals of `record`'s rollout, summed (from the registry's rollout-stats)."""
    total = LiveComparison(rollout=record.key, worker="all")
    for data in registry.rollout_stats():
        if data.get("rollout") == record.key:
            total.add(LiveComparison.from_dict(data))
    return total


async def compare(
    settings: Settings, versions: Sequence[str], sample: int, since: str | None
) -> list[Comparison]:
    registry = Registry(settings.engine_dir)
    out = []
    record = registry.rollout()
    async with Searcher(es_settings(settings), alias=settings.es_alias) as searcher:
        for version in versions:
            manifest = registry.get(version)
            recorded = manifest.baseline
            baseline = None if recorded is None else Distribution.from_dict(recorded)
            recent = await searcher.recent_outputs(version, size=sample, since=since)
            live = Distribution.of_predictions(
                manifest.labels, recent, source=f"latest {len(recent)} in {settings.es_alias}"
            )
            if record is not None and record.candidate == version:
                against = live_comparison(registry, record)
                out.append(Comparison(version, baseline, live, record, against))
            else:
                out.append(Comparison(version, baseline, live))
    return out


def format_comparison(c: Comparison) -> str:
    b = c.baseline
    lines = [
        f"{c.version}: {c.live.n} live predictions ({c.live.source}) against "
        f"{b.source if b else 'no recorded baseline (`inflow engine baseline` records one)'}"
    ]
    if b is not None and not c.live.n:
        lines.append("  PSI: no live predictions of this version in the index")
    elif b is not None:
        assert c.psi_labels is not None and c.psi_confidence is not None
        lines.append(
            f"  PSI labels {c.psi_labels:.3f} ({verdict(c.psi_labels)}), confidence "
            f"{c.psi_confidence:.3f} ({verdict(c.psi_confidence)})"
        )
    known = list(b.labels) if b else []
    labels = known + [label for label in c.live.labels if label not in known]
    evaluation = b.shares_for(labels) if b else [0.0] * len(labels)
    lines.append(f"  {'label':<16}{'evaluation':>12}{'live':>10}")
    for label, e, live in zip(labels, evaluation, c.live.shares_for(labels), strict=True):
        lines.append(f"  {label:<16}{e:>12.3f}{live:>10.3f}")
    lines.append(f"  {'confidence':<16}{'evaluation':>12}{'live':>10}")
    for i, live in enumerate(c.live.confidence_shares):
        span = f"{CONFIDENCE_EDGES[i]:.2f}-{CONFIDENCE_EDGES[i + 1]:.2f}"
        e = b.confidence_shares[i] if b else 0.0
        lines.append(f"  {span:<16}{e:>12.3f}{live:>10.3f}")
    if c.rollout is not None and c.against_active is not None:
        r = c.rollout
        lines.append(
            f"  {r.mode} against {r.active} on {r.share:.0%} of keys "
            f"({r.status.replace('_', ' ')}): {c.against_active.describe()}"
        )
    return "\n".join(lines)


def run_compare(
    settings: Settings, versions: Sequence[str], *, sample: int, since: str | None, as_json: bool
) -> int:
    registry = Registry(settings.engine_dir)
    if not versions:
        active = registry.active_version()
        if active is None:
            raise ConfigError(f"no active engine in {registry.root}: name the versions")
        versions = [active]
        record = registry.rollout()
        if record is not None and record.running:
            versions.append(record.candidate)  # with the live comparison of the two
    found = asyncio.run(compare(settings, versions, sample, since))
    if as_json:
        print(json.dumps([c.to_dict() for c in found], indent=1))
    else:
        print("\n\n".join(format_comparison(c) for c in found))
    return 0
