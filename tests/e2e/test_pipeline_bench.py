"""`inflow bench pipeline` on a tiny configuration: it runs end to end and writes its JSON.

Checks the shape of the report, never its figures (speed is the bench's business).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TestServices
from tests.e2e.conftest import ROOT


def _bench(
    services: TestServices, engine_dir: Path, tmp_path: Path, *argv: str
) -> tuple[dict, str]:
    """`inflow bench ARGV --json F` against the test services: (the JSON report, stdout)."""
    report_path = tmp_path / "bench.json"
    env = {
        **os.environ,
        "INFLOW_KAFKA_BOOTSTRAP": services.kafka_bootstrap,
        "INFLOW_ES_URL": services.es_url,
        "INFLOW_ENGINE_DIR": str(engine_dir),
        "INFLOW_STATE_DIR": str(tmp_path / "state"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "streams.cli.main", "bench", *argv, "--json", str(report_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report: dict = json.loads(report_path.read_text())
    return report, result.stdout


def test_bench_pipeline_runs_on_a_tiny_configuration(
    services: TestServices, engine_dir: Path, tmp_path: Path
) -> None:
    report, stdout = _bench(
        services, engine_dir, tmp_path,
        "pipeline", "--n", "40", "--baseline-n", "12", "--rates", "0.5", "--latency-events", "20",
        "--png", str(tmp_path / "bench.png"),
    )  # fmt: skip
    assert "ratios:" in stdout
    assert set(report["cpu"]) == {"model", "cpus", "flags"}
    assert report["engine_only"]["texts_per_s"] > 0
    assert report["engine_only"]["cpu_s_per_text"] > 0
    assert report["engine_by_length"]["texts_per_s"] > 0
    assert report["drain"]["events"] == 40
    assert {"events_per_s", "cpu_s_per_event", "kafka_cores", "search_cores"} <= set(
        report["drain"]
    )
    assert set(report["padding"]) == {"fifo", "length_aware", "worker_drain"}
    assert report["padding"]["length_aware"] >= 1.0
    [latency] = report["latency"]
    assert latency["fraction"] == 0.5
    assert latency["events"] >= 20
    assert latency["p50_ms"] <= latency["p95_ms"] <= latency["p99_ms"]
    assert latency["load_average"] >= 0 and report["drain"]["load_average"] >= 0
    # the worker's own view of the same phase: queue and batch within what it saw end to end
    assert 0 <= latency["queue_p99_ms"] <= latency["worker_p99_ms"]
    assert 0 < latency["batch_p99_ms"] <= latency["worker_p99_ms"]
    assert set(latency["cores"]) == {"worker", "kafka", "search", "bench"}
    assert latency["cores"]["worker"] > 0 and latency["cores"]["bench"] > 0
    assert [b["name"] for b in report["baselines"]] == ["torch fp32 per-event", "torch fp32 take"]
    assert all(b["events"] == 12 for b in report["baselines"])
    for key in (
        "drain / engine-only texts/s",
        "worker CPU per event / engine CPU per text",
        "inflow / torch fp32 per-event events/s",
        "inflow / torch fp32 take events/s",
        "drain / engine-only by length texts/s",
        "engine by length / torch fp32 per-event (ceiling)",
    ):
        assert key in report["ratios"]
    assert (tmp_path / "bench.png").stat().st_size > 0


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning needs 2 CPUs")
def test_the_placement_study_pins_the_worker_and_runs_the_latency_target(
    services: TestServices, engine_dir: Path, tmp_path: Path
) -> None:
    """Unpinned and pinned, a fixed policy then the target at 3x its median batch time: the
    pinned worker's threads ran on its core only, and every latency came from its own
    taken -> acked histogram."""
    report, _ = _bench(
        services, engine_dir, tmp_path,
        "pipeline", "--pin", "--policies", "8/2048/10,target", "--n", "30",
        "--latency-events", "20",
    )  # fmt: skip
    runs = report["runs"]
    assert [(r["placement"], r["policy"]) for r in runs] == [
        ("unpinned", "8/2048/10"), ("unpinned", "target"),
        ("pinned", "8/2048/10"), ("pinned", "target"),
    ]  # fmt: skip
    cores = sorted(os.sched_getaffinity(0))
    for r in runs:
        assert r["events"] == 20 and r["drain_per_s"] > 0
        assert 0 < r["p50_ms"] <= r["p99_ms"]
        assert r["mean_batch_size"] >= 1
        if r["placement"] == "pinned":
            assert r["cores_allowed"]["worker"] == cores[:1]
            assert r["cores_allowed"]["bench"] == cores[1:]
        else:
            assert r["cores_allowed"]["worker"] == cores
    for fixed, target in ((runs[0], runs[1]), (runs[2], runs[3])):
        assert target["target_ms"] == pytest.approx(3 * fixed["median_batch_ms"], abs=0.2)
        assert target["offered_per_s"] == fixed["offered_per_s"]  # one load per placement
        assert target["within_target"] == (target["p99_ms"] <= target["target_ms"])


def test_the_scale_bench_predicts_two_workers_from_one(
    services: TestServices, engine_dir: Path, tmp_path: Path
) -> None:
    report, _ = _bench(
        services, engine_dir, tmp_path,
        "scale", "--n", "40", "--workers", "1,2", "--texts", "tweets",
    )  # fmt: skip
    one, two = report["runs"]
    assert (one["workers"], two["workers"]) == (1, 2)
    assert one["events"] == two["events"] == 40
    assert one["predicted_per_s"] is None and two["predicted_per_s"] > 0
    assert one["worker_cpu_ms_per_event"] > 0 and two["worker_cpu_ms_per_event"] > 0
    assert two["error"] == pytest.approx(two["predicted_per_s"] / two["events_per_s"] - 1)
