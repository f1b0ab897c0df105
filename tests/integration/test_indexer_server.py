"""The indexer against a real search server over HTTP (``es_url`` from tests/conftest.py).

Where genuine Elasticsearch and the noida-db fallback differ, these tests follow genuine
Elasticsearch; the few checks that only it can pass (percentiles, real 429s) say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from elastic_transport import ApiResponseMeta, HttpHeaders, NodeConfig
from elasticsearch import ApiError, AsyncElasticsearch, ConnectionError, NotFoundError

# Submodules, not the package root: an editable install made while indexer/ had no
# __init__ resolves `indexer` as a namespace package under pytest.
from indexer.bulk import BulkWriter, RetryPolicy
from indexer.client import EsSettings
from indexer.errors import IndexSetupError, IndexUnavailable
from indexer.mapping import alias_dims, ensure_index, first_index_name
from indexer.search import Searcher, SearchFilters
from tests.conftest import TestServices

pytestmark = pytest.mark.integration

FAST_RETRY = RetryPolicy(max_attempts=4, base_delay=0.01, max_delay=0.05)


def unit_vector(rng: random.Random, dims: int = 384) -> list[float]:
    v = [rng.gauss(0.0, 1.0) for _ in range(dims)]
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def prediction(i: int, rng: random.Random, **changes: Any) -> dict[str, Any]:
    label = ("positive", "negative", "neutral")[i % 3]
    doc: dict[str, Any] = {
        "id": f"ev-{i:05d}",
        "text": f"an ordinary message about the weather, number {i}",
        "label": label,
        "scores": {"positive": 0.2, "negative": 0.3, "neutral": 0.5, label: 0.9},
        "embedding": unit_vector(rng),
        "model": {
            "name": "minilm",
            "version": "1" if i % 2 else "2",
            "backend": "onnxruntime",
            "precision": "fp32",
        },
        "truncated": False,
        "event_ts": None,
        "processed_ts": f"2024-05-{1 + i % 28:02d}T12:00:00Z",
        "metadata": {"producer": "test", "seq": i},
        "source": {"topic": "inflow.texts", "partition": i % 3, "offset": i},
    }
    doc.update(changes)
    return doc


@pytest.fixture
async def es(es_url: str) -> AsyncIterator[AsyncElasticsearch]:
    client = AsyncElasticsearch(es_url, request_timeout=30)
    yield client
    await client.close()


@pytest.fixture
async def alias(es: AsyncElasticsearch, unique_name: Callable[[str], str]) -> AsyncIterator[str]:
    name = unique_name("pred")
    yield name
    # Real Elasticsearch refuses wildcard deletes by default: name the index.
    for cleanup in (
        es.indices.delete(index=first_index_name(name)),
        es.indices.delete_index_template(name=name),
    ):
        with contextlib.suppress(NotFoundError):
            await cleanup


@pytest.fixture
async def writer(es_url: str, alias: str) -> AsyncIterator[BulkWriter]:
    # refresh=true, not wait_for: genuine Elasticsearch answers wait_for only at its next
    # scheduled refresh (about 1 s per bulk call); true refreshes at once.
    async with BulkWriter(EsSettings(es_url), alias=alias, refresh=True, retry=FAST_RETRY) as w:
        yield w


@pytest.fixture
async def searcher(es_url: str, alias: str) -> AsyncIterator[Searcher]:
    async with Searcher(EsSettings(es_url), alias=alias) as s:
        yield s


@pytest.fixture
async def corpus(writer: BulkWriter) -> list[dict[str, Any]]:
    """60 documents, one of them with distinctive text."""
    rng = random.Random(7)
    docs = [prediction(i, rng) for i in range(60)]
    docs[17]["text"] = "a zebra quartet played the xylophone at midnight"
    outcome = await writer.bulk_index(docs)
    assert len(outcome.indexed_ids) == 60 and not outcome.rejected
    return docs


# -- index setup -----------------------------------------------------------------------------


async def test_ensure_index_twice_gives_one_index_with_a_cosine_vector(
    es: AsyncElasticsearch, alias: str
) -> None:
    await ensure_index(es, alias)
    await ensure_index(es, alias)
    indices = (await es.indices.get(index=alias)).body
    assert list(indices) == [first_index_name(alias)]
    (index,) = indices.values()
    assert index["aliases"][alias].get("is_write_index") is True
    embedding = index["mappings"]["properties"]["embedding"]
    assert embedding["type"] == "dense_vector"
    assert (embedding["dims"], embedding["index"], embedding["similarity"]) == (384, True, "cosine")
    templates = (await es.indices.get_index_template(name=alias)).body["index_templates"]
    assert templates[0]["index_template"]["index_patterns"] == [f"{alias}-*"]


async def test_each_alias_gets_its_models_width_and_never_mixes_widths(
    es: AsyncElasticsearch, alias: str
) -> None:
    await ensure_index(es, alias, dims=768)
    await ensure_index(es, alias)  # no width given: the alias keeps its own
    await ensure_index(es, alias, dims=768)
    assert await alias_dims(es, alias) == 768
    template = (await es.indices.get_index_template(name=alias)).body["index_templates"][0]
    mappings = template["index_template"]["template"]["mappings"]
    assert mappings["properties"]["embedding"]["dims"] == 768
    with pytest.raises(IndexSetupError) as refused:
        await ensure_index(es, alias, dims=384)
    message = str(refused.value)
    assert "\n" not in message and "768-wide" in message and "384-wide" in message
    # Refused before anything changed: the template still says 768.
    template = (await es.indices.get_index_template(name=alias)).body["index_templates"][0]
    assert (
        template["index_template"]["template"]["mappings"]["properties"]["embedding"]["dims"] == 768
    )


async def test_a_concrete_index_named_like_the_alias_is_reported(
    es: AsyncElasticsearch, alias: str
) -> None:
    await es.indices.create(index=alias)  # e.g. written to before the template existed
    try:
        with pytest.raises(IndexSetupError, match=alias):
            await ensure_index(es, alias)
    finally:
        await es.indices.delete(index=alias)


# -- writing ---------------------------------------------------------------------------------


async def test_bulk_index_is_idempotent(writer: BulkWriter, searcher: Searcher) -> None:
    rng = random.Random(1)
    docs = [prediction(i, rng) for i in range(200)]
    first = await writer.bulk_index(docs)
    assert first.indexed_ids == [d["id"] for d in docs]
    assert await searcher.count() == 200
    again = await writer.bulk_index(docs)
    assert len(again.indexed_ids) == 200 and not again.rejected
    assert await searcher.count() == 200


async def test_small_chunks_write_everything(es_url: str, alias: str, searcher: Searcher) -> None:
    rng = random.Random(2)
    docs = [prediction(i, rng) for i in range(25)]
    async with BulkWriter(
        EsSettings(es_url),
        alias=alias,
        refresh=True,
        max_chunk_docs=4,
        max_chunk_bytes=20_000,
    ) as writer:
        outcome = await writer.bulk_index(docs)
    assert len(outcome.indexed_ids) == 25
    assert await searcher.count() == 25


async def test_bad_documents_are_rejected_while_the_rest_index(
    writer: BulkWriter, searcher: Searcher
) -> None:
    rng = random.Random(3)
    docs = [prediction(i, rng) for i in range(10)]
    docs[2]["label"] = {"not": "a keyword"}
    docs[5]["embedding"] = docs[5]["embedding"][:100]
    docs[7] = {k: v for k, v in docs[7].items() if k != "id"}
    outcome = await writer.bulk_index(docs)
    assert outcome.indexed_ids == [docs[i]["id"] for i in (0, 1, 3, 4, 6, 8, 9)]
    by_id = {r.id: r for r in outcome.rejected}
    assert set(by_id) == {"ev-00002", "ev-00005", None}
    assert by_id["ev-00002"].status == 400 and "label" in by_id["ev-00002"].reason
    assert by_id["ev-00005"].status == 400 and "dimensions" in by_id["ev-00005"].reason
    assert by_id[None].status is None and "id" in by_id[None].reason
    assert by_id["ev-00002"].doc is docs[2]  # the caller dead-letters the original
    assert await searcher.count() == 7


async def test_any_metadata_shape_indexes_and_stays_searchable(
    writer: BulkWriter, es: AsyncElasticsearch, alias: str
) -> None:
    rng = random.Random(4)
    shapes: list[Any] = [
        {"x": 1},
        {"x": {"y": "z"}},  # same key, now an object: an object mapping would reject this
        {"x": [1, "two", {"three": 3.0}], "long": "v" * 5000},
        None,
        {"deep": {"a": {"b": {"c": {"d": {"e": "f"}}}}}},
    ]
    docs = [prediction(i, rng, metadata=m) for i, m in enumerate(shapes)]
    outcome = await writer.bulk_index(docs)
    assert not outcome.rejected and len(outcome.indexed_ids) == len(shapes)
    found = await es.search(index=alias, query={"term": {"metadata.x.y": "z"}})
    assert [h["_id"] for h in found.body["hits"]["hits"]] == [docs[1]["id"]]


# -- searching -------------------------------------------------------------------------------


async def test_distinctive_text_comes_first(
    corpus: list[dict[str, Any]], searcher: Searcher
) -> None:
    result = await searcher.search_text("zebra xylophone", k=5)
    assert result.hits[0].id == corpus[17]["id"]
    assert any("<em>" in fragment for fragment in result.hits[0].highlight)
    assert result.hits[0].label == corpus[17]["label"]
    assert result.hits[0].scores[corpus[17]["label"]] == pytest.approx(0.9)


async def test_text_search_filters(corpus: list[dict[str, Any]], searcher: Searcher) -> None:
    both = SearchFilters(label="negative", model_version="2")
    result = await searcher.search_text("weather", filters=both, k=100)
    expected = {
        d["id"] for d in corpus if d["label"] == "negative" and d["model"]["version"] == "2"
    }
    assert {h.id for h in result.hits} == expected
    assert all(h.model_version == "2" for h in result.hits)
    window = SearchFilters(since="2024-05-01T00:00:00Z", until="2024-05-03T00:00:00Z")
    early = await searcher.search_text("", filters=window, k=100)
    assert {h.id for h in early.hits} == {
        d["id"] for d in corpus if d["processed_ts"] < "2024-05-03"
    }


async def test_knn_with_a_known_vector_finds_its_document(
    corpus: list[dict[str, Any]], searcher: Searcher
) -> None:
    target = corpus[33]
    result = await searcher.search_similar(target["embedding"], k=5)
    assert result.hits[0].id == target["id"]
    assert result.hits[0].score == pytest.approx(1.0, abs=0.01)  # cosine score = (1 + cos) / 2
    assert "embedding" not in result.hits[0].doc


async def test_knn_label_filter(corpus: list[dict[str, Any]], searcher: Searcher) -> None:
    target = corpus[33]
    other = "positive" if target["label"] != "positive" else "negative"
    result = await searcher.search_similar(
        target["embedding"], k=5, filters=SearchFilters(label=other)
    )
    assert len(result.hits) == 5
    assert all(h.label == other for h in result.hits)
    assert target["id"] not in {h.id for h in result.hits}


async def test_label_counts_and_count(corpus: list[dict[str, Any]], searcher: Searcher) -> None:
    expected: dict[str, int] = {}
    for d in corpus:
        expected[d["label"]] = expected.get(d["label"], 0) + 1
    assert await searcher.label_counts() == expected
    v1 = {label: 0 for label in expected}
    for d in corpus:
        if d["model"]["version"] == "1":
            v1[d["label"]] += 1
    v1_counts = await searcher.label_counts(filters=SearchFilters(model_version="1"))
    assert v1_counts == {k: n for k, n in v1.items() if n}
    assert await searcher.count() == len(corpus)
    assert await searcher.count(filters=SearchFilters(label="neutral")) == expected["neutral"]


async def test_time_histogram_per_day_with_labels(
    corpus: list[dict[str, Any]], searcher: Searcher
) -> None:
    week = SearchFilters(since="2024-05-01T00:00:00Z", until="2024-05-08T00:00:00Z")
    buckets = await searcher.time_histogram(interval="1d", filters=week, by_label=True)
    expected: dict[str, dict[str, int]] = {}
    for d in corpus:
        day = d["processed_ts"][:10]
        if day < "2024-05-08":
            labels = expected.setdefault(f"{day}T00:00:00.000Z", {})
            labels[d["label"]] = labels.get(d["label"], 0) + 1
    assert [b.start for b in buckets] == sorted(expected)
    assert {b.start: b.labels for b in buckets} == expected
    assert all(b.count == sum(b.labels.values()) for b in buckets)
    neutral = SearchFilters(label="neutral", until="2024-05-03")
    hours = await searcher.time_histogram(interval="12h", filters=neutral)
    # Neutral documents before May 3rd: #56 (May 1st, 12:00) and #29 (May 2nd, 12:00). The
    # empty bucket between them comes back with a zero count.
    assert [(b.start, b.count) for b in hours] == [
        ("2024-05-01T12:00:00.000Z", 1),
        ("2024-05-02T00:00:00.000Z", 0),
        ("2024-05-02T12:00:00.000Z", 1),
    ]


async def test_latency_percentiles(
    writer: BulkWriter, searcher: Searcher, services: TestServices
) -> None:
    if not services.genuine_search:
        pytest.skip("needs genuine Elasticsearch: noida-db has no percentiles aggregation")
    rng = random.Random(8)
    processed = datetime(2024, 5, 1, 12, tzinfo=UTC)
    docs = []
    for i in range(100):  # latencies 10, 20, ..., 1000 ms
        event = processed - timedelta(milliseconds=10 * (i + 1))
        docs.append(
            prediction(
                i,
                rng,
                event_ts=event.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                processed_ts="2024-05-01T12:00:00.000Z",
            )
        )
    docs.append(prediction(100, rng))  # no event_ts: no latency, not counted
    assert not (await writer.bulk_index(docs)).rejected
    result = await searcher.latency_percentiles(percents=(50, 90, 99))
    assert result.count == 100
    assert result.values_ms[50.0] == pytest.approx(505, abs=10)
    assert result.values_ms[90.0] == pytest.approx(905, abs=10)
    assert result.values_ms[99.0] == pytest.approx(995, abs=10)
    nothing = SearchFilters(label="nothing-has-this-label")
    negative = await searcher.latency_percentiles(filters=nothing)
    assert negative.count == 0 and set(negative.values_ms.values()) == {None}


# -- fault injection ----------------------------------------------------------------------------


def crafted_429() -> ApiError:
    meta = ApiResponseMeta(
        status=429,
        http_version="1.1",
        headers=HttpHeaders(),
        duration=0.0,
        node=NodeConfig("http", "localhost", 9200),
    )
    body = {"error": {"type": "es_rejected_execution_exception", "reason": "queue full"}}
    return ApiError("es_rejected_execution_exception", meta=meta, body=body)


class FlakyBulk:
    """Wraps a live client: the first bulk calls raise the queued errors, the rest go through."""

    def __init__(self, client: AsyncElasticsearch, errors: Sequence[Exception]) -> None:
        self._client = client
        self.errors = list(errors)
        self.bulk_calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def bulk(self, **kwargs: Any) -> Any:
        self.bulk_calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return await self._client.bulk(**kwargs)


class HalfRejectingBulk(FlakyBulk):
    """On its first call sends only the first half of the actions and answers 429 for the rest,
    as a cluster with a full write queue does."""

    def __init__(self, client: AsyncElasticsearch) -> None:
        super().__init__(client, [])
        self.sizes: list[int] = []

    async def bulk(self, **kwargs: Any) -> Any:
        operations: Any = kwargs.pop("operations")  # pre-encoded ndjson lines (bytes)
        self.sizes.append(len(operations))
        if len(self.sizes) > 1:
            return await self._client.bulk(operations=operations, **kwargs)
        half = len(operations) // 2
        response = await self._client.bulk(operations=operations[:half], **kwargs)
        refused = {
            "index": {
                "status": 429,
                "error": {"type": "es_rejected_execution_exception", "reason": "queue full"},
            }
        }
        items = response.body["items"] + [refused] * (len(operations) - half)
        return type("Reply", (), {"body": {"errors": True, "items": items}})()


async def test_writer_retries_crafted_429_and_connection_errors(
    es: AsyncElasticsearch, alias: str, searcher: Searcher
) -> None:
    flaky = FlakyBulk(es, [crafted_429(), ConnectionError("connection reset"), crafted_429()])
    client = cast(AsyncElasticsearch, flaky)
    async with BulkWriter(client=client, alias=alias, refresh=True, retry=FAST_RETRY) as w:
        rng = random.Random(5)
        outcome = await w.bulk_index([prediction(i, rng) for i in range(30)])
    assert flaky.bulk_calls == 4
    assert len(outcome.indexed_ids) == 30
    assert await searcher.count() == 30


async def test_only_refused_items_are_sent_again(
    es: AsyncElasticsearch, alias: str, searcher: Searcher
) -> None:
    half = HalfRejectingBulk(es)
    client = cast(AsyncElasticsearch, half)
    async with BulkWriter(client=client, alias=alias, refresh=True, retry=FAST_RETRY) as w:
        rng = random.Random(6)
        outcome = await w.bulk_index([prediction(i, rng) for i in range(40)])
    assert half.sizes == [40, 20]
    assert len(outcome.indexed_ids) == 40
    assert await searcher.count() == 40


async def test_exhausted_attempts_raise_index_unavailable(
    es: AsyncElasticsearch, alias: str, searcher: Searcher
) -> None:
    flaky = FlakyBulk(es, [crafted_429()] * FAST_RETRY.max_attempts)
    client = cast(AsyncElasticsearch, flaky)
    rng = random.Random(7)
    docs = [prediction(i, rng) for i in range(5)]
    async with BulkWriter(client=client, alias=alias, retry=FAST_RETRY) as w:
        with pytest.raises(IndexUnavailable) as caught:
            await w.bulk_index(docs)
        assert caught.value.retriable is True
        assert caught.value.attempts == FAST_RETRY.max_attempts
        assert caught.value.pending_ids == [d["id"] for d in docs]
        assert "es_rejected_execution_exception" in str(caught.value)
        # The server is back: the caller's retry of the same batch goes through.
        assert len((await w.bulk_index(docs)).indexed_ids) == 5
        await w.refresh()
    assert flaky.bulk_calls == FAST_RETRY.max_attempts + 1
    assert await searcher.count() == 5


class Counting429:
    """Passes every bulk call through to a live client and counts the 429s it answers."""

    def __init__(self, client: AsyncElasticsearch) -> None:
        self._client = client
        self.rejected = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def bulk(self, **kwargs: Any) -> Any:
        try:
            return await self._client.bulk(**kwargs)
        except ApiError as exc:
            if exc.meta.status == 429:
                self.rejected += 1
            raise


@pytest.mark.slow
async def test_real_429s_under_indexing_pressure_are_retried(
    es: AsyncElasticsearch, alias: str, searcher: Searcher, services: TestServices
) -> None:
    """Four writers send 60 MB each at once. Genuine Elasticsearch refuses a whole request with
    429 es_rejected_execution_exception when the bytes being indexed would pass 10% of its heap
    (indexing_pressure.memory.limit; 102 MB with the 1 GB dev heap), that is when two of these
    requests overlap. The writers back off and everything arrives. noida-db never says 429."""
    counting = Counting429(es)
    client = cast(AsyncElasticsearch, counting)
    patient = RetryPolicy(max_attempts=30, base_delay=0.05, max_delay=0.5)
    writers = [
        BulkWriter(
            client=client,
            alias=alias,
            retry=patient,
            max_chunk_docs=3000,
            max_chunk_bytes=64 * 2**20,
        )
        for _ in range(4)
    ]
    blob = "x" * 20_000  # stored, not indexed (flattened ignore_above): cheap for the server
    batches = [
        [
            {"id": f"w{n}-{i:04d}", "text": "pressure", "label": "neutral", "metadata": {"b": blob}}
            for i in range(3000)
        ]
        for n in range(len(writers))
    ]
    for w in writers:
        await w.start()
    try:
        # Whether two requests overlap on the server depends on timing: try a few rounds.
        for _ in range(5):
            outcomes = await asyncio.gather(
                *(w.bulk_index(b) for w, b in zip(writers, batches, strict=True))
            )
            assert all(len(o.indexed_ids) == 3000 and not o.rejected for o in outcomes)
            if counting.rejected or not services.genuine_search:
                break
    finally:
        for w in writers:
            await w.stop()
    await es.indices.refresh(index=alias)
    assert await searcher.count() == 12_000
    if services.genuine_search:
        assert counting.rejected > 0, "expected genuine Elasticsearch to push back with 429"


async def test_unreachable_server_makes_start_raise_index_unavailable() -> None:
    writer = BulkWriter(EsSettings("http://127.0.0.1:9", request_timeout=2), retry=FAST_RETRY)
    with pytest.raises(IndexUnavailable, match="ensure index failed 4 times"):
        await writer.start()
    await writer.stop()
