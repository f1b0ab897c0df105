"""Errors of the streaming layer. Each carries a one-line message that says what to do."""

from __future__ import annotations


class InflowError(Exception):
    """Root of the errors the CLI prints as one line."""

    retriable: bool = False


class ConfigError(InflowError):
    """Bad configuration or a bad argument: the message names the setting and what to do."""


class KafkaUnavailable(InflowError):
    retriable = True


class SearchUnavailable(InflowError):
    retriable = True


class CutoverRefused(InflowError):
    """`inflow reindex` measured the new model worse than the live one on the eval set."""
