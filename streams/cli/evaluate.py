"""`inflow eval retrieval [FOLDER]`: how well an engine version's index answers a BEIR eval set,
as full text (BM25), kNN and hybrid (reciprocal rank fusion of the two), in one table.

The corpus goes straight through the engine and the bulk writer (the same document the worker
writes: `build_prediction`), not through Kafka: an eval measures the model and the index, and a
private index per run keeps it apart from live traffic. The index is deleted afterwards unless
`--keep`. Queries are embedded by the same engine, as `/similar` does.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
from elasticsearch import ApiError

from engines.registry import Registry
from indexer import BulkWriter, Searcher
from indexer.evaluation import METRICS, EvalSet, Scores, load_beir, score_run, shipped_set
from indexer.mapping import prediction_mappings
from indexer.search import HYBRID_ALPHA
from schemas import TextEvent
from streams.app import es_settings
from streams.config import Settings
from streams.delivery.batcher import ItemResult
from streams.delivery.infer import build_prediction
from streams.delivery.records import InputRecord
from streams.errors import ConfigError

MODES = ("bm25", "knn", "hybrid", "hybrid-rrf")  # hybrid: linear fusion, the default
DEPTH = 100  # ranks kept per query: recall@100 needs them all
EMBED_BATCH = 32
EVAL_TOPIC = "inflow-eval"  # the documents' `source.topic`: no Kafka topic is read


@dataclass(frozen=True, slots=True)
class RetrievalReport:
    eval_set: str
    version: str
    documents: int
    queries: int
    fusion: str  # where hybrid-rrf fused: "server" (Elasticsearch's rrf retriever) or "client"
    index: str  # the private index (deleted after the run unless --keep)
    index_s: float
    scores: dict[str, Scores]  # mode -> scores

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["scores"] = {mode: s.as_dict() for mode, s in self.scores.items()}
        return out

    def table(self) -> str:
        head = f"{'mode':<11}" + "".join(f"{m:>12}" for m in METRICS)
        rows = [
            f"{mode:<11}" + "".join(f"{v:>12.3f}" for v in self.scores[mode].as_dict().values())
            for mode in MODES
        ]
        return "\n".join(
            [
                f"{self.eval_set}: {self.documents} documents, {self.queries} queries, engine "
                f"{self.version}; hybrid = linear fusion (alpha {HYBRID_ALPHA}), hybrid-rrf fused "
                f"in the {self.fusion}",
                head,
                *rows,
            ]
        )


async def embed_documents(
    engine: Any, events: list[tuple[InputRecord, TextEvent]]
) -> list[dict[str, Any]]:
    """The new model's documents for `events` (where each was read, what it said)."""
    if not events:
        return []
    result = await asyncio.to_thread(engine.predict, [e.text for _, e in events])
    docs = []
    for i, (record, event) in enumerate(events):
        item = ItemResult(
            label=result.labels[i],
            scores=result.scores[i],
            embedding=np.asarray(result.embeddings[i], dtype=np.float32),
            truncated=result.truncated[i],
            model=result.model,
            queue_ms=0.0,
            infer_ms=0.0,
            batch_size=len(events),
        )
        docs.append(msgspec.to_builtins(build_prediction(record, event, item)))
    return docs


def _noop() -> None:
    return None


def _say(text: str, quiet: bool) -> None:
    if not quiet:
        print(text, file=sys.stderr, flush=True)


async def _index_corpus(
    engine: Any, writer: BulkWriter, evalset: EvalSet, say: Callable[[str], None]
) -> None:
    done = 0
    for start in range(0, len(evalset.corpus), EMBED_BATCH):
        chunk = evalset.corpus[start : start + EMBED_BATCH]
        events = [
            (
                InputRecord(EVAL_TOPIC, 0, start + i, None, None, _noop),
                TextEvent(doc.id, doc.indexed_text, None, None),
            )
            for i, doc in enumerate(chunk)
        ]
        outcome = await writer.bulk_index(await embed_documents(engine, events))
        if outcome.rejected:
            first = outcome.rejected[0]
            raise ConfigError(
                f"the eval index refused {len(outcome.rejected)} documents "
                f"(first {first.id}: {first.reason})"
            )
        done += len(chunk)
        say(f"indexed {done}/{len(evalset.corpus)} documents")


async def evaluate_retrieval(
    settings: Settings,
    evalset: EvalSet,
    version: str | None = None,
    *,
    keep: bool = False,
    quiet: bool = False,
) -> RetrievalReport:
    """Index ``evalset``'s corpus with engine ``version`` (the active one by default) into a
    private index, run every query three ways and score the rankings."""
    from engines.load import load_engine

    registry = Registry(settings.engine_dir)
    manifest = registry.verify(version) if version else registry.active()
    if manifest is None:
        raise ConfigError(f"no active engine in {settings.engine_dir}: run `inflow engine ensure`")

    def say(text: str) -> None:
        _say(text, quiet)

    engine = await asyncio.to_thread(load_engine, settings.engine_dir, manifest.version)
    es = es_settings(settings).make_client()
    alias = f"inflow-eval-{secrets.token_hex(4)}"
    index = f"{alias}-000001"
    try:
        await es.indices.create(
            index=index,
            mappings=prediction_mappings(manifest.embedding_dim),
            aliases={alias: {"is_write_index": True}},
        )
        say(f"indexing {len(evalset.corpus)} documents of {evalset.name} into {index}")
        started = time.monotonic()
        writer = BulkWriter(client=es, alias=alias, ensure=False)
        await writer.start()
        try:
            await _index_corpus(engine, writer, evalset, say)
        finally:
            await writer.stop()
        # One segment: int8_hnsw (the default from 8.14 on) quantizes per segment, so the kNN
        # figures would otherwise depend on how bulk requests happened to fall into segments.
        try:
            await es.indices.forcemerge(index=index, max_num_segments=1)
        except ApiError as exc:  # serverless clusters refuse it: figures may then vary a little
            say(f"force merge refused ({exc.meta.status}): kNN figures may vary between runs")
        await es.indices.refresh(index=index)
        index_s = time.monotonic() - started
        ids = list(evalset.queries)
        texts = [evalset.queries[q] for q in ids]
        predicted = await asyncio.to_thread(engine.predict, texts)
        vectors = [[float(x) for x in v] for v in predicted.embeddings]
        runs: dict[str, dict[str, list[str]]] = {mode: {} for mode in MODES}
        async with Searcher(client=es, alias=alias) as searcher:
            for n, (qid, text, vector) in enumerate(zip(ids, texts, vectors, strict=True), 1):
                text_hits = await searcher.search_text(text, k=DEPTH)
                knn_hits = await searcher.search_similar(vector, k=DEPTH)
                linear = await searcher.search_hybrid(text, vector, k=DEPTH, method="linear")
                rrf = await searcher.search_hybrid(text, vector, k=DEPTH, method="rrf")
                for mode, result in zip(MODES, (text_hits, knn_hits, linear, rrf), strict=True):
                    runs[mode][qid] = [hit.id for hit in result.hits]
                if n % 10 == 0 or n == len(ids):
                    say(f"searched {n}/{len(ids)} queries")
            fusion = searcher.fusion
        return RetrievalReport(
            eval_set=evalset.name,
            version=manifest.version,
            documents=len(evalset.corpus),
            queries=len(ids),
            fusion=fusion,
            index=index,
            index_s=round(index_s, 2),
            scores={mode: score_run(runs[mode], evalset.qrels) for mode in MODES},
        )
    finally:
        engine.close()
        if not keep:
            await es.indices.delete(index=index, ignore_unavailable=True)
        await es.close()


def run_eval_retrieval(
    settings: Settings,
    folder: Path | None,
    *,
    version: str | None,
    as_json: Path | None,
    keep: bool,
    quiet: bool,
) -> int:
    evalset = load_beir(folder if folder is not None else shipped_set())
    report = asyncio.run(evaluate_retrieval(settings, evalset, version, keep=keep, quiet=quiet))
    print(report.table())
    if as_json is not None:
        text = json.dumps(report.as_json(), indent=2)
        if str(as_json) == "-":
            print(text)
        else:
            as_json.write_text(text + "\n", encoding="utf-8")
    return 0


@dataclass(frozen=True, slots=True)
class QualityGate:
    """What a cutover must keep: ``metric`` of ``mode`` on ``evalset`` may fall by at most
    ``tolerance`` (absolute) from the live model's."""

    evalset: EvalSet
    tolerance: float = 0.0
    mode: str = "knn"
    metric: str = "ndcg@10"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"eval mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.metric not in METRICS:
            raise ConfigError(f"eval metric must be one of {', '.join(METRICS)}")
        if not 0 <= self.tolerance < 1:
            raise ConfigError(f"the tolerance is a score difference in 0..1, got {self.tolerance}")


@dataclass(frozen=True, slots=True)
class GateVerdict:
    gate: QualityGate
    new_version: str
    new_score: float
    live_version: str
    live_score: float

    @property
    def passed(self) -> bool:
        return self.new_score >= self.live_score - self.gate.tolerance

    def line(self) -> str:
        g = self.gate
        figures = (
            f"{g.mode} {g.metric} on {g.evalset.name}: {self.new_version} {self.new_score:.3f}, "
            f"live {self.live_version} {self.live_score:.3f} (tolerance {g.tolerance:.3f})"
        )
        if self.passed:
            return f"quality gate passed: {figures}"
        return (
            f"quality gate refused the cutover: {figures}; the new model is worse by "
            f"{self.live_score - self.new_score:.3f}: the alias stays where it is"
        )


async def check_quality(
    settings: Settings, gate: QualityGate, new_version: str, live_version: str, *, quiet: bool
) -> GateVerdict:
    """Both versions measured on the same eval set, each in a private index."""
    figures = {}
    for version in (new_version, live_version):
        _say(f"quality gate: measuring {version} on {gate.evalset.name}", quiet)
        report = await evaluate_retrieval(settings, gate.evalset, version, quiet=True)
        figures[version] = report.scores[gate.mode].as_dict()[gate.metric]
    return GateVerdict(gate, new_version, figures[new_version], live_version, figures[live_version])
