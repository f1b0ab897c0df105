"""Typed errors of the indexer; retry loops and callers read ``retriable``."""

from __future__ import annotations

from collections.abc import Sequence


class IndexerError(Exception):
    """Root of every error the indexer raises on purpose."""

    retriable: bool = False


class IndexUnavailable(IndexerError):
    """The search server could not take the documents after every attempt.

    Nothing about the documents is known to be wrong: the caller must not commit
    its offsets and should try the same batch again later (ids make it idempotent).
    """

    retriable = True

    def __init__(self, message: str, *, attempts: int, pending_ids: Sequence[str]) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.pending_ids = list(pending_ids)


class IndexRequestError(IndexerError):
    """The server refused a whole request for a reason retrying will not fix (auth, 4xx)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class IndexSetupError(IndexerError):
    """The alias or index cannot be put in the expected shape (e.g. a concrete index
    already holds the alias's name)."""


class LifecycleError(IndexerError):
    """Misuse of start/stop: a call before ``start()`` or after ``stop()``."""
