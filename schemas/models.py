"""Typed wire models for Inflow: what travels on `inflow.texts` (TextEvent v1) and
`inflow.predictions` (Prediction v2; v1 records are still decoded).

The JSON Schema files in `schemas/json/` describe the same contracts for other languages;
`schemas.codec` is the one run-time path that decodes and validates them.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

import msgspec

SCHEMA_VERSION = "v1"  # TextEvent and dead-letter headers
PREDICTION_VERSION = "v2"  # v2: task and embedding_dim; any width; no label for embedders
TASK_CLASSIFICATION = "classification"
TASK_EMBEDDING = "embedding"
TASKS = (TASK_CLASSIFICATION, TASK_EMBEDDING)
MAX_EMBEDDING_DIM = 4096  # Elasticsearch's dense_vector limit
MAX_TEXT_CHARS = 100_000
MAX_ID_CHARS = 256
EMBEDDING_DIM = 384  # Prediction v1's fixed width (the default model's)
# Epoch milliseconds of 0001-01-01T00:00:00.000Z and 9999-12-31T23:59:59.999Z: the instants
# an RFC 3339 timestamp (four-digit year) can name, so every accepted `ts` can be written back.
MIN_TS_MS = -62_135_596_800_000
MAX_TS_MS = 253_402_300_799_999


class ErrorCode(StrEnum):
    """Why a record was dead-lettered. Values travel in the `inflow.error.code` header."""

    # decode stage (TextEvent)
    EMPTY_VALUE = "empty_value"  # zero-byte value or a Kafka null value (tombstone)
    INVALID_UTF8 = "invalid_utf8"
    INVALID_JSON = "invalid_json"
    NOT_AN_OBJECT = "not_an_object"  # valid JSON, but an array, scalar or null
    MISSING_TEXT = "missing_text"  # no `text` field, or `"text": null`
    WRONG_TYPE = "wrong_type"  # a known field holds the wrong JSON type
    EMPTY_TEXT = "empty_text"  # empty or whitespace-only text
    TEXT_TOO_LONG = "text_too_long"
    EMPTY_ID = "empty_id"
    ID_TOO_LONG = "id_too_long"
    INVALID_TS = "invalid_ts"
    # later stages
    INFERENCE_FAILED = "inference_failed"
    INVALID_PREDICTION = "invalid_prediction"
    INDEX_REJECTED = "index_rejected"
    # the prediction is larger than the predictions topic (or the producer) takes
    PREDICTION_TOO_LARGE = "prediction_too_large"
    # an unexpected error while processing this one record (a bug: the message says which)
    PROCESSING_FAILED = "processing_failed"


class Stage(StrEnum):
    """The pipeline stage that gave up on a record (`inflow.error.stage`)."""

    DECODE = "decode"
    INFER = "infer"
    PUBLISH = "publish"
    INDEX = "index"


class DecodeError(msgspec.Struct, frozen=True):
    """A record that could not be used, as a value: `code` is an `ErrorCode` value.

    `message` is one line that says what is wrong and what was expected.
    """

    code: str
    message: str


class TextEvent(msgspec.Struct, frozen=True):
    """A validated input event. `id` is always set (defaulted from the Kafka position)."""

    id: str
    text: str
    metadata: dict[str, Any] | None
    ts_ms: int | None  # event time, epoch milliseconds (UTC)


class ModelRef(msgspec.Struct, frozen=True):
    """The exact model artifact that made a prediction."""

    name: Annotated[str, msgspec.Meta(min_length=1)]
    version: Annotated[str, msgspec.Meta(min_length=1)]
    backend: Annotated[str, msgspec.Meta(min_length=1)]
    precision: Annotated[str, msgspec.Meta(min_length=1)]


class Source(msgspec.Struct, frozen=True):
    """Where the input event was read from."""

    topic: Annotated[str, msgspec.Meta(min_length=1)]
    partition: Annotated[int, msgspec.Meta(ge=0)]
    offset: Annotated[int, msgspec.Meta(ge=0)]


class PassageVector(msgspec.Struct, frozen=True):
    """One window of a long text (characters [start, end) of `text`) and its embedding."""

    start: Annotated[int, msgspec.Meta(ge=0)]
    end: Annotated[int, msgspec.Meta(ge=1)]
    embedding: Annotated[list[float], msgspec.Meta(min_length=1, max_length=MAX_EMBEDDING_DIM)]


MAX_PASSAGES = 64

# The Annotated constraints are checked by `decode_prediction` (msgspec reads them while
# decoding); they cost nothing when a Prediction is built in Python.
_Score = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]


class Prediction(msgspec.Struct, frozen=True):
    """One model output for one TextEvent, as published on `inflow.predictions` (v2).

    A classifier's prediction has a label and scores; an embedder's has `label` None and
    `scores` {}. `embedding` holds exactly `embedding_dim` numbers. A decoded v1 record
    becomes a classification with embedding_dim 384.
    """

    id: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_CHARS)]
    text: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TEXT_CHARS)]
    label: Annotated[str, msgspec.Meta(min_length=1)] | None
    scores: dict[str, _Score]
    embedding: Annotated[list[float], msgspec.Meta(min_length=1, max_length=MAX_EMBEDDING_DIM)]
    model: ModelRef
    truncated: bool
    event_ts: str | None  # RFC 3339, UTC
    processed_ts: str  # RFC 3339, UTC
    metadata: dict[str, Any] | None
    source: Source
    task: str = TASK_CLASSIFICATION  # "classification" | "embedding"
    embedding_dim: int = EMBEDDING_DIM
    # With INFLOW_PASSAGES_MAX > 1: the text's windows in order (one for a text that fits);
    # `embedding` is then the first one's, label and scores pool them all. null otherwise.
    passages: Annotated[list[PassageVector], msgspec.Meta(max_length=MAX_PASSAGES)] | None = None


class WirePrediction(msgspec.Struct, frozen=True):
    """A Prediction as read from the wire, v1 or v2: v1 has no task and no embedding_dim."""

    id: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_CHARS)]
    text: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TEXT_CHARS)]
    label: Annotated[str, msgspec.Meta(min_length=1)] | None
    scores: dict[str, _Score]
    embedding: Annotated[list[float], msgspec.Meta(min_length=1, max_length=MAX_EMBEDDING_DIM)]
    model: ModelRef
    truncated: bool
    event_ts: str | None
    processed_ts: str
    metadata: dict[str, Any] | None
    source: Source
    task: str | None = None
    embedding_dim: Annotated[int, msgspec.Meta(ge=1, le=MAX_EMBEDDING_DIM)] | None = None
    passages: Annotated[list[PassageVector], msgspec.Meta(max_length=MAX_PASSAGES)] | None = None
