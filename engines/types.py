"""The engine contract that the rest of Inflow sees.

`streams/` only ever calls `Engine.predict(texts)` (blocking, on its own thread) and reads
`Engine.identity`; it never imports a runtime (onnxruntime, tensorrt, torch) itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

EMBEDDING_DIM = 384  # the default model's width; an engine's own is ModelIdentity.embedding_dim
TASK_CLASSIFICATION = "classification"  # label + scores + embedding
TASK_EMBEDDING = "embedding"  # embedding only (a sentence embedder)


@dataclass(frozen=True, slots=True)
class ModelIdentity:
    """Names the exact artifact that made a prediction."""

    name: str  # e.g. "minilm-l6-sentiment"
    version: str  # registry version, e.g. "v3-onnxruntime-int8-1a2b3c4d"
    backend: str  # "onnxruntime" | "tensorrt" | "torch"
    precision: str  # "fp32" | "fp16" | "int8"
    task: str = TASK_CLASSIFICATION  # "classification" | "embedding"
    embedding_dim: int = EMBEDDING_DIM  # the width of every embedding this engine makes


@dataclass(frozen=True, slots=True)
class TokenizedText:
    """One text's token ids (truncated to the engine's max sequence length, unpadded)."""

    ids: list[int]
    truncated: bool

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True, slots=True)
class Span:
    """Characters [start, end) of a text."""

    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Passage:
    """One window of a text and its embedding (L2-normalised)."""

    start: int  # first character of the window in the text
    end: int  # one past its last character
    embedding: npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class BatchResult:
    """Results keyed by position in the input batch."""

    labels: list[str | None]  # None for every text of an embedding engine
    scores: list[dict[str, float]]  # label -> probability, sums to 1; {} for an embedder
    embeddings: npt.NDArray[np.float32]  # shape (n, model.embedding_dim), L2-normalised rows
    truncated: list[bool]  # True where the text was cut to the engine's max sequence length
    model: ModelIdentity
    # With passages on (max_passages > 1): each text's windows, one for a text that fits.
    # Labels and scores then pool every window; `embeddings` stay the first window's.
    passages: list[list[Passage]] | None = None

    def __len__(self) -> int:
        return len(self.labels)


@runtime_checkable
class Engine(Protocol):
    """A loaded, warmed-up model. `predict` blocks: call it from dedicated threads, at most
    `concurrent_batches` at once."""

    @property
    def identity(self) -> ModelIdentity: ...

    @property
    def concurrent_batches(self) -> int:
        """How many batches `predict` may run at once (onnxruntime: one per core by default)."""
        ...

    @property
    def max_batch_size(self) -> int: ...

    @property
    def max_seq_len(self) -> int: ...

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Token count of each text after truncation to max_seq_len (for batch token budgets)."""
        ...

    def tokenize(self, texts: list[str]) -> list[TokenizedText]:
        """Each text's tokens, for `predict(texts, tokens)`: tokenize once, off the engine
        thread, and let the router batch by length."""
        ...

    def predict(
        self, texts: list[str], tokens: Sequence[TokenizedText] | None = None
    ) -> BatchResult:
        """Answer `texts`; `tokens`, when given, is this engine's `tokenize(texts)`."""
        ...

    def close(self) -> None: ...
