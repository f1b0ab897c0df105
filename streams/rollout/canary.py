"""Shadow and canary: a candidate engine served beside the active one, by key hash.

The registry's rollout record (`engines.registry.RolloutRecord`) names a candidate version, a
mode and a share. A key is routed when its bucket, the first 8 bytes of its sha256 read as a
fraction of 2**64, is below the share: the same key gets the same answer in every worker and
after every restart, and raising the share only adds keys (a key in a 10 % canary stays in the
25 % one). The key is the record's Kafka key, or the event id when a producer sets none.

For a routed event both engines predict; which one's prediction is published is the mode's:

  shadow   the active engine's is published (as for any event); the candidate's is compared
           with it and dropped. Nothing the candidate says reaches Kafka or the index.
  canary   the candidate's is published, naming its version; the active engine's is computed
           beside it for the comparison and dropped. Every other key goes to the active engine.

The published prediction never waits for the other engine: the comparison runs in the
background, at most `max_open` at once (more are skipped and counted). Comparisons give label
agreement, the largest score difference, embedding cosine and the candidate's latency, as
Prometheus metrics (`Metrics.rollout_*`) and as this worker's totals in the registry
(`rollout-stats/`, read by `inflow engine compare`).

Each worker checks the rollout's rule (`breach`) against its own totals; the first worker that
finds it broken ends the rollout in the registry (status rolled_back), logs one line and counts
`inflow_rollout_auto_rollbacks`; every worker then drops the candidate at its next poll.

A candidate that fails to load or warm up (any exception: the active engine is never touched)
is marked failed in the registry and its rollout ended with the reason, in one ERROR line; no
worker loads it again until a new rollout or activation of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from engines.errors import EngineError, NothingToRollBack
from engines.load import describe_failure
from engines.registry import (
    CANARY,
    PROMOTED,
    ROLLED_BACK,
    SHADOW,
    Registry,
    RolloutRecord,
    RolloutRule,
)
from engines.types import Engine
from streams.delivery.batcher import Batcher, BatchPolicy, InferenceFailed, ItemResult
from streams.ops.metrics import Metrics

log = logging.getLogger(__name__)

_SCALE = float(2**64)


def bucket(key: bytes) -> float:
    """Where `key` falls in [0, 1): stable across processes, machines and Python versions."""
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / _SCALE


def routed(key: bytes, share: float) -> bool:
    """Whether `key` belongs to the candidate's share of keys."""
    return bucket(key) < share


def route_key(key: bytes | None, event_id: str) -> bytes:
    """What a record is routed by: its Kafka key, or its event id when it has none."""
    return key if key else event_id.encode()


class CandidateFailed(InferenceFailed):
    """The candidate engine raised for a canary-routed text (dead-lettered naming `version`)."""

    def __init__(self, message: str, version: str) -> None:
        super().__init__(message)
        self.version = version


@dataclass(slots=True)
class LiveComparison:
    """One worker's totals for one rollout: the active engine against the candidate."""

    rollout: str = ""  # RolloutRecord.key
    worker: str = ""
    routed: int = 0  # events of the candidate's share
    compared: int = 0  # both engines answered
    agreed: int = 0  # ... with the same label
    skipped: int = 0  # not compared: too many comparisons open
    score_delta_sum: float = 0.0
    score_delta_max: float = 0.0
    cosine_sum: float = 0.0
    cosine_min: float = 1.0
    candidate_sent: int = 0  # texts given to the candidate
    candidate_errors: int = 0
    candidate_ms_sum: float = 0.0
    candidate_ms_max: float = 0.0

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.compared if self.compared else None

    @property
    def error_rate(self) -> float | None:
        return self.candidate_errors / self.candidate_sent if self.candidate_sent else None

    def add(self, other: LiveComparison) -> None:
        """Sum `other` (another worker's totals of the same rollout) into this one."""
        self.routed += other.routed
        self.compared += other.compared
        self.agreed += other.agreed
        self.skipped += other.skipped
        self.score_delta_sum += other.score_delta_sum
        self.score_delta_max = max(self.score_delta_max, other.score_delta_max)
        self.cosine_sum += other.cosine_sum
        self.cosine_min = min(self.cosine_min, other.cosine_min)
        self.candidate_sent += other.candidate_sent
        self.candidate_errors += other.candidate_errors
        self.candidate_ms_sum += other.candidate_ms_sum
        self.candidate_ms_max = max(self.candidate_ms_max, other.candidate_ms_max)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "agreement": self.agreement, "error_rate": self.error_rate}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LiveComparison:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    def describe(self) -> str:
        if not self.candidate_sent:
            return "no live events for the candidate yet"
        parts = [f"{self.routed} events routed, {self.compared} compared"]
        if self.compared:
            parts.append(
                f"label agreement {self.agreed / self.compared:.3f}, score delta mean "
                f"{self.score_delta_sum / self.compared:.4f} max {self.score_delta_max:.4f}, "
                f"embedding cosine mean {self.cosine_sum / self.compared:.4f} "
                f"min {self.cosine_min:.4f}"
            )
        parts.append(
            f"candidate latency mean {self.candidate_ms_sum / self.candidate_sent:.1f} ms "
            f"max {self.candidate_ms_max:.1f} ms, errors {self.candidate_errors}/"
            f"{self.candidate_sent}"
        )
        if self.skipped:
            parts.append(f"{self.skipped} not compared (too many open)")
        return "; ".join(parts)


def breach(rule: RolloutRule, stats: LiveComparison) -> str | None:
    """Why `stats` break `rule` (one line), or None. Nothing is judged before `min_samples`."""
    if rule.max_error_rate is not None and stats.candidate_sent >= rule.min_samples:
        rate = stats.candidate_errors / stats.candidate_sent
        if rate > rule.max_error_rate:
            return (
                f"candidate error rate {rate:.3f} above {rule.max_error_rate} over "
                f"{stats.candidate_sent} events"
            )
    if rule.min_agreement is not None and stats.compared >= rule.min_samples:
        agreement = stats.agreed / stats.compared
        if agreement < rule.min_agreement:
            return (
                f"label agreement {agreement:.3f} below {rule.min_agreement} over "
                f"{stats.compared} events"
            )
    return None


def compare_results(active: ItemResult, candidate: ItemResult) -> tuple[bool, float, float]:
    """(same label, largest |score difference| over the labels, embedding cosine)."""
    labels = set(active.scores) | set(candidate.scores)
    delta = max(
        (abs(active.scores.get(k, 0.0) - candidate.scores.get(k, 0.0)) for k in labels),
        default=0.0,
    )
    a = np.asarray(active.embedding, dtype=np.float64)
    b = np.asarray(candidate.embedding, dtype=np.float64)
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    cosine = float(a @ b) / norm if a.shape == b.shape and norm > 0 else 0.0
    return active.label == candidate.label, delta, cosine


def _settle(task: asyncio.Task[ItemResult]) -> None:
    """Retrieve a background prediction's error (it is counted elsewhere, or moot)."""
    if not task.cancelled():
        task.exception()


class Rollout:
    """The worker's side of a rollout: routes submissions and follows the registry's record.

    `submit(key, text)` is what the infer stage calls instead of `Batcher.submit`; `sync()` is
    called by a timer: it reads the record, loads or drops the candidate (a second `Batcher`),
    enforces the rule and writes this worker's totals. `stop()` drops the candidate.
    """

    def __init__(
        self,
        active: Batcher,
        registry: Registry,
        metrics: Metrics,
        *,
        policy: BatchPolicy,
        load: Callable[[str], Engine],
        worker: str,
        max_open: int = 256,
    ) -> None:
        self._active = active
        self._registry = registry
        self._metrics = metrics
        self._policy = policy
        self._load = load
        self._worker = worker
        self._max_open = max_open
        self._record: RolloutRecord | None = None  # served now (with a candidate loaded)
        self._candidate: Batcher | None = None
        self._open: set[asyncio.Task[Any]] = set()
        self._failed: set[str] = set()  # rollout keys whose candidate failed to load
        self.stats = LiveComparison()
        self._written: dict[str, Any] | None = None

    @property
    def record(self) -> RolloutRecord | None:
        """The rollout this worker serves now (None: every event goes to the active engine)."""
        return self._record if self._candidate is not None else None

    # ---------------------------------------------------------------- the event path

    async def submit(self, key: bytes, text: str) -> ItemResult:
        record, candidate = self._record, self._candidate
        if record is None or candidate is None or not routed(key, record.share):
            return await self._active.submit(text)
        self.stats.routed += 1
        self._metrics.rollout_routed.labels(mode=record.mode, candidate=record.candidate).inc()
        if record.mode == SHADOW:
            other = self._background(self._timed(candidate, text, record))
            result = await self._active.submit(text)  # raises as for any event
            self._compare_later(record, result, other, active_first=True)
            return result
        other = self._background(self._active.submit(text))
        try:
            result = await self._timed(candidate, text, record)
        except InferenceFailed as exc:
            if other is not None:
                other.cancel()
            raise CandidateFailed(str(exc), record.candidate) from exc
        self._compare_later(record, result, other, active_first=False)
        return result

    async def _timed(self, candidate: Batcher, text: str, record: RolloutRecord) -> ItemResult:
        """The candidate's answer, its latency and errors counted."""
        started = time.perf_counter()
        self.stats.candidate_sent += 1
        try:
            result = await candidate.submit(text)
        except InferenceFailed:
            self.stats.candidate_errors += 1
            self._metrics.rollout_errors.labels(candidate=record.candidate).inc()
            raise
        ms = (time.perf_counter() - started) * 1000
        self.stats.candidate_ms_sum += ms
        self.stats.candidate_ms_max = max(self.stats.candidate_ms_max, ms)
        self._metrics.rollout_latency_ms.labels(candidate=record.candidate).observe(ms)
        return result

    def _background(self, work: Any) -> asyncio.Task[ItemResult] | None:
        """Run the other engine's prediction unless too many comparisons are open."""
        if len(self._open) >= self._max_open:
            work.close()  # the coroutine never started
            return None
        task: asyncio.Task[ItemResult] = asyncio.ensure_future(work)
        self._open.add(task)
        task.add_done_callback(_settle)
        task.add_done_callback(self._open.discard)
        return task

    def _compare_later(
        self,
        record: RolloutRecord,
        published: ItemResult,
        other: asyncio.Task[ItemResult] | None,
        *,
        active_first: bool,
    ) -> None:
        if other is None:
            self.stats.skipped += 1
            self._metrics.rollout_skipped.labels(candidate=record.candidate).inc()
            return

        async def compare() -> None:
            try:
                second = await other
            except (InferenceFailed, asyncio.CancelledError):
                return  # a candidate error is counted by _timed; the active's is its own
            except Exception as exc:  # the batcher stopped under it: nothing to compare
                log.debug("rollout comparison dropped: %s", exc)
                return
            current = self._record
            if current is None or current.key != record.key:
                return  # the rollout changed meanwhile: these totals are not its
            active, candidate = (published, second) if active_first else (second, published)
            self._observe(record, active, candidate)

        task = asyncio.create_task(compare())
        self._open.add(task)
        task.add_done_callback(self._open.discard)

    def _observe(self, record: RolloutRecord, active: ItemResult, candidate: ItemResult) -> None:
        same, delta, cosine = compare_results(active, candidate)
        stats, m, name = self.stats, self._metrics, record.candidate
        stats.compared += 1
        stats.agreed += int(same)
        stats.score_delta_sum += delta
        stats.score_delta_max = max(stats.score_delta_max, delta)
        stats.cosine_sum += cosine
        stats.cosine_min = min(stats.cosine_min, cosine)
        m.rollout_compared.labels(candidate=name).inc()
        if same:
            m.rollout_agreed.labels(candidate=name).inc()
        m.rollout_agreement.labels(candidate=name).set(stats.agreed / stats.compared)
        m.rollout_score_delta.labels(candidate=name).observe(delta)
        if not math.isnan(cosine):
            m.rollout_cosine.labels(candidate=name).observe(cosine)

    # ---------------------------------------------------------------- following the registry

    async def sync(self) -> None:
        """Follow the registry's rollout record; enforce its rule; write this worker's totals.

        The record is read before the active pointer: `promote` writes the pointer first, so
        a promoted rollout is never seen with the old pointer. After a promotion the candidate
        keeps its keys until the active engine is the candidate (no key goes back to the old
        version in between)."""
        try:
            record = self._registry.rollout()
        except EngineError as exc:
            log.error("rollout: %s", exc)
            return
        pointer = self._registry.active_version()
        identity = self._active.identity
        serving = identity.version if identity is not None else None
        await self._follow(self._wanted(record, pointer, serving))
        current = self.record
        if current is None or not current.running:
            return
        reason = breach(current.rule, self.stats)
        if reason is not None:
            await self._roll_back(current, reason)
            return
        self._write_stats(current)

    @staticmethod
    def _wanted(
        record: RolloutRecord | None, pointer: str | None, serving: str | None
    ) -> RolloutRecord | None:
        if record is None or serving is None:
            return None
        if record.running:
            return record if record.active == serving and pointer == record.active else None
        if record.status == PROMOTED and pointer == record.candidate != serving:
            return record  # until the active engine has swapped to the candidate
        return None

    async def _follow(self, wanted: RolloutRecord | None) -> None:
        current = self._record
        if wanted is None:
            if current is not None:
                log.info("rollout: candidate %s dropped (%s)", current.candidate, current.status)
                await self._drop()
            return
        if current is not None and current.candidate == wanted.candidate:
            if current.key != wanted.key:
                self.stats = LiveComparison(rollout=wanted.key, worker=self._worker)
                self._written = None
            self._show_share(current, wanted)
            self._record = wanted  # share, mode or status may have changed
            return
        if wanted.key in self._failed or not wanted.running:
            return
        if wanted.candidate in self._registry.failed():
            # It failed on another worker, which ends the rollout: not loaded here either.
            self._failed.add(wanted.key)
            return
        if current is not None:
            await self._drop()
        log.info(
            "rollout: loading candidate %s (%s, %.0f %% of keys)",
            wanted.candidate,
            wanted.mode,
            wanted.share * 100,
        )
        candidate = Batcher(None, self._policy, on_batch=None)
        await candidate.start()
        try:
            await candidate.swap_engine(lambda: self._load(wanted.candidate))
        except Exception as exc:  # any: onnxruntime's own errors, a graph unlike its manifest
            await candidate.stop()
            self._failed.add(wanted.key)
            self._metrics.engine_swap_failures.inc()
            self._end_failed(wanted, exc)
            return
        self.stats = LiveComparison(rollout=wanted.key, worker=self._worker)
        self._written = None
        self._candidate, self._record = candidate, wanted
        self._show_share(None, wanted)
        log.info("rollout: candidate %s serving its share", wanted.candidate)

    def _end_failed(self, record: RolloutRecord, exc: BaseException) -> None:
        """The candidate failed to load, warm up or run: mark it failed in the registry and end
        the rollout with the reason, so no worker (now or after a restart) loads it again. The
        active engine was never touched. One ERROR line, whatever the registry answers."""
        reason = describe_failure(exc)
        notes: list[str] = []
        try:
            self._registry.mark_failed(record.candidate, reason, worker=self._worker)
        except Exception as error:
            notes.append(f"could not mark it failed: {describe_failure(error)}")
        outcome = "rollout ended"
        try:
            self._registry.end_rollout(
                ROLLED_BACK,
                f"automatic: candidate {record.candidate} failed to load: {reason}",
                only=record.key,
            )
        except NothingToRollBack:
            outcome = "rollout ended already"  # another worker found it first
        except Exception as error:
            outcome = f"could not end the rollout: {describe_failure(error)}"
        log.error(
            "rollout: %s candidate %s failed to load (%s): %s%s",
            record.mode,
            record.candidate,
            outcome,
            reason,
            "".join(f"; {note}" for note in notes),
        )
        log.debug("rollout: candidate %s load failure", record.candidate, exc_info=exc)

    def _show_share(self, old: RolloutRecord | None, new: RolloutRecord | None) -> None:
        gauge = self._metrics.rollout_share
        if old is not None:
            with contextlib.suppress(KeyError):
                gauge.remove(old.mode, old.candidate)
        if new is not None:
            gauge.labels(mode=new.mode, candidate=new.candidate).set(new.share)

    async def _roll_back(self, record: RolloutRecord, reason: str) -> None:
        self._write_stats(record)
        try:
            self._registry.end_rollout(ROLLED_BACK, f"automatic: {reason}", only=record.key)
        except NothingToRollBack:
            pass  # another worker ended it first
        except EngineError as exc:
            log.error("rollout: cannot roll back %s: %s", record.candidate, exc)
            return
        else:
            rule = "error_rate" if reason.startswith("candidate error rate") else "agreement"
            self._metrics.rollout_auto_rollbacks.labels(candidate=record.candidate, rule=rule).inc()
            log.warning(
                "rollout: %s of %s rolled back automatically: %s",
                record.mode,
                record.candidate,
                reason,
            )
        await self._drop()

    def _write_stats(self, record: RolloutRecord) -> None:
        data = self.stats.to_dict()
        if data == self._written:
            return
        data["mode"] = record.mode
        try:
            self._registry.write_rollout_stats(self._worker, data)
        except OSError as exc:
            log.warning("rollout: cannot write this worker's totals: %s", exc)
            return
        self._written = self.stats.to_dict()

    async def _drop(self) -> None:
        candidate, record = self._candidate, self._record
        self._candidate, self._record = None, None
        if record is not None:
            self._show_share(record, None)
            if record.running or record.status == PROMOTED:
                self._write_stats(record)
        if candidate is not None:
            await candidate.stop()  # answers what was queued for it first
            with contextlib.suppress(Exception):
                candidate.engine.close()

    async def stop(self) -> None:
        """Drop the candidate after its queued texts are answered; wait for comparisons."""
        await self._drop()
        if self._open:
            await asyncio.gather(*list(self._open), return_exceptions=True)


__all__ = [
    "CANARY",
    "SHADOW",
    "CandidateFailed",
    "LiveComparison",
    "Rollout",
    "breach",
    "bucket",
    "compare_results",
    "route_key",
    "routed",
]
