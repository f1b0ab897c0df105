"""End to end on real services: `inflow worker` subprocesses, genuine Kafka, the search server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from elasticsearch import AsyncElasticsearch

from engines.builder.data import sample_texts
from schemas import Prediction, decode_prediction, encode_event, parse_dead_letter_headers
from tests.e2e.conftest import ROOT, Names, WorkerFactory, read_topic

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

# (key, value, expected dead-letter code): every kind of malformed input the issue lists.
MALFORMED: list[tuple[bytes, bytes, str]] = [
    (b"bad-json", b'{"text": "unterminated', "invalid_json"),
    (b"bad-utf8", b'{"text": "caf\xe9 \xff"}', "invalid_utf8"),
    (b"bad-array", b'["a json", "array"]', "not_an_object"),
    (b"bad-missing", b'{"id": "x1", "body": "no text field"}', "missing_text"),
    (b"bad-empty", b'{"text": ""}', "empty_text"),
    (b"bad-blank", b'{"text": " \\t\\n  "}', "empty_text"),
    (b"bad-type", b'{"text": 42}', "wrong_type"),
    (b"bad-meta", b'{"text": "fine", "metadata": "not an object"}', "wrong_type"),
    (b"bad-long", json.dumps({"text": "x" * 100_001}).encode(), "text_too_long"),
    (b"bad-zero", b"", "empty_value"),
]

KNOWN = {
    "known-cat": "My cat loves sleeping on the warm windowsill all afternoon",
    "known-rates": "The central bank raised interest rates again to fight inflation",
    "known-match": "What a match! Our team scored in the last minute and won the final",
}


async def _produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic, key=key, value=value) for key, value in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def _indexed_ids(es_url: str, alias: str, expected: int, timeout_s: float = 300) -> list[str]:
    async with AsyncElasticsearch(es_url) as es:
        deadline = time.monotonic() + timeout_s
        count = -1
        while time.monotonic() < deadline:
            await es.indices.refresh(index=alias)
            count = int((await es.count(index=alias))["count"])
            if count >= expected:
                break
            await asyncio.sleep(1)
        response = await es.search(index=alias, size=max(count, 1), source=False)
        return [hit["_id"] for hit in response["hits"]["hits"]]


def _search_cli(env: dict[str, str], *args: str) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-m", "streams.cli.main", "search", *args, "--json"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    parsed: dict[str, object] = json.loads(result.stdout)
    return parsed


async def test_valid_events_predicted_and_indexed_malformed_dead_lettered(
    workers: WorkerFactory, names: Names, kafka_bootstrap: str, es_url: str
) -> None:
    worker = workers.start()
    texts = sample_texts(1000, seed=7)
    valid = [(f"ev-{i}", text) for i, text in enumerate(texts)] + list(KNOWN.items())
    records = [(eid.encode(), encode_event(text, id=eid)) for eid, text in valid]
    records += [(key, value) for key, value, _ in MALFORMED]
    await _produce(kafka_bootstrap, names.texts, records)

    predictions = await read_topic(kafka_bootstrap, names.predictions, len(valid))
    by_id: dict[str, list[Prediction]] = {}
    for key, value, _ in predictions:
        prediction = decode_prediction(value or b"")
        assert isinstance(prediction, Prediction), prediction
        assert key == prediction.id.encode()
        by_id.setdefault(prediction.id, []).append(prediction)
    assert sorted(by_id) == sorted(eid for eid, _ in valid), "one prediction per valid event"
    assert all(len(found) == 1 for found in by_id.values()), "no duplicates"
    sample = by_id["known-cat"][0]
    assert sample.text == KNOWN["known-cat"]
    assert sample.label in sample.scores and abs(sum(sample.scores.values()) - 1) < 1e-3
    assert len(sample.embedding) == 384
    assert sample.model.version and sample.source.topic == names.texts

    dead = await read_topic(kafka_bootstrap, names.texts_dlq, len(MALFORMED))
    assert sorted(key or b"" for key, _, _ in dead) == sorted(key for key, _, _ in MALFORMED)
    expected = {key: (value, code) for key, value, code in MALFORMED}
    for key, value, headers in dead:
        original, code = expected[key or b""]
        assert value == original, f"{key!r}: dead letter must keep the original bytes"
        parsed = parse_dead_letter_headers(list(headers.items()))
        assert parsed["inflow.error.code"] == code, (key, parsed)
        assert parsed["inflow.source.topic"] == names.texts
        assert parsed["inflow.error.message"]

    ids = await _indexed_ids(es_url, names.alias, len(valid))
    assert sorted(ids) == sorted(eid for eid, _ in valid), "each valid event indexed exactly once"
    health = worker.health()
    assert health is not None and health["status"] == "ok", "the worker still runs"

    env = {**workers.env, "INFLOW_KAFKA_BOOTSTRAP": kafka_bootstrap, "INFLOW_ES_URL": es_url}
    text_hits = _search_cli(env, "central bank interest rates", "-k", "3")["hits"]
    assert isinstance(text_hits, list) and text_hits[0]["id"] == "known-rates"
    similar = _search_cli(env, "a kitten napping in the sun by the window", "--similar", "-k", "3")
    similar_hits = similar["hits"]
    # In the top 3, not first: the sentiment fine-tune bends the embedding space, and one run
    # ranked a tweet about a window seat (cosine 0.805) just above the cat.
    assert isinstance(similar_hits, list) and "known-cat" in [h["id"] for h in similar_hits]
    label = sample.label
    filtered = _search_cli(env, "cat windowsill", "--label", label, "-k", "5")["hits"]
    assert isinstance(filtered, list) and filtered and all(h["label"] == label for h in filtered)
    # Hybrid: no content word of the query is in the cat's text, and kNN still brings it into
    # the fused top 3; the label filter holds on both halves.
    hybrid = _search_cli(env, "a kitten napping in the sun by the window", "--hybrid", "-k", "3")[
        "hits"
    ]
    assert isinstance(hybrid, list) and "known-cat" in [h["id"] for h in hybrid]
    hybrid = _search_cli(env, "cat windowsill", "--hybrid", "--label", label, "-k", "50")["hits"]
    assert isinstance(hybrid, list) and hybrid and all(h["label"] == label for h in hybrid)
    assert {h["id"] for h in filtered} <= {h["id"] for h in hybrid}


async def test_sigterm_mid_stream_then_restart_loses_nothing(
    workers: WorkerFactory, names: Names, kafka_bootstrap: str, es_url: str
) -> None:
    worker = workers.start()
    texts = sample_texts(1500, seed=11)
    records = [(f"s-{i}".encode(), encode_event(t, id=f"s-{i}")) for i, t in enumerate(texts)]
    await _produce(kafka_bootstrap, names.texts, records)

    # Stop it while the stream is still flowing.
    deadline = time.monotonic() + 300
    while True:
        health = worker.health() or {}
        done = int(str(health.get("texts", 0)))
        if done >= 150:
            break
        assert time.monotonic() < deadline, "worker made no progress"
        await asyncio.sleep(0.2)
    code = worker.stop(signal.SIGTERM)
    assert code == 0, worker.log.read_text()[-3000:]
    first_run = worker.log.read_text()
    assert "Traceback" not in first_run, first_run[-3000:]

    ids_after_stop = await _indexed_ids(es_url, names.alias, 0, timeout_s=5)
    assert len(ids_after_stop) < len(texts), "the stop should land mid-stream"

    workers.start()
    ids = await _indexed_ids(es_url, names.alias, len(texts))
    assert sorted(ids) == sorted(f"s-{i}" for i in range(len(texts))), "no event lost"
    predictions = await read_topic(kafka_bootstrap, names.predictions, len(texts))
    assert {key for key, _, _ in predictions} == {f"s-{i}".encode() for i in range(len(texts))}


def test_worker_refuses_bad_configuration_with_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFLOW_")}
    env.update(INFLOW_STATE_DIR=str(tmp_path), INFLOW_MAX_BATCH_SIZE="lots")
    result = subprocess.run(
        [sys.executable, "-m", "streams.cli.main", "worker"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "inflow: error: INFLOW_MAX_BATCH_SIZE must be an integer, got 'lots'"
    )


def test_unreachable_kafka_is_a_one_line_error(tmp_path: Path, engine_dir: Path) -> None:
    from streams.dev.process import free_port

    env = {k: v for k, v in os.environ.items() if not k.startswith("INFLOW_")}
    env.update(
        INFLOW_STATE_DIR=str(tmp_path),
        INFLOW_ENGINE_DIR=str(engine_dir),
        INFLOW_KAFKA_BOOTSTRAP=f"127.0.0.1:{free_port()}",  # nothing listens there
        INFLOW_ES_URL=f"http://127.0.0.1:{free_port()}",
    )
    result = subprocess.run(
        [sys.executable, "-m", "streams.cli.main", "topics"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("inflow: error: cannot reach Kafka at 127.0.0.1:")
    assert "inflow dev up" in line
