"""Small fakes of our own interfaces (Engine, Publisher, DocumentWriter) for unit tests."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from engines.types import EMBEDDING_DIM, BatchResult, ModelIdentity, TokenizedText
from indexer import BulkOutcome, Rejected

LABELS = ("negative", "neutral", "positive")


class FakeEngine:
    """Labels by keyword, embeds by hash; records each batch it saw and on which thread."""

    def __init__(
        self,
        version: str = "v-test",
        max_batch_size: int = 64,
        fail_on: str = "",
        concurrent_batches: int = 1,
    ) -> None:
        self._identity = ModelIdentity("fake", version, "fake", "fp32")
        self._max_batch = max_batch_size
        self.concurrent_batches = concurrent_batches
        self.fail_on = fail_on
        self.batches: list[list[str]] = []
        self.tokenized: list[int] = []  # how many texts of each batch came pre-tokenized
        self.threads: set[str] = set()
        self.closed = False

    @property
    def identity(self) -> ModelIdentity:
        return self._identity

    @property
    def max_batch_size(self) -> int:
        return self._max_batch

    @property
    def max_seq_len(self) -> int:
        return 256

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [min(256, len(text.split()) + 2) for text in texts]

    def tokenize(self, texts: list[str]) -> list[TokenizedText]:
        return [TokenizedText(list(range(n)), False) for n in self.count_tokens(texts)]

    def predict(
        self, texts: list[str], tokens: Sequence[TokenizedText] | None = None
    ) -> BatchResult:
        self.threads.add(threading.current_thread().name)
        if tokens is not None:
            assert [len(t) for t in tokens] == self.count_tokens(texts), "tokens of other texts"
        self.tokenized.append(0 if tokens is None else len(tokens))
        if self.fail_on and any(self.fail_on in text for text in texts):
            raise RuntimeError(f"engine cannot take {self.fail_on!r}")
        self.batches.append(list(texts))
        labels = [
            "positive" if "love" in t else "negative" if "hate" in t else "neutral" for t in texts
        ]
        scores = [
            {label: (0.8 if label == chosen else 0.1) for label in LABELS} for chosen in labels
        ]
        vectors = np.stack([_vector(text) for text in texts]).astype(np.float32)
        return BatchResult(labels, scores, vectors, [False] * len(texts), self._identity)

    def close(self) -> None:
        self.closed = True


def _vector(text: str) -> np.ndarray[Any, np.dtype[np.float32]]:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
    vector = np.random.default_rng(seed).standard_normal(EMBEDDING_DIM).astype(np.float32)
    return vector / np.linalg.norm(vector)


# (topic, key, value) -> the error the broker would answer with, or None to accept
Refusal = Callable[[str, bytes | None, bytes | None], Exception | None]


class FakePublisher:
    """Records what was published; can fail the first N publishes, and refuse records that
    `refuse` answers with an error (a topic's size limit, a compacted topic's keyless record)."""

    def __init__(self, fail_first: int = 0, refuse: Refusal | None = None) -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]] | None]] = []
        self.fail_first = fail_first
        self.refuse = refuse
        self.refused = 0
        self.attempts = 0

    async def publish(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        self.attempts += 1
        if self.attempts <= self.fail_first:
            raise ConnectionError("broker unavailable")
        error = self.refuse(topic, key, value) if self.refuse is not None else None
        if error is not None:
            self.refused += 1
            raise error
        self.sent.append((topic, key, value, headers))

    def on(
        self, topic: str
    ) -> list[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]] | None]]:
        return [record for record in self.sent if record[0] == topic]


class FakeWriter:
    """Accepts documents except those whose label is in `reject_labels`."""

    def __init__(self, reject_labels: Sequence[str] = (), fail_first: int = 0) -> None:
        self.docs: dict[str, Mapping[str, Any]] = {}
        self.reject_labels = set(reject_labels)
        self.fail_first = fail_first
        self.calls = 0

    async def bulk_index(self, docs: Sequence[Mapping[str, Any]]) -> BulkOutcome:
        self.calls += 1
        if self.calls <= self.fail_first:
            raise ConnectionError("search server unavailable")
        outcome = BulkOutcome()
        for doc in docs:
            if doc["label"] in self.reject_labels:
                outcome.rejected.append(Rejected(doc["id"], doc, "mapper_parsing_exception", 400))
            else:
                self.docs[doc["id"]] = doc
                outcome.indexed_ids.append(doc["id"])
        return outcome
