"""`inflow bench knn` as a subprocess on a small scale against the test search server: every
step of both index types is measured, recall is computed against exact cosine, and the scratch
indices are gone afterwards."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from elasticsearch import AsyncElasticsearch

from tests.e2e.conftest import ROOT

pytestmark = [pytest.mark.integration]


async def test_knn_bench_measures_each_step_of_each_index_type(es_url: str, tmp_path: Path) -> None:
    out = tmp_path / "knn.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFLOW_")}
    env.update(INFLOW_ES_URL=es_url, INFLOW_KAFKA_BOOTSTRAP="127.0.0.1:1")
    command = [sys.executable, "-m", "streams.cli.main", "bench", "knn", "--sizes", "300,1200"]
    result = await asyncio.to_thread(
        subprocess.run,
        [*command, "--queries", "20", "--json", str(out)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(r["index_type"], r["documents"]) for r in rows] == [
        ("int8_hnsw", 300),
        ("int8_hnsw", 1200),
        ("hnsw", 300),
        ("hnsw", 1200),
    ]
    for row in rows:
        assert row["bulk_docs_per_s"] > 0 and 0 < row["knn_p50_ms"] <= row["knn_p99_ms"]
        assert row["ingest_during_queries"] > 0
        # 100 candidates of at most 1,200 vectors: HNSW finds nearly all true neighbours.
        assert 0.8 <= row["recall_at_10"] <= 1.0, row
    assert "recall@10" in result.stdout
    async with AsyncElasticsearch(es_url) as es:
        assert not (await es.indices.get(index="inflow-knnbench-*")).body
