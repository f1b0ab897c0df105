"""A permanent error of the system: one clear log line, not ready, no offset committed, no
retry loop; and delivery resumes by itself once the cause is fixed."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from elasticsearch import AsyncElasticsearch

from schemas import encode_event
from tests.e2e.conftest import Names, WorkerFactory
from tests.e2e.test_pipeline import _indexed_ids, _produce

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]


async def _committed(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(4)]
        found = await admin.list_consumer_group_offsets(group, partitions=tps)
    finally:
        await admin.close()
    return {tp.partition: meta.offset for tp, meta in found.items() if meta.offset >= 0}


async def test_an_index_that_cannot_be_set_up_is_one_line_not_ready_and_commits_nothing(
    workers: WorkerFactory, names: Names, kafka_bootstrap: str, es_url: str
) -> None:
    # A concrete index holds the alias's name: the worker can never set up its alias there.
    async with AsyncElasticsearch(es_url) as es:
        await es.indices.create(index=names.alias)
    worker = workers.start(wait_ready=False, INFLOW_PERMANENT_RECHECK_S="4")
    ids = [f"perm-{i}" for i in range(40)]
    await _produce(
        kafka_bootstrap, names.texts, [(i.encode(), encode_event(f"text {i}", id=i)) for i in ids]
    )
    deadline = time.monotonic() + 90
    while True:
        answer = worker.probe("/health/ready")
        reason = str(answer[1].get("reason")) if answer else ""
        if "concrete index" in reason:
            break
        assert time.monotonic() < deadline, answer
        await asyncio.sleep(0.5)
    assert answer is not None and answer[0] == 503
    await asyncio.sleep(10)  # past the commit interval and two re-checks
    assert await _committed(kafka_bootstrap, names.app_id, names.texts) == {}
    log = worker.log.read_text(errors="replace")
    errors = [line for line in log.splitlines() if "permanent error" in line]
    assert len(errors) == 1, errors
    assert "concrete index" in errors[0] and names.alias in errors[0]
    assert "Traceback" not in log

    # The operator removes the index in the way: the next check sets the alias up and the
    # held-back events are indexed, each once.
    async with AsyncElasticsearch(es_url) as es:
        await es.indices.delete(index=names.alias)
    deadline = time.monotonic() + 60
    while (answer := worker.probe("/health/ready")) is None or answer[0] != 200:
        assert time.monotonic() < deadline, answer
        await asyncio.sleep(0.5)
    indexed = await _indexed_ids(es_url, names.alias, len(ids), timeout_s=120)
    assert sorted(indexed) == sorted(ids)
    assert "succeeded after a permanent error" in worker.log.read_text(errors="replace")
