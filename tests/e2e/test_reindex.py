"""Re-embedding with an alias cutover on genuine services: a worker serves the default model
while `inflow reindex --version V` backfills a second model's index from the input topic and
events keep arriving; the alias then switches atomically. Every id ends in the new index once,
kNN through the alias returns one model's vectors before and after, and `--rollback` switches
back with the events the old index missed."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete
from elasticsearch import AsyncElasticsearch

from engines.registry import Registry
from indexer.evaluation import shipped_set
from schemas import encode_event
from tests.e2e.conftest import ROOT, Names, WorkerFactory
from tests.e2e.test_own_models import own_engine  # noqa: F401  (the topic classifier's build)
from tests.e2e.test_pipeline import _produce

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

N = 120  # events before the backfill, and again while it runs


def _registry(tmp: Path, default: Path, topic: Path) -> tuple[Path, str, str]:
    """One registry holding the default engine (active) and the topic classifier."""
    root = tmp / "registry"
    first = Registry(default).active()
    second = Registry(topic).active()
    assert first is not None and second is not None
    for source, manifest in ((default, first), (topic, second)):
        shutil.copytree(
            source / "versions" / manifest.version, root / "versions" / manifest.version
        )
    Registry(root).activate(first.version)
    return root, first.version, second.version


async def _alias_state(es_url: str, alias: str) -> tuple[list[str], dict[str, int], set[str]]:
    """(indices behind the alias, id -> count, model versions of a kNN query's hits)."""
    async with AsyncElasticsearch(es_url) as es:
        await es.indices.refresh(index=alias)
        indices = sorted((await es.indices.get_alias(name=alias)).body)
        found = await es.search(index=alias, size=1000, source=["id", "embedding"])
        counts: dict[str, int] = {}
        for hit in found["hits"]["hits"]:
            counts[hit["_id"]] = counts.get(hit["_id"], 0) + 1
        vector = found["hits"]["hits"][0]["_source"]["embedding"]
        knn = await es.search(
            index=alias,
            knn={"field": "embedding", "query_vector": vector, "k": 20, "num_candidates": 100},
            source=["model.version"],
            size=20,
        )
        versions = {hit["_source"]["model"]["version"] for hit in knn["hits"]["hits"]}
    return indices, counts, versions


def _reindex(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "streams.cli.main", "reindex", *args, "--handover-s", "3"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _gate_figures(output: str, verdict: str) -> dict[str, float]:
    """version -> figure from the gate's line ("... V1 0.959, live V2 0.911 ...")."""
    line = next((x for x in output.splitlines() if f"quality gate {verdict}" in x), None)
    assert line is not None, output
    found = re.findall(r"(v\d+-[\w-]+) (\d\.\d{3})", line)
    assert len(found) == 2, line
    return {version: float(value) for version, value in found}


async def _finish(proc: subprocess.Popen[str]) -> str:
    out, err = await asyncio.to_thread(proc.communicate, timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return out + err


async def _wait_count(es_url: str, alias: str, expected: int, timeout_s: float = 120) -> None:
    async with AsyncElasticsearch(es_url) as es:
        deadline = time.monotonic() + timeout_s
        while True:
            await es.indices.refresh(index=alias)
            if int((await es.count(index=alias))["count"]) >= expected:
                return
            assert time.monotonic() < deadline, f"fewer than {expected} documents in {alias}"
            await asyncio.sleep(0.5)


async def test_reindex_backfills_while_events_flow_then_cuts_over_and_rolls_back(
    workers: WorkerFactory,
    names: Names,
    kafka_bootstrap: str,
    es_url: str,
    engine_dir: Path,
    own_engine: dict[str, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    registry, old, new = _registry(tmp_path, engine_dir, own_engine["topic"])
    env = {**workers.env, "INFLOW_ENGINE_DIR": str(registry)}
    workers.start(INFLOW_ENGINE_DIR=str(registry))

    def events(start: int) -> list[tuple[bytes, bytes]]:
        return [
            (
                f"r-{i}".encode(),
                encode_event(f"news item {i}: the market and the match", id=f"r-{i}"),
            )
            for i in range(start, start + N)
        ]

    await _produce(kafka_bootstrap, names.texts, events(0))
    await _wait_count(es_url, names.alias, N)
    indices_before, counts, versions = await _alias_state(es_url, names.alias)
    assert len(indices_before) == 1 and len(counts) == N and versions == {old}

    # With the shipped eval set as the quality gate: the topic classifier is measured better
    # than the default model on it (kNN nDCG@10), so the gate lets the cutover happen.
    proc = _reindex(env, "--version", new, "--eval-set", str(shipped_set()))
    for start in range(N, 2 * N, N // 4):  # live traffic during the backfill
        await _produce(kafka_bootstrap, names.texts, events(start)[: N // 4])
        await asyncio.sleep(0.5)
    output = await _finish(proc)
    assert "re-embedded" in output and "now serves" in output, output
    gate = _gate_figures(output, "passed")
    assert gate[new] > gate[old], output

    ids = {f"r-{i}" for i in range(2 * N)}
    indices_after, counts, versions = await _alias_state(es_url, names.alias)
    assert indices_after != indices_before and len(indices_after) == 1
    assert set(counts) == ids and set(counts.values()) == {1}, "every id once in the new index"
    assert versions == {new}, "kNN through the alias sees only the new model's vectors"
    assert Registry(registry).active_version() == new

    # After the cutover the workers write the new model's predictions to the new index.
    await _produce(kafka_bootstrap, names.texts, events(2 * N)[:10])
    await _wait_count(es_url, names.alias, 2 * N + 10)

    # Back to the default model through the gate: worse by more than the tolerance, refused
    # with both figures, and nothing moves. (--rollback skips the gate: going back must work.)
    refused = _reindex(
        env, "--version", old, "--eval-set", str(shipped_set()), "--tolerance", "0.01"
    )
    out, err = await asyncio.to_thread(refused.communicate, timeout=300)
    assert refused.returncode != 0, out + err
    figures = _gate_figures(out + err, "refused the cutover")
    assert figures[old] < figures[new] - 0.01, out + err
    assert (await _alias_state(es_url, names.alias))[0] == indices_after
    assert Registry(registry).active_version() == new

    output = await _finish(_reindex(env, "--rollback"))
    assert f"rolling back to {old}" in output, output
    indices_back, counts, versions = await _alias_state(es_url, names.alias)
    assert indices_back == indices_before and versions == {old}
    assert set(counts) == ids | {f"r-{i}" for i in range(2 * N, 2 * N + 10)}
    assert set(counts.values()) == {1}
    assert Registry(registry).active_version() == old


async def test_reindex_takes_what_retention_dropped_from_the_index_stored_text(
    workers: WorkerFactory,
    names: Names,
    kafka_bootstrap: str,
    es_url: str,
    engine_dir: Path,
    own_engine: dict[str, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    registry, _old, new = _registry(tmp_path, engine_dir, own_engine["topic"])
    env = {**workers.env, "INFLOW_ENGINE_DIR": str(registry)}
    workers.start(INFLOW_ENGINE_DIR=str(registry))
    texts = [(f"k-{i}", f"story {i}: rain, goals and markets") for i in range(N)]
    await _produce(
        kafka_bootstrap, names.texts, [(k.encode(), encode_event(t, id=k)) for k, t in texts]
    )
    await _wait_count(es_url, names.alias, N)

    # Retention took the older half of every partition: only the index still has those events.
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()  # what partitions_for_topic reads
        partitions = consumer.partitions_for_topic(names.texts) or set()
        tps = [TopicPartition(names.texts, p) for p in sorted(partitions)]
        ends = await consumer.end_offsets(tps)
        cut = {tp: RecordsToDelete(before_offset=ends[tp] // 2) for tp in tps}
        await admin.delete_records(cut)
        dropped = sum(ends[tp] // 2 for tp in tps)
        assert dropped > 0 and (await consumer.beginning_offsets(tps)) == {
            tp: ends[tp] // 2 for tp in tps
        }
    finally:
        await consumer.stop()
        await admin.close()

    output = await _finish(_reindex(env, "--version", new, "--no-activate"))
    assert "no longer holds offsets" in output, output
    assert f"{N - dropped} from topic {names.texts}, {dropped} from the stored text" in output
    _indices, counts, versions = await _alias_state(es_url, names.alias)
    assert set(counts) == {k for k, _ in texts} and set(counts.values()) == {1}
    assert versions == {new}
