"""`inflow reindex --version V`: re-embed the input topic's events with engine version V into V's
own index while live traffic keeps flowing, then cut the read alias over to it atomically.

1. V's index is made (one index per model, `indexer.mapping.ModelIndices`); the workers go on
   writing the current model's predictions to the current model's index.
2. The input topic is read from `--from-timestamp`, `--from-offset` or the beginning, through V,
   into V's index. Events that arrive meanwhile are read too (the read follows the topic's end):
   during the backfill new events go to both indices, the current model's by the workers and
   V's by this command.
3. When the read has caught up with the end of every partition, V becomes the active engine
   (the workers swap to it within INFLOW_ENGINE_POLL_S and write V's predictions to V's index),
   the read goes on for a hand-over period so that no event a worker predicted with the old
   engine in the meantime is missing from V's index, and then the read alias switches to V's
   index in one atomic alias update: a kNN query through it sees one model's vectors, before
   and after.
4. `--rollback` does the same towards the version the alias served before the last cutover,
   from the cutover's time: the old index gets the events it missed, then the alias switches
   back (and that version is active again).

Progress (events re-embedded, lag, rate, time left) is a bar on stderr and, with
`--metrics-port`, Prometheus metrics (inflow_reindex_*).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from elasticsearch import AsyncElasticsearch
from elasticsearch.helpers import async_scan
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from engines.registry import Registry
from indexer import (
    BulkWriter,
    ModelIndices,
    alias_indices,
    index_meta,
    model_space,
    set_index_meta,
    switch_alias,
)
from indexer.evaluation import load_beir
from schemas import DecodeError, TextEvent, decode_event, parse_rfc3339_ms
from streams.app import es_settings
from streams.cli.evaluate import QualityGate, check_quality, embed_documents
from streams.cli.records import topic_partitions
from streams.config import Settings
from streams.delivery.infer import InputRecord
from streams.errors import ConfigError, CutoverRefused
from streams.kafka import client_options

BATCH = 32


@dataclass(slots=True)
class Progress:
    """What the bar and the metrics show."""

    done: int = 0
    skipped: int = 0  # records that are no TextEvent (the workers dead-lettered them)
    lag: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        return self.lag / self.rate if self.rate > 0 else None

    def bar(self, phase: str, width: int = 30) -> str:
        total = self.done + self.lag
        filled = width if total == 0 else int(width * self.done / total)
        eta = "-" if self.eta_s is None else f"{self.eta_s:.0f}s"
        return (
            f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{total} re-embedded, "
            f"lag {self.lag}, {self.rate:.0f}/s, eta {eta}  {phase}   "
        )


class ReindexMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.events = Counter(
            "inflow_reindex_events", "Events re-embedded into the new index", registry=r
        )
        self.lag = Gauge("inflow_reindex_lag", "Input records not yet re-embedded", registry=r)
        self.eta = Gauge("inflow_reindex_eta_seconds", "Estimated time to catch up", registry=r)
        self.caught_up = Gauge(
            "inflow_reindex_caught_up", "1 once the backfill reached the topic's end", registry=r
        )
        self.eval_score = Gauge(
            "inflow_reindex_eval_score",
            "The quality gate's figure (nDCG@10 by default) of the new and the live model",
            ["model", "version"],
            registry=r,
        )
        self.cutover_refused = Gauge(
            "inflow_reindex_cutover_refused",
            "1 when the quality gate refused the cutover",
            registry=r,
        )


@dataclass(frozen=True, slots=True)
class Plan:
    version: str
    space: str
    index: str
    serving: list[str]  # indices behind the read alias now
    since_ms: int | None
    offsets: dict[int, int]


def parse_offsets(text: str) -> dict[int, int]:
    """`--from-offset 0:120,1:98` -> {0: 120, 1: 98}."""
    out: dict[int, int] = {}
    for part in text.split(","):
        partition, sep, offset = part.strip().partition(":")
        if not sep or not partition.isdigit() or not offset.isdigit():
            raise ConfigError(f"--from-offset {text!r}: expected PARTITION:OFFSET[,...]")
        out[int(partition)] = int(offset)
    return out


async def _predict(engine: Any, records: list[Any], topic: str) -> tuple[list[dict[str, Any]], int]:
    events = []
    skipped = 0
    for m in records:
        decoded = decode_event(m.value, topic=topic, partition=m.partition, offset=m.offset)
        if isinstance(decoded, DecodeError):
            skipped += 1
        else:
            events.append(
                (InputRecord(topic, m.partition, m.offset, m.key, m.value, _noop), decoded)
            )
    return await embed_documents(engine, events), skipped


def _noop() -> None:
    return None


async def reindex(
    settings: Settings,
    version: str,
    *,
    since_ms: int | None,
    offsets: Mapping[int, int],
    activate: bool,
    handover_s: float,
    metrics: ReindexMetrics,
    quiet: bool = False,
    gate: QualityGate | None = None,
) -> Plan:
    from engines.load import load_engine

    registry = Registry(settings.engine_dir)
    manifest = registry.verify(version)
    space = model_space(version)
    es = es_settings(settings).make_client()
    try:
        serving = await alias_indices(es, settings.es_alias)
        if gate is not None:
            await _check_gate(settings, es, gate, version, serving, metrics, quiet)
        target = ModelIndices(es, settings.es_alias)
        doc = {"model": {"version": version}, "embedding_dim": manifest.embedding_dim}
        write_alias = await target.target(doc)
        index = sorted((await es.indices.get_alias(name=write_alias)).body)[0]
        plan = Plan(version, space, index, serving, since_ms, dict(offsets))
        if serving == [index]:
            _say(f"{settings.es_alias} already serves {index} ({version}'s model)")
            return plan
        engine = await asyncio.to_thread(load_engine, settings.engine_dir, version)
        writer = BulkWriter(client=es, alias=settings.es_alias, ensure=False, route=target.target)
        await writer.start()
        try:
            await _backfill(
                settings, es, engine, writer, plan, registry, activate, handover_s, metrics, quiet
            )
        finally:
            engine.close()
            await writer.stop()
        before = await switch_alias(es, settings.es_alias, index)
        old_versions = [(await index_meta(es, old)).get("version") for old in before]
        record = await index_meta(es, index)
        record["cutover"] = {
            "at_ms": int(time.time() * 1000),
            "from_indices": before,
            "from_versions": [v for v in old_versions if v],
        }
        await set_index_meta(es, index, record)
        _say(
            f"\n{settings.es_alias} now serves {index} ({version}); before: "
            f"{', '.join(before) or 'nothing'}"
        )
        return plan
    finally:
        await es.close()


async def _check_gate(
    settings: Settings,
    es: AsyncElasticsearch,
    gate: QualityGate,
    version: str,
    serving: list[str],
    metrics: ReindexMetrics,
    quiet: bool,
) -> None:
    """Before any backfill: measure the new and the live model on the eval set (each in a
    private index) and refuse when the new one is worse by more than the tolerance."""
    live = [v for v in [(await index_meta(es, i)).get("version") for i in serving] if v]
    if not live:
        _say("quality gate: the alias serves no model yet, nothing to compare with")
        return
    if live[0] == version:
        return
    verdict = await check_quality(settings, gate, version, str(live[0]), quiet=quiet)
    metrics.eval_score.labels("new", version).set(verdict.new_score)
    metrics.eval_score.labels("live", verdict.live_version).set(verdict.live_score)
    metrics.cutover_refused.set(0 if verdict.passed else 1)
    if not verdict.passed:
        raise CutoverRefused(verdict.line())
    _say(verdict.line())


async def _backfill(
    settings: Settings,
    es: AsyncElasticsearch,
    engine: Any,
    writer: BulkWriter,
    plan: Plan,
    registry: Registry,
    activate: bool,
    handover_s: float,
    metrics: ReindexMetrics,
    quiet: bool,
) -> None:
    topic = settings.texts_topic
    partitions = await topic_partitions(settings, topic)
    if not partitions:
        raise ConfigError(f"topic {topic} does not exist")
    consumer = AIOKafkaConsumer(**client_options(settings), enable_auto_commit=False)
    await consumer.start()
    progress = Progress()
    handover_until: float | None = None
    last_draw = 0.0
    try:
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        starts = await consumer.beginning_offsets(tps)
        # Events the topic's retention no longer holds: from the serving index's stored text.
        gaps = {
            tp.partition: (plan.offsets.get(tp.partition, 0), starts[tp])
            for tp in tps
            if plan.offsets.get(tp.partition, 0) < starts[tp]
        }
        from_index = await _from_stored_text(
            es, engine, writer, plan, topic, gaps, progress, metrics
        )
        if plan.since_ms is not None:
            found = await consumer.offsets_for_times({tp: plan.since_ms for tp in tps})
            ends = await consumer.end_offsets(tps)
            for tp in tps:
                hit = found.get(tp)
                starts[tp] = hit.offset if hit is not None else ends[tp]
        for tp in tps:
            if tp.partition in plan.offsets:
                starts[tp] = max(starts[tp], plan.offsets[tp.partition])
            consumer.seek(tp, starts[tp])
        while True:
            batch = await consumer.getmany(timeout_ms=200, max_records=BATCH)
            for records in batch.values():
                docs, skipped = await _predict(engine, records, topic)
                progress.skipped += skipped
                if docs:
                    outcome = await writer.bulk_index(docs)
                    if outcome.rejected:
                        first = outcome.rejected[0]
                        raise ConfigError(
                            f"{plan.index} refused {len(outcome.rejected)} documents "
                            f"(first {first.id}: {first.reason}); nothing was switched"
                        )
                progress.done += len(docs)
                metrics.events.inc(len(docs))
            ends = await consumer.end_offsets(tps)
            positions = [await consumer.position(tp) for tp in tps]
            progress.lag = sum(max(0, ends[tp] - p) for tp, p in zip(tps, positions, strict=True))
            metrics.lag.set(progress.lag)
            metrics.eta.set(progress.eta_s or 0.0)
            caught_up = progress.lag == 0
            now = time.monotonic()
            if caught_up and handover_until is None:
                metrics.caught_up.set(1)
                if activate and registry.active_version() != plan.version:
                    registry.activate(plan.version)
                    _say(f"\ncaught up: {plan.version} is the active engine; handing over")
                handover_until = now + handover_s
            phase = "backfill" if handover_until is None else "hand-over"
            if not quiet and now - last_draw > 0.5:
                print(progress.bar(phase), end="", file=sys.stderr, flush=True)
                last_draw = now
            if handover_until is not None and now >= handover_until and caught_up:
                break
        if not quiet:
            print(progress.bar("done"), file=sys.stderr, flush=True)
        _say(
            f"re-embedded {progress.done} events with {plan.version} into {plan.index}: "
            f"{progress.done - from_index} from topic {topic}, {from_index} from the stored "
            f"text of {', '.join(plan.serving) or 'no index'} "
            f"({progress.skipped} records that are no event skipped)"
        )
    finally:
        await consumer.stop()


async def _from_stored_text(
    es: AsyncElasticsearch,
    engine: Any,
    writer: BulkWriter,
    plan: Plan,
    topic: str,
    gaps: Mapping[int, tuple[int, int]],
    progress: Progress,
    metrics: ReindexMetrics,
) -> int:
    """Re-embed the documents of the serving index whose source offsets the topic no longer
    holds (partition -> [from, log start)), from the text and metadata they stored; with
    --from-timestamp, only those processed since then. Returns how many."""
    if not gaps or not plan.serving:
        return 0
    ranges = ", ".join(f"[{p}] {lo}-{hi - 1}" for p, (lo, hi) in sorted(gaps.items()))
    _say(f"topic {topic} no longer holds offsets {ranges}: reading them from {plan.serving}")
    filters: list[dict[str, Any]] = [
        {"term": {"source.topic": topic}},
        {
            "bool": {
                "should": [
                    {
                        "bool": {
                            "filter": [
                                {"term": {"source.partition": partition}},
                                {"range": {"source.offset": {"gte": lo, "lt": hi}}},
                            ]
                        }
                    }
                    for partition, (lo, hi) in gaps.items()
                ],
                "minimum_should_match": 1,
            }
        },
    ]
    if plan.since_ms is not None:
        filters.append({"range": {"processed_ts": {"gte": plan.since_ms}}})
    fields = ["id", "text", "metadata", "event_ts", "source"]
    done = 0
    events: list[tuple[InputRecord, TextEvent]] = []

    async def flush() -> None:
        nonlocal done, events
        docs = await embed_documents(engine, events)
        outcome = await writer.bulk_index(docs)
        if outcome.rejected:
            raise ConfigError(f"{plan.index} refused {len(outcome.rejected)} documents")
        done += len(docs)
        progress.done += len(docs)
        metrics.events.inc(len(docs))
        events = []

    async for hit in async_scan(
        es, index=plan.serving, query={"query": {"bool": {"filter": filters}}, "_source": fields}
    ):
        doc = hit["_source"]
        source = doc["source"]
        record = InputRecord(
            source["topic"], source["partition"], source["offset"], None, None, _noop
        )
        event_ts = doc.get("event_ts")
        ts_ms = None if event_ts is None else parse_rfc3339_ms(event_ts)
        events.append((record, TextEvent(doc["id"], doc["text"], doc.get("metadata"), ts_ms)))
        if len(events) >= BATCH:
            await flush()
    if events:
        await flush()
    return done


async def previous_version(settings: Settings) -> tuple[str, int]:
    """The version the read alias served before the last cutover, and the cutover's time."""
    es = es_settings(settings).make_client()
    try:
        serving = await alias_indices(es, settings.es_alias)
        cutover = (await index_meta(es, serving[0])).get("cutover") if serving else None
    finally:
        await es.close()
    if not cutover or not cutover.get("from_versions"):
        raise ConfigError(f"{settings.es_alias} records no cutover to roll back")
    return str(cutover["from_versions"][0]), int(cutover["at_ms"])


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_reindex(
    settings: Settings,
    version: str | None,
    *,
    from_timestamp: str | None,
    from_offset: str | None,
    rollback: bool,
    activate: bool,
    handover_s: float | None,
    metrics_port: int | None,
    quiet: bool,
    eval_set: Path | None = None,
    tolerance: float = 0.0,
    eval_mode: str = "knn",
) -> int:
    from streams.cli.dlq import parse_time

    if rollback == (version is not None):
        raise ConfigError("name --version V, or --rollback (not both)")
    if rollback and eval_set is not None:
        raise ConfigError("--rollback goes back whatever the eval set says: drop --eval-set")
    if from_timestamp is not None and from_offset is not None:
        raise ConfigError("--from-timestamp and --from-offset exclude each other")
    since_ms = None if from_timestamp is None else parse_time(from_timestamp)
    if rollback:
        version, cutover_ms = asyncio.run(previous_version(settings))
        since_ms = cutover_ms - 60_000  # what the old index missed, with a margin
        _say(f"rolling back to {version}: re-embedding events since the cutover")
    assert version is not None
    gate = None
    if eval_set is not None:
        gate = QualityGate(load_beir(eval_set), tolerance=tolerance, mode=eval_mode)
    metrics = ReindexMetrics()
    if metrics_port is not None:
        start_http_server(metrics_port, addr="127.0.0.1", registry=metrics.registry)
    wait = 3 * settings.engine_poll_s + 5 if handover_s is None else handover_s
    plan = asyncio.run(
        reindex(
            settings,
            version,
            since_ms=since_ms,
            offsets=parse_offsets(from_offset) if from_offset else {},
            activate=activate,
            handover_s=wait,
            metrics=metrics,
            quiet=quiet,
            gate=gate,
        )
    )
    print(f"{settings.es_alias} -> {plan.index} ({plan.version})")
    return 0
