"""What `/health/ready` and `/health/live` answer: conditions the worker keeps up to date.

Ready (take traffic, count as a serving replica): an engine is loaded, Elasticsearch answers
and the alias exists, the agents started, and the consumer group gave this worker partitions.
Live (do not restart me): no assigned partition has lag above zero while its committed offset
stands still for longer than `stall_after_s` — the known Faust failure where the consumer stops
fetching while lag grows. Lag counts records still to consume: the transaction markers (and
aborted records) an exactly-once writer leaves past its last record are not lag (`streams.ops.lag`
probes for them), so an idle exactly-once worker stays live; a gap holding one real record, or
one the probe could not decide, still counts. A stall that readiness already explains (no
engine yet, Elasticsearch down) is not a liveness failure: restarting the worker would not
bring the dependency back.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

from streams.ops.lag import LagSample

OK = "ok"
# Readiness conditions that explain a stalled consumer (see `WorkerHealth.live`).
EXPLAINS_STALL = ("engine", "elasticsearch", "index", "kafka")


@dataclass(frozen=True, slots=True)
class HealthReport:
    ok: bool
    checks: dict[str, str]  # name -> "ok" or the one-line reason it is not

    @property
    def status(self) -> int:
        return 200 if self.ok else 503

    def body(self) -> dict[str, object]:
        failing = [f"{name}: {why}" for name, why in self.checks.items() if why != OK]
        return {
            "status": "ok" if self.ok else "unavailable",
            "checks": self.checks,
            "reason": "; ".join(failing),
        }


class WorkerHealth:
    """Readiness conditions set by the start-up task and probes; liveness from lag samples."""

    def __init__(
        self,
        *,
        assignment: Callable[[], Collection[object]],
        lag: Callable[[], LagSample | None],
        stall_after_s: float,
    ) -> None:
        self._assignment = assignment
        self._lag = lag
        self.stall_after_s = stall_after_s
        self._conditions: dict[str, str] = {
            "engine": "no engine loaded yet",
            "elasticsearch": "not checked yet",
            "agents": "starting",
        }

    def set(self, name: str, problem: str | None) -> None:
        """Record a readiness condition: None when met, else why not (one line)."""
        self._conditions[name] = OK if problem is None else problem

    def _partitions(self) -> str:
        try:
            assigned = len(self._assignment())
        except Exception as exc:  # the consumer is not up yet
            return f"consumer not started ({type(exc).__name__})"
        if assigned:
            return OK
        return "no partitions assigned (joining the group, or more workers than partitions)"

    def ready(self) -> HealthReport:
        checks = {**self._conditions, "partitions": self._partitions()}
        return HealthReport(all(v == OK for v in checks.values()), checks)

    def live(self) -> HealthReport:
        sample = self._lag()
        stalled = [] if sample is None else sample.stalled(self.stall_after_s)
        # The index stage parked on a permanent error ("index") is reported by readiness
        # too; a restart would not fix it.
        explained = [n for n in EXPLAINS_STALL if self._conditions.get(n, OK) != OK]
        if not stalled:
            consumer = OK
        elif explained:
            consumer = OK  # waiting on a dependency that readiness reports
        else:
            consumer = "stalled: " + ", ".join(
                f"{p.topic}[{p.partition}] lag {p.lag}, no progress for {p.idle_s:.0f}s"
                for p in stalled
            )
        checks = {"consumer": consumer}
        return HealthReport(consumer == OK, checks)
