"""`inflow bench knn`: kNN latency and bulk rate as an index grows, per vector index type.

Generated vectors (384 wide, L2-normalised, drawn around 2,000 random centres so that
neighbourhoods exist, seeded) go into one scratch index per `index_options.type` on the
configured Elasticsearch (`inflow dev up` gives one). At every size step the bench measures:
- the bulk rate of that step (documents/s, refresh included);
- `/similar`'s query (the Searcher's kNN: k 10, 100 candidates) p50/p99 over `--queries`
  queries, while a second task keeps bulk-indexing the next step's vectors;
- recall@10 of those queries against exact cosine over every vector indexed so far.
The scratch indices are deleted at the end unless `--keep`.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from elasticsearch import AsyncElasticsearch
from elasticsearch.helpers import async_bulk

from indexer import Searcher
from streams.app import es_settings
from streams.config import Settings
from streams.errors import ConfigError

DIMS = 384
CENTRES = 2_000
CHUNK = 2_000  # documents per bulk request
INDEX_TYPES = ("int8_hnsw", "hnsw")  # int8_hnsw: Elasticsearch's default from 8.14 on


@dataclass(frozen=True, slots=True)
class SizeRow:
    index_type: str
    documents: int
    bulk_docs_per_s: float  # for the step that reached this size
    knn_p50_ms: float  # while ingest goes on
    knn_p99_ms: float
    recall_at_10: float
    ingest_during_queries: int  # documents the concurrent ingest wrote meanwhile


def vectors(n: int, seed: int, centres: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    rng = np.random.default_rng(seed)
    picked = centres[rng.integers(0, len(centres), n)]
    out = picked + rng.normal(0.0, 0.35 / np.sqrt(DIMS), (n, DIMS)).astype(np.float32)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out.astype(np.float32)


def _actions(
    index: str, block: npt.NDArray[np.float32], first: int, prefix: str
) -> Iterator[dict[str, Any]]:
    for i, row in enumerate(block):
        doc_id = f"{prefix}{first + i}"
        yield {"_index": index, "_id": doc_id, "id": doc_id, "embedding": row.tolist()}


async def _ingest(
    es: AsyncElasticsearch, index: str, block: npt.NDArray[np.float32], first: int, prefix: str = ""
) -> int:
    done = 0
    for start in range(0, len(block), CHUNK):
        part = block[start : start + CHUNK]
        actions = _actions(index, part, first + start, prefix)
        ok, _ = await async_bulk(es, actions, chunk_size=CHUNK, refresh=False)
        done += int(ok)
    return done


def _recall(
    matrix: npt.NDArray[np.float32], probe: npt.NDArray[np.float32], found: list[set[str]]
) -> float:
    """Mean recall@10 of `found` against exact cosine (the vectors are unit length)."""
    total = 0.0
    for start in range(0, len(probe), 16):
        scores = matrix @ probe[start : start + 16].T  # [documents, 16]
        for j in range(scores.shape[1]):
            exact = {str(i) for i in np.argpartition(-scores[:, j], 10)[:10]}
            total += len(exact & found[start + j]) / 10
    return total / len(probe)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _bench_type(
    es: AsyncElasticsearch,
    index_type: str,
    sizes: list[int],
    queries: int,
    seed: int,
    keep: bool,
) -> list[SizeRow]:
    index = f"inflow-knnbench-{index_type.replace('_', '-')}"
    await es.indices.delete(index=index, ignore_unavailable=True)
    await es.indices.create(
        index=index,
        settings={"index": {"number_of_shards": 1, "number_of_replicas": 0}},
        mappings={
            "dynamic": False,
            "properties": {
                "id": {"type": "keyword"},
                "embedding": {
                    "type": "dense_vector",
                    "dims": DIMS,
                    "index": True,
                    "similarity": "cosine",
                    "index_options": {"type": index_type},
                },
            },
        },
    )
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(CENTRES, DIMS)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    probe = vectors(queries, seed + 1, centres)
    stored: list[npt.NDArray[np.float32]] = []
    rows: list[SizeRow] = []
    have = 0
    try:
        async with Searcher(client=es, alias=index) as searcher:
            for step, size in enumerate(sizes):
                block = vectors(size - have, seed + 10 + step, centres)
                started = time.perf_counter()
                await _ingest(es, index, block, have)
                await es.indices.refresh(index=index)
                rate = len(block) / (time.perf_counter() - started)
                stored.append(block)
                have = size
                matrix = np.concatenate(stored)
                # Queries while more vectors keep arriving (deleted again afterwards).
                background = vectors(min(CHUNK * 20, max(CHUNK, size // 10)), seed + 99, centres)
                ingest = asyncio.create_task(_ingest(es, index, background, 0, prefix="bg-"))
                latencies: list[float] = []
                found: list[set[str]] = []
                for vector in probe:
                    t0 = time.perf_counter()
                    result = await searcher.search_similar(vector.tolist(), k=10)
                    latencies.append((time.perf_counter() - t0) * 1000)
                    found.append({h.id for h in result.hits})
                written = await ingest
                # By id: _delete_by_query lives in the reindex module the local node lacks.
                deletes = (
                    {"_op_type": "delete", "_index": index, "_id": f"bg-{i}"}
                    for i in range(len(background))
                )
                await async_bulk(es, deletes, chunk_size=CHUNK, refresh=True)
                recall = _recall(matrix, probe, found)
                rows.append(
                    SizeRow(
                        index_type,
                        size,
                        round(rate),
                        round(statistics.median(latencies), 2),
                        round(_percentile(latencies, 0.99), 2),
                        round(recall, 3),
                        written,
                    )
                )
                row = rows[-1]
                print(
                    f"{index_type} {size:>9,}: bulk {row.bulk_docs_per_s:,.0f} docs/s, kNN "
                    f"p50 {row.knn_p50_ms} ms p99 {row.knn_p99_ms} ms, recall@10 "
                    f"{row.recall_at_10} ({written} written meanwhile)",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        if not keep:
            await es.indices.delete(index=index, ignore_unavailable=True)
    return rows


async def bench_knn(
    settings: Settings, sizes: list[int], queries: int, types: list[str], seed: int, keep: bool
) -> list[SizeRow]:
    if sorted(sizes) != sizes or not sizes or sizes[0] < 10:
        raise ConfigError("--sizes must be increasing index sizes of at least 10")
    unknown = set(types) - set(INDEX_TYPES)
    if unknown:
        raise ConfigError(f"--types takes {', '.join(INDEX_TYPES)}, not {', '.join(unknown)}")
    es = es_settings(settings).make_client()
    try:
        rows = []
        for index_type in types:
            rows += await _bench_type(es, index_type, sizes, queries, seed, keep)
        return rows
    finally:
        await es.close()


def run_knn_bench(
    settings: Settings,
    *,
    sizes: list[int],
    queries: int,
    types: list[str],
    seed: int,
    keep: bool,
    json_path: Path | None,
) -> int:
    rows = asyncio.run(bench_knn(settings, sizes, queries, types, seed, keep))
    print(
        f"{'index type':<10} {'documents':>10} {'bulk docs/s':>12} {'kNN p50 ms':>11} "
        f"{'kNN p99 ms':>11} {'recall@10':>10}"
    )
    for r in rows:
        print(
            f"{r.index_type:<10} {r.documents:>10,} {r.bulk_docs_per_s:>12,.0f} "
            f"{r.knn_p50_ms:>11.2f} {r.knn_p99_ms:>11.2f} {r.recall_at_10:>10.3f}"
        )
    if json_path is not None:
        json_path.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 0
