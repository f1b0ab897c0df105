"""Retrieval quality: BEIR-layout eval sets and the usual ranking metrics.

A BEIR folder holds `corpus.jsonl` ({"_id", "title"?, "text"} per line), `queries.jsonl`
({"_id", "text"}) and `qrels/test.tsv` (a `query-id corpus-id score` header, then one graded
judgement per line; score 0 means judged not relevant). Metrics follow trec_eval, as BEIR's
pytrec_eval does: nDCG with linear gains, precision over the cut-off, recall over all relevant
documents; each is the mean over the queries that have at least one relevant document.
Pure functions: the searching is the caller's (`streams/cli/evaluate.py`).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from indexer.errors import IndexerError

METRICS = ("ndcg@10", "p@10", "recall@100")
SHIPPED_DIR = Path(__file__).resolve().parent / "evalsets"

Qrels = dict[str, dict[str, int]]  # query id -> document id -> grade


class EvalSetError(IndexerError):
    """A folder that is not a readable BEIR eval set (the message says which file and line)."""


@dataclass(frozen=True, slots=True)
class EvalDoc:
    id: str
    title: str
    text: str

    @property
    def indexed_text(self) -> str:
        """What is embedded and searched: the title, then the body."""
        return f"{self.title}. {self.text}" if self.title else self.text


@dataclass(frozen=True, slots=True)
class EvalSet:
    name: str
    corpus: list[EvalDoc]
    queries: dict[str, str]  # id -> text, only the queries that qrels judge
    qrels: Qrels


@dataclass(frozen=True, slots=True)
class Scores:
    """Mean metrics over ``queries`` queries."""

    ndcg_at_10: float
    precision_at_10: float
    recall_at_100: float
    queries: int

    def as_dict(self) -> dict[str, float]:
        return dict(
            zip(METRICS, (self.ndcg_at_10, self.precision_at_10, self.recall_at_100), strict=True)
        )


def shipped_set(name: str = "bbc-topics") -> Path:
    """The folder of an eval set shipped with Inflow."""
    return SHIPPED_DIR / name


def _jsonl(path: Path) -> list[dict[str, object]]:
    if not path.is_file():
        raise EvalSetError(
            f"{path} is missing: a BEIR folder holds corpus.jsonl, queries.jsonl and qrels/test.tsv"
        )
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EvalSetError(f"{path}:{lineno}: not JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("_id"), str | int):
                raise EvalSetError(f'{path}:{lineno}: expected an object with an "_id"')
            rows.append(row)
    return rows


def _read_qrels(path: Path) -> Qrels:
    if not path.is_file():
        raise EvalSetError(f"{path} is missing: a BEIR folder holds qrels/test.tsv")
    qrels: Qrels = {}
    with path.open(encoding="utf-8", newline="") as fh:
        for lineno, row in enumerate(csv.reader(fh, delimiter="\t"), 1):
            if not row or (lineno == 1 and row[0] == "query-id"):
                continue
            if len(row) != 3:
                raise EvalSetError(f"{path}:{lineno}: expected query-id, corpus-id, score")
            try:
                grade = int(row[2])
            except ValueError:
                raise EvalSetError(f"{path}:{lineno}: score {row[2]!r} is not an integer") from None
            qrels.setdefault(row[0], {})[row[1]] = grade
    return qrels


def load_beir(folder: Path) -> EvalSet:
    """Read a BEIR folder; the queries kept are those the qrels judge relevant to something."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvalSetError(f"{folder} is not a folder: pass a BEIR eval set folder")
    corpus = []
    for row in _jsonl(folder / "corpus.jsonl"):
        text, title = row.get("text"), row.get("title") or ""
        if not isinstance(text, str) or not isinstance(title, str):
            raise EvalSetError(f"{folder / 'corpus.jsonl'}: document {row['_id']} has no text")
        corpus.append(EvalDoc(str(row["_id"]), title.strip(), text.strip()))
    queries = {str(r["_id"]): str(r.get("text", "")) for r in _jsonl(folder / "queries.jsonl")}
    qrels = _read_qrels(folder / "qrels" / "test.tsv")
    judged = {q: rels for q, rels in qrels.items() if q in queries and any(rels.values())}
    if not judged:
        raise EvalSetError(f"{folder}: no query of queries.jsonl has a relevant document")
    return EvalSet(folder.name, corpus, {q: queries[q] for q in judged}, judged)


def dcg(grades: Sequence[int]) -> float:
    return sum(g / math.log2(rank + 2) for rank, g in enumerate(grades) if g > 0)


def ndcg_at(ranked: Sequence[str], relevant: Mapping[str, int], k: int = 10) -> float:
    ideal = dcg(sorted((g for g in relevant.values() if g > 0), reverse=True)[:k])
    if ideal == 0:
        return 0.0
    return dcg([relevant.get(doc, 0) for doc in ranked[:k]]) / ideal


def precision_at(ranked: Sequence[str], relevant: Mapping[str, int], k: int = 10) -> float:
    return sum(1 for doc in ranked[:k] if relevant.get(doc, 0) > 0) / k


def recall_at(ranked: Sequence[str], relevant: Mapping[str, int], k: int = 100) -> float:
    wanted = sum(1 for g in relevant.values() if g > 0)
    if wanted == 0:
        return 0.0
    return sum(1 for doc in ranked[:k] if relevant.get(doc, 0) > 0) / wanted


def score_run(run: Mapping[str, Sequence[str]], qrels: Qrels) -> Scores:
    """Mean metrics of ``run`` (query id -> ranked document ids) over the judged queries; a
    query the run lacks counts as an empty ranking."""
    judged = [q for q, rels in qrels.items() if any(g > 0 for g in rels.values())]
    if not judged:
        raise EvalSetError("no judged query: nothing to score")
    n = len(judged)
    return Scores(
        ndcg_at_10=sum(ndcg_at(run.get(q, ()), qrels[q], 10) for q in judged) / n,
        precision_at_10=sum(precision_at(run.get(q, ()), qrels[q], 10) for q in judged) / n,
        recall_at_100=sum(recall_at(run.get(q, ()), qrels[q], 100) for q in judged) / n,
        queries=n,
    )
