"""The Faust app: two thin agents, a timer that follows the engine registry, and web views.

infer agent:  inflow.texts (raw bytes) -> InferStage (decode -> Batcher -> publish) -> answer
index agent:  inflow.predictions (raw bytes) -> IndexBuffer -> IndexStage (bulk) -> answer
Both iterate with manual acks (`noack`) and concurrency 1; the stages never let one record
raise out of an agent. Records are answered out of order, and Faust's commit rule commits
past an unanswered record when acked out of order (faust #606): every answer goes through the
offset ledger (`streams.delivery.ledger`), which acks Faust in offset order only, so a commit never
passes a record that has no prediction or dead letter yet.

Stopping (and rebalancing) does not wait on Faust's `stream_wait_empty`, which waits for every
taken record with no bound, so one parked record held SIGTERM for ever: on stop the worker
waits `INFLOW_DRAIN_TIMEOUT_S` for what it took, and what is still unanswered is simply not
committed (the next owner takes it again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

import faust
from faust.exceptions import ProducerSendError

from engines.drift import Distribution
from engines.registry import Registry
from engines.types import Engine
from indexer import BulkWriter, EsSettings, ModelIndices, Searcher, ensure_index, index_problem
from indexer.client import describe_es_error
from streams.config import Settings
from streams.delivery.batcher import Batcher, BatchPolicy
from streams.delivery.eos import TransactionalInfer, eos_group
from streams.delivery.flow import InFlightBudget, record_cost
from streams.delivery.index import IndexBuffer, IndexStage
from streams.delivery.infer import Headers, InferStage, InferTopics, InputRecord
from streams.delivery.latency import LatencyTarget
from streams.delivery.ledger import OffsetLedger
from streams.delivery.records import MAX_REQUEST_SIZE, RecordLimits
from streams.delivery.retry import RetryPolicy
from streams.kafka import InflowApp, client_options, faust_credentials
from streams.ops.drift import DriftWatch
from streams.ops.health import WorkerHealth
from streams.ops.lag import ConsumerLag, DrainRate, LagSample, LagUnavailable, merge_samples
from streams.ops.logs import install_repeat_filter
from streams.ops.metrics import Metrics
from streams.rollout.canary import Rollout
from streams.rollout.follower import EngineFollower
from streams.topics import max_message_bytes, topic_names

log = logging.getLogger(__name__)


def baseline_of(registry: Registry, version: str) -> Distribution | None:
    """The drift baseline an engine's build recorded (None: an embedder, or an old build)."""
    recorded = registry.get(version).baseline
    return None if recorded is None else Distribution.from_dict(recorded)


def es_settings(settings: Settings) -> EsSettings:
    basic = (settings.es_username, str(settings.es_password)) if settings.es_username else None
    return EsSettings(
        url=settings.require_es(),
        api_key=str(settings.es_api_key) or None,
        basic_auth=basic,
        verify_certs=settings.es_verify_certs,
        ca_certs=settings.es_ca_certs or None,
    )


class _FaustPublisher:
    """Publisher over Faust's producer: returns once the broker acknowledged the record.

    The producer itself, not a Faust channel: a channel's send wraps the outcome in Faust's
    FutureMessage, which logs "exception was never retrieved" for every refused record."""

    def __init__(self, app: faust.App) -> None:
        self._app = app

    async def publish(
        self, topic: str, key: bytes | None, value: bytes | None, headers: Headers | None = None
    ) -> None:
        try:
            delivered = await self._app.producer.send(topic, key, value, None, None, headers)
        except ProducerSendError as exc:  # aiokafka's own error, whose class says retriable
            raise (exc.__cause__ or exc) from None
        await delivered


def create_app(settings: Settings, registry: Registry) -> faust.App:
    """Build the Faust app. The engine comes from `registry` (the active version, or the pinned
    `settings.engine_version`): the worker waits, not ready, until there is one to load."""
    bootstrap = settings.require_kafka()
    datadir = settings.state_dir / "faust"
    datadir.mkdir(parents=True, exist_ok=True)  # Faust creates only the last level
    app = InflowApp(
        settings.app_id,
        broker=[f"kafka://{server.strip()}" for server in bootstrap.split(",")],
        broker_credentials=faust_credentials(settings),
        key_serializer="raw",
        value_serializer="raw",
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,
        # A kill -9'd worker's partitions move to the others after the session timeout.
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=settings.heartbeat_interval_s,
        broker_rebalance_timeout=settings.rebalance_timeout_s,
        # Per-partition prefetch; with the in-flight ceiling, what bounds the worker's memory.
        stream_buffer_maxsize=settings.stream_buffer_maxsize,
        # exactly_once is ours (streams.delivery.eos), not Faust's: Faust's agents stay at least
        # once (the index agent's writes are idempotent by id).
        processing_guarantee="at_least_once",
        producer_acks=-1,
        producer_max_request_size=MAX_REQUEST_SIZE,
        # Not Faust's unbounded wait for every taken record (on stop and on each rebalance):
        # the bounded drain in _stop below; what is unanswered then is not committed.
        stream_wait_empty=False,
        web_enabled=True,
        web_bind=settings.web_host,
        web_host=settings.web_host,
        web_port=settings.web_port,
        # Faust's own pages (/router, /table/...) are not ours to expose.
        web_router_enabled=False,
        web_tables_enabled=False,
        store="memory://",
        datadir=str(datadir / settings.app_id),
        logging_config=None,
    )
    exactly_once = settings.processing_guarantee == "exactly_once"
    # exactly_once: the predictions come in transactions; index only committed ones.
    app.read_committed = exactly_once
    metrics = Metrics()
    ledger = OffsetLedger()  # every answer goes through it: Faust sees acks in offset order
    limits = RecordLimits()  # the topics' size limits, read from the broker at start
    repeats = install_repeat_filter()  # broker outages: one line and a count, not thousands

    def on_fault(condition: str, reason: str | None) -> None:
        health.set(condition, reason)  # `health` is built below, before anything runs

    retry = RetryPolicy(recheck_s=settings.permanent_recheck_s, on_fault=on_fault)
    budget = InFlightBudget(settings.max_in_flight_bytes)
    app_state: dict[str, Any] = {"metrics": metrics, "settings": settings}
    publisher = _FaustPublisher(app)
    bounds = BatchPolicy(settings.max_batch_size, settings.max_batch_tokens, settings.max_wait_ms)
    target = None
    if settings.latency_target_ms > 0:
        target = LatencyTarget(settings.latency_target_ms, bounds)
        metrics.watch_latency_target(target)
    batcher = Batcher(None, bounds, on_batch=metrics.observe_batch, target=target)
    # A candidate engine beside the active one: shadow or canary (streams.rollout.canary).
    rollout = Rollout(
        batcher,
        registry,
        metrics,
        policy=batcher.policy,
        load=lambda version: _load_engine(settings, version),
        worker=f"{settings.app_id}-{socket.gethostname()}-{os.getpid()}",
    )
    infer_stage = InferStage(
        batcher,
        publisher,
        InferTopics(settings.predictions_topic, settings.texts_dlq_topic),
        metrics,
        max_in_flight=settings.max_in_flight,
        retry=retry,
        rollout=rollout,
        limits=limits,
    )
    # One client for the writer and the searcher; the index is ensured at start (below).
    es = es_settings(settings).make_client()
    # Each model's documents go to that model's own index (indexer.mapping.ModelIndices).
    writer = BulkWriter(
        client=es,
        alias=settings.es_alias,
        ensure=False,
        observer=metrics,
        route=ModelIndices(es, settings.es_alias).target,
    )
    index_stage = IndexStage(
        writer, publisher, settings.predictions_dlq_topic, metrics, retry, limits=limits
    )
    index_buffer = IndexBuffer(index_stage, settings.index_batch_size, settings.index_max_wait_ms)
    searcher = Searcher(client=es, alias=settings.es_alias, passages=settings.passages_max > 1)
    app_state.update(
        batcher=batcher, infer=infer_stage, writer=writer, searcher=searcher, registry=registry
    )
    app_state.update(rollout=rollout)

    def topic(name: str) -> Any:
        return app.topic(
            name,
            partitions=settings.topic_partitions,
            key_serializer="raw",
            value_serializer="raw",
        )

    ready = asyncio.Event()  # set once the components below have started
    texts = topic(settings.texts_topic)
    predictions = topic(settings.predictions_topic)
    engine_loaded = asyncio.Event()
    transactional = (
        TransactionalInfer(settings, batcher, metrics, retry, rollout=rollout, limits=limits)
        if exactly_once
        else None
    )
    lags = [
        ConsumerLag(
            settings.app_id,
            assignment=lambda: app.consumer.assignment(),
            client_options=client_options(settings),
        )
    ]
    if transactional is not None:  # texts are consumed by its own group: watched too
        lags.append(
            ConsumerLag(
                eos_group(settings),
                assignment=transactional.assignment,
                client_options=client_options(settings),
            )
        )

    def latest_lag() -> LagSample | None:
        return merge_samples(lag.last for lag in lags)

    health = WorkerHealth(
        assignment=lambda: app.consumer.assignment(),
        lag=latest_lag,
        stall_after_s=settings.stall_after_s,
    )
    app_state.update(health=health)
    metrics.watch_engine(lambda: batcher.identity)
    metrics.watch_drift(
        DriftWatch(
            lambda version: baseline_of(registry, version),
            window=settings.drift_window,
            min_samples=settings.drift_min_samples,
        )
    )
    drain = DrainRate()
    metrics.watch_lag(latest_lag, max_age_s=3 * settings.health_poll_s, drain_rate=drain.per_second)

    if transactional is None:

        @app.agent(texts, concurrency=1)
        async def infer(stream: Any) -> None:
            await ready.wait()
            async for event in stream.noack().events():
                record = await input_record(event, budget, ledger)
                await infer_stage.handle(record)

    @app.agent(predictions, concurrency=1)
    async def index(stream: Any) -> None:
        await ready.wait()
        async for event in stream.noack().events():
            record = await input_record(event, budget, ledger)
            await index_buffer.add(record)

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def _revoked(app: faust.App, revoked: set[Any], **kwargs: Any) -> None:
        # A new generation: what waits in the ledger for a revoked partition is redone by
        # its next owner from the committed offset; its answers here release nothing.
        ledger.revoke(revoked)

    @app.task
    async def _start() -> None:
        await batcher.start()
        for lag in lags:
            await lag.start()
        await read_limits()
        # The engine first: the index takes the width of the version this worker serves (a
        # failed active version is skipped by the follower, streams.rollout.follower).
        await engine_loaded.wait()
        identity = batcher.identity
        dims = identity.embedding_dim if identity is not None else None

        # Elasticsearch may come up after the worker: retry what may pass later rather than
        # crash; a permanent refusal (credentials, a name taken by an index) is one line and
        # not-ready health. Nothing is consumed until the index exists.
        def setup_problem(exc: BaseException) -> str:
            return f"cannot set up alias {settings.es_alias}: {describe_es_error(exc)}"

        await retry.with_backoff(1.0, 15.0).call(
            lambda: ensure_index(es, settings.es_alias, dims=dims),
            what=f"create index template and alias {settings.es_alias}",
            condition="elasticsearch",
            on_retry=lambda _attempt, exc: health.set("elasticsearch", setup_problem(exc)),
            describe=setup_problem,
        )
        health.set("elasticsearch", None)
        await writer.start()
        await searcher.start()
        await index_buffer.start()
        if transactional is not None:  # exactly_once: texts are consumed in transactions
            await transactional.start()
        ready.set()
        health.set("agents", None)

    async def read_limits() -> None:
        """The topics' `max.message.bytes`, so an output too large is known before sending."""
        topics = topic_names(settings)
        try:
            found = await retry.with_backoff(1.0, 15.0).call(
                lambda: max_message_bytes(settings, topics),
                what="read the topics' max.message.bytes",
                condition="kafka",
                per_record=lambda _exc: True,  # permanent (e.g. not allowed): defaults below
            )
        except Exception as exc:
            log.warning(
                "cannot read the topics' max.message.bytes (%s: %s): assuming Kafka's default; "
                "a record the broker refuses for its size is still dead-lettered",
                type(exc).__name__,
                exc,
            )
            return
        limits.update(found)
        log.info("record limits: %s", ", ".join(f"{t} {limits.max_bytes(t)} B" for t in topics))

    @app.on_before_shutdown.connect  # type: ignore[arg-type]
    async def _stop(app: faust.App, **kwargs: Any) -> None:
        # Runs after the consumer stopped fetching, before its final commit. Records taken
        # get INFLOW_DRAIN_TIMEOUT_S in all to be answered; the rest are not committed.
        deadline = time.monotonic() + settings.drain_timeout_s
        if transactional is not None:
            await transactional.stop()
        await infer_stage.stop(settings.drain_timeout_s)
        await rollout.stop()
        try:
            await asyncio.wait_for(index_buffer.stop(), max(1.0, deadline - time.monotonic()))
        except TimeoutError:
            log.warning("stop: the index batch was not written in time: not committed")
        with contextlib.suppress(Exception):  # the commit of what was answered, now
            await app.consumer.commit()
        await batcher.stop()
        await writer.stop()
        await searcher.stop()
        await es.close()
        for lag in lags:
            await lag.stop()

    @app.timer(interval=settings.health_poll_s)
    async def probe_health() -> None:
        repeats.flush()
        if ready.is_set():  # before, _start reports Elasticsearch through its retry loop
            health.set("elasticsearch", await index_problem(es, settings.es_alias))
        if transactional is not None:  # its loop ended: not ready, and the log says why
            health.set("exactly_once", transactional.failure)
        for lag in lags:
            try:
                await lag.sample()
            except LagUnavailable as exc:
                log.warning("consumer lag: %s", exc)
        drain.observe(latest_lag())
        metrics.set_ready(health.ready().ok)

    @app.timer(interval=settings.engine_poll_s)
    async def follow_rollout() -> None:
        """Load or drop the candidate of a shadow or canary; roll it back on a breached rule."""
        if engine_loaded.is_set():
            await rollout.sync()

    # Follows the active pointer; a version that fails to load, warm up or run is contained
    # there (kept serving the previous one, marked failed in the registry:
    # streams.rollout.follower).
    follower = EngineFollower(
        registry,
        swap=batcher.swap_engine,
        serving=lambda: batcher.identity,
        load=lambda version: _load_engine(settings, version),
        set_health=health.set,
        swaps=metrics.engine_swaps,
        failures=metrics.engine_swap_failures,
        pinned=settings.engine_version or None,
        worker=f"{settings.app_id}-{socket.gethostname()}-{os.getpid()}",
    )

    @app.timer(interval=settings.engine_poll_s)
    async def follow_registry() -> None:
        """Load the first engine when one exists, then follow the registry's active pointer
        (unless a version is pinned); a version that fails is contained
        (streams.rollout.follower)."""
        if await follower.sync() is not None:
            engine_loaded.set()

    from streams.ops.web import register_views

    register_views(app, app_state)
    return app


def _load_engine(settings: Settings, version: str) -> Engine:
    from engines.load import load_engine

    return load_engine(settings.engine_dir, version, max_passages=settings.passages_max)


async def input_record(event: Any, budget: InFlightBudget, ledger: OffsetLedger) -> InputRecord:
    """The raw record of a Faust event (original key and value bytes, Kafka timestamp) and its
    answer callback; waits for room under the in-flight ceiling. The room is given back, and
    Faust's event acked, when the ledger releases the record (in offset order)."""
    message = event.message
    cost = record_cost(message.key, message.value)
    await budget.acquire(cost)
    answer = ledger.take(
        (message.topic, message.partition), message.offset, event.ack, lambda: budget.release(cost)
    )
    return InputRecord(
        message.topic,
        message.partition,
        message.offset,
        message.key,
        message.value,
        answer,
        timestamp=message.timestamp,
        headers=header_list(message.headers),
    )


def header_list(headers: Any) -> Headers | None:
    """Faust gives a message's headers as a list of pairs or a mapping: pairs, or None."""
    if not headers:
        return None
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    return [
        (str(name), value.encode() if isinstance(value, str) else bytes(value or b""))
        for name, value in pairs
    ]
