"""Delivery under faults injected from outside, on genuine Kafka and the search server.

Each scenario sends a few thousand real texts at a steady rate, injects its fault mid-stream,
and then asserts: every sent id indexed exactly once, nothing in the index that was not sent,
every dead letter accounted for. Each prints its figures (duplicates on the predictions topic,
catch-up seconds, the worker's peak RSS); the session ends with the table.

Scenarios that kill the broker or the search server run on private services of their own.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable

import pytest

from tests.chaos.conftest import PrivateServices, WorkerEnv
from tests.chaos.harness import (
    EVENTS,
    OUTAGE_S,
    RATE,
    Figures,
    RssSampler,
    SteadyProducer,
    account,
    catch_up,
    events,
    read_all,
)
from tests.conftest import TestServices
from tests.e2e.conftest import Names

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow, pytest.mark.chaos]

# The done-when bound: a second worker takes over a kill -9'd worker's partitions and catches
# up within this many seconds of the kill.
TAKEOVER_S = float(os.environ.get("INFLOW_CHAOS_TAKEOVER_S", "15"))
# Scenarios that run in both delivery modes (exactly once: read_committed sees one each). The
# search server's faults meet the index agent, which is the same in both modes: at least once.
GUARANTEES = pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])


async def _until_sent(producer: SteadyProducer, count: int) -> None:
    while len(producer.acked) < count:
        assert producer.task is not None and not producer.task.done(), "producer ended early"
        await asyncio.sleep(0.1)


def _log_errors(text: str) -> int:
    return sum(1 for line in text.splitlines() if " ERROR " in line)


async def test_worker_kill_9_second_worker_takes_over(
    services: TestServices, chaos_workers: WorkerEnv, names: Names
) -> None:
    records, seconds, peak = await _kill_one_of_two(services, chaos_workers, names, "kill9")
    figures = Figures("worker kill -9", catch_up_s=seconds, peak_rss_mb=peak)
    await account(
        figures,
        bootstrap=services.kafka_bootstrap,
        es_url=services.es_url,
        names=names,
        sent=[eid for eid, _ in records],
    )
    assert seconds <= TAKEOVER_S, f"caught up {seconds:.1f}s after the kill (> {TAKEOVER_S}s)"


@GUARANTEES
async def test_broker_kill_9_and_restart_with_its_data(
    private_services: PrivateServices, chaos_workers: WorkerEnv, names: Names, guarantee: str
) -> None:
    endpoints = private_services.endpoints
    assert endpoints is not None
    factory = chaos_workers(endpoints.kafka_bootstrap, endpoints.es_url)
    worker = factory.start(INFLOW_PROCESSING_GUARANTEE=guarantee)
    records = events("broker")
    producer = SteadyProducer(endpoints.kafka_bootstrap, names.texts, records)
    with RssSampler() as rss:
        rss.watch(worker.proc.pid)
        producer.start()
        await _until_sent(producer, len(records) * 2 // 5)
        log_before = len(worker.log.read_text(errors="replace").splitlines())
        await asyncio.to_thread(private_services.kill, "kafka")
        await asyncio.sleep(5)
        again = await asyncio.to_thread(private_services.up)  # the same port, the same data
        assert again.kafka_bootstrap == endpoints.kafka_bootstrap
        restarted = time.monotonic()
        seconds = await catch_up(
            endpoints.es_url, names.alias, producer.sent_before(restarted), restarted
        )
        await producer.wait()
    outage_log = worker.log.read_text(errors="replace").splitlines()[log_before:]
    figures = Figures(
        "broker kill -9 + restart",
        guarantee=guarantee,
        catch_up_s=seconds,
        peak_rss_mb=rss.peak(),
        notes={"log_errors": _log_errors("\n".join(outage_log)), "resends": producer.resends},
    )
    await account(
        figures,
        bootstrap=endpoints.kafka_bootstrap,
        es_url=endpoints.es_url,
        names=names,
        sent=[eid for eid, _ in records],
        read_committed=guarantee == "exactly_once",
    )
    errors = figures.notes["log_errors"]
    assert isinstance(errors, int) and errors <= 40, f"{errors} ERROR lines for one outage"


async def test_search_server_kill_9_and_restart(
    private_services: PrivateServices, chaos_workers: WorkerEnv, names: Names
) -> None:
    endpoints = private_services.endpoints
    assert endpoints is not None
    worker = chaos_workers(endpoints.kafka_bootstrap, endpoints.es_url).start()
    records = events("eskill")
    producer = SteadyProducer(endpoints.kafka_bootstrap, names.texts, records)
    with RssSampler() as rss:
        rss.watch(worker.proc.pid)
        producer.start()
        await _until_sent(producer, len(records) * 2 // 5)
        await asyncio.to_thread(private_services.kill, "search")
        await asyncio.sleep(3)
        again = await asyncio.to_thread(private_services.up)
        assert again.es_url == endpoints.es_url
        restarted = time.monotonic()
        seconds = await catch_up(
            endpoints.es_url, names.alias, producer.sent_before(restarted), restarted
        )
        await producer.wait()
    figures = Figures("search kill -9 + restart", catch_up_s=seconds, peak_rss_mb=rss.peak())
    await account(
        figures,
        bootstrap=endpoints.kafka_bootstrap,
        es_url=endpoints.es_url,
        names=names,
        sent=[eid for eid, _ in records],
    )


async def test_search_server_down_under_load_costs_lag_not_memory(
    private_services: PrivateServices, chaos_workers: WorkerEnv, names: Names
) -> None:
    """The index is down for OUTAGE_S (60 s in CI; INFLOW_CHAOS_OUTAGE_S=300 for the 5-minute
    run) while texts keep coming: RSS stays under the in-flight ceiling plus a fixed margin."""
    endpoints = private_services.endpoints
    assert endpoints is not None
    ceiling_mb = 16
    margin_mb = 96
    worker = chaos_workers(endpoints.kafka_bootstrap, endpoints.es_url).start(
        INFLOW_MAX_IN_FLIGHT_BYTES=str(ceiling_mb * 1024 * 1024)
    )
    n = max(EVENTS, int(RATE * (OUTAGE_S + 25)))
    records = events("esdown", n)
    producer = SteadyProducer(endpoints.kafka_bootstrap, names.texts, records)
    with RssSampler() as rss:
        rss.watch(worker.proc.pid)
        producer.start()
        await _until_sent(producer, int(RATE * 10))
        await asyncio.to_thread(private_services.stop, "search")
        down = time.monotonic()
        await asyncio.sleep(1)
        at_outage = rss.at(down, worker.proc.pid)
        await asyncio.sleep(OUTAGE_S)
        during = rss.peak(since=down)
        answer = worker.probe("/health/ready")
        await asyncio.to_thread(private_services.up)
        restarted = time.monotonic()
        seconds = await catch_up(
            endpoints.es_url, names.alias, producer.sent_before(restarted), restarted, 600
        )
        await producer.wait()
    figures = Figures(
        f"search down {OUTAGE_S:.0f}s under load",
        catch_up_s=seconds,
        peak_rss_mb=rss.peak(),
        notes={
            "rss_at_outage_mb": round(at_outage),
            "peak_rss_during_outage_mb": round(during),
            "ceiling_mb": ceiling_mb,
            "ready_during_outage": None if answer is None else answer[0],
        },
    )
    await account(
        figures,
        bootstrap=endpoints.kafka_bootstrap,
        es_url=endpoints.es_url,
        names=names,
        sent=[eid for eid, _ in records],
    )
    assert answer is not None and answer[0] == 503, "not ready while the index is down"
    assert during <= at_outage + ceiling_mb + margin_mb, (
        f"RSS grew from {at_outage:.0f} MB to {during:.0f} MB during the outage"
    )


@GUARANTEES
async def test_a_worker_joining_and_leaving(
    services: TestServices, chaos_workers: WorkerEnv, names: Names, guarantee: str
) -> None:
    factory = chaos_workers(services.kafka_bootstrap, services.es_url)
    factory.env["INFLOW_PROCESSING_GUARANTEE"] = guarantee
    first = factory.start()
    records = events("joinleave")
    producer = SteadyProducer(services.kafka_bootstrap, names.texts, records)
    with RssSampler() as rss:
        rss.watch(first.proc.pid)
        producer.start()
        await _until_sent(producer, len(records) // 4)
        second = factory.start()
        rss.watch(second.proc.pid)
        await _until_sent(producer, len(records) * 3 // 5)
        # In a thread: the producer goes on sending while the worker leaves.
        assert await asyncio.to_thread(second.stop, signal.SIGTERM) == 0, "a clean leave"
        left = time.monotonic()
        seconds = await catch_up(services.es_url, names.alias, producer.sent_before(left), left)
        await producer.wait()
    figures = Figures(
        "worker joins and leaves", guarantee=guarantee, catch_up_s=seconds, peak_rss_mb=rss.peak()
    )
    await account(
        figures,
        bootstrap=services.kafka_bootstrap,
        es_url=services.es_url,
        names=names,
        sent=[eid for eid, _ in records],
        read_committed=guarantee == "exactly_once",
    )


POISON: list[tuple[bytes, bytes | None, str]] = [
    (b"poison-json", b'{"text": "unterminated', "invalid_json"),
    (b"poison-utf8", b'{"text": "caf\xe9 \xff"}', "invalid_utf8"),
    (b"poison-array", b'["not", "an", "event"]', "not_an_object"),
    (b"poison-type", b'{"text": 42}', "wrong_type"),
    (b"poison-long", json.dumps({"text": "x" * 100_001}).encode(), "text_too_long"),
    (b"poison-empty", b"", "empty_value"),
    (b"poison-tombstone", None, "empty_value"),
]


@GUARANTEES
async def test_poison_texts_are_dead_letters_and_nothing_else_stops(
    services: TestServices, chaos_workers: WorkerEnv, names: Names, guarantee: str
) -> None:
    factory = chaos_workers(services.kafka_bootstrap, services.es_url)
    worker = factory.start(INFLOW_PROCESSING_GUARANTEE=guarantee)
    good = events("poison")
    mixed: list[tuple[str, bytes | None]] = list(good)
    step = len(good) // (len(POISON) + 1)
    for i, (key, value, _) in enumerate(POISON):
        mixed.insert((i + 1) * step + i, (key.decode(), value))
    producer = SteadyProducer(services.kafka_bootstrap, names.texts, mixed)
    with RssSampler() as rss:
        rss.watch(worker.proc.pid)
        producer.start()
        await producer.wait()
        finished = time.monotonic()
        seconds = await catch_up(services.es_url, names.alias, [eid for eid, _ in good], finished)
    figures = Figures(
        "poison texts", guarantee=guarantee, catch_up_s=seconds, peak_rss_mb=rss.peak()
    )
    await account(
        figures,
        bootstrap=services.kafka_bootstrap,
        es_url=services.es_url,
        names=names,
        sent=[eid for eid, _ in good],
        poison={key: code for key, _, code in POISON},
        read_committed=guarantee == "exactly_once",
    )
    health = worker.health()
    assert health is not None and health["status"] == "ok", "the worker still runs"


async def test_exactly_once_read_committed_sees_one_prediction_per_event_across_kill_9(
    services: TestServices, chaos_workers: WorkerEnv, names: Names
) -> None:
    eos = {"INFLOW_PROCESSING_GUARANTEE": "exactly_once"}
    records, seconds, peak = await _kill_one_of_two(services, chaos_workers, names, "eos", **eos)
    uncommitted = await read_all(services.kafka_bootstrap, names.predictions)
    keys = [key for key, _, _ in uncommitted]
    figures = Figures(
        "worker kill -9",
        guarantee="exactly_once",
        catch_up_s=seconds,
        peak_rss_mb=peak,
        notes={"read_uncommitted_duplicates": len(keys) - len(set(keys))},
    )
    await account(
        figures,
        bootstrap=services.kafka_bootstrap,
        es_url=services.es_url,
        names=names,
        sent=[eid for eid, _ in records],
        read_committed=True,
    )


@pytest.mark.skipif(
    not os.environ.get("INFLOW_CHAOS_BENCH"), reason="a measurement: INFLOW_CHAOS_BENCH=1"
)
async def test_throughput_at_least_once_against_exactly_once(
    services: TestServices,
    chaos_workers: WorkerEnv,
    unique_name: Callable[[str], str],
) -> None:
    """One worker drains the same backlog in each mode; the events/s of each are printed."""
    n = int(os.environ.get("INFLOW_CHAOS_BENCH_EVENTS", "3000"))
    rates = {}
    for guarantee in ("at_least_once", "exactly_once"):
        base = unique_name(guarantee.replace("_", ""))
        names = Names(
            base, f"{base}.texts", f"{base}.predictions", f"{base}.texts.dlq",
            f"{base}.predictions.dlq", base,
        )  # fmt: skip
        factory = chaos_workers(services.kafka_bootstrap, services.es_url)
        factory.env.update(names.env())
        worker = factory.start(INFLOW_PROCESSING_GUARANTEE=guarantee)
        worker.stop()  # the topics exist now; the backlog is produced with no worker running
        producer = SteadyProducer(services.kafka_bootstrap, names.texts, events(base, n))
        producer.start(rate=100_000)
        await producer.wait()
        worker = factory.start(INFLOW_PROCESSING_GUARANTEE=guarantee)
        started = time.monotonic()  # ready: it has its partitions and starts on the backlog
        ids = [eid for _, eid in producer.acked]
        seconds = await catch_up(services.es_url, names.alias, ids, started, 900)
        committed = await read_all(services.kafka_bootstrap, names.predictions, read_committed=True)
        assert len({key for key, _, _ in committed}) == n
        rates[guarantee] = n / seconds
        worker.stop()
        print(f"\nTHROUGHPUT {guarantee}: {n} events in {seconds:.1f}s = {n / seconds:.1f}/s")
    cost = 1 - rates["exactly_once"] / rates["at_least_once"]
    print(f"THROUGHPUT exactly_once costs {cost:.0%} against at_least_once")


async def _kill_one_of_two(
    services: TestServices, chaos_workers: WorkerEnv, names: Names, prefix: str, **env: str
) -> tuple[list[tuple[str, bytes]], float, float]:
    """Two workers under steady load; kill -9 one of them after 2/5 of the events were sent.
    Returns the events, seconds until everything sent before the kill was indexed, peak RSS."""
    factory = chaos_workers(services.kafka_bootstrap, services.es_url)
    first = factory.start(**env)
    second = factory.start(**env)
    records = events(prefix)
    producer = SteadyProducer(services.kafka_bootstrap, names.texts, records)
    with RssSampler() as rss:
        rss.watch(first.proc.pid)
        rss.watch(second.proc.pid)
        producer.start()
        await _until_sent(producer, len(records) * 2 // 5)
        first.proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        first.proc.wait()
        seconds = await catch_up(services.es_url, names.alias, producer.sent_before(killed), killed)
        await producer.wait()
    return records, seconds, rss.peak()
