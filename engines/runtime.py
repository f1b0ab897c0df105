"""`LoadedEngine`: tokenizer + one Backend behind the `Engine` protocol.

predict() tokenizes, pads each sub-batch to its longest text, runs the backend and maps
probabilities to labels. More texts than `max_batch_size` are sorted by length and split
(less padding); results always come back in input order.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from engines.backends.base import Backend
from engines.tokenize import Tokenizer
from engines.types import BatchResult, Engine, ModelIdentity, Passage, Span, TokenizedText

MAX_PASSAGES = 64  # windows per text at most (INFLOW_PASSAGES_MAX's bound)
WARMUP_TEXTS = (
    "warm-up",
    "This is a warm-up sentence so that the runtime allocates its buffers before traffic.",
)


class LoadedEngine:
    """A ready engine. `predict` is blocking; up to `concurrent_batches` calls may run at once,
    from as many threads (more wait)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        backend: Backend,
        identity: ModelIdentity,
        labels: Sequence[str],
        max_passages: int = 1,
    ) -> None:
        if backend.max_seq_len < tokenizer.max_seq_len:
            raise ValueError("the tokenizer may emit longer sequences than the backend accepts")
        if not 1 <= max_passages <= MAX_PASSAGES:
            raise ValueError(f"max_passages must be in 1..{MAX_PASSAGES}, got {max_passages}")
        self.max_passages = max_passages
        self._tokenizer = tokenizer
        self._backend: Backend | None = backend
        self._identity = identity
        self.labels = list(labels)
        self._concurrent = max(1, backend.concurrent_runs)
        self._runs = threading.BoundedSemaphore(self._concurrent)

    @property
    def identity(self) -> ModelIdentity:
        return self._identity

    @property
    def concurrent_batches(self) -> int:
        return self._concurrent

    @property
    def max_batch_size(self) -> int:
        return self._require().max_batch_size

    @property
    def max_seq_len(self) -> int:
        return self._tokenizer.max_seq_len

    @property
    def backend(self) -> Backend:
        return self._require()

    def _require(self) -> Backend:
        if self._backend is None:
            raise RuntimeError(f"engine {self._identity.version} is closed")
        return self._backend

    def count_tokens(self, texts: list[str]) -> list[int]:
        return self._tokenizer.count_tokens(texts)

    def tokenize(self, texts: list[str]) -> list[TokenizedText]:
        """Thread-safe (the tokenizer holds no per-call state): the router calls it on its own
        thread while the engine thread runs the previous batch."""
        return self._tokenizer.tokenize(texts)

    def run_raw(
        self, texts: Sequence[str], tokens: Sequence[TokenizedText] | None = None
    ) -> tuple[np.ndarray, np.ndarray, list[bool]]:
        """(probs [n, labels], embeddings [n, width], truncated) in input order; `tokens` is
        `tokenize(texts)` when the caller already has it (then no text is tokenized again)."""
        backend = self._require()
        n = len(texts)
        if tokens is not None and len(tokens) != n:
            raise ValueError(f"{len(tokens)} tokenized texts for {n} texts")
        probs = np.zeros((n, len(self.labels)), dtype=np.float32)
        if n == 0:
            return probs, np.zeros((0, self._identity.embedding_dim), dtype=np.float32), []
        emb: np.ndarray | None = None
        items = list(tokens) if tokens is not None else self._tokenizer.tokenize(texts)
        cap = backend.max_batch_size
        if n <= cap:
            groups = [list(range(n))]
        else:
            order = sorted(range(n), key=lambda i: len(items[i].ids))
            groups = [order[i : i + cap] for i in range(0, n, cap)]
        with self._runs:
            backend = self._require()  # closed while this batch waited: say so, not crash
            for idx in groups:
                enc = self._tokenizer.pad([items[i] for i in idx])
                p, e = backend.run(enc.input_ids, enc.attention_mask)
                if emb is None:
                    if e.shape[1] != self._identity.embedding_dim:
                        raise ValueError(
                            f"engine {self._identity.version} made {e.shape[1]}-wide embeddings, "
                            f"its manifest says {self._identity.embedding_dim}: rebuild it"
                        )
                    # Said plainly here: numpy's broadcast error would not name the cause.
                    if p.shape[1] != len(self.labels):
                        raise ValueError(
                            f"engine {self._identity.version} made {p.shape[1]} scores per text, "
                            f"its manifest lists {len(self.labels)} labels: rebuild it"
                        )
                    emb = np.zeros((n, e.shape[1]), dtype=np.float32)
                probs[idx] = p
                emb[idx] = e
        assert emb is not None
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        emb /= np.maximum(norms, 1e-12)
        return probs, emb, [t.truncated for t in items]

    def predict(
        self, texts: list[str], tokens: Sequence[TokenizedText] | None = None
    ) -> BatchResult:
        probs, emb, truncated = self.run_raw(texts, tokens)
        passages = None
        if self.max_passages > 1:
            probs, passages, truncated = self._passages(texts, probs, emb, truncated)
        labels = self.labels
        if not labels:  # an embedder: no label, no scores
            return BatchResult(
                [None] * len(texts), [{}] * len(texts), emb, truncated, self._identity, passages
            )
        top = probs.argmax(axis=1) if len(texts) else np.zeros(0, dtype=np.int64)
        scores = [{label: float(p) for label, p in zip(labels, row, strict=True)} for row in probs]
        return BatchResult(
            labels=[labels[int(i)] for i in top],
            scores=scores,
            embeddings=emb,
            truncated=truncated,
            model=self._identity,
            passages=passages,
        )

    def _passages(
        self, texts: list[str], probs: np.ndarray, emb: np.ndarray, truncated: list[bool]
    ) -> tuple[np.ndarray, list[list[Passage]], list[bool]]:
        """Every window of each text that did not fit, embedded in one more run: the texts'
        passages, their pooled scores and whether any text is still cut (more windows than
        max_passages). Pooling: the first window weighs as much as all the others together
        (half of the score, the mean of the rest the other half). A text's opening (a
        headline and lead, a review's verdict) tends to carry it; a mean weighted by window length
        lost 4 of 150 long BBC articles' topics that truncation got right (docs/search.md)."""
        spans: list[list[Span]] = []
        still_cut: list[bool] = []
        for text, cut in zip(texts, truncated, strict=True):
            whole = [Span(0, len(text))]
            found, complete = (
                self._tokenizer.windows(text, self.max_passages) if cut else (whole, True)
            )
            spans.append(found)
            still_cut.append(not complete)
        extra = [(i, span) for i, found in enumerate(spans) for span in found[1:]]
        more_probs, more_emb, _ = self.run_raw([texts[i][s.start : s.end] for i, s in extra])
        passages = [
            [Passage(found[0].start, found[0].end, emb[i])] for i, found in enumerate(spans)
        ]
        rest = np.zeros_like(probs)
        for j, (i, span) in enumerate(extra):
            passages[i].append(Passage(span.start, span.end, more_emb[j]))
            rest[i] += more_probs[j]
        pooled = probs.copy()
        for i, found in enumerate(spans):
            if len(found) > 1:
                pooled[i] = 0.5 * probs[i] + 0.5 * rest[i] / (len(found) - 1)
        return pooled, passages, still_cut

    def warmup(self, rounds: int = 2) -> None:
        """Run a few small batches so first real requests do not pay allocation costs."""
        texts = list(WARMUP_TEXTS)
        cap = self._require().max_batch_size
        for _ in range(rounds):
            self.predict(texts[: min(len(texts), cap)])
            self.predict([texts[0]])

    def close(self) -> None:
        """Waits for the batches in progress."""
        for _ in range(self._concurrent):
            self._runs.acquire()
        try:
            if self._backend is not None:
                self._backend.close()
                self._backend = None
        finally:
            for _ in range(self._concurrent):
                self._runs.release()

    def __enter__(self) -> LoadedEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_batches(
    engine: Engine,
    batches: Sequence[list[str]],
    on_batch: Callable[[int], object] | None = None,
) -> tuple[float, list[float]]:
    """Predict every batch the way the worker does, `engine.concurrent_batches` at a time:
    (wall seconds for all of them, each batch's seconds). Benches measure the engine alone
    with this, so it is the same engine the worker runs. `on_batch(size)` after each one."""

    def one(batch: list[str]) -> float:
        started = time.perf_counter()
        engine.predict(batch)
        elapsed = time.perf_counter() - started
        if on_batch is not None:
            on_batch(len(batch))
        return elapsed

    started = time.perf_counter()
    with ThreadPoolExecutor(max(1, engine.concurrent_batches)) as threads:
        times = list(threads.map(one, batches))
    return time.perf_counter() - started, times
