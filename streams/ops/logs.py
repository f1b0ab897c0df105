"""Outage logging that says one thing once, with a count, instead of thousands of lines.

During a broker outage aiokafka logs `Unable connect to node with id 1` (and Faust its commit
and fetch complaints) on every reconnect attempt: thousands of ERROR lines in seconds, which
bury what matters. `RepeatFilter`, installed on the worker's log handlers, lets the first
record of each kind through (logger + message template), swallows the repeats while they keep
coming, and when they stop for `quiet_s` emits one summary: `... repeated 2301 times in 22s`.
Only the client libraries' loggers are filtered; Inflow's own lines always pass.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

FILTERED_PREFIXES = ("aiokafka", "faust", "mode", "kafka")


@dataclass(slots=True)
class _Episode:
    first: float
    last: float
    suppressed: int
    level: int
    logger: str
    message: str


class RepeatFilter(logging.Filter):
    def __init__(self, quiet_s: float = 10.0, prefixes: tuple[str, ...] = FILTERED_PREFIXES):
        super().__init__()
        self.quiet_s = quiet_s
        self.prefixes = prefixes
        self._episodes: dict[tuple[str, str], _Episode] = {}
        self._emitting = False

    def filter(self, record: logging.LogRecord) -> bool:
        if self._emitting or record.levelno < logging.WARNING:
            return True
        if not record.name.startswith(self.prefixes):
            return True
        now = time.monotonic()
        self.flush(now)
        key = (record.name, str(record.msg))
        episode = self._episodes.get(key)
        if episode is None:
            self._episodes[key] = _Episode(
                now, now, 0, record.levelno, record.name, record.getMessage()
            )
            return True
        episode.last = now
        episode.suppressed += 1
        return False

    def flush(self, now: float | None = None) -> None:
        """End the episodes quiet for `quiet_s`: one summary line each for those with repeats.
        Called on every filtered record and by the worker's health timer."""
        now = time.monotonic() if now is None else now
        ended = [k for k, e in self._episodes.items() if now - e.last >= self.quiet_s]
        for key in ended:
            episode = self._episodes.pop(key)
            if episode.suppressed:
                self._emitting = True
                try:
                    logging.getLogger(episode.logger).log(
                        episode.level,
                        "%s (repeated %d more times in %.0fs; now quiet)",
                        episode.message,
                        episode.suppressed,
                        episode.last - episode.first,
                    )
                finally:
                    self._emitting = False


def install_repeat_filter(quiet_s: float = 10.0) -> RepeatFilter:
    """Put one `RepeatFilter` on every handler of the root logger (logger filters are not
    inherited by child loggers; handler filters see every record)."""
    repeat = RepeatFilter(quiet_s)
    root = logging.getLogger()
    for handler in root.handlers:
        if not any(isinstance(f, RepeatFilter) for f in handler.filters):
            handler.addFilter(repeat)
    return repeat
