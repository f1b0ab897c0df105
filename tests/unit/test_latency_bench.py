"""The placement and policy study of `inflow bench pipeline --pin/--policies`: its parsing,
its pinning (on this process's own threads) and its verdicts."""

from __future__ import annotations

import os
import threading

import pytest

from streams.cli.bench.latency import (
    ALL_CORES,
    PolicyRun,
    parse_policies,
    pin_process,
    placements,
    summary,
)


def test_policies_parse_fixed_knobs_and_the_target() -> None:
    fixed, target = parse_policies("8/2048/10, target")
    assert fixed.env == {
        "INFLOW_MAX_BATCH_SIZE": "8",
        "INFLOW_MAX_BATCH_TOKENS": "2048",
        "INFLOW_MAX_WAIT_MS": "10",
        "INFLOW_LATENCY_TARGET_MS": "0",
    }
    assert target.name == "target"
    with pytest.raises(SystemExit, match="SIZE/TOKENS/WAIT_MS"):
        parse_policies("8/2048")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning needs 2 CPUs")
def test_pinning_moves_every_thread_and_unpinning_restores_them() -> None:
    cores = sorted(os.sched_getaffinity(0))
    worker = placements(pin=True)[1]
    assert worker.worker_cores == frozenset(cores[:1])
    assert worker.other_cores == frozenset(cores[1:])
    started = threading.Event()
    stop = threading.Event()

    def idle() -> None:
        started.set()
        stop.wait(10)

    thread = threading.Thread(target=idle)
    thread.start()
    started.wait(10)
    try:
        pin_process(os.getpid(), worker.other_cores)
        assert thread.native_id is not None
        assert os.sched_getaffinity(thread.native_id) == worker.other_cores
        assert os.sched_getaffinity(0) == worker.other_cores
    finally:
        pin_process(os.getpid(), None)
        stop.set()
        thread.join()
    assert os.sched_getaffinity(0) == ALL_CORES


def row(policy: str, p99: float, drain: float, target: float = 0.0) -> PolicyRun:
    return PolicyRun(
        1, "pinned", policy, target, drain, 50.0, 500, 5.0, p99, 90.0, 8.0, 3.0, 9.0, 1, 2
    )


def test_the_summary_compares_the_target_with_the_best_fixed_policy() -> None:
    lines = summary(
        [row("8/2048/10", 40.0, 100.0), row("1/2048/0", 20.0, 96.0), row("target", 19.0, 99.0, 24)]
    )
    verdict = next(line for line in lines if line.startswith("run 1 pinned"))
    assert "target p99 19.0 ms vs best fixed 20.0 (1/2048/0)" in verdict
    assert "99.0% of the best (100.0, 8/2048/10)" in verdict
    assert any("within target 1/1" in line for line in lines)


def test_the_capacity_formula_is_bound_by_the_workers_cores_then_by_the_machine() -> None:
    from streams.cli.bench.scale import ScaleRun, predict

    # One worker on one core: 8 ms of its CPU per event (125/s), the services 2 ms.
    base = ScaleRun(1, "tweets", 1000, 120.0, 8.0, 2.0)
    assert predict(base, 1, 1, 2) == pytest.approx(125.0)
    # Two workers would do 250/s on their own cores, but the machine's two cores also run
    # the services: 2 / (8 + 2) ms = 200/s.
    assert predict(base, 2, 1, 2) == pytest.approx(200.0)
    # On 16 cores the workers' own cores bound it again.
    assert predict(base, 2, 1, 16) == pytest.approx(250.0)
    run = ScaleRun(2, "tweets", 1000, 160.0, 9.0, 2.0, predicted_per_s=200.0)
    assert run.error == pytest.approx(0.25)
