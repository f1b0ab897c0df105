"""The worker's engine follower: serve the registry's active version, contain a bad one.

`EngineFollower.sync()` runs on a timer. It loads the first engine once one exists, then follows
the active pointer (or the pinned `settings.engine_version`). Whatever a new version raises
while it is loaded, warmed up or first run (an `EngineError`, onnxruntime's own exception types,
a graph whose width or label count disagrees with its manifest) is contained here:

- the worker keeps serving the version it had (or stays not ready, the reason on the "engine"
  readiness condition, when it had none); one ERROR line says so;
- the version is marked failed in the registry (`Registry.mark_failed`), so no worker loads it
  again, after a restart either, until it is activated anew (`inflow engine activate`);
- while the active pointer names a failed version, a worker serves the newest good version of
  the activation history (`Registry.last_good`) and says so in one WARNING line; with none it
  is not ready. A pinned worker has no fallback: the pin names the one version it may serve.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from engines.load import describe_failure
from engines.registry import FailedMap, FailedRecord, Registry
from engines.types import Engine, ModelIdentity

log = logging.getLogger(__name__)

Swap = Callable[[Callable[[], Engine]], Awaitable[ModelIdentity]]
SetHealth = Callable[[str, str | None], None]


class Count(Protocol):
    """A counter (prometheus_client's Counter has this method)."""

    def inc(self, amount: float = 1) -> None: ...


class EngineFollower:
    """Follows the registry's active pointer for one worker (see the module docstring).

    `swap(load)` installs the engine `load()` returns between batches (`Batcher.swap_engine`) and
    raises what `load` raised; `serving()` names the engine served now; `load(version)` loads and
    warms a version up; `set_health(condition, problem)` records readiness."""

    def __init__(
        self,
        registry: Registry,
        *,
        swap: Swap,
        serving: Callable[[], ModelIdentity | None],
        load: Callable[[str], Engine],
        set_health: SetHealth,
        swaps: Count,
        failures: Count,
        pinned: str | None = None,
        worker: str = "",
    ) -> None:
        self._registry = registry
        self._swap = swap
        self._serving = serving
        self._load = load
        self._set_health = set_health
        self._swaps = swaps
        self._failures = failures
        self._pinned = pinned or None
        self._worker = worker
        # Failures the registry could not record (read-only, full disk): this worker still
        # does not retry them. Not cleared by a new activation (nothing tells it); a restart is.
        self._unrecorded: FailedMap = {}
        # The failed mark last reported, so each situation is said once, not at every poll.
        self._said: tuple[str, str] | None = None
        self._broken: str | None = None  # the last registry read error logged

    async def sync(self) -> ModelIdentity | None:
        """Load what should be served if it is not; returns the engine served afterwards."""
        identity = self._serving()
        current = identity.version if identity is not None else None
        try:
            target = self._target(current)
        except Exception as exc:  # an unreadable registry must not end the worker either
            problem = f"cannot read the engine registry {self._registry.root}: "
            problem += describe_failure(exc)
            if problem != self._broken:
                self._broken = problem
                log.error("engine: %s (keeping %s)", problem, current or "nothing")
            if current is None:
                self._set_health("engine", problem)
            return identity
        self._broken = None
        if target is None or target == current:
            return identity
        log.info("engine: loading %s (serving %s)", target, current or "nothing yet")
        try:
            # load verifies the artifacts and warms the engine up before the swap; the swap
            # happens only once it returned, so a failure leaves the old engine in place.
            loaded = await self._swap(lambda: self._load(target))
        except Exception as exc:
            self._contain(target, current, exc)
            return self._serving()
        if current is not None:
            self._swaps.inc()
        self._set_health("engine", None)
        log.info("engine: now serving %s (%s %s)", loaded.version, loaded.backend, loaded.precision)
        return loaded

    def _target(self, current: str | None) -> str | None:
        """The version to serve now, or None to change nothing (readiness set as it should)."""
        pointer = self._pinned or self._registry.active_version()
        if pointer is None:
            self._set_health(
                "engine",
                f"no active engine in {self._registry.root}: run the engine-build job "
                "(`inflow engine ensure`)",
            )
            return None
        marks = {**self._unrecorded, **self._registry.failed()}
        mark = marks.get(pointer)
        if mark is None:
            self._said = None
            return pointer
        if pointer == current:
            return current  # it failed elsewhere but runs here: no reason to drop it
        if self._pinned:
            self._refuse(current, f"pinned engine {pointer} is marked failed ({mark.reason})", mark)
            return None
        fallback = self._registry.last_good(marks)
        if fallback is None:
            self._refuse(
                current,
                f"active engine {pointer} is marked failed ({mark.reason}) and the activation "
                "history has no earlier good version",
                mark,
            )
            return None
        if self._say(mark):
            log.warning(
                "engine: active version %s is marked failed (%s, %s): serving %s, the newest "
                "good version of the activation history, until another one is activated",
                pointer,
                mark.reason,
                mark.time,
                fallback,
            )
        return fallback

    def _refuse(self, current: str | None, problem: str, mark: FailedRecord) -> None:
        """Nothing may be loaded: keep `current`, or be not ready."""
        hint = f"`inflow engine activate {mark.version}` clears the mark"
        if self._pinned:
            hint = f"pin another version, or {hint}"
        if current is None:
            self._set_health("engine", f"{problem}: {hint}")
        if self._say(mark):
            log.warning("engine: %s; serving %s (%s)", problem, current or "nothing", hint)

    def _say(self, mark: FailedRecord) -> bool:
        """Whether `mark` was not reported yet (then it counts as reported)."""
        key = (mark.version, mark.time)
        if key == self._said:
            return False
        self._said = key
        return True

    def _contain(self, version: str, current: str | None, exc: BaseException) -> None:
        """A version failed to load, warm up or run: record it, keep serving, say it once."""
        self._failures.inc()
        reason = describe_failure(exc)
        note = ""
        try:
            mark = self._registry.mark_failed(version, reason, worker=self._worker)
        except Exception as write_error:
            mark = self._unrecorded[version] = FailedRecord(version, reason, worker=self._worker)
            note = f" (could not mark it failed in the registry: {describe_failure(write_error)})"
        self._said = (mark.version, mark.time)  # this ERROR line is the report: no WARNING
        log.error(
            "engine %s failed to load, keeping %s: %s%s",
            version,
            current or "nothing",
            reason,
            note,
        )
        # The traceback for whoever debugs it, below the default level: the line above is it.
        log.debug("engine %s load failure", version, exc_info=exc)
        if current is None:
            self._set_health("engine", f"engine {version} failed to load: {reason}")


__all__ = ["Count", "EngineFollower"]
