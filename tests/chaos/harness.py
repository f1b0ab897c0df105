"""What every chaos scenario shares: a steady producer, an RSS sampler, a catch-up clock, and
the accounting (every sent id indexed exactly once, nothing extra, dead letters as expected).

"Indexed once" is counted by the documents' `id` field over every index behind the alias (one
index per model: `indexer.mapping.ModelIndices`), not by `_id`: an index never holds one `_id`
twice, so only the `id` field across the alias's indices can show an event indexed twice.
Predictions are counted by their decoded `id`, each checked against its record's key.

Figures go to stdout (pytest -s shows them) and into a table printed at the end of the session
(`tests/chaos/conftest.py`); INFLOW_CHAOS_REPORT names a JSON-lines file that receives them.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from elasticsearch import AsyncElasticsearch, NotFoundError
from elasticsearch.helpers import async_scan

from engines.builder.data import sample_texts
from schemas import (
    HEADER_ERROR_CODE,
    HEADER_SOURCE_OFFSET,
    HEADER_SOURCE_PARTITION,
    DecodeError,
    decode_prediction,
    encode_event,
    parse_dead_letter_headers,
)
from tests.e2e.conftest import Names

# 1,200 real texts per scenario at a steady 80 events/s (the CI budget: 15 s each); raise them
# for longer runs, e.g. INFLOW_CHAOS_EVENTS=30000 INFLOW_CHAOS_OUTAGE_S=300.
EVENTS = int(os.environ.get("INFLOW_CHAOS_EVENTS", "1200"))
RATE = float(os.environ.get("INFLOW_CHAOS_RATE", "80"))
OUTAGE_S = float(os.environ.get("INFLOW_CHAOS_OUTAGE_S", "20"))

RESULTS: list[Figures] = []


@dataclass
class Figures:
    scenario: str
    guarantee: str = "at_least_once"
    sent: int = 0
    indexed: int = 0
    lost: int = 0
    extra: int = 0  # documents in the index that were never sent
    duplicate_predictions: int = 0  # records on the predictions topic beyond one per id
    dead_letters: int = 0
    catch_up_s: float | None = None
    peak_rss_mb: float = 0.0
    notes: dict[str, object] = field(default_factory=dict)

    def line(self) -> str:
        catch_up = "-" if self.catch_up_s is None else f"{self.catch_up_s:.1f}"
        return (
            f"{self.scenario:<28} {self.guarantee:<13} sent {self.sent:>6}  indexed "
            f"{self.indexed:>6}  lost {self.lost:>3}  extra {self.extra:>3}  dup-predictions "
            f"{self.duplicate_predictions:>5}  dead-letters {self.dead_letters:>3}  catch-up "
            f"{catch_up:>6}s  peak RSS {self.peak_rss_mb:>6.0f} MB"
        )


def record(figures: Figures) -> None:
    RESULTS.append(figures)
    print("\nCHAOS " + figures.line() + (f"  {figures.notes}" if figures.notes else ""))
    report = os.environ.get("INFLOW_CHAOS_REPORT")
    if report:
        with open(report, "a") as out:
            out.write(json.dumps(asdict(figures)) + "\n")


def events(scenario: str, n: int = EVENTS, seed: int = 11) -> list[tuple[str, bytes]]:
    """`n` real texts as (id, encoded event)."""
    return [
        (f"{scenario}-{i}", encode_event(text, id=f"{scenario}-{i}"))
        for i, text in enumerate(sample_texts(n, seed=seed))
    ]


class RssSampler:
    """Samples the resident set of some PIDs every `every_s` on a thread; keeps (t, pid, MB)."""

    def __init__(self, every_s: float = 0.25) -> None:
        self.every_s = every_s
        self.pids: set[int] = set()
        self.samples: list[tuple[float, int, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def watch(self, pid: int) -> None:
        self.pids.add(pid)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            for pid in list(self.pids):
                rss = rss_mb(pid)
                if rss is not None:
                    self.samples.append((time.monotonic(), pid, rss))

    def peak(self, since: float = 0.0, until: float = float("inf")) -> float:
        return max((mb for t, _, mb in self.samples if since <= t <= until), default=0.0)

    def at(self, moment: float, pid: int) -> float:
        """The sample of `pid` closest to `moment`."""
        mine = [(abs(t - moment), mb) for t, p, mb in self.samples if p == pid]
        return min(mine)[1] if mine else 0.0


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class SteadyProducer:
    """Sends events at `rate` per second on a task; `sent_before(t)` says which had been
    acknowledged by then. A send that fails (broker down longer than the client waits) is
    sent again: the id stays the same, so the index still holds it once.

    Each record is keyed by its id, except those named in `keyless` (sent with no key; the id
    only names them here). `placed` says where each acknowledged record landed: id ->
    (partition, offset), which is how a keyless record's dead letter is found again (by its
    `inflow.source.*` headers)."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        records: Sequence[tuple[str, bytes | None]],
        keyless: Collection[str] = (),
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.records = list(records)
        self.keyless = set(keyless)
        self.acked: list[tuple[float, str]] = []
        self.placed: dict[str, list[tuple[int, int]]] = {}
        self.resends = 0
        self.task: asyncio.Task[None] | None = None

    def start(self, rate: float = RATE) -> None:
        self.task = asyncio.create_task(self._run(rate))

    async def wait(self) -> None:
        assert self.task is not None
        await self.task

    def sent_before(self, moment: float) -> list[str]:
        return [eid for t, eid in self.acked if t <= moment]

    async def _run(self, rate: float) -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            enable_idempotence=True,
            linger_ms=5,
            request_timeout_ms=30000,
        )
        await producer.start()
        pending: set[asyncio.Task[None]] = set()

        async def deliver(eid: str, value: bytes | None) -> None:
            key = None if eid in self.keyless else eid.encode()
            while True:
                try:
                    meta = await (await producer.send(self.topic, key=key, value=value))
                    self.acked.append((time.monotonic(), eid))
                    self.placed.setdefault(eid, []).append((meta.partition, meta.offset))
                    return
                except Exception:
                    self.resends += 1
                    await asyncio.sleep(1.0)

        try:
            started = time.monotonic()
            for i, (eid, value) in enumerate(self.records):
                delay = started + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.create_task(deliver(eid, value))
                pending.add(task)
                task.add_done_callback(pending.discard)
            while pending:
                await asyncio.gather(*list(pending))
        finally:
            await producer.stop()


async def create_topics(
    bootstrap: str,
    names: Names,
    partitions: int = 4,
    configs: Mapping[str, Mapping[str, str]] | None = None,
) -> None:
    """The four topics of `names` before any worker makes them, with topic `configs` (e.g. a
    compacted texts DLQ); `partitions` is the worker's default INFLOW_TOPIC_PARTITIONS."""
    configs = configs or {}
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(name, partitions, 1, topic_configs=dict(configs.get(name, {})))
                for name in (names.texts, names.predictions, names.texts_dlq, names.predictions_dlq)
            ]
        )
    finally:
        await admin.close()


async def alter_topic(bootstrap: str, topic: str, config: Mapping[str, str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, dict(config))])
    finally:
        await admin.close()


async def count_ids(es: AsyncElasticsearch, alias: str, ids: Sequence[str]) -> int:
    if not ids:
        return 0
    try:
        await es.indices.refresh(index=alias)
        answer = await es.count(index=alias, query={"ids": {"values": list(ids)}})
    except NotFoundError:
        return 0
    return int(answer["count"])


async def catch_up(
    es_url: str, alias: str, ids: Sequence[str], since: float, timeout_s: float = 240
) -> float:
    """Seconds from `since` until every id of `ids` is in the index."""
    async with AsyncElasticsearch(es_url, request_timeout=30) as es:
        deadline = time.monotonic() + timeout_s
        while await count_ids(es, alias, ids) < len(ids):
            assert time.monotonic() < deadline, f"{len(ids)} ids not all indexed in {timeout_s}s"
            await asyncio.sleep(0.25)
    return time.monotonic() - since


@dataclass(frozen=True)
class IndexedDoc:
    index: str  # the concrete index behind the alias
    doc_id: str  # its _id
    id: str | None  # the document's own `id` field (the event id)


async def indexed_documents(
    es_url: str, alias: str, expected: int, timeout_s: float = 240
) -> list[IndexedDoc]:
    """Every document of every index behind `alias`, once at least `expected` are there (or
    time is up)."""
    async with AsyncElasticsearch(es_url, request_timeout=60) as es:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                await es.indices.refresh(index=alias)
                if int((await es.count(index=alias))["count"]) >= expected:
                    break
            except NotFoundError:
                pass
            await asyncio.sleep(1)
        await asyncio.sleep(2)  # anything extra would land now
        try:
            await es.indices.refresh(index=alias)
        except NotFoundError:
            return []
        return [
            IndexedDoc(hit["_index"], hit["_id"], (hit.get("_source") or {}).get("id"))
            async for hit in async_scan(es, index=alias, query={"_source": ["id"]})
        ]


def indexed_more_than_once(docs: Iterable[IndexedDoc]) -> dict[str | None, list[str]]:
    """Event ids held by more than one document behind the alias: id -> "index/_id" of each."""
    where: dict[str | None, list[str]] = {}
    for doc in docs:
        where.setdefault(doc.id, []).append(f"{doc.index}/{doc.doc_id}")
    return {eid: places for eid, places in where.items() if len(places) > 1}


def predictions_per_id(
    records: Iterable[tuple[bytes | None, bytes | None, Mapping[str, bytes]]],
) -> Counter[str]:
    """How many records of the predictions topic carry each event id (decoded from the
    value); asserts each is a Prediction keyed by its own id."""
    counts: Counter[str] = Counter()
    for key, value, _headers in records:
        prediction = decode_prediction(value or b"")
        assert not isinstance(prediction, DecodeError), (key, prediction.message)
        assert key == prediction.id.encode(), f"prediction {prediction.id!r} keyed by {key!r}"
        counts[prediction.id] += 1
    return counts


def duplicates(counts: Counter[str]) -> int:
    """Records beyond the first of each id."""
    return sum(n - 1 for n in counts.values())


async def read_all(
    bootstrap: str, topic: str, *, read_committed: bool = False, idle_s: float = 3.0
) -> list[tuple[bytes | None, bytes | None, dict[str, bytes]]]:
    """Every record of `topic` up to its end (for read_committed: up to the last stable
    offset), read until nothing new arrives for `idle_s`."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        isolation_level="read_committed" if read_committed else "read_uncommitted",
    )
    await consumer.start()
    records: list[tuple[bytes | None, bytes | None, dict[str, bytes]]] = []
    try:
        partitions = consumer.partitions_for_topic(topic)
        for _ in range(50):
            if partitions:
                break
            await consumer._client.force_metadata_update()
            await asyncio.sleep(0.2)
            partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            return records
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < idle_s:
            batch = await consumer.getmany(timeout_ms=500)
            for items in batch.values():
                for item in items:
                    records.append((item.key, item.value, dict(item.headers or ())))
                    quiet_since = time.monotonic()
    finally:
        await consumer.stop()
    return records


async def account(
    figures: Figures,
    *,
    bootstrap: str,
    es_url: str,
    names: Names,
    sent: Sequence[str],
    poison: dict[bytes, str] | None = None,
    keyless_poison: Mapping[tuple[int, int], str] | None = None,
    read_committed: bool = False,
) -> None:
    """Fill in `figures` and assert: every sent id indexed exactly once (by its `id` field,
    over every index behind the alias), nothing extra, a prediction for every sent id and for
    nothing else, the dead letters exactly the poison records (key -> expected error code;
    keyless ones by their source (partition, offset) -> code), none else."""
    poison = poison or {}
    keyless_poison = keyless_poison or {}
    wanted = set(sent)
    docs = await indexed_documents(es_url, names.alias, len(wanted))
    in_index = {doc.id for doc in docs}
    twice = indexed_more_than_once(docs)
    figures.sent = len(wanted) + len(poison) + len(keyless_poison)
    figures.indexed = len(docs)
    figures.lost = len(wanted - in_index)
    figures.extra = len(in_index - wanted)
    predictions = await read_all(bootstrap, names.predictions, read_committed=read_committed)
    per_id = predictions_per_id(predictions)
    figures.duplicate_predictions = duplicates(per_id)
    # Exactly once writes the texts' dead letters in the same transactions as the predictions.
    dead_texts = await read_all(
        bootstrap, names.texts_dlq, read_committed=read_committed, idle_s=1.5
    )
    dead_predictions = await read_all(bootstrap, names.predictions_dlq, idle_s=1.5)
    figures.dead_letters = len(dead_texts) + len(dead_predictions)
    record(figures)

    assert figures.lost == 0, f"{figures.lost} sent ids never indexed"
    assert not twice, f"{len(twice)} ids indexed more than once: {dict(list(twice.items())[:5])}"
    assert figures.extra == 0, f"{figures.extra} documents that were never sent"
    assert not wanted - set(per_id), f"{len(wanted - set(per_id))} ids have no prediction"
    assert not set(per_id) - wanted, f"predictions of ids never sent: {set(per_id) - wanted}"
    assert dead_predictions == [], "no prediction may be dead-lettered here"
    by_key: dict[bytes, list[str]] = {}
    by_source: dict[tuple[int, int], list[str]] = {}
    for key, value, headers in dead_texts:
        parsed = parse_dead_letter_headers(list(headers.items()))
        code = str(parsed.get(HEADER_ERROR_CODE, "?"))
        if key is None:
            source = (int(parsed[HEADER_SOURCE_PARTITION]), int(parsed[HEADER_SOURCE_OFFSET]))
            by_source.setdefault(source, []).append(code)
            continue
        by_key.setdefault(key or b"", []).append(code)
        if key == b"poison-tombstone":
            assert value is None, "a tombstone must stay a tombstone in the dead letters"
    assert set(by_key) == set(poison), (
        f"keyed: poison without a dead letter {sorted(set(poison) - set(by_key))}, dead "
        f"letters of no poison record {sorted(set(by_key) - set(poison))}"
    )
    assert set(by_source) == set(keyless_poison), (
        "keyless (partition, offset): poison without a dead letter "
        f"{sorted(set(keyless_poison) - set(by_source))}, dead letters of no poison record "
        f"{sorted(set(by_source) - set(keyless_poison))}"
    )
    if read_committed:  # exactly once: each prediction and each dead letter once
        assert figures.duplicate_predictions == 0, "read_committed must see each prediction once"
        assert all(len(codes) == 1 for codes in by_key.values()), by_key
        assert all(len(codes) == 1 for codes in by_source.values()), by_source
    for key, code in poison.items():
        assert code in by_key[key], (key, by_key[key])
    for source, code in keyless_poison.items():
        assert code in by_source[source], (source, by_source[source])
