"""The default engine that `inflow engine ensure` trains and builds on a fresh checkout: its
per-domain evaluation is stored with the model and shown by `inflow engine list`, and it
holds out of domain (issue 20's bars, on data the training never saw)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from engines.registry import Registry
from tests.e2e.conftest import ROOT


def test_the_default_engine_reports_each_domain_and_holds_out_of_domain(
    engine_dir: Path,
) -> None:
    registry = Registry(engine_dir)
    manifest = registry.verify(registry.active_version() or "")
    scores = manifest.extra["evaluation"]
    assert set(scores) == {"tweets", "reviews", "imdb", "imdb_pooled"}
    for domain in scores.values():
        assert 0.0 <= domain["ece"] <= 1.0
        assert len(domain["confusion"]) == len(domain["labels"])
        # Every text is in the confusion matrix, or was called a label the domain does not
        # score (a review sentence called neutral).
        shares = domain["predicted_share"]
        outside = sum(share for label, share in shares.items() if label not in domain["labels"])
        assert sum(map(sum, domain["confusion"])) + round(outside * domain["n"]) == domain["n"]
    # In domain: tweets at or above the tweets-only model's 0.746.
    assert scores["tweets"]["accuracy"] >= 0.746, scores["tweets"]
    # Out of domain: whole IMDB reviews, read in windows as INFLOW_PASSAGES_MAX reads them.
    pooled = scores["imdb_pooled"]
    assert pooled["accuracy"] >= 0.80, pooled
    assert pooled["predicted_share"]["neutral"] <= 0.25, pooled
    assert scores["imdb"]["predicted_share"]["neutral"] <= 0.25, scores["imdb"]

    listing = subprocess.run(
        [sys.executable, "-m", "streams.cli.main", "--registry", str(engine_dir), "engine", "list"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    for domain, score in scores.items():
        [line] = [line for line in lines if line.strip().startswith(domain + " ")]
        assert f"accuracy {score['accuracy']:.3f}" in line and "ECE" in line, line
