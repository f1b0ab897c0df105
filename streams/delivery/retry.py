"""The one retry policy of the worker: tenacity, steered by whether an error is retriable.

Every call that must eventually succeed (publishing a prediction or a dead letter, a bulk write,
setting up the index) goes through `RetryPolicy.call`:

- a retriable error (a flag ``retriable = True`` on our error classes and on aiokafka's, a
  Kafka timeout or unavailable broker that aiokafka flags permanent (`is_retriable`), a
  connection or timeout error, an Elasticsearch 429/5xx or transport error) is retried with
  capped exponential backoff and jitter, for as long as it takes; the log says so on the 1st,
  2nd, 4th, 8th... attempt with the count, never once per attempt, and from the
  `NOT_READY_AFTER`th attempt the named health condition is not-ready until it succeeds;
- a permanent error that belongs to one record is raised to the caller (`per_record`), which
  dead-letters that record;
- any other permanent error belongs to the system (wrong credentials, missing permissions, an
  index that cannot be set up): it is logged once, as one ERROR line, the named health
  condition turns not-ready with that reason, and the call is parked: nothing is acked, so no
  offset moves past the unprocessed record. The parked call is checked again every
  `recheck_s` (quietly; one line only if the reason changes) and resumes when the cause is
  fixed, clearing the condition. Publishes to Kafka name no readiness condition (the worker's
  Kafka probe owns it): a parked publish stalls the consumer, which `/health/live` reports.

Nothing loops silently: a retriable loop logs with a growing count, a parked one is one ERROR
line and visible on `/health/ready` or `/health/live`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from aiokafka.errors import (
    BrokerNotAvailableError,
    ConcurrentTransactions,
    KafkaTimeoutError,
    KafkaUnavailableError,
    MessageSizeTooLargeError,
    QuotaViolationError,
    RecordListTooLargeError,
    RecordTooLargeError,
    ReplicaNotAvailableError,
)
from elasticsearch import ApiError, TransportError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    wait_exponential_jitter,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# A call still failing after this many retriable attempts turns its condition not-ready until
# it succeeds (~3 s with the default backoff): an outage shows on /health/ready.
NOT_READY_AFTER = 4
FaultSink = Callable[[str, str | None], object]  # (condition name, reason or None when cleared)


# aiokafka flags these `retriable = False`, yet each reports a state that passes by itself, and
# Kafka's Java client retries them: a timeout (the producer's delivery or metadata timeout is
# what a Kafka outage during a publish looks like), a broker or replica that is down or moving,
# no broker answering, a quota throttle, another transaction on the same id still completing.
# Flagged permanent, an outage would park the call and be rechecked once a `recheck_s`.
# aiokafka's other errors keep their flag: timeouts, connection, leader and coordinator errors
# already say True; authorization, authentication, sizes, invalid topics or configuration,
# unsupported versions and a fenced producer say False and stay permanent.
_TRANSIENT_KAFKA_ERRORS: tuple[type[BaseException], ...] = (
    KafkaTimeoutError,
    BrokerNotAvailableError,
    ReplicaNotAvailableError,
    KafkaUnavailableError,
    QuotaViolationError,
    ConcurrentTransactions,
)
# One record that no retry can deliver: the producer's own `max_request_size` check and the
# broker's MESSAGE_TOO_LARGE (both MessageSizeTooLargeError), the broker's RECORD_LIST_TOO_LARGE
# (a batch over the segment size; aiokafka gives an over-batch-size record a batch of its own),
# and aiokafka's RecordTooLargeError (a record over the consumer's fetch size).
_RECORD_TOO_LARGE_ERRORS: tuple[type[BaseException], ...] = (
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
)


def is_retriable(exc: BaseException) -> bool:
    """Whether the same call may succeed later: a transient Kafka error (above), else the
    error's own ``retriable`` flag when it has one, else connection and timeout failures and
    Elasticsearch's 429/5xx."""
    if isinstance(exc, _TRANSIENT_KAFKA_ERRORS):
        return True
    flag = getattr(exc, "retriable", None)
    if isinstance(flag, bool):
        return flag
    if isinstance(exc, ApiError):
        return exc.meta.status == 429 or exc.meta.status >= 500
    if isinstance(exc, TransportError):  # connection refused/reset, timeout, TLS
        return True
    return isinstance(exc, (OSError, TimeoutError))  # ConnectionError is an OSError


def is_record_too_large(exc: BaseException) -> bool:
    """Whether `exc` says one record is too large for Kafka: permanent for that record (a
    retry sends the same bytes), so dead-letter it rather than park the stream behind it."""
    return isinstance(exc, _RECORD_TOO_LARGE_ERRORS)


def _noop_fault(_name: str, _reason: str | None) -> None:
    return None


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else 'no detail'}"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Backoff for retriable errors and what to do with permanent ones (see the module)."""

    base_s: float = 0.2
    cap_s: float = 10.0
    recheck_s: float = 60.0
    on_fault: FaultSink = _noop_fault

    def with_backoff(self, base_s: float, cap_s: float) -> RetryPolicy:
        return RetryPolicy(base_s, cap_s, self.recheck_s, self.on_fault)

    async def call(
        self,
        call: Callable[[], Awaitable[T]],
        *,
        what: str,
        condition: str | None,
        describe: Callable[[BaseException], str] = _describe,
        on_retry: Callable[[int, BaseException], object] | None = None,
        per_record: Callable[[BaseException], bool] | None = None,
    ) -> T:
        """Return `call()`'s result once it succeeds; raise only a per-record permanent error.

        `condition` names the readiness condition a permanent system error (or a long
        retriable outage) turns not-ready; None leaves readiness alone: a parked call then
        stalls the consumer, which `/health/live` reports (restart me)."""
        on_fault = self.on_fault if condition is not None else _noop_fault
        name = condition or "liveness"
        faulted: str | None = None
        checks = 0
        while True:
            try:
                result = await self._retrying(call, what, name, on_fault, describe, on_retry)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # permanent: is_retriable(exc) is False
                if per_record is not None and per_record(exc):
                    raise
                reason = describe(exc)
                checks += 1
                if reason != faulted:
                    log.error(
                        "%s failed (attempt %d, permanent error: not retried; %s reports it, "
                        "checked again every %.0fs): %s",
                        what,
                        checks,
                        f"{name} not ready" if condition else "/health/live",
                        self.recheck_s,
                        reason,
                    )
                    # the default description names the error, not the call: say which call
                    on_fault(name, f"{what}: {reason}" if describe is _describe else reason)
                    faulted = reason
                else:
                    log.debug("%s still failing (check %d): %s", what, checks, reason)
                await asyncio.sleep(self.recheck_s)
                continue
            if faulted is not None:
                log.warning("%s succeeded after a permanent error (%d checks)", what, checks)
                on_fault(name, None)
            return result

    async def _retrying(
        self,
        call: Callable[[], Awaitable[T]],
        what: str,
        condition: str,
        on_fault: FaultSink,
        describe: Callable[[BaseException], str],
        on_retry: Callable[[int, BaseException], object] | None,
    ) -> T:
        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome is not None else None
            if exc is None:
                return
            attempt = state.attempt_number
            if on_retry is not None:
                on_retry(attempt, exc)
            if attempt == NOT_READY_AFTER:  # a long outage shows on /health/ready too
                on_fault(condition, f"retrying ({what}): {describe(exc)}")
                retried[0] = True
            if attempt & (attempt - 1) == 0:  # 1, 2, 4, 8, ...: a count, not a flood
                wait = state.next_action.sleep if state.next_action is not None else 0.0
                log.warning(
                    "%s failed (attempt %d, retrying; next in %.1fs): %s",
                    what,
                    attempt,
                    wait,
                    describe(exc),
                )

        retrying = AsyncRetrying(
            retry=retry_if_exception(is_retriable),
            wait=wait_exponential_jitter(
                multiplier=self.base_s, max=self.cap_s, jitter=self.base_s
            ),
            before_sleep=before_sleep,
            reraise=True,
        )
        retried = [False]

        async def once() -> T:  # a coroutine function, which tenacity awaits (a lambda is not)
            return await call()

        result: T = await retrying(once)
        if retried[0]:
            on_fault(condition, None)
        attempts = int(retrying.statistics.get("attempt_number", 1))
        if attempts > 1:
            log.info("%s succeeded after %d attempts", what, attempts)
        return result
