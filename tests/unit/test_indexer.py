"""Unit tests of the indexer's pure parts, and of the retry loop against a fake client."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from types import MappingProxyType, SimpleNamespace
from typing import Any, cast

import pytest
from elastic_transport import ApiResponseMeta, HttpHeaders, NodeConfig
from elasticsearch import ApiError, AsyncElasticsearch, ConnectionError

from indexer.actions import (
    EncodedAction,
    ItemStatus,
    build_action,
    chunk_actions,
    encode_action,
    latency_ms,
    parse_bulk_response,
)
from indexer.bulk import BulkWriter, RetryPolicy
from indexer.client import EsSettings
from indexer.errors import IndexRequestError, IndexUnavailable, LifecycleError
from indexer.mapping import (
    EMBEDDING_DIMS,
    TEMPLATE_PRIORITY,
    first_index_name,
    index_template,
    prediction_mappings,
    validate_alias,
)
from indexer.search import (
    NO_FILTERS,
    Searcher,
    SearchFilters,
    build_count_query,
    build_knn_query,
    build_label_counts_query,
    build_latency_percentiles_query,
    build_text_query,
    build_time_histogram_query,
    parse_label_counts,
    parse_latency_percentiles,
    parse_search_response,
    parse_time_histogram,
)

# -- helpers -------------------------------------------------------------------------------


def unit_vector(seed: int, dims: int = EMBEDDING_DIMS) -> list[float]:
    rng = random.Random(seed)
    v = [rng.gauss(0.0, 1.0) for _ in range(dims)]
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def prediction(i: int, **changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": f"ev-{i}",
        "text": f"text number {i}",
        "label": "positive",
        "scores": {"positive": 0.9, "negative": 0.1},
        "embedding": unit_vector(i),
        "model": {"name": "minilm", "version": "1", "backend": "onnxruntime", "precision": "fp32"},
        "truncated": False,
        "event_ts": None,
        "processed_ts": "2024-05-01T12:00:00Z",
        "metadata": None,
        "source": {"topic": "inflow.texts", "partition": 0, "offset": i},
    }
    doc.update(changes)
    return doc


def encoded(position: int, size: int) -> EncodedAction:
    return EncodedAction(position, f"id{position}", {}, b"x" * size)


def api_error(status: int, error_type: str = "es_rejected_execution_exception") -> ApiError:
    meta = ApiResponseMeta(
        status=status,
        http_version="1.1",
        headers=HttpHeaders(),
        duration=0.0,
        node=NodeConfig("http", "localhost", 9200),
    )
    body = {"error": {"type": error_type, "reason": "crafted"}, "status": status}
    return ApiError(error_type, meta=meta, body=body)


def item(doc_id: str, status: int, error_type: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"_index": "a-000001", "_id": doc_id, "status": status}
    if error_type is not None:
        body["error"] = {"type": error_type, "reason": f"because {doc_id}"}
    return {"index": body}


# -- mapping -------------------------------------------------------------------------------


def test_template_covers_alias_indices_with_a_cosine_vector() -> None:
    body = index_template("inflow-predictions", replicas=0)
    assert body["index_patterns"] == ["inflow-predictions-*"]
    assert body["priority"] == TEMPLATE_PRIORITY
    assert body["template"]["settings"]["index"] == {"number_of_shards": 1, "number_of_replicas": 0}
    props = body["template"]["mappings"]["properties"]
    assert props["embedding"] == {
        "type": "dense_vector",
        "dims": 384,
        "index": True,
        "similarity": "cosine",
    }
    assert props["label"]["type"] == "keyword"
    assert props["text"]["fields"]["keyword"]["ignore_above"] == 256
    assert props["source"]["properties"]["offset"]["type"] == "long"
    assert first_index_name("inflow-predictions") == "inflow-predictions-000001"
    # Each call returns a copy: callers cannot corrupt the packaged mappings.
    props["label"]["type"] = "text"
    assert index_template("x")["template"]["mappings"]["properties"]["label"]["type"] == "keyword"


@pytest.mark.parametrize("alias", ["", "Upper", "_x", "-x", "a b", "a*", "a" * 201])
def test_invalid_alias_names_are_refused(alias: str) -> None:
    with pytest.raises(ValueError, match="invalid alias"):
        validate_alias(alias)


# -- actions -------------------------------------------------------------------------------


def test_action_id_is_the_event_id_and_encodes_to_two_lines() -> None:
    action = build_action(prediction(7), "my-alias")
    assert (action["_op_type"], action["_index"], action["_id"]) == ("index", "my-alias", "ev-7")
    header, source, tail = encode_action(action).split(b"\n")
    assert json.loads(header) == {"index": {"_index": "my-alias", "_id": "ev-7"}}
    assert json.loads(source)["label"] == "positive"
    assert tail == b""


def test_metadata_too_deep_to_encode_is_a_value_error_of_that_document() -> None:
    """Found by the worker fuzz run: metadata ~330 levels deep (the decoder takes ~1,000) raised
    RecursionError out of the bulk writer, which parked every document of the batch for good."""
    deep: dict[str, object] = {"leaf": 1}
    for _ in range(2_000):
        deep = {"k": deep}
    doc = prediction(3)
    doc["metadata"] = deep
    with pytest.raises(ValueError, match="nested too deeply"):
        encode_action(build_action(doc))


def test_latency_is_derived_when_both_times_are_known() -> None:
    doc = prediction(1, event_ts="2024-05-01T11:59:58.750Z")
    action = build_action(doc)
    assert action["_source"]["latency_ms"] == 1250
    assert "latency_ms" not in doc  # the caller's document is left as it is
    assert json.loads(encode_action(action).split(b"\n")[1])["latency_ms"] == 1250
    assert "latency_ms" not in build_action(prediction(2))["_source"]  # event_ts is null
    assert latency_ms({"event_ts": "yesterday", "processed_ts": "2024-05-01T12:00:00Z"}) is None
    # A producer clock ahead of the worker's shows as a negative latency, not as zero.
    assert (
        latency_ms({"event_ts": "2024-05-01T12:00:01Z", "processed_ts": "2024-05-01T12:00:00Z"})
        == -1000
    )


def test_read_only_mappings_encode_like_dicts() -> None:
    doc = MappingProxyType({"id": "a", "model": MappingProxyType({"version": "1"})})
    assert json.loads(encode_action(build_action(doc)).split(b"\n")[1])["model"] == {"version": "1"}


@pytest.mark.parametrize(
    "doc", [{"text": "no id"}, {"id": 5}, {"id": ""}, {"id": "é" * 300}], ids=str
)
def test_documents_without_a_usable_id_are_refused(doc: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        build_action(doc)


def test_nan_and_unserialisable_values_are_refused_before_sending() -> None:
    with pytest.raises(ValueError, match="not valid JSON"):
        encode_action(build_action({"id": "a", "scores": {"x": math.nan}}))
    with pytest.raises(ValueError, match="not valid JSON"):
        encode_action(build_action({"id": "a", "when": datetime.now(UTC)}))


def test_chunks_are_capped_by_count() -> None:
    chunks = list(chunk_actions([encoded(i, 10) for i in range(10)], 3, 10_000))
    assert [len(c) for c in chunks] == [3, 3, 3, 1]
    assert [a.position for c in chunks for a in c] == list(range(10))


def test_chunks_are_capped_by_bytes_and_oversized_actions_travel_alone() -> None:
    sizes = [40, 40, 30, 150, 10, 90, 20]
    chunks = list(chunk_actions([encoded(i, s) for i, s in enumerate(sizes)], 100, 100))
    assert [[a.size for a in c] for c in chunks] == [[40, 40], [30], [150], [10, 90], [20]]
    assert all(sum(a.size for a in c) <= 100 for c in chunks if len(c) > 1)


def test_chunk_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        list(chunk_actions([], 0, 10))


def test_bulk_response_items_are_classified() -> None:
    response = {
        "errors": True,
        "items": [
            item("a", 201),
            item("b", 200),
            item("c", 429, "es_rejected_execution_exception"),
            item("d", 400, "mapper_parsing_exception"),
            item("e", 503, "unavailable_shards_exception"),
            item("f", 404, "index_not_found_exception"),
            item("g", 400, "document_parsing_exception"),
        ],
    }
    outcomes = parse_bulk_response(response, 7)
    assert [o.status for o in outcomes] == [
        ItemStatus.OK,
        ItemStatus.OK,
        ItemStatus.RETRIABLE,
        ItemStatus.REJECTED,
        ItemStatus.RETRIABLE,
        ItemStatus.RETRIABLE,  # the alias vanished: the documents are not at fault
        ItemStatus.REJECTED,
    ]
    assert outcomes[3].reason == "mapper_parsing_exception: because d"
    assert outcomes[3].http_status == 400 and outcomes[3].doc_id == "d"


def test_reason_includes_the_cause() -> None:
    body = item("a", 400, "document_parsing_exception")
    body["index"]["error"]["caused_by"] = {"type": "illegal_argument_exception", "reason": "bad"}
    (outcome,) = parse_bulk_response({"items": [body]}, 1)
    assert outcome.reason == (
        "document_parsing_exception: because a (caused by illegal_argument_exception: bad)"
    )


def test_a_response_with_the_wrong_number_of_items_is_malformed() -> None:
    with pytest.raises(ValueError, match="1 items for 2 actions"):
        parse_bulk_response({"items": [item("a", 201)]}, 2)
    with pytest.raises(ValueError):
        parse_bulk_response({"error": "x"}, 1)


# -- backoff -------------------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap() -> None:
    policy = RetryPolicy(max_attempts=8, base_delay=0.2, max_delay=10.0)
    ceilings = [policy.ceiling(n) for n in range(1, 10)]
    assert ceilings == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0, 10.0])
    assert policy.ceiling(10_000) == 10.0  # no overflow however long it has failed


def test_backoff_jitter_stays_within_half_and_full_ceiling() -> None:
    policy = RetryPolicy()
    rng = random.Random(1)
    for failures in range(1, 12):
        top = policy.ceiling(failures)
        delays = [policy.delay(failures, rng) for _ in range(200)]
        assert all(top / 2 <= d <= top for d in delays)
        assert len(set(delays)) > 1
    worst = sum(policy.ceiling(n) for n in range(1, policy.max_attempts))
    assert worst == pytest.approx(22.6)  # the longest a caller waits before IndexUnavailable


@pytest.mark.parametrize(
    "kwargs", [{"max_attempts": 0}, {"base_delay": -1.0}, {"base_delay": 2.0, "max_delay": 1.0}]
)
def test_nonsense_retry_policies_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)


# -- search query builders -----------------------------------------------------------------


def test_filters_cover_label_model_and_half_open_time_range() -> None:
    since = datetime(2024, 1, 1, tzinfo=UTC)
    filters = SearchFilters(
        label=["a", "b"], model_version="2", since=since, until="now", time_field="event_ts"
    )
    assert filters.clauses() == [
        {"terms": {"label": ["a", "b"]}},
        {"term": {"model.version": "2"}},
        {"range": {"event_ts": {"gte": "2024-01-01T00:00:00+00:00", "lt": "now"}}},
    ]
    assert SearchFilters(label="a").clauses() == [{"term": {"label": "a"}}]
    assert SearchFilters().clauses() == [] and SearchFilters() == NO_FILTERS
    assert SearchFilters(until="now-1h").clauses() == [
        {"range": {"processed_ts": {"lt": "now-1h"}}}
    ]
    with pytest.raises(ValueError, match="timezone"):  # refused when made, not when searched
        SearchFilters(since=datetime(2024, 1, 1))


def test_filters_are_a_value_that_a_caller_cannot_change_afterwards() -> None:
    labels = ["a", "b"]
    filters = SearchFilters(label=labels)
    labels.append("c")
    assert filters.label == ("a", "b") and filters == SearchFilters(label=("a", "b"))
    assert hash(filters) == hash(SearchFilters(label=["a", "b"]))


def test_text_query_matches_text_filters_and_highlights() -> None:
    body = build_text_query("quick fox", k=5, filters=SearchFilters(label="pos").clauses())
    assert body["query"] == {
        "bool": {
            "must": [{"match": {"text": {"query": "quick fox"}}}],
            "filter": [{"term": {"label": "pos"}}],
        }
    }
    assert body["size"] == 5
    assert body["highlight"] == {"fields": {"text": {}}}
    assert body["_source"] == {"excludes": ["embedding", "passages.embedding"]}
    blank = build_text_query("  ")
    assert blank["query"]["bool"]["must"] == [{"match_all": {}}]
    assert "highlight" not in blank
    with pytest.raises(ValueError):
        build_text_query("x", k=0)


def test_knn_query_is_top_level_with_filter() -> None:
    vector = unit_vector(1)
    body = build_knn_query(vector, k=3, filters=SearchFilters(label="neg").clauses())
    knn = body["knn"]
    assert knn["field"] == "embedding"
    assert knn["query_vector"] == pytest.approx(vector)
    assert (knn["k"], knn["num_candidates"], body["size"]) == (3, 100, 3)
    assert knn["filter"] == [{"term": {"label": "neg"}}]
    assert "filter" not in build_knn_query(vector)["knn"]
    assert build_knn_query(vector, k=2000)["knn"]["num_candidates"] == 10_000


def test_mappings_and_templates_carry_the_models_width() -> None:
    assert prediction_mappings()["properties"]["embedding"]["dims"] == EMBEDDING_DIMS
    template = index_template("inflow-mpnet", dims=768)
    assert template["template"]["mappings"]["properties"]["embedding"]["dims"] == 768
    passages = template["template"]["mappings"]["properties"]["passages"]
    assert passages["type"] == "nested" and passages["properties"]["embedding"]["dims"] == 768
    with pytest.raises(ValueError, match=r"1\.\.4096"):
        prediction_mappings(4097)
    vector = [1.0] + [0.0] * 767
    assert len(build_knn_query(vector, dims=None)["knn"]["query_vector"]) == 768
    with pytest.raises(ValueError, match="768 dimensions"):
        build_knn_query(vector)  # the default width is checked unless told otherwise


@pytest.mark.parametrize(
    ("vector", "words"),
    [
        ([1.0] * 10, "10 dimensions"),
        ([0.0] * EMBEDDING_DIMS, "all zeros"),
        ([math.nan] * EMBEDDING_DIMS, "NaN"),
    ],
)
def test_unsearchable_vectors_are_refused(vector: list[float], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        build_knn_query(vector)


def test_num_candidates_below_k_is_refused() -> None:
    with pytest.raises(ValueError, match="num_candidates"):
        build_knn_query(unit_vector(0), k=10, num_candidates=5)


def test_label_counts_and_count_queries() -> None:
    body = build_label_counts_query(filters=SearchFilters(model_version="1").clauses(), size=7)
    assert body["size"] == 0
    assert body["aggs"] == {"labels": {"terms": {"field": "label", "size": 7}}}
    assert body["query"]["bool"]["filter"] == [{"term": {"model.version": "1"}}]
    assert build_count_query() == {"query": {"bool": {"filter": []}}}


def test_time_histogram_query_uses_a_fixed_interval_and_keeps_empty_buckets() -> None:
    body = build_time_histogram_query(
        interval="5m",
        filters=SearchFilters(label="negative").clauses(),
        time_field="event_ts",
        by_label=True,
    )
    assert body["size"] == 0
    histogram = body["aggs"]["over_time"]
    assert histogram["date_histogram"] == {
        "field": "event_ts",
        "fixed_interval": "5m",
        "min_doc_count": 0,
    }
    assert histogram["aggs"] == {"labels": {"terms": {"field": "label", "size": 100}}}
    assert body["query"]["bool"]["filter"] == [{"term": {"label": "negative"}}]
    assert "aggs" not in build_time_histogram_query()["aggs"]["over_time"]


@pytest.mark.parametrize("interval", ["", "1", "0h", "1M", "1y", "h", "1 h", "-1h"])
def test_calendar_or_malformed_intervals_are_refused(interval: str) -> None:
    with pytest.raises(ValueError, match="interval"):
        build_time_histogram_query(interval=interval)


def test_time_histogram_response_parses_into_buckets() -> None:
    response = {
        "aggregations": {
            "over_time": {
                "buckets": [
                    {
                        "key": 1714521600000,
                        "key_as_string": "2024-05-01T00:00:00.000Z",
                        "doc_count": 3,
                        "labels": {"buckets": [{"key": "positive", "doc_count": 3}]},
                    },
                    {
                        "key": 1714608000000,
                        "key_as_string": "2024-05-02T00:00:00.000Z",
                        "doc_count": 0,
                    },
                ]
            }
        }
    }
    first, empty = parse_time_histogram(response)
    assert (first.start, first.start_ms, first.count) == (
        "2024-05-01T00:00:00.000Z",
        1714521600000,
        3,
    )
    assert first.labels == {"positive": 3}
    assert (empty.count, empty.labels) == (0, {})
    assert parse_time_histogram({}) == []


def test_latency_percentiles_query_and_response() -> None:
    body = build_latency_percentiles_query(percents=[50, 99.9])
    assert body["aggs"]["latency"] == {
        "percentiles": {"field": "latency_ms", "percents": [50.0, 99.9]}
    }
    assert body["aggs"]["with_latency"] == {"value_count": {"field": "latency_ms"}}
    with pytest.raises(ValueError, match="percents"):
        build_latency_percentiles_query(percents=[])
    with pytest.raises(ValueError, match="percents"):
        build_latency_percentiles_query(percents=[101])
    parsed = parse_latency_percentiles(
        {
            "aggregations": {
                "latency": {"values": {"50.0": 120.0, "99.9": None}},
                "with_latency": {"value": 7},
            }
        }
    )
    assert parsed.count == 7
    assert parsed.values_ms == {50.0: 120.0, 99.9: None}


def test_search_response_parses_into_hits() -> None:
    response = {
        "took": 3,
        "hits": {
            "total": {"value": 12, "relation": "gte"},
            "hits": [
                {
                    "_id": "ev-1",
                    "_score": 1.5,
                    "_source": prediction(1, embedding=None),
                    "highlight": {"text": ["<em>text</em> number 1"]},
                }
            ],
        },
        "aggregations": {"labels": {"buckets": [{"key": "a", "doc_count": 2}]}},
    }
    result = parse_search_response(response)
    assert (result.total, result.total_is_exact, result.took_ms) == (12, False, 3)
    (hit,) = result.hits
    assert (hit.id, hit.score, hit.label, hit.model_version) == ("ev-1", 1.5, "positive", "1")
    assert hit.scores == {"positive": 0.9, "negative": 0.1}
    assert hit.highlight == ["<em>text</em> number 1"]
    assert parse_label_counts(response) == {"a": 2}


# -- Searcher against a fake client --------------------------------------------------------


class RecordingSearchClient:
    """Answers every search with no hits and every count with 4, keeping each body."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    async def search(self, *, index: str, body: dict[str, Any]) -> SimpleNamespace:
        self.bodies.append(body)
        return SimpleNamespace(body={"took": 1, "hits": {"total": {"value": 0}, "hits": []}})

    async def count(self, *, index: str, body: dict[str, Any]) -> SimpleNamespace:
        self.bodies.append(body)
        return SimpleNamespace(body={"count": 4})


def _filter_of(body: Mapping[str, Any]) -> Any:
    return body["knn"]["filter"] if "knn" in body else body["query"]["bool"]["filter"]


async def test_every_searcher_method_filters_by_the_one_filters_value() -> None:
    es = RecordingSearchClient()
    filters = SearchFilters(label="neg", model_version="2", since="now-1d", time_field="event_ts")
    vector = unit_vector(0)
    async with Searcher(client=cast(AsyncElasticsearch, es)) as searcher:
        await searcher.search_text("fox", filters=filters)
        await searcher.search_similar(vector, filters=filters)
        await searcher.search_hybrid("fox", vector, filters=filters)  # linear: text and kNN
        await searcher.label_counts(filters=filters)
        await searcher.time_histogram(filters=filters)
        await searcher.latency_percentiles(filters=filters)
        assert await searcher.count(filters=filters) == 4
        assert await searcher.count() == 4
    *filtered, unfiltered = es.bodies
    assert len(filtered) == 8
    assert all(_filter_of(body) == filters.clauses() for body in filtered)
    histogram = filtered[5]["aggs"]["over_time"]["date_histogram"]
    assert histogram["field"] == "event_ts"  # the histogram is over the filters' time field
    assert unfiltered == {"query": {"bool": {"filter": []}}}


# -- BulkWriter against a fake client ------------------------------------------------------


class FakeClient:
    """Answers bulk calls from a script: an exception to raise, or per-item statuses."""

    def __init__(self, script: Sequence[Exception | Mapping[str, int]]) -> None:
        self.script = list(script)
        self.calls: list[list[str]] = []

    async def bulk(self, *, operations: Sequence[bytes], **kwargs: Any) -> SimpleNamespace:
        assert kwargs["require_alias"] is True
        ids = [json.loads(op.split(b"\n")[0])["index"]["_id"] for op in operations]
        self.calls.append(ids)
        step = self.script.pop(0) if self.script else {}
        if isinstance(step, Exception):
            raise step
        items = []
        for doc_id in ids:
            status = step.get(doc_id, 201)
            kind = {429: "es_rejected_execution_exception", 400: "mapper_parsing_exception"}
            items.append(item(doc_id, status, kind.get(status)))
        return SimpleNamespace(body={"errors": bool(step), "items": items})


def fast_writer(client: FakeClient, attempts: int = 4, **kwargs: Any) -> BulkWriter:
    return BulkWriter(
        client=cast(AsyncElasticsearch, client),
        alias="test-alias",
        retry=RetryPolicy(max_attempts=attempts, base_delay=0.001, max_delay=0.002),
        ensure=False,
        **kwargs,
    )


async def test_only_failed_items_are_retried() -> None:
    client = FakeClient([{"ev-1": 429, "ev-2": 400}])
    async with fast_writer(client) as writer:
        outcome = await writer.bulk_index([prediction(i) for i in range(4)])
    assert client.calls == [["ev-0", "ev-1", "ev-2", "ev-3"], ["ev-1"]]
    assert outcome.indexed_ids == ["ev-0", "ev-1", "ev-3"]
    (rejected,) = outcome.rejected
    assert (rejected.id, rejected.status) == ("ev-2", 400)
    assert rejected.reason.startswith("mapper_parsing_exception")
    assert rejected.doc["id"] == "ev-2"


async def test_whole_request_failures_are_retried_and_later_chunks_wait() -> None:
    client = FakeClient([api_error(429), ConnectionError("refused"), api_error(503)])
    async with fast_writer(client, attempts=4, max_chunk_docs=2) as writer:
        outcome = await writer.bulk_index([prediction(i) for i in range(4)])
    # Each failed request ends its round: no request for ev-2/ev-3 until ev-0/ev-1 passed.
    assert client.calls == [["ev-0", "ev-1"]] * 4 + [["ev-2", "ev-3"]]
    assert outcome.indexed_ids == [f"ev-{i}" for i in range(4)]


async def test_exhausted_attempts_raise_index_unavailable() -> None:
    client = FakeClient([{"ev-1": 429}] * 3)
    async with fast_writer(client, attempts=3) as writer:
        with pytest.raises(IndexUnavailable) as caught:
            await writer.bulk_index([prediction(0), prediction(1)])
    assert caught.value.retriable is True
    assert caught.value.attempts == 3
    assert caught.value.pending_ids == ["ev-1"]
    assert "es_rejected_execution_exception" in str(caught.value)


class RecordingObserver:
    def __init__(self) -> None:
        self.requests: list[float] = []
        self.retries: list[int] = []

    def on_bulk_request(self, seconds: float) -> None:
        self.requests.append(seconds)

    def on_bulk_retry(self, pending: int) -> None:
        self.retries.append(pending)


async def test_the_observer_hears_every_request_and_every_retried_round() -> None:
    client = FakeClient([api_error(429), {"ev-1": 429}])
    seen = RecordingObserver()
    async with fast_writer(client, max_chunk_docs=2, observer=seen) as writer:
        outcome = await writer.bulk_index([prediction(i) for i in range(4)])
    assert outcome.indexed_ids == [f"ev-{i}" for i in range(4)]
    # Round 1: one failed request, all 4 pending. Round 2: two requests, ev-1 pending again.
    assert len(seen.requests) == len(client.calls) == 4
    assert all(0 <= seconds < 5 for seconds in seen.requests)
    assert seen.retries == [4, 1]


async def test_non_retriable_request_errors_raise_at_once() -> None:
    client = FakeClient([api_error(401, "security_exception")])
    async with fast_writer(client) as writer:
        with pytest.raises(IndexRequestError) as caught:
            await writer.bulk_index([prediction(0)])
    assert caught.value.status == 401 and caught.value.retriable is False
    assert len(client.calls) == 1


async def test_invalid_documents_are_rejected_without_a_request() -> None:
    client = FakeClient([])
    async with fast_writer(client) as writer:
        bad = [{"text": "no id"}, prediction(1, scores={"x": math.inf})]
        outcome = await writer.bulk_index(bad)
        assert client.calls == []
        assert [(r.id, r.status) for r in outcome.rejected] == [(None, None), ("ev-1", None)]
        assert (await writer.bulk_index([])).indexed_ids == []


async def test_lifecycle_is_explicit() -> None:
    writer = fast_writer(FakeClient([]))
    with pytest.raises(LifecycleError, match="not started"):
        await writer.bulk_index([prediction(0)])
    await writer.start()
    await writer.stop()
    await writer.stop()  # twice is fine
    with pytest.raises(LifecycleError, match="stopped"):
        await writer.bulk_index([prediction(0)])
    with pytest.raises(LifecycleError):
        await writer.start()


def test_constructors_validate_without_io() -> None:
    with pytest.raises(ValueError):
        EsSettings(url="localhost:9200")
    with pytest.raises(ValueError):
        EsSettings(api_key="k", basic_auth=("u", "p"))
    with pytest.raises(ValueError):
        BulkWriter(alias="Bad Alias")
    with pytest.raises(ValueError):
        BulkWriter(max_chunk_bytes=0)
    assert "secret" not in repr(EsSettings(api_key="secret"))


def test_knn_over_passages_asks_for_the_best_one_and_a_hit_names_it() -> None:
    vector = unit_vector(3)
    knn = build_knn_query(vector, k=4, passages=True)["knn"]
    assert knn["field"] == "passages.embedding" and knn["inner_hits"]["size"] == 1
    assert "inner_hits" not in build_knn_query(vector, k=4)["knn"]
    text = "first window text. second window with the cat"
    raw = {
        "_id": "doc",
        "_score": 0.9,
        "_source": {
            "id": "doc",
            "text": text,
            "passages": [{"start": 0, "end": 18}, {"start": 19, "end": len(text)}],
        },
        "inner_hits": {
            "passages": {
                "hits": {"hits": [{"_nested": {"field": "passages", "offset": 1}, "_score": 0.9}]}
            }
        },
    }
    hit = parse_search_response({"hits": {"total": {"value": 1}, "hits": [raw]}}).hits[0]
    assert hit.passage is not None
    assert (hit.passage.index, hit.passage.start, hit.passage.end) == (1, 19, len(text))
    assert hit.passage.text == "second window with the cat"
    assert (
        parse_search_response({"hits": {"hits": [{**raw, "inner_hits": {}}]}}).hits[0].passage
        is None
    )
