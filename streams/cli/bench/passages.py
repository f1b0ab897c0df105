"""`inflow bench passages`: engine time per event against text length, with passages and
without (truncation to the engine's window).

Texts of each length are cut from real BBC articles (the shipped bbc-topics corpus, joined end
to end) to a given number of tokens. Every length runs through the same engine, loaded once with
INFLOW_PASSAGES_MAX windows and once with one; all rows come from one run on the same texts.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from engines.errors import EngineError
from engines.types import Engine
from indexer.evaluation import load_beir, shipped_set
from streams.config import Settings
from streams.errors import ConfigError

Example = tuple[str, str]  # (text, label)


@dataclass(frozen=True, slots=True)
class LengthRow:
    tokens: int  # tokens per text (before truncation)
    windows: float  # mean windows per text with passages
    truncated_ms: float  # engine ms per event, first window only
    passages_ms: float  # engine ms per event, every window up to the bound
    ratio: float


def texts_of_length(n: int, tokens: int) -> list[str]:
    """`n` texts of about `tokens` tokens each, cut from the BBC articles in turn."""
    words = " ".join(doc.indexed_text for doc in load_beir(shipped_set()).corpus).split()
    per_word = 1.3  # MiniLM's WordPiece makes about 1.3 tokens per English word
    size = max(1, int(tokens / per_word))
    if size * n > len(words):
        raise ConfigError(f"the corpus holds {len(words)} words: ask for fewer or shorter texts")
    return [" ".join(words[i * size : (i + 1) * size]) for i in range(n)]


def _time(engine: Engine, texts: list[str], batch: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for i in range(0, len(texts), batch):
            engine.predict(texts[i : i + batch])
        best = min(best, time.perf_counter() - started)
    return best * 1000 / len(texts)


@dataclass(frozen=True, slots=True)
class LabelRow:
    data: str  # which labelled long texts
    texts: int  # texts longer than one window
    truncated_accuracy: float  # label == the known one, first window only
    pooled_accuracy: float  # label from the pooled windows


def _labelled_long_texts(engine: Engine, labels: list[str], n: int) -> tuple[str, list[Example]]:
    """Labelled texts longer than the window that this engine's labels can be scored on:
    BBC articles (the shipped eval corpus) for a topic engine, IMDB reviews (the build extra's
    data) for a sentiment one."""
    if set(labels) == {"business", "entertainment", "politics", "sports", "tech"}:
        docs = load_beir(shipped_set()).corpus
        items = [(d.indexed_text, d.id.split("-")[0]) for d in docs]
        data = "BBC articles (bbc-topics corpus)"
    elif {"negative", "positive"} <= set(labels):
        from engines.builder.data import review_examples

        items, data = review_examples(4000), "IMDB reviews"
    else:
        return "", []
    return data, [(t, y) for t, y in items if engine.tokenize([t])[0].truncated][:n]


def long_text_labels(plain: Engine, windowed: Engine, labels: list[str], n: int) -> LabelRow | None:
    """Accuracy on long labelled texts, truncated against pooled; None without such data."""
    try:
        data, long = _labelled_long_texts(plain, labels, n)
    except (ImportError, EngineError) as exc:  # the build extra's data is not installed
        print(f"no label figures: {exc}", file=sys.stderr)
        return None
    if not long:
        return None
    texts, truth = [t for t, _ in long], [y for _, y in long]

    def accuracy(engine: Engine) -> float:
        got = [x for i in range(0, len(texts), 8) for x in engine.predict(texts[i : i + 8]).labels]
        return round(sum(x == y for x, y in zip(got, truth, strict=True)) / len(texts), 3)

    return LabelRow(data, len(long), accuracy(plain), accuracy(windowed))


def run_passages_bench(
    settings: Settings,
    *,
    n: int,
    lengths: list[int],
    batch: int,
    rounds: int,
    json_path: Path | None,
    reviews: int = 300,
) -> int:
    from engines.load import load_engine

    max_passages = max(settings.passages_max, 2)
    version = settings.engine_version or None
    plain = load_engine(settings.engine_dir, version)
    windowed = load_engine(settings.engine_dir, version, max_passages=max_passages)
    rows: list[LengthRow] = []
    labels: LabelRow | None = None
    try:
        for tokens in lengths:
            texts = texts_of_length(n, tokens)
            print(f"{tokens} tokens: {n} texts, best of {rounds}", file=sys.stderr, flush=True)
            truncated_ms = _time(plain, texts, batch, rounds)
            passages_ms = _time(windowed, texts, batch, rounds)
            result = windowed.predict(texts[:batch])
            windows = sum(len(p) for p in result.passages or []) / max(1, len(result))
            rows.append(
                LengthRow(
                    tokens,
                    round(windows, 2),
                    round(truncated_ms, 2),
                    round(passages_ms, 2),
                    round(passages_ms / truncated_ms, 2),
                )
            )
        print(f"labels of up to {reviews} long texts", file=sys.stderr, flush=True)
        labels = long_text_labels(plain, windowed, list(getattr(plain, "labels", [])), reviews)
    finally:
        plain.close()
        windowed.close()
    print(
        f"engine {plain.identity.version}, window {plain.max_seq_len} tokens, passages up to "
        f"{max_passages}, batches of {batch}"
    )
    print(f"{'~tokens':>7} {'windows':>8} {'truncate ms/ev':>15} {'passages ms/ev':>15} {'x':>6}")
    for row in rows:
        print(
            f"{row.tokens:>7} {row.windows:>8.2f} {row.truncated_ms:>15.2f} "
            f"{row.passages_ms:>15.2f} {row.ratio:>6.2f}"
        )
    if labels is not None:
        print(
            f"{labels.texts} {labels.data} longer than one window: label accuracy "
            f"{labels.truncated_accuracy:.3f} truncated, {labels.pooled_accuracy:.3f} pooled"
        )
    if json_path is not None:
        report = {
            "labels": None if labels is None else asdict(labels),
            "engine": plain.identity.version,
            "max_passages": max_passages,
            "batch": batch,
            "rows": [asdict(r) for r in rows],
        }
        json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0
