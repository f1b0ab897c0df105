"""Shadow and canary (streams.rollout.canary, the registry's rollout record), without services."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import pytest

from engines.errors import ActivationRefused, NothingToRollBack
from engines.registry import (
    ACCEPTED,
    CANARY,
    PROMOTED,
    ROLLED_BACK,
    SHADOW,
    Manifest,
    Registry,
    RolloutRecord,
    RolloutRule,
)
from engines.types import BatchResult, TokenizedText
from streams.cli.compare import live_comparison
from streams.cli.main import build_parser
from streams.delivery.batcher import Batcher, BatchPolicy
from streams.ops.metrics import Metrics
from streams.rollout.canary import (
    CandidateFailed,
    LiveComparison,
    Rollout,
    breach,
    bucket,
    route_key,
    routed,
)
from tests.fakes import LABELS, FakeEngine

# ------------------------------------------------------------------ key-hash routing


def test_a_key_falls_in_the_same_bucket_everywhere() -> None:
    # sha256, not Python's salted hash(): every worker, every restart, every machine agrees.
    digest = hashlib.sha256(b"order-17").digest()
    assert bucket(b"order-17") == int.from_bytes(digest[:8], "big") / 2**64
    assert bucket(b"order-17") == bucket(b"order-17")
    assert 0.0 <= bucket(b"") < 1.0
    assert [routed(f"k{i}".encode(), 0.25) for i in range(50)] == [
        routed(f"k{i}".encode(), 0.25) for i in range(50)
    ]


def test_the_share_of_keys_routed_is_the_share_asked_within_tolerance() -> None:
    keys = [f"event-{i}".encode() for i in range(20_000)]
    for share in (0.05, 0.2, 0.25, 0.5):
        got = sum(routed(key, share) for key in keys) / len(keys)
        # binomial sd at n=20,000 is <= 0.0036: 4 sd
        assert abs(got - share) < 0.015, (share, got)
    assert not any(routed(key, 0.0) for key in keys)
    assert all(routed(key, 1.0) for key in keys)


def test_raising_the_share_only_adds_keys() -> None:
    keys = [f"id-{i}".encode() for i in range(5000)]
    small = {k for k in keys if routed(k, 0.1)}
    large = {k for k in keys if routed(k, 0.25)}
    assert small < large


def test_a_record_is_routed_by_its_key_or_else_its_event_id() -> None:
    assert route_key(b"k1", "id-1") == b"k1"
    assert route_key(None, "id-1") == b"id-1"
    assert route_key(b"", "id-1") == b"id-1"


# ------------------------------------------------------------------ the rule


def _stats(**values: float) -> LiveComparison:
    return LiveComparison(**values)  # type: ignore[arg-type]


def test_nothing_is_judged_before_the_minimum_of_samples() -> None:
    rule = RolloutRule(min_agreement=0.9, max_error_rate=0.05, min_samples=100)
    assert (
        breach(rule, _stats(compared=99, agreed=0, candidate_sent=99, candidate_errors=99)) is None
    )


def test_agreement_below_the_threshold_breaks_the_rule() -> None:
    rule = RolloutRule(min_agreement=0.9, max_error_rate=None, min_samples=100)
    assert breach(rule, _stats(compared=100, agreed=90, candidate_sent=100)) is None
    reason = breach(rule, _stats(compared=100, agreed=89, candidate_sent=100))
    assert reason == "label agreement 0.890 below 0.9 over 100 events"


def test_the_candidates_error_rate_breaks_the_rule() -> None:
    rule = RolloutRule(min_agreement=None, max_error_rate=0.05, min_samples=100)
    assert breach(rule, _stats(candidate_sent=200, candidate_errors=10)) is None
    reason = breach(rule, _stats(candidate_sent=200, candidate_errors=11, compared=0))
    assert reason is not None and reason.startswith("candidate error rate 0.055 above 0.05")
    off = RolloutRule(min_agreement=None, max_error_rate=None, min_samples=1)
    assert breach(off, _stats(candidate_sent=10, candidate_errors=10, compared=10)) is None


def test_a_rule_and_a_record_refuse_nonsense() -> None:
    with pytest.raises(ValueError):
        RolloutRule(min_agreement=1.5)
    with pytest.raises(ValueError):
        RolloutRule(min_samples=0)
    with pytest.raises(ValueError):
        RolloutRecord("blue-green", "v2", 0.2, "v1")
    with pytest.raises(ValueError):
        RolloutRecord(CANARY, "v2", 0.0, "v1")


def test_workers_totals_add_up() -> None:
    a = _stats(compared=10, agreed=9, cosine_sum=9.9, cosine_min=0.98, candidate_sent=10)
    b = _stats(compared=30, agreed=30, cosine_sum=29.97, cosine_min=0.99, candidate_sent=31)
    a.add(b)
    assert (a.compared, a.agreed, a.candidate_sent, a.cosine_min) == (40, 39, 41, 0.98)
    assert a.agreement == pytest.approx(39 / 40)
    assert LiveComparison.from_dict(json.loads(json.dumps(a.to_dict()))) == a


# ------------------------------------------------------------------ the registry's record


def _version(registry: Registry, model_hash: str, precision: str) -> str:
    staging = registry.stage()
    (staging / "model.onnx").write_bytes(precision.encode() + model_hash.encode())
    (staging / "tokenizer.json").write_text("{}")
    manifest = Manifest(
        version="",
        model_name="m",
        model_hash=model_hash,
        labels=list(LABELS),
        backend="onnxruntime",
        precision=precision,
        max_batch=8,
        max_seq=32,
        artifact="model.onnx",
        tokenizer="tokenizer.json",
        files={},
        status=ACCEPTED,
        created="2026-01-01T00:00:00+00:00",
    )
    return registry.commit(staging, manifest).version


@pytest.fixture
def registry(tmp_path: Path) -> tuple[Registry, str, str]:
    reg = Registry(tmp_path / "engines")
    first = _version(reg, "b12d8b7e00", "int8")
    second = _version(reg, "b12d8b7e00", "fp32")
    reg.activate(first)
    return reg, first, second


def test_canary_promote_then_rollback_in_the_registry(registry: tuple[Registry, str, str]) -> None:
    reg, first, second = registry
    record = reg.start_rollout(CANARY, second, 0.25)
    assert reg.rollout() == record and record.running and record.active == first
    reg.write_rollout_stats("w/1", {"rollout": record.key, "compared": 3, "agreed": 3})
    assert live_comparison(reg, record).compared == 3
    promoted = reg.promote()
    assert promoted.status == PROMOTED and reg.active_version() == second
    with pytest.raises(NothingToRollBack):
        reg.promote()
    assert reg.rollback() == first  # after a promotion, rollback is the active pointer's


def test_a_breach_ends_a_rollout_once(registry: tuple[Registry, str, str]) -> None:
    reg, first, second = registry
    record = reg.start_rollout(SHADOW, second, 0.2)
    ended = reg.end_rollout(ROLLED_BACK, "automatic: x", only=record.key)
    assert ended.status == ROLLED_BACK and ended.reason == "automatic: x"
    with pytest.raises(NothingToRollBack):  # a second worker finding the same breach
        reg.end_rollout(ROLLED_BACK, "automatic: x", only=record.key)
    again = reg.start_rollout(SHADOW, second, 0.2)
    with pytest.raises(NothingToRollBack):  # an older rollout's breach ends no newer one
        reg.end_rollout(ROLLED_BACK, "automatic: x", only=record.key)
    assert reg.rollout() == again and reg.active_version() == first


def test_a_canary_is_refused_across_models_and_for_the_active_version(
    registry: tuple[Registry, str, str],
) -> None:
    reg, first, _ = registry
    other = _version(reg, "ffffffff00", "int8")
    with pytest.raises(ActivationRefused, match="another model"):
        reg.start_rollout(CANARY, other, 0.25)
    reg.start_rollout(SHADOW, other, 0.25)  # a shadow publishes nothing: any model may
    with pytest.raises(ActivationRefused, match="active engine already"):
        reg.start_rollout(SHADOW, first, 0.25)


def test_the_commands_parse() -> None:
    args = build_parser().parse_args(["engine", "canary", "v2-x-y-ab", "--share", "25%"])
    assert (args.version, args.share, args.min_agreement) == ("v2-x-y-ab", 0.25, 0.9)
    assert build_parser().parse_args(["engine", "shadow", "v2-x-y-ab"]).share == 0.2
    with pytest.raises(SystemExit):
        build_parser().parse_args(["engine", "canary", "v2", "--share", "1.5"])
    for command in ("promote", "rollback", "rollout"):
        build_parser().parse_args(["engine", command])


# ------------------------------------------------------------------ the worker's router


class _Contrarian(FakeEngine):
    """Says "negative" to everything (disagrees with FakeEngine on most texts)."""

    def predict(
        self, texts: list[str], tokens: Sequence[TokenizedText] | None = None
    ) -> BatchResult:
        result = super().predict(texts, tokens)
        labels: list[str | None] = ["negative"] * len(texts)
        return BatchResult(labels, result.scores, result.embeddings, result.truncated, result.model)


async def _router(
    reg: Registry, first: str, candidate_engine: FakeEngine
) -> tuple[Rollout, Batcher, Metrics]:
    metrics = Metrics()
    policy = BatchPolicy(8, 4096, 1)
    active = Batcher(FakeEngine(first), policy)
    await active.start()
    rollout = Rollout(
        active, reg, metrics, policy=policy, load=lambda _v: candidate_engine, worker="w1"
    )
    return rollout, active, metrics


async def test_shadow_publishes_the_active_answer_and_compares_the_candidates(
    registry: tuple[Registry, str, str],
) -> None:
    reg, first, second = registry
    reg.start_rollout(SHADOW, second, 0.5)
    rollout, active, metrics = await _router(reg, first, FakeEngine(second))
    await rollout.sync()
    assert rollout.record is not None and rollout.record.candidate == second
    keys = [f"id-{i}".encode() for i in range(200)]
    results = []
    for i, key in enumerate(keys):
        results.append(await rollout.submit(key, f"i love text {i}"))
        if i % 50 == 0:
            await rollout.sync()  # reads the record anew: comparisons still count
    assert {r.model.version for r in results} == {first}, "a shadow is never published"
    await rollout.stop()
    share = sum(routed(k, 0.5) for k in keys)
    assert rollout.stats.routed == share == rollout.stats.compared
    assert rollout.stats.agreement == 1.0 and rollout.stats.cosine_min == pytest.approx(1.0)
    assert metrics.total("inflow_rollout_compared_total") == share
    assert metrics.total("inflow_rollout_candidate_latency_ms_count") == share
    [written] = reg.rollout_stats()
    assert written["compared"] == share and written["worker"] == "w1"
    await active.stop()


async def test_canary_publishes_the_candidate_for_exactly_the_hashed_keys(
    registry: tuple[Registry, str, str],
) -> None:
    reg, first, second = registry
    reg.start_rollout(CANARY, second, 0.25)
    rollout, active, _ = await _router(reg, first, FakeEngine(second))
    await rollout.sync()
    keys = [f"id-{i}".encode() for i in range(400)]
    got = {key: (await rollout.submit(key, "a text")).model.version for key in keys}
    assert {k for k, v in got.items() if v == second} == {k for k in keys if routed(k, 0.25)}
    again = {key: (await rollout.submit(key, "another")).model.version for key in keys[:50]}
    assert all(again[k] == got[k] for k in keys[:50]), "the same key, the same version"
    await rollout.stop()
    await active.stop()


async def test_a_failing_canary_is_dead_lettered_under_its_own_version(
    registry: tuple[Registry, str, str],
) -> None:
    reg, first, second = registry
    reg.start_rollout(CANARY, second, 1.0)
    rollout, active, metrics = await _router(reg, first, FakeEngine(second, fail_on="boom"))
    await rollout.sync()
    with pytest.raises(CandidateFailed) as caught:
        await rollout.submit(b"k", "boom")
    assert caught.value.version == second
    assert metrics.total("inflow_rollout_candidate_errors_total") == 1
    await rollout.stop()
    await active.stop()


async def test_a_worker_rolls_back_a_breached_rollout_and_drops_the_candidate(
    registry: tuple[Registry, str, str], caplog: pytest.LogCaptureFixture
) -> None:
    reg, first, second = registry
    rule = RolloutRule(min_agreement=0.9, max_error_rate=None, min_samples=20)
    reg.start_rollout(CANARY, second, 1.0, rule)
    rollout, active, metrics = await _router(reg, first, _Contrarian(second))
    await rollout.sync()
    for i in range(30):
        await rollout.submit(f"k{i}".encode(), f"i love it {i}")
    for _ in range(500):  # the last comparisons may still be open
        if rollout.stats.compared >= 30:
            break
        await asyncio.sleep(0.01)
    await rollout.sync()
    record = reg.rollout()
    assert record is not None and record.status == ROLLED_BACK
    assert record.reason.startswith("automatic: label agreement 0.000 below 0.9")
    assert rollout.record is None, "the candidate is dropped at once"
    assert metrics.total("inflow_rollout_auto_rollbacks_total") == 1
    lines = [r for r in caplog.records if "rolled back automatically" in r.getMessage()]
    assert len(lines) == 1
    assert (await rollout.submit(b"k0", "i love it")).model.version == first
    assert reg.active_version() == first
    await rollout.stop()
    await active.stop()


async def test_after_a_promotion_the_candidate_keeps_its_keys_until_the_swap(
    registry: tuple[Registry, str, str],
) -> None:
    reg, first, second = registry
    reg.start_rollout(CANARY, second, 0.5)
    rollout, active, _ = await _router(reg, first, FakeEngine(second))
    await rollout.sync()
    reg.promote()
    await rollout.sync()  # the active batcher still serves `first`
    key = next(f"k{i}".encode() for i in range(100) if routed(f"k{i}".encode(), 0.5))
    assert (await rollout.submit(key, "x")).model.version == second
    await active.swap_engine(lambda: FakeEngine(second))
    await rollout.sync()
    assert rollout.record is None
    assert (await rollout.submit(key, "x")).model.version == second
    await rollout.stop()
    await active.stop()


# ------------------------------------------------------------------ a candidate that cannot load


class _Broken:
    """A loader for a candidate that fails its warm-up (not an EngineError: a plain ValueError,
    as a graph whose width disagrees with its manifest raises)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, version: str) -> FakeEngine:
        self.calls += 1
        raise ValueError(f"engine {version} made 384-wide embeddings, its manifest says 256")


async def test_a_candidate_that_fails_to_load_ends_its_rollout_and_is_marked_failed(
    registry: tuple[Registry, str, str], caplog: pytest.LogCaptureFixture
) -> None:
    reg, first, second = registry
    record = reg.start_rollout(CANARY, second, 0.5)
    metrics = Metrics()
    policy = BatchPolicy(8, 4096, 1)
    active = Batcher(FakeEngine(first), policy)
    await active.start()
    broken = _Broken()
    workers = [
        Rollout(active, reg, metrics, policy=policy, load=broken, worker=f"w{i}") for i in (1, 2)
    ]
    caplog.set_level(logging.INFO, logger="streams.rollout.canary")
    for _ in range(3):
        await workers[0].sync()
    assert workers[0].record is None and broken.calls == 1, "tried once, never again"
    ended = reg.rollout()
    assert ended is not None and ended.status == ROLLED_BACK and ended.key == record.key
    assert ended.reason.startswith(f"automatic: candidate {second} failed to load: ValueError")
    mark = reg.failed()[second]
    assert mark.worker == "w1" and "384-wide" in mark.reason
    [line] = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert line.startswith(f"rollout: canary candidate {second} failed to load (rollout ended)")
    assert metrics.total("inflow_engine_swap_failures_total") == 1
    await workers[1].sync()  # another worker (or a restarted one) does not load it at all
    assert broken.calls == 1
    assert (await workers[0].submit(b"k", "i love it")).model.version == first
    assert reg.active_version() == first
    for worker in workers:
        await worker.stop()
    await active.stop()


async def test_a_failed_mark_keeps_a_running_rollouts_candidate_unloaded_until_a_new_rollout(
    registry: tuple[Registry, str, str],
) -> None:
    reg, first, second = registry
    reg.start_rollout(SHADOW, second, 0.5)
    reg.mark_failed(second, "RuntimeError: seen on another worker", worker="w0")
    loads: list[str] = []

    def load(version: str) -> FakeEngine:
        loads.append(version)
        return FakeEngine(version)

    metrics, policy = Metrics(), BatchPolicy(8, 4096, 1)
    active = Batcher(FakeEngine(first), policy)
    await active.start()
    rollout = Rollout(active, reg, metrics, policy=policy, load=load, worker="w1")
    await rollout.sync()
    assert rollout.record is None and loads == []
    reg.start_rollout(SHADOW, second, 0.5)  # a new attempt clears the mark
    assert second not in reg.failed()
    await rollout.sync()
    assert rollout.record is not None and loads == [second]
    await rollout.stop()
    await active.stop()
