"""Security that is tested, not configured: genuine Kafka over SASL_SSL/SCRAM-SHA-512, mTLS and
SASL_PLAINTEXT; Elasticsearch over HTTPS with an API key (nginx in front of the real server);
the worker's search views behind hashed, rotatable API keys; no secret in any output.

One broker with four listeners and one nginx serve the whole module; two worker subprocesses
run (one with every credential right, one with a wrong Elasticsearch key).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from indexer import EsSettings, Searcher
from streams.config import Settings
from streams.dev.process import free_port
from streams.kafka import client_options, connection_problem
from streams.ops.auth import new_key
from streams.topics import ensure_topics_sync
from tests.e2e.conftest import ROOT, Names, WorkerFactory
from tests.security.conftest import Pki, SecureEs, SecureKafka

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]


# --------------------------------------------------------------------------- helpers


def _kafka_env(kafka: SecureKafka, pki: Pki, **changes: str) -> dict[str, str]:
    env = {
        "INFLOW_KAFKA_BOOTSTRAP": kafka.sasl_ssl,
        "INFLOW_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "INFLOW_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "INFLOW_KAFKA_SASL_USERNAME": kafka.username,
        "INFLOW_KAFKA_SASL_PASSWORD": kafka.password,
        "INFLOW_KAFKA_SSL_CAFILE": str(pki.ca),
    }
    env.update(changes)
    return env


def _es_env(es: SecureEs, pki: Pki, **changes: str) -> dict[str, str]:
    env = {
        "INFLOW_ES_URL": es.url,
        "INFLOW_ES_API_KEY": es.api_key,
        "INFLOW_ES_CA_CERTS": str(pki.ca),
    }
    env.update(changes)
    return env


def _base_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFLOW_")}
    env["INFLOW_STATE_DIR"] = str(tmp / "state")
    return env


class Outputs:
    """Everything a run printed or answered, for the secret scan."""

    def __init__(self) -> None:
        self.texts: list[tuple[str, str]] = []

    def add(self, where: str, text: str) -> str:
        self.texts.append((where, text))
        return text


def _cli(
    env: dict[str, str], *args: str, outputs: Outputs | None = None, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "streams.cli.main", *args],
        env=env,
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=180,
    )
    if outputs is not None:
        outputs.add(f"inflow {args[0]} stdout", result.stdout)
        outputs.add(f"inflow {args[0]} stderr", result.stderr)
    return result


def _one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a failed command (asserting there is nothing else)."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("inflow: error: ")
    return lines[0]


def _http(
    url: str, headers: dict[str, str] | None = None, outputs: Outputs | None = None
) -> tuple[int, dict[str, str], str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, head, body = response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            status, head, body = error.code, dict(error.headers), error.read().decode()
    if outputs is not None:
        outputs.add(f"GET {url}", f"{head}\n{body}")
    return status, head, body


def _settings(env: dict[str, str]) -> Settings:
    return Settings.load(env=env)


async def _committed(settings: Settings, group: str, topic: str) -> dict[int, int]:
    """The group's committed offsets on `topic` (partition -> offset), only those set."""
    admin = AIOKafkaAdminClient(**client_options(settings))
    await admin.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(settings.topic_partitions)]
        found = await admin.list_consumer_group_offsets(group, partitions=tps)
    finally:
        await admin.close()
    return {tp.partition: meta.offset for tp, meta in found.items() if meta.offset >= 0}


async def _read_one(settings: Settings, topic: str, timeout_s: float = 120) -> list[bytes]:
    consumer = AIOKafkaConsumer(**client_options(settings), enable_auto_commit=False)
    await consumer.start()
    values: list[bytes] = []
    try:
        tps = [TopicPartition(topic, p) for p in range(settings.topic_partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        deadline = time.monotonic() + timeout_s
        while not values and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=1000)
            values.extend(r.value for records in batch.values() for r in records if r.value)
    finally:
        await consumer.stop()
    return values


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def names(unique_name: Callable[[str], str]) -> Names:
    base = unique_name("sec")
    return Names(
        app_id=base,
        texts=f"{base}.texts",
        predictions=f"{base}.predictions",
        texts_dlq=f"{base}.texts.dlq",
        predictions_dlq=f"{base}.predictions.dlq",
        alias=base,
    )


@pytest.fixture
def secure_workers(tmp_path: Path, engine_dir: Path, names: Names) -> Iterator[WorkerFactory]:
    env = _base_env(tmp_path)
    env.update(names.env(), INFLOW_ENGINE_DIR=str(engine_dir), INFLOW_ENGINE_POLL_S="0.5")
    factory = WorkerFactory(env, tmp_path)
    yield factory
    for worker in factory.started:
        worker.stop(signal.SIGKILL, timeout=30)


# --------------------------------------------------------------------------- Kafka


async def test_each_listener_accepts_its_credentials(
    secure_kafka: SecureKafka, pki: Pki, tmp_path: Path, unique_name: Callable[[str], str]
) -> None:
    """SASL_SSL + SCRAM-SHA-512, SSL with a client certificate, SASL_PLAINTEXT + SCRAM: the topic
    admin connects through `client_options`, and a record makes the round trip."""
    cases = {
        "SASL_SSL": _kafka_env(secure_kafka, pki),
        "SSL": _kafka_env(
            secure_kafka,
            pki,
            INFLOW_KAFKA_BOOTSTRAP=secure_kafka.ssl,
            INFLOW_KAFKA_SECURITY_PROTOCOL="SSL",
            INFLOW_KAFKA_SSL_CERTFILE=str(pki.client_cert),
            INFLOW_KAFKA_SSL_KEYFILE=str(pki.client_key),
        ),
        "SASL_PLAINTEXT": _kafka_env(
            secure_kafka,
            pki,
            INFLOW_KAFKA_BOOTSTRAP=secure_kafka.sasl_plaintext,
            INFLOW_KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT",
        ),
    }
    for protocol, env in cases.items():
        texts = unique_name(protocol.lower().replace("_", "-"))
        settings = _settings(
            {
                **_base_env(tmp_path),
                **env,
                "INFLOW_TEXTS_TOPIC": texts,
                "INFLOW_TOPIC_PARTITIONS": "1",
            }
        )
        assert await connection_problem(settings) is None, protocol
        lines = await asyncio.to_thread(ensure_topics_sync, settings)
        assert any(texts in line for line in lines), (protocol, lines)
        from streams.kafka import producer

        client = producer(settings)
        await client.start()
        try:
            await client.send_and_wait(texts, b"hello " + protocol.encode())
        finally:
            await client.stop()
        assert await _read_one(settings, texts) == [b"hello " + protocol.encode()], protocol


WRONG_KAFKA = {
    "wrong password": (
        {"INFLOW_KAFKA_SASL_PASSWORD": "not-the-password"},
        "authentication failed for user 'inflow' with SCRAM-SHA-512: wrong username or password",
    ),
    "unknown CA": (
        {"INFLOW_KAFKA_SSL_CAFILE": "{other_ca}"},
        "TLS: the broker's certificate is not trusted",
    ),
    "wrong mechanism": (
        {"INFLOW_KAFKA_SASL_MECHANISM": "PLAIN"},
        "the broker does not accept SASL mechanism PLAIN",
    ),
    "no client certificate": (
        {"INFLOW_KAFKA_BOOTSTRAP": "{ssl}", "INFLOW_KAFKA_SECURITY_PROTOCOL": "SSL"},
        "client certificate",
    ),
}


def test_wrong_kafka_credentials_are_one_line_errors(
    secure_kafka: SecureKafka, pki: Pki, tmp_path: Path, engine_dir: Path
) -> None:
    """`inflow produce` fails with one line naming the cause, no traceback, for each case; a
    worker stays up, not ready, and says why on /health/ready and in its log."""
    for case, (changes, expected) in WRONG_KAFKA.items():
        filled = {
            k: v.format(other_ca=pki.other_ca, ssl=secure_kafka.ssl) for k, v in changes.items()
        }
        env = {**_base_env(tmp_path), **_kafka_env(secure_kafka, pki, **filled)}
        line = _one_line_error(_cli(env, "produce", "--format", "text", stdin="hello\n"))
        assert expected in line, (case, line)
        assert secure_kafka.password not in line

    # The worker does not exit: it stays up, not ready, says why on /health/ready and in one
    # log line per attempt (with backoff), and stops cleanly on SIGTERM.
    for case, (changes, expected) in WRONG_KAFKA.items():
        filled = {
            k: v.format(other_ca=pki.other_ca, ssl=secure_kafka.ssl) for k, v in changes.items()
        }
        env = {
            **_base_env(tmp_path),
            **_kafka_env(secure_kafka, pki, **filled),
            "INFLOW_ES_URL": "https://127.0.0.1:9",
            "INFLOW_ENGINE_DIR": str(engine_dir),
        }
        ready, live, code, output = _worker_until_stopped(env, tmp_path / f"worker-{case}.log")
        assert ready is not None and ready[0] == 503, (case, ready, output[-2000:])
        assert expected in str(ready[1]["checks"]["kafka"]), (case, ready)
        assert live is not None and live[0] == 200, (case, live)
        assert code == 0, (case, output[-2000:])
        assert "Traceback" not in output, case
        errors = [line for line in output.splitlines() if " ERROR inflow.worker: " in line]
        assert errors and all(expected in e for e in errors), (case, output)
        assert "attempt 1;" in errors[0], errors
        assert secure_kafka.password not in output and "not-the-password" not in output


def _worker_until_stopped(
    env: dict[str, str], log: Path
) -> tuple[tuple[int, dict[str, Any]] | None, tuple[int, dict[str, Any]] | None, int, str]:
    """Start a worker, read /health/ready and /health/live once they answer, SIGTERM it."""
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streams.cli.main", "worker", "--web-port", str(port)],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    ready = live = None
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and ready is None and proc.poll() is None:
            ready = _get_json(f"http://127.0.0.1:{port}/health/ready")
            time.sleep(0.5)
        live = _get_json(f"http://127.0.0.1:{port}/health/live")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    return ready, live, code, log.read_text()


def _get_json(url: str) -> tuple[int, dict[str, Any]] | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())
    except OSError:
        return None


# --------------------------------------------------------------------------- the whole flow


INJECTIONS_Q = [
    '{"query":{"match_all":{}}}',
    "*:*",
    "text:* OR label:positive",
    '"}},"size":10000,"query":{"match_all":{}}}',
    '{"script":{"source":"java.lang.Runtime.getRuntime().exec(\'id\')"}}',
    "_source:* AND _id:*",
    "'; DROP TABLE predictions; --",
    '\\u0000\\"}',
    "ünïcødé 🤖 ≠ <script>alert(1)</script>",
    "x" * 1000,
]
# Documents beside the marker's, with the words and field names the injections above would
# select if they were read as query DSL or query-string syntax (`*`, OR, AND, label, text,
# _source, _id, size, match_all...), and some with none of their words.
INJECTION_CORPUS = [
    "the positive label on this text was right",
    "a query about match_all and its size",
    "drop the table of predictions or keep it",
    "a quiet afternoon by the river",
    "another calm evening with tea",
    "the script ran with id 42 and exec rights",
    "_source and _id are the names of fields",
    "stars * and colons : everywhere",
]


async def _literal_matches(
    es: EsSettings, alias: str, documents: dict[str, str], queries: list[str]
) -> dict[str, set[str]]:
    """For each query: the ids of `documents` that hold at least one of its words, as the
    index's own analyzer of `text` splits query and documents (a `match` query's meaning,
    found without running one). Asserts that each query leaves some document out, so that a
    DSL reading (`*:*`, `text:* OR ...`, `{"match_all": {}}`: every document) shows."""
    async with es.make_client() as client:

        async def words(text: str) -> set[str]:
            answer = await client.indices.analyze(index=alias, field="text", text=text)
            return {token["token"] for token in answer["tokens"]}

        held = {doc_id: await words(text) for doc_id, text in documents.items()}
        deadline = time.monotonic() + 120
        while True:  # every document searchable before the views are asked
            await client.indices.refresh(index=alias)
            if int((await client.count(index=alias))["count"]) >= len(documents):
                break
            assert time.monotonic() < deadline, "the injection corpus was never indexed"
            await asyncio.sleep(0.5)
        literal = {}
        for query in queries:
            asked = await words(query)
            literal[query] = {doc_id for doc_id, have in held.items() if have & asked}
            assert len(literal[query]) < len(documents), (query[:60], "matches every document")
    return literal


INJECTIONS_400 = [
    {"q": "x" * 1001},
    {"q": "a\x00b"},
    {"q": "ok", "label": "*"},
    {"q": "ok", "label": '{"exists":{"field":"text"}}'},
    {"q": "ok", "label": "positive OR 1=1"},
    {"q": "ok", "k": "1e9"},
    {"q": "ok", "k": "-1"},
    {"q": "ok", "k": "0"},
    {"q": "ok", "k": "101"},
    {"q": "ok", "k": "10;"},
    {"q": "ok", "size": "10000"},
    {"q": "ok", "q[]": "x"},
    {"q": ""},
]


async def test_full_flow_with_every_credential_and_no_secret_anywhere(
    secure_kafka: SecureKafka,
    secure_es: SecureEs,
    pki: Pki,
    secure_workers: WorkerFactory,
    names: Names,
    tmp_path: Path,
) -> None:
    outputs = Outputs()
    old_key, old_entry = new_key("old")
    new_key_, new_entry = new_key("new")
    search_port = free_port()
    env = {
        **_kafka_env(secure_kafka, pki),
        **_es_env(secure_es, pki),
        "INFLOW_WEB_API_KEYS": f"{old_entry},{new_entry}",
        "INFLOW_SEARCH_PORT": str(search_port),
    }
    secrets_ = {
        "Kafka password": secure_kafka.password,
        "ES API key": secure_es.api_key,
        "ES password": secure_es.password,
        "web key old": old_key,
        "web key new": new_key_,
    }
    secure_workers.env.update(env)
    worker = secure_workers.start()
    cli_env = dict(secure_workers.env)

    # An event through SASL_SSL to a prediction and a document behind HTTPS + API key; with it,
    # the corpus the injection checks search (below).
    marker = f"sentinel{uuid.uuid4().hex[:10]}"
    event = json.dumps({"id": marker, "text": f"a wonderful secure day {marker}"})
    corpus = {f"{marker}-c{i}": text for i, text in enumerate(INJECTION_CORPUS)}
    lines = [event, *(json.dumps({"id": i, "text": t}) for i, t in corpus.items())]
    produced = _cli(cli_env, "produce", stdin="\n".join(lines) + "\n", outputs=outputs)
    assert produced.returncode == 0, produced.stderr
    settings = _settings(cli_env)
    predictions = await _read_one(settings, names.predictions)
    assert any(marker.encode() in prediction for prediction in predictions)
    es = EsSettings(url=secure_es.url, api_key=secure_es.api_key, ca_certs=str(pki.ca))
    async with Searcher(es, alias=names.alias) as searcher:
        deadline = time.monotonic() + 120
        while (await searcher.search_text(marker)).total == 0:
            assert time.monotonic() < deadline, "the document never appeared"
            await asyncio.sleep(0.5)
    documents = {marker: f"a wonderful secure day {marker}", **corpus}
    literal = await _literal_matches(es, names.alias, documents, INJECTIONS_Q)

    # The search CLI over HTTPS with the API key, and with basic auth.
    found = _cli(cli_env, "search", marker, "--json", outputs=outputs)
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout)["hits"][0]["id"] == marker
    basic_env = {
        **cli_env,
        "INFLOW_ES_API_KEY": "",
        "INFLOW_ES_USERNAME": secure_es.username,
        "INFLOW_ES_PASSWORD": secure_es.password,
    }
    found = _cli(basic_env, "search", marker, "--json", outputs=outputs)
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout)["total"] == 1

    # Search views: their own port, keys required, both rotated keys accepted.
    search_url = f"http://127.0.0.1:{search_port}"
    query = urllib.parse.urlencode({"q": marker})
    for headers in ({}, {"Authorization": "ApiKey wrong"}, {"X-API-Key": old_key + "x"}):
        status, head, _ = _http(f"{search_url}/search?{query}", headers, outputs)
        assert status == 401 and head.get("WWW-Authenticate") == "ApiKey", headers
    for key in (old_key, new_key_):
        for path in (
            f"/search?{query}",
            f"/search?{query}&mode=hybrid",
            f"/similar?text={marker}&k=3",
        ):
            status, _, body = _http(
                f"{search_url}{path}", {"Authorization": f"ApiKey {key}"}, outputs
            )
            assert status == 200, (path, body)
            assert marker in body
    status, _, _ = _http(f"{search_url}/search?{query}", {"X-API-Key": new_key_}, outputs)
    assert status == 200
    # /metrics and /health/* on the worker's web port; search is not served there.
    for path in ("/metrics", "/health", "/health/ready", "/health/live"):
        status, _, _ = _http(f"{worker.url}{path}", outputs=outputs)
        assert status == 200, path
    assert _http(f"{worker.url}/search?{query}")[0] == 404
    assert _http(f"{worker.url}/router/")[0] == 404  # Faust's own pages are off

    # Injection corpus: 200 with plain results or 400, never a server error. On /search, q is
    # words to match, not a query: the hits are exactly the documents holding one of its words
    # (what the index's analyzer makes of it), never what its DSL or query-string syntax
    # would select (every document, for most of them: see _literal_matches).
    auth = {"Authorization": f"ApiKey {new_key_}"}
    for text in INJECTIONS_Q:
        for view, name in (("search", "q"), ("similar", "text")):
            url = f"{search_url}/{view}?{urllib.parse.urlencode({name: text})}"
            status, _, body = _http(url, auth, outputs)
            assert status in (200, 400), (view, text[:60], status, body[:300])
            if status == 200:
                result = json.loads(body)
                assert isinstance(result["hits"], list)
                if view == "search":
                    found_ids = {hit["id"] for hit in result["hits"]}
                    assert (result["total"], found_ids) == (len(literal[text]), literal[text]), (
                        text[:60],
                        result["total"],
                        sorted(found_ids),
                        sorted(literal[text]),
                    )
    for params in INJECTIONS_400:
        url = f"{search_url}/search?{urllib.parse.urlencode(params)}"
        status, _, body = _http(url, auth, outputs)
        assert status == 400, (params, status, body[:300])
        assert "error" in json.loads(body)
    status, _, _ = _http(f"{search_url}/search?q={'y' * 5000}", auth, outputs)
    assert status == 400

    # `inflow dev status` with every credential in the environment.
    outputs.add("settings repr", repr(_settings(cli_env)))
    _cli(cli_env, "dev", "status", outputs=outputs)

    worker.stop()
    log = worker.log.read_text(errors="replace")
    outputs.add("worker log", log)
    audit = [
        json.loads(line.split(": ", 1)[1]) for line in log.splitlines() if "inflow.audit:" in line
    ]
    by_key = {record["key_id"] for record in audit if record["status"] == 200}
    assert {"old", "new"} <= by_key
    assert any(r["status"] == 401 and r["key_id"] is None for r in audit)
    hit = next(r for r in audit if r.get("query") == marker and r["status"] == 200)
    assert hit["hits"] >= 1 and hit["k"] == 10 and hit["view"] == "search" and hit["ts"]

    # The scan: no secret in any log line, output, response or header of the run.
    leaks = [
        (name, where)
        for where, text in outputs.texts
        for name, value in secrets_.items()
        if value in text
    ]
    assert not leaks, leaks
    assert re.search(r"inflow\.audit", log)


# --------------------------------------------------------------------------- wrong ES credentials


async def test_wrong_es_key_is_not_ready_keeps_offsets_and_says_why(
    secure_kafka: SecureKafka,
    secure_es: SecureEs,
    pki: Pki,
    secure_workers: WorkerFactory,
    names: Names,
) -> None:
    env = {
        **_kafka_env(secure_kafka, pki),
        **_es_env(secure_es, pki, INFLOW_ES_API_KEY="wrong-key"),
    }
    secure_workers.env.update(env)
    worker = secure_workers.start(wait_ready=False)
    cli_env = dict(secure_workers.env)
    produced = _cli(cli_env, "produce", "--format", "text", stdin="held back by the index\n")
    assert produced.returncode == 0, produced.stderr

    deadline = time.monotonic() + 60
    while True:
        answer = worker.probe("/health/ready")
        reason = str(answer[1].get("reason")) if answer else ""
        if "refused the credentials (HTTP 401)" in reason:
            break
        assert time.monotonic() < deadline, answer
        await asyncio.sleep(0.5)
    assert answer is not None and answer[0] == 503
    assert answer[1]["checks"]["elasticsearch"].startswith(  # type: ignore[index]
        f"cannot set up alias {names.alias}: Elasticsearch refused the credentials (HTTP 401)"
    )
    await asyncio.sleep(6)  # past Faust's commit interval: nothing may be committed
    settings = _settings(cli_env)
    assert await _committed(settings, names.app_id, names.texts) == {}

    worker.stop()
    log = worker.log.read_text(errors="replace")
    assert "Traceback" not in log
    retries = [line for line in log.splitlines() if "failed (attempt" in line]
    assert retries and all("refused the credentials (HTTP 401)" in line for line in retries)
    assert len(retries) <= 12, "retries must back off"
    assert "wrong-key" not in log and secure_kafka.password not in log

    # The search CLI: a wrong key, and an unknown CA, each one line.
    line = _one_line_error(_cli(cli_env, "search", "anything"))
    assert "Elasticsearch refused the credentials (HTTP 401)" in line
    ca_env = {
        **cli_env,
        "INFLOW_ES_API_KEY": secure_es.api_key,
        "INFLOW_ES_CA_CERTS": str(pki.other_ca),
    }
    line = _one_line_error(_cli(ca_env, "search", "anything"))
    assert "certificate is not trusted" in line and secure_es.api_key not in line
