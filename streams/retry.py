"""Bounded exponential backoff with jitter, for calls that must eventually succeed."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


def backoff_delays(base_s: float, cap_s: float, attempts: int) -> list[float]:
    """The (pre-jitter) waits between attempts: base, 2*base, 4*base, ... capped."""
    return [min(cap_s, base_s * 2**i) for i in range(max(0, attempts - 1))]


async def retry_forever(
    call: Callable[[], Awaitable[T]],
    *,
    what: str,
    base_s: float = 0.2,
    cap_s: float = 10.0,
    max_attempts: int | None = None,
    on_retry: Callable[[int, BaseException], object] | None = None,
    describe: Callable[[BaseException], str] = str,
) -> T:
    """Retry `call` on any exception until it succeeds (or `max_attempts` is reached).

    Used where giving up would lose data (publishing a prediction or a dead letter): the
    input offset stays uncommitted meanwhile, so a crash replays the record instead. Each
    failure is one log line with the attempt count; `describe` turns the error into that line.
    """
    attempt = 0
    while True:
        attempt += 1
        try:
            return await call()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if max_attempts is not None and attempt >= max_attempts:
                raise
            delay = min(cap_s, base_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            log.warning(
                "%s failed (attempt %d, retry in %.1fs): %s", what, attempt, delay, describe(exc)
            )
            if on_retry is not None:
                on_retry(attempt, exc)
            await asyncio.sleep(delay)
