"""Security pieces without services: API keys, search access and bounds, query building from
values only, one-line error descriptions, secrets kept out of reprs."""

from __future__ import annotations

import hashlib
import json
import ssl
from collections.abc import Mapping
from typing import Any

import pytest
from aiokafka.errors import (
    KafkaConnectionError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)
from multidict import CIMultiDict

from indexer.search import SearchFilters, build_knn_query, build_text_query
from streams.config import Settings
from streams.errors import ConfigError
from streams.kafka import client_options, describe_connection_error, faust_credentials
from streams.ops.auth import ApiKeys, is_loopback, new_key, presented_key
from streams.ops.web import (
    MAX_K,
    MAX_QUERY_CHARS,
    BadRequest,
    Refused,
    SearchAccess,
    SearchViews,
    parse_search_params,
)

# --------------------------------------------------------------------------- API keys


def test_keys_are_stored_hashed_and_several_are_active() -> None:
    old, old_entry = new_key("old")
    new, new_entry = new_key("new")
    assert old not in old_entry and hashlib.sha256(old.encode()).hexdigest() in old_entry
    keys = ApiKeys.parse(f"{old_entry}, {new_entry}")
    assert keys.identify(old) == "old" and keys.identify(new) == "new"
    assert keys.identify(old + "x") is None and keys.identify("") is None
    assert keys.identify(None) is None and keys.identify("k" * 10_000) is None
    assert "sha256" not in repr(keys._keys) and old not in repr(keys._keys)


@pytest.mark.parametrize(
    "text",
    [
        "plainkey",  # a key instead of its hash
        "id:md5:" + "0" * 32,
        "id:sha256:" + "0" * 63,
        "bad id:sha256:" + "0" * 64,
        "a:sha256:" + "0" * 64 + ",a:sha256:" + "1" * 64,  # the same id twice
    ],
)
def test_bad_key_entries_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError, match="INFLOW_WEB_API_KEYS"):
        ApiKeys.parse(text)
    with pytest.raises(ConfigError):
        Settings.load(env={"INFLOW_WEB_API_KEYS": text})


def test_presented_key_and_loopback() -> None:
    assert presented_key(CIMultiDict({"authorization": "ApiKey abc"})) == "abc"
    assert presented_key(CIMultiDict({"Authorization": "Bearer abc"})) == "abc"
    assert presented_key(CIMultiDict({"x-api-key": "abc"})) == "abc"
    assert presented_key(CIMultiDict({"Authorization": "Basic Zm9vOmJhcg=="})) is None
    assert presented_key(CIMultiDict()) is None
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "", "example.com"))


# --------------------------------------------------------------------------- access


def test_off_loopback_search_needs_a_key_unless_the_operator_opens_it() -> None:
    none = ApiKeys.parse("")
    with pytest.raises(Refused) as refused:
        SearchAccess(none, bind_host="0.0.0.0", allow_anonymous=False).authorize(CIMultiDict())
    assert refused.value.status == 403 and "INFLOW_WEB_API_KEYS" in str(refused.value)
    open_ = SearchAccess(none, bind_host="0.0.0.0", allow_anonymous=True)
    assert open_.authorize(CIMultiDict()) == "anonymous"
    local = SearchAccess(none, bind_host="127.0.0.1", allow_anonymous=False)
    assert local.authorize(CIMultiDict()) == "anonymous"


def test_with_keys_every_bind_needs_one_of_them() -> None:
    key, entry = new_key("k1")
    for host in ("127.0.0.1", "0.0.0.0"):
        access = SearchAccess(ApiKeys.parse(entry), bind_host=host, allow_anonymous=True)
        for headers in ({}, {"Authorization": "ApiKey nope"}):
            with pytest.raises(Refused) as refused:
                access.authorize(CIMultiDict(headers))
            assert refused.value.status == 401
        assert access.authorize(CIMultiDict({"Authorization": f"ApiKey {key}"})) == "k1"


def test_search_port_setting_moves_the_views() -> None:
    settings = Settings.load(env={"INFLOW_WEB_HOST": "0.0.0.0", "INFLOW_SEARCH_PORT": "7000"})
    assert SearchAccess.from_settings(settings).bind_host == "0.0.0.0"
    settings = Settings.load(env={"INFLOW_SEARCH_HOST": "127.0.0.1", "INFLOW_SEARCH_PORT": "0"})
    assert SearchAccess.from_settings(settings).open_without_key
    with pytest.raises(ConfigError, match="INFLOW_SEARCH_PORT"):
        Settings.load(env={"INFLOW_SEARCH_PORT": "70000"})


# --------------------------------------------------------------------------- bounds


def test_parameters_within_bounds() -> None:
    request = parse_search_params("search", [("q", " hello "), ("label", "pos:1"), ("k", "5")])
    assert (request.text, request.filters, request.k) == ("hello", SearchFilters("pos:1"), 5)
    similar = parse_search_params("similar", [("text", "x"), ("label", "neg")])
    assert similar.k == 10 and similar.filters == SearchFilters(label="neg")
    assert parse_search_params("search", [("q", "x")]).filters == SearchFilters()
    assert parse_search_params("search", [("q", "x" * MAX_QUERY_CHARS), ("k", str(MAX_K))])
    assert parse_search_params("search", [("q", "x")]).mode == "text"
    assert parse_search_params("search", [("q", "x"), ("mode", "hybrid")]).mode == "hybrid"


@pytest.mark.parametrize(
    ("view", "items"),
    [
        ("search", []),
        ("search", [("q", "   ")]),
        ("search", [("q", "x" * (MAX_QUERY_CHARS + 1))]),
        ("search", [("q", "a\x00b")]),
        ("search", [("q", "a"), ("q", "b")]),
        ("search", [("q", "a"), ("size", "10000")]),
        ("search", [("text", "a")]),
        ("similar", [("q", "a")]),
        ("search", [("q", "a"), ("label", "*")]),
        ("search", [("q", "a"), ("label", "")]),
        ("search", [("q", "a"), ("label", "l" * 65)]),
        ("search", [("q", "a"), ("label", '{"match_all":{}}')]),
        ("search", [("q", "a"), ("k", "0")]),
        ("search", [("q", "a"), ("k", str(MAX_K + 1))]),
        ("search", [("q", "a"), ("k", "1e3")]),
        ("search", [("q", "a"), ("k", " 5")]),
        ("search", [("q", "a"), ("k", "99999999999999999999")]),
        ("search", [("q", "a"), ("mode", "knn")]),
        ("search", [("q", "a"), ("mode", "hybrid"), ("mode", "text")]),
        ("similar", [("text", "a"), ("mode", "hybrid")]),
    ],
)
def test_parameters_outside_bounds_are_bad_requests(
    view: str, items: list[tuple[str, str]]
) -> None:
    with pytest.raises(BadRequest):
        parse_search_params(view, items)


def test_overlong_query_string_is_a_bad_request() -> None:
    with pytest.raises(BadRequest, match="query string"):
        parse_search_params("search", [("q", "a")], raw_length=5000)


INJECTIONS = [
    '{"query":{"match_all":{}}}',
    '"}},"size":10000,"query":{"match_all":{}},"x":{"y":"',
    '{"script":{"source":"Runtime.getRuntime().exec(\'id\')"}}',
    "*:* OR _id:*",
    "label:positive AND text:*",
]


@pytest.mark.parametrize("text", INJECTIONS)
def test_query_text_is_only_ever_a_value(text: str) -> None:
    """The text lands in exactly one place, as a JSON string value, whatever it holds."""
    body = build_text_query(text, k=5, filters=SearchFilters(label=text).clauses())
    assert body["query"]["bool"]["must"] == [{"match": {"text": {"query": text}}}]
    assert body["query"]["bool"]["filter"] == [{"term": {"label": text}}]
    assert set(body) == {"query", "size", "_source", "highlight"} and body["size"] == 5
    round_trip = json.loads(json.dumps(body))
    assert round_trip == body  # serialising keeps it a string: no structure leaks in
    knn = build_knn_query([1.0] * 384, k=3, filters=SearchFilters(label=text).clauses())
    assert knn["knn"]["filter"] == [{"term": {"label": text}}]


class _Searcher:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Mapping[str, Any]]] = []

    async def search_text(self, q: str, **kwargs: Any) -> Any:
        from indexer import SearchResult

        self.calls.append((q, kwargs))
        return SearchResult(total=0, total_is_exact=True, took_ms=1, hits=[])


async def test_views_answer_400_401_and_200_and_audit_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    key, entry = new_key("ops")
    searcher = _Searcher()
    access = SearchAccess(ApiKeys.parse(entry), bind_host="0.0.0.0", allow_anonymous=False)
    views = SearchViews(batcher=None, searcher=searcher, access=access)
    good = CIMultiDict({"Authorization": f"ApiKey {key}"})
    caplog.set_level("INFO", logger="inflow.audit")
    assert (await views.handle("search", [("q", "hi")], 4, CIMultiDict(), "10.0.0.9"))[0] == 401
    assert (await views.handle("search", [("k", "5000"), ("q", "a")], 10, good, None))[0] == 400
    status, body, _ = await views.handle("search", [("q", INJECTIONS[0])], 40, good, None)
    assert status == 200 and body["hits"] == [] and searcher.calls[0][0] == INJECTIONS[0]
    audit = [json.loads(r.getMessage()) for r in caplog.records if r.name == "inflow.audit"]
    assert [a["status"] for a in audit] == [401, 400, 200]
    assert audit[0]["key_id"] is None and audit[0]["remote"] == "10.0.0.9"
    assert audit[2]["key_id"] == "ops" and audit[2]["query"] == INJECTIONS[0]
    assert audit[2]["hits"] == 0 and audit[2]["k"] == 10 and audit[2]["ts"]
    assert all(key not in r.getMessage() for r in caplog.records)


async def test_the_label_reaches_the_searcher_as_filters_and_the_audit_as_a_label(
    caplog: pytest.LogCaptureFixture,
) -> None:
    searcher = _Searcher()
    access = SearchAccess(ApiKeys.parse(""), bind_host="127.0.0.1", allow_anonymous=False)
    views = SearchViews(batcher=None, searcher=searcher, access=access)
    caplog.set_level("INFO", logger="inflow.audit")
    items = [("q", "hi"), ("label", "pos:1"), ("k", "3")]
    assert (await views.handle("search", items, 20, CIMultiDict(), None))[0] == 200
    assert searcher.calls == [("hi", {"filters": SearchFilters(label="pos:1"), "k": 3})]
    audit = [json.loads(r.getMessage()) for r in caplog.records if r.name == "inflow.audit"]
    assert audit[-1]["label"] == "pos:1" and audit[-1]["k"] == 3


# --------------------------------------------------------------------------- Kafka options


def test_one_source_for_aiokafka_and_faust_security_options(tmp_path: Any) -> None:
    env = {
        "INFLOW_KAFKA_BOOTSTRAP": "broker:9093",
        "INFLOW_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "INFLOW_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "INFLOW_KAFKA_SASL_USERNAME": "svc",
        "INFLOW_KAFKA_SASL_PASSWORD": "s3cret-pw",
    }
    settings = Settings.load(env=env)
    options = client_options(settings)
    credentials = faust_credentials(settings)
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    derived = credentials_to_aiokafka_auth(credentials)
    assert derived["security_protocol"] == options["security_protocol"] == "SASL_SSL"
    assert derived["sasl_mechanism"] == options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert derived["sasl_plain_password"] == options["sasl_plain_password"] == "s3cret-pw"
    assert isinstance(derived["ssl_context"], ssl.SSLContext)
    assert "s3cret-pw" not in repr(settings) and "s3cret-pw" not in repr(credentials)
    with pytest.raises(ConfigError, match="go together"):
        Settings.load(env={**env, "INFLOW_KAFKA_SSL_CERTFILE": "/x.pem"})
    with pytest.raises(ConfigError, match="INFLOW_KAFKA_SSL_CAFILE"):
        client_options(Settings.load(env={**env, "INFLOW_KAFKA_SSL_CAFILE": str(tmp_path)}))


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (SaslAuthenticationFailed("bad"), "wrong username or password"),
        (UnsupportedSaslMechanismError("x"), "does not accept SASL mechanism SCRAM-SHA-512"),
        (ConnectionRefusedError(111, "refused"), "connection refused"),
        (TimeoutError(), "no answer in time"),
        (KafkaConnectionError("closed"), "closed the connection"),
    ],
)
def test_kafka_errors_are_named_in_one_line(error: BaseException, expected: str) -> None:
    settings = Settings.load(
        env={
            "INFLOW_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "INFLOW_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "INFLOW_KAFKA_SASL_USERNAME": "svc",
            "INFLOW_KAFKA_SASL_PASSWORD": "s3cret-pw",
        }
    )
    line = describe_connection_error(settings, error)
    assert expected in line and "\n" not in line and "s3cret-pw" not in line
