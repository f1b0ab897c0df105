"""A record parked MID-STREAM on genuine Kafka, with a real worker: records answered and committed
first, then one parked by a permanent error of the system, then more behind it. The group's
committed offset must stop right at the parked record (everything before it committed,
nothing past it), and once the cause is fixed every record ends exactly once.

The parked record: a keyless poison record whose dead letter the texts dead-letter topic
refuses (compacted: the broker refuses a record without a key there); `cleanup.policy=delete`
fixes it, and the worker's recheck (INFLOW_PERMANENT_RECHECK_S) sends it.

The permanent-error tests elsewhere check that nothing is committed while a worker is not
ready, before it consumed anything; here the worker has consumed and committed a prefix when
the record parks, which is where a commit past an unanswered record would happen (faust #606:
committed 10, acked 11..20, Faust alone commits 21).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from schemas import (
    HEADER_ERROR_CODE,
    HEADER_SOURCE_OFFSET,
    DecodeError,
    decode_prediction,
    parse_dead_letter_headers,
)
from tests.chaos.harness import alter_topic, read_all
from tests.e2e.conftest import Names, WorkerFactory
from tests.e2e.test_delivery import Record, committed, create_topics, end_offset, normal, produce

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]

PREFIX = 10  # offsets 0..9: answered and committed before anything parks
BEHIND = 10  # offsets 11..20: behind the parked record at offset 10


async def _until_committed(bootstrap: str, group: str, topic: str, offset: int) -> None:
    deadline = time.monotonic() + 90
    while (position := await committed(bootstrap, group, topic)) != offset:
        assert time.monotonic() < deadline, f"committed {position}, never {offset}"
        await asyncio.sleep(0.5)


async def _predicted(bootstrap: str, names: Names, *, read_committed: bool) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _key, value, _ in await read_all(
        bootstrap, names.predictions, read_committed=read_committed, idle_s=1.5
    ):
        prediction = decode_prediction(value or b"")
        assert not isinstance(prediction, DecodeError), prediction
        counts[prediction.id] = counts.get(prediction.id, 0) + 1
    return counts


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
async def test_a_record_parked_mid_stream_stops_the_commit_right_before_it(
    workers: WorkerFactory, names: Names, kafka_bootstrap: str, guarantee: str
) -> None:
    exactly = guarantee == "exactly_once"
    group = f"{names.app_id}.eos" if exactly else names.app_id
    await create_topics(kafka_bootstrap, names, {names.texts_dlq: {"cleanup.policy": "compact"}})
    worker = workers.start(
        INFLOW_TOPIC_PARTITIONS="1",
        INFLOW_PROCESSING_GUARANTEE=guarantee,
        INFLOW_PERMANENT_RECHECK_S="2",
        INFLOW_STALL_AFTER_S="4",
        INFLOW_HEALTH_POLL_S="1",
        INFLOW_DRAIN_TIMEOUT_S="3",
    )

    # Some records answered and committed.
    prefix = [normal(f"n-{i}") for i in range(PREFIX)]
    await produce(kafka_bootstrap, names.texts, prefix)
    await _until_committed(kafka_bootstrap, group, names.texts, PREFIX)

    # Then one parked, then more behind it.
    behind = [normal(f"n-{i}") for i in range(PREFIX, PREFIX + BEHIND)]
    poison: Record = (None, b"{not json")
    await produce(kafka_bootstrap, names.texts, [poison, *behind])
    parked_at, end = PREFIX, PREFIX + 1 + BEHIND
    behind_ids = {f"n-{i}" for i in range(PREFIX, PREFIX + BEHIND)}
    if not exactly:
        # At least once, the records behind it are answered (published) while it waits.
        deadline = time.monotonic() + 90
        while not behind_ids <= set(await _predicted(kafka_bootstrap, names, read_committed=False)):
            assert time.monotonic() < deadline, "the records behind the parked one never ran"
            await asyncio.sleep(1)
    # Several commit intervals (1 s) and rechecks (2 s): the commit stays right before it.
    positions = []
    for _ in range(6):
        positions.append(await committed(kafka_bootstrap, group, names.texts))
        await asyncio.sleep(1)
    assert positions == [parked_at] * len(positions), (
        f"committed offsets while offset {parked_at} was parked: {positions} (the prefix "
        f"ends at {parked_at}; anything higher passed an unanswered record)"
    )
    ready = await asyncio.to_thread(worker.probe, "/health/ready")
    live = await asyncio.to_thread(worker.probe, "/health/live")
    assert (ready is not None and ready[0] == 503) or (live is not None and live[0] == 503), (
        "a parked record shows on /health/ready or /health/live",
        ready,
        live,
    )
    if exactly:  # in a transaction that never committed: nothing of its batch is visible
        seen = await _predicted(kafka_bootstrap, names, read_committed=True)
        assert not behind_ids & set(seen), sorted(behind_ids & set(seen))
    dead = await read_all(kafka_bootstrap, names.texts_dlq, read_committed=exactly, idle_s=1)
    assert dead == [], "the refusing topic took a dead letter"

    # The cause fixed: the same worker's recheck sends the dead letter; everything ends once.
    await alter_topic(kafka_bootstrap, names.texts_dlq, {"cleanup.policy": "delete"})
    assert end == await end_offset(kafka_bootstrap, names.texts)
    await _until_committed(kafka_bootstrap, group, names.texts, end)
    ids = {f"n-{i}" for i in range(PREFIX + BEHIND)}
    predicted = await _predicted(kafka_bootstrap, names, read_committed=exactly)
    assert set(predicted) == ids, (sorted(ids - set(predicted)), sorted(set(predicted) - ids))
    twice = {eid: n for eid, n in predicted.items() if n != 1}
    assert not twice, f"predicted more than once with no restart: {twice}"
    dead = await read_all(kafka_bootstrap, names.texts_dlq, read_committed=exactly, idle_s=1.5)
    assert len(dead) == 1, f"{len(dead)} dead letters for one parked record"
    key, value, headers = dead[0]
    parsed = parse_dead_letter_headers(list(headers.items()))
    assert key is None and value == poison[1]
    assert parsed[HEADER_SOURCE_OFFSET] == str(parked_at)
    assert parsed[HEADER_ERROR_CODE] == "invalid_json"
    assert worker.proc.poll() is None, "the worker kept running"
