"""Searching predictions: pure query builders and response parsers, and a thin ``Searcher``."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any, Literal, Self

from elasticsearch import ApiError, AsyncElasticsearch, TransportError

from indexer.client import ClientSlot, EsSettings, describe_es_error
from indexer.errors import IndexRequestError, IndexUnavailable
from indexer.mapping import (
    DEFAULT_ALIAS,
    EMBEDDING_DIMS,
    EMBEDDING_FIELD,
    LATENCY_FIELD,
    MAX_EMBEDDING_DIMS,
    PASSAGES_FIELD,
    validate_alias,
)

TimeField = Literal["event_ts", "processed_ts"]
DateLike = datetime | str
MAX_RESULT_WINDOW = 10_000  # Elasticsearch's default index.max_result_window and kNN cap
# Vectors are large and rarely wanted in results; leave them on the server.
SOURCE_FILTER: dict[str, Any] = {
    "excludes": [EMBEDDING_FIELD, f"{PASSAGES_FIELD}.{EMBEDDING_FIELD}"]
}
# date_histogram's fixed_interval units (calendar units such as 1M would need calendar_interval).
_FIXED_INTERVAL_RE = re.compile(r"^[1-9][0-9]*(ms|s|m|h|d)$")
DEFAULT_PERCENTS = (50.0, 90.0, 95.0, 99.0)
# Reciprocal rank fusion: a document's fused score is the sum over rankings of
# 1 / (RRF_RANK_CONSTANT + rank). 60 is the constant of Cormack et al. (2009) and Elasticsearch's
# default; each half contributes its top RRF_WINDOW (Elasticsearch's rank_window_size).
RRF_RANK_CONSTANT = 60
RRF_WINDOW = 100
Fusion = Literal["auto", "server", "client"]
# How hybrid search combines its halves. "linear" (relative score fusion): each half's scores
# min-max normalized over its top window, then HYBRID_ALPHA * kNN + (1 - HYBRID_ALPHA) * BM25,
# Weaviate's default fusion and weight (alpha 0.75) and Elasticsearch's `linear` retriever with
# the minmax normalizer. "rrf": reciprocal rank fusion, rank only. Linear is the default: when
# one half is much better than the other (kNN on topical queries), RRF's equal votes drag the
# fused ranking towards the worse half (see README, "Search quality").
HybridMethod = Literal["linear", "rrf"]
HYBRID_METHODS: tuple[HybridMethod, ...] = ("linear", "rrf")
HYBRID_ALPHA = 0.75


@dataclass(frozen=True, slots=True)
class Hit:
    """One matching prediction."""

    id: str
    score: float | None
    label: str | None
    text: str | None
    scores: dict[str, float]
    model_version: str | None
    event_ts: str | None
    processed_ts: str | None
    highlight: list[str] = field(default_factory=list)
    doc: Mapping[str, Any] = field(default_factory=dict)  # the stored document, no embedding
    passage: PassageHit | None = None  # kNN over passages: the window that matched best


@dataclass(frozen=True, slots=True)
class PassageHit:
    """The best-matching window of a long text: the ``index``-th passage, characters
    [start, end) of the document's text."""

    index: int
    start: int
    end: int
    score: float | None
    text: str | None


@dataclass(frozen=True, slots=True)
class SearchResult:
    """Hits in rank order, with the total the server reports."""

    total: int
    total_is_exact: bool
    took_ms: int
    hits: list[Hit]


def _date(value: DateLike) -> str:
    if isinstance(value, datetime):
        if value.tzinfo is None:  # a naive time is ambiguous; UTC is a guess we will not make
            raise ValueError(f"datetime {value!r} has no timezone")
        return value.isoformat()
    return value  # RFC 3339 or Elasticsearch date math such as "now-1h"


@dataclass(frozen=True, slots=True)
class SearchFilters:
    """Which documents a search may return: labels, model version, and
    ``since <= time_field < until``. The defaults let every document through.

    ``since`` and ``until`` are timezone-aware datetimes, RFC 3339 strings or Elasticsearch
    date math such as ``"now-1h"``; a naive datetime is refused here, at construction."""

    label: str | Sequence[str] | None = None  # a sequence matches any of its labels
    model_version: str | None = None
    since: DateLike | None = None
    until: DateLike | None = None
    time_field: TimeField = "processed_ts"

    def __post_init__(self) -> None:
        if self.label is not None and not isinstance(self.label, str):
            object.__setattr__(self, "label", tuple(self.label))  # frozen: no shared list
        for bound in (self.since, self.until):
            if bound is not None:
                _date(bound)

    def clauses(self) -> list[dict[str, Any]]:
        """Elasticsearch filter clauses (no scoring) for a ``bool`` query's ``filter``."""
        clauses: list[dict[str, Any]] = []
        if isinstance(self.label, str):
            clauses.append({"term": {"label": self.label}})
        elif self.label is not None:
            clauses.append({"terms": {"label": list(self.label)}})
        if self.model_version is not None:
            clauses.append({"term": {"model.version": self.model_version}})
        if self.since is not None or self.until is not None:
            bounds: dict[str, str] = {}
            if self.since is not None:
                bounds["gte"] = _date(self.since)
            if self.until is not None:
                bounds["lt"] = _date(self.until)
            clauses.append({"range": {self.time_field: bounds}})
        return clauses


NO_FILTERS = SearchFilters()


def _check_k(k: int) -> None:
    if not 1 <= k <= MAX_RESULT_WINDOW:
        raise ValueError(f"k must be in 1..{MAX_RESULT_WINDOW}, got {k}")


def build_text_query(
    q: str,
    *,
    k: int = 10,
    filters: Sequence[Mapping[str, Any]] = (),
    highlight: bool = True,
) -> dict[str, Any]:
    """A search body: full-text ``match`` on ``text`` (all words optional, best first).

    A blank ``q`` matches every document, so filters alone can be browsed.
    """
    _check_k(k)
    must: dict[str, Any] = {"match": {"text": {"query": q}}} if q.strip() else {"match_all": {}}
    body: dict[str, Any] = {
        "query": {"bool": {"must": [must], "filter": [dict(f) for f in filters]}},
        "size": k,
        "_source": SOURCE_FILTER,
    }
    if highlight and q.strip():
        body["highlight"] = {"fields": {"text": {}}}
    return body


def check_vector(vector: Sequence[float], dims: int | None = EMBEDDING_DIMS) -> list[float]:
    """``vector`` as a list of floats; raises if its length, values or norm cannot be searched.
    ``dims`` None accepts any width an index can hold (1..4096)."""
    values = [float(v) for v in vector]
    if dims is None and not 1 <= len(values) <= MAX_EMBEDDING_DIMS:
        raise ValueError(f"vector has {len(values)} dimensions: 1..{MAX_EMBEDDING_DIMS} allowed")
    if dims is not None and len(values) != dims:
        raise ValueError(f"vector has {len(values)} dimensions, the index has {dims}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError("vector has NaN or infinite values")
    if not any(values):  # cosine similarity is undefined for the zero vector
        raise ValueError("vector is all zeros")
    return values


def build_knn_query(
    vector: Sequence[float],
    *,
    k: int = 10,
    num_candidates: int | None = None,
    filters: Sequence[Mapping[str, Any]] = (),
    dims: int | None = EMBEDDING_DIMS,
    passages: bool = False,
) -> dict[str, Any]:
    """A search body: top-level approximate kNN on ``embedding``, filtered during the search
    (not after it, so a selective filter still returns ``k`` hits). ``dims`` None accepts
    any width: Elasticsearch then refuses a vector that is not its index's width."""
    _check_k(k)
    candidates = num_candidates if num_candidates is not None else max(100, 10 * k)
    candidates = min(candidates, MAX_RESULT_WINDOW)
    if candidates < k:
        raise ValueError(f"num_candidates ({candidates}) must be >= k ({k})")
    knn: dict[str, Any] = {
        "field": f"{PASSAGES_FIELD}.{EMBEDDING_FIELD}" if passages else EMBEDDING_FIELD,
        "query_vector": check_vector(vector, dims),
        "k": k,
        "num_candidates": candidates,
    }
    if passages:
        # A document scores as its best passage (nested kNN, Elasticsearch 8.11+); inner_hits
        # names that passage.
        knn["inner_hits"] = {"size": 1, "_source": False}
    if filters:
        knn["filter"] = [dict(f) for f in filters]
    return {"knn": knn, "size": k, "_source": SOURCE_FILTER}


def build_rrf_query(
    q: str,
    vector: Sequence[float],
    *,
    k: int = 10,
    window: int = RRF_WINDOW,
    filters: Sequence[Mapping[str, Any]] = (),
    dims: int | None = EMBEDDING_DIMS,
    passages: bool = False,
) -> dict[str, Any]:
    """A search body for Elasticsearch's own ``rrf`` retriever (x-pack, 8.14+): the text
    query and the kNN query, both filtered, fused on the server."""
    _check_k(k)
    if not k <= window <= MAX_RESULT_WINDOW:
        raise ValueError(f"window must be in {k}..{MAX_RESULT_WINDOW}, got {window}")
    text = build_text_query(q, k=window, filters=filters, highlight=False)
    knn = build_knn_query(vector, k=window, filters=filters, dims=dims, passages=passages)
    return {
        "retriever": {
            "rrf": {
                "retrievers": [{"standard": {"query": text["query"]}}, {"knn": knn["knn"]}],
                "rank_window_size": window,
                "rank_constant": RRF_RANK_CONSTANT,
            }
        },
        "size": k,
        "_source": SOURCE_FILTER,
    }


def fuse_rrf(
    rankings: Sequence[Sequence[Hit]], *, k: int, rank_constant: int = RRF_RANK_CONSTANT
) -> list[Hit]:
    """The top ``k`` of several rankings by reciprocal rank fusion, as Elasticsearch's ``rrf``
    retriever computes it: each hit's score becomes the sum of ``1 / (rank_constant + rank)``
    over the rankings that hold it (rank from 1). Ties go to the better best rank, then the
    id, so the order never depends on dictionary order. A hit keeps the first ranking's
    highlights and document."""
    if rank_constant < 1:
        raise ValueError(f"rank_constant must be >= 1, got {rank_constant}")
    fused: dict[str, float] = {}
    for ranking in rankings:
        for rank, hit in enumerate(ranking, 1):
            fused[hit.id] = fused.get(hit.id, 0.0) + 1.0 / (rank_constant + rank)
    return _top_fused(rankings, fused, k)


def _top_fused(rankings: Sequence[Sequence[Hit]], fused: Mapping[str, float], k: int) -> list[Hit]:
    """The ``k`` best of ``fused`` (id -> score), ties to the better best rank, then the id;
    each hit as the first ranking that holds it has it, with the fused score."""
    best_rank: dict[str, int] = {}
    first: dict[str, Hit] = {}
    for ranking in rankings:
        for rank, hit in enumerate(ranking, 1):
            best_rank[hit.id] = min(best_rank.get(hit.id, rank), rank)
            first.setdefault(hit.id, hit)
    order = sorted(fused, key=lambda i: (-fused[i], best_rank[i], i))
    return [dataclasses.replace(first[i], score=fused[i]) for i in order[:k]]


def _minmax(hits: Sequence[Hit]) -> dict[str, float]:
    scores = [h.score for h in hits if h.score is not None]
    if not scores:
        return {}
    lo, hi = min(scores), max(scores)
    return {
        h.id: 1.0 if hi == lo else ((h.score if h.score is not None else lo) - lo) / (hi - lo)
        for h in hits
    }


def fuse_linear(
    text: Sequence[Hit], knn: Sequence[Hit], *, k: int, alpha: float = HYBRID_ALPHA
) -> list[Hit]:
    """The top ``k`` by relative score fusion: ``alpha * knn + (1 - alpha) * text`` on each
    half's min-max normalized scores (a hit one half lacks scores 0 there). Ties go to the
    better best rank, then the id. A hit keeps the text half's highlights when it has them."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in 0..1, got {alpha}")
    text_scores, knn_scores = _minmax(text), _minmax(knn)
    ids = {hit.id for ranking in (text, knn) for hit in ranking}
    fused = {
        i: alpha * knn_scores.get(i, 0.0) + (1.0 - alpha) * text_scores.get(i, 0.0) for i in ids
    }
    return _top_fused((text, knn), fused, k)


def build_label_counts_query(
    *, q: str | None = None, filters: Sequence[Mapping[str, Any]] = (), size: int = 100
) -> dict[str, Any]:
    """A search body counting documents per label (terms aggregation, no hits)."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    query = build_text_query(q or "", filters=filters, highlight=False)["query"]
    return {
        "size": 0,
        "query": query,
        "aggs": {"labels": {"terms": {"field": "label", "size": size}}},
    }


def build_recent_outputs_query(
    model_version: str, *, size: int, since: DateLike | None = None
) -> dict[str, Any]:
    """The latest ``size`` documents of one model version, newest first: labels and scores."""
    filters = SearchFilters(model_version=model_version, since=since).clauses()
    return {
        "size": size,
        "query": {"bool": {"filter": filters}},
        "sort": [{"processed_ts": {"order": "desc"}}],
        "_source": ["label", "scores"],
    }


def build_time_histogram_query(
    *,
    interval: str = "1h",
    q: str | None = None,
    filters: Sequence[Mapping[str, Any]] = (),
    time_field: TimeField = "processed_ts",
    by_label: bool = False,
    label_size: int = 100,
) -> dict[str, Any]:
    """A search body counting documents per ``interval`` of ``time_field`` (``date_histogram``
    with a ``fixed_interval`` such as ``"30s"``, ``"5m"``, ``"1h"`` or ``"1d"``, in UTC), empty
    buckets included between the first and the last, optionally split per label."""
    if not _FIXED_INTERVAL_RE.fullmatch(interval):
        raise ValueError(f"interval must be a number and one of ms, s, m, h, d; got {interval!r}")
    if label_size < 1:
        raise ValueError(f"label_size must be >= 1, got {label_size}")
    histogram: dict[str, Any] = {
        "date_histogram": {"field": time_field, "fixed_interval": interval, "min_doc_count": 0}
    }
    if by_label:
        histogram["aggs"] = {"labels": {"terms": {"field": "label", "size": label_size}}}
    query = build_text_query(q or "", filters=filters, highlight=False)["query"]
    return {"size": 0, "query": query, "aggs": {"over_time": histogram}}


def build_latency_percentiles_query(
    *,
    percents: Sequence[float] = DEFAULT_PERCENTS,
    q: str | None = None,
    filters: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """A search body for percentiles of ``latency_ms`` (event time to prediction), plus the
    number of documents that have one (``value_count``)."""
    values = [float(p) for p in percents]
    if not values or not all(0.0 <= p <= 100.0 for p in values):
        raise ValueError(f"percents must be a non-empty list of numbers in 0..100, got {percents}")
    query = build_text_query(q or "", filters=filters, highlight=False)["query"]
    return {
        "size": 0,
        "query": query,
        "aggs": {
            "latency": {"percentiles": {"field": LATENCY_FIELD, "percents": values}},
            "with_latency": {"value_count": {"field": LATENCY_FIELD}},
        },
    }


def build_count_query(filters: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """A ``_count`` body."""
    return {"query": {"bool": {"filter": [dict(f) for f in filters]}}}


def parse_hit(raw: Mapping[str, Any]) -> Hit:
    """A ``Hit`` from one element of ``hits.hits``."""
    doc: Mapping[str, Any] = raw.get("_source") or {}
    model = doc.get("model")
    scores = doc.get("scores")
    highlight = raw.get("highlight") or {}
    return Hit(
        id=str(raw["_id"]),
        score=raw.get("_score"),
        label=doc.get("label"),
        text=doc.get("text"),
        scores=(
            {str(k): float(v) for k, v in scores.items() if isinstance(v, int | float)}
            if isinstance(scores, Mapping)
            else {}
        ),
        model_version=model.get("version") if isinstance(model, Mapping) else None,
        event_ts=doc.get("event_ts"),
        processed_ts=doc.get("processed_ts"),
        highlight=list(highlight.get("text", [])),
        doc=doc,
        passage=_best_passage(raw, doc.get("text")),
    )


def _best_passage(raw: Mapping[str, Any], text: Any) -> PassageHit | None:
    inner = (raw.get("inner_hits") or {}).get(PASSAGES_FIELD, {}).get("hits", {}).get("hits")
    if not inner:
        return None
    best = inner[0]
    index = int(best.get("_nested", {}).get("offset", 0))
    # The span from the document's own passages (its _source keeps start and end).
    stored = (raw.get("_source") or {}).get(PASSAGES_FIELD) or []
    span = stored[index] if 0 <= index < len(stored) and isinstance(stored[index], dict) else {}
    start, end = int(span.get("start", 0)), int(span.get("end", 0))
    return PassageHit(
        index=index,
        start=start,
        end=end,
        score=best.get("_score"),
        text=text[start:end] if isinstance(text, str) else None,
    )


def parse_search_response(response: Mapping[str, Any]) -> SearchResult:
    """A ``SearchResult`` from a ``_search`` response body."""
    hits = response.get("hits", {})
    total = hits.get("total") or {}
    return SearchResult(
        total=int(total.get("value", 0)),
        total_is_exact=total.get("relation", "eq") == "eq",
        took_ms=int(response.get("took", 0)),
        hits=[parse_hit(h) for h in hits.get("hits", [])],
    )


def parse_label_counts(response: Mapping[str, Any]) -> dict[str, int]:
    """``{label: count}``, most frequent first, from a label-counts response body."""
    buckets = response.get("aggregations", {}).get("labels", {}).get("buckets", [])
    return {str(b["key"]): int(b["doc_count"]) for b in buckets}


@dataclass(frozen=True, slots=True)
class TimeBucket:
    """Documents whose time falls in ``[start, start + interval)``."""

    start: str  # RFC 3339, UTC, e.g. "2024-05-01T12:00:00.000Z"
    start_ms: int
    count: int
    labels: dict[str, int] = field(default_factory=dict)  # only when asked ``by_label``


def parse_time_histogram(response: Mapping[str, Any]) -> list[TimeBucket]:
    """Buckets in time order from a time-histogram response body."""
    buckets = response.get("aggregations", {}).get("over_time", {}).get("buckets", [])
    return [
        TimeBucket(
            start=str(b.get("key_as_string", b["key"])),
            start_ms=int(b["key"]),
            count=int(b["doc_count"]),
            labels=parse_label_counts({"aggregations": b}),
        )
        for b in buckets
    ]


@dataclass(frozen=True, slots=True)
class LatencyPercentiles:
    """Percentiles of ``latency_ms`` over ``count`` documents (values None when count is 0).
    The server estimates them (TDigest): close to exact on small sets, approximate on large."""

    count: int
    values_ms: dict[float, float | None]


def parse_latency_percentiles(response: Mapping[str, Any]) -> LatencyPercentiles:
    aggregations = response.get("aggregations", {})
    values = aggregations.get("latency", {}).get("values", {})
    count = aggregations.get("with_latency", {}).get("value", 0)
    return LatencyPercentiles(
        count=int(count or 0),
        values_ms={float(k): None if v is None else float(v) for k, v in values.items()},
    )


class Searcher:
    """Queries the predictions alias. Same lifecycle as ``BulkWriter``."""

    def __init__(
        self,
        settings: EsSettings | None = None,
        *,
        client: AsyncElasticsearch | None = None,
        alias: str = DEFAULT_ALIAS,
        fusion: Fusion = "auto",
        hybrid: HybridMethod = "linear",
        passages: bool = False,
    ) -> None:
        self._slot = ClientSlot(settings, client)
        self._alias = validate_alias(alias)
        if fusion not in ("auto", "server", "client"):
            raise ValueError(f"fusion must be auto, server or client, got {fusion!r}")
        self._fusion: Fusion = fusion
        if hybrid not in HYBRID_METHODS:
            raise ValueError(f"hybrid must be one of {', '.join(HYBRID_METHODS)}, got {hybrid!r}")
        self._hybrid: HybridMethod = hybrid
        self._passages = passages  # kNN over each document's passages (INFLOW_PASSAGES_MAX > 1)

    @property
    def fusion(self) -> Fusion:
        """Where RRF hybrid search fuses: "server" (Elasticsearch's rrf retriever), "client",
        or "auto" until the first RRF search has found out which the cluster offers."""
        return self._fusion

    async def start(self) -> None:
        self._slot.open()

    async def stop(self) -> None:
        """Close the client if this searcher opened it. Safe to call twice."""
        await self._slot.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def search_text(
        self,
        q: str,
        *,
        filters: SearchFilters = NO_FILTERS,
        k: int = 10,
    ) -> SearchResult:
        """Full-text search on ``text``, best match first, with highlights."""
        body = build_text_query(q, k=k, filters=filters.clauses())
        return parse_search_response(await self._search(body))

    async def search_similar(
        self,
        vector: Sequence[float],
        *,
        k: int = 10,
        num_candidates: int | None = None,
        filters: SearchFilters = NO_FILTERS,
        passages: bool | None = None,
    ) -> SearchResult:
        """The ``k`` documents whose embeddings are nearest ``vector`` (cosine), best first;
        with ``passages`` (this searcher's default when None), by their best passage, which
        each hit names."""
        # Any width: each alias holds one model's width, which Elasticsearch checks.
        body = build_knn_query(
            vector,
            k=k,
            num_candidates=num_candidates,
            filters=filters.clauses(),
            dims=None,
            passages=self._passages if passages is None else passages,
        )
        return parse_search_response(await self._search(body))

    async def search_hybrid(
        self,
        q: str,
        vector: Sequence[float],
        *,
        k: int = 10,
        window: int = RRF_WINDOW,
        method: HybridMethod | None = None,
        filters: SearchFilters = NO_FILTERS,
    ) -> SearchResult:
        """Full-text and kNN, both under the same filters, each to depth ``window``, fused by
        ``method`` (this searcher's default when None; see HybridMethod). "rrf" runs on the
        server where the cluster has the ``rrf`` retriever (x-pack), else here with the same
        formula; "auto" asks the server once and remembers its answer. "linear" fuses here."""
        method = method or self._hybrid
        if method not in HYBRID_METHODS:
            raise ValueError(f"method must be one of {', '.join(HYBRID_METHODS)}, got {method!r}")
        clauses = filters.clauses()
        window = max(window, k)  # each half must reach as deep as the answer
        if method == "rrf" and self._fusion != "client":
            body = build_rrf_query(
                q, vector, k=k, window=window, filters=clauses, dims=None, passages=self._passages
            )
            try:
                return parse_search_response(await self._search(body))
            except IndexRequestError as exc:
                if self._fusion == "server" or not _lacks_rrf(exc):
                    raise
                self._fusion = "client"
            else:
                self._fusion = "server"
        text_body = build_text_query(q, k=window, filters=clauses)
        knn_body = build_knn_query(
            vector, k=window, filters=clauses, dims=None, passages=self._passages
        )
        text, knn = await asyncio.gather(self._search(text_body), self._search(knn_body))
        halves = [parse_search_response(text), parse_search_response(knn)]
        if method == "rrf":
            hits = fuse_rrf([h.hits for h in halves], k=k)
        else:
            hits = fuse_linear(halves[0].hits, halves[1].hits, k=k)
        union = {hit.id for half in halves for hit in half.hits}
        return SearchResult(
            total=max(len(union), *(h.total for h in halves)),
            total_is_exact=all(h.total_is_exact and h.total <= window for h in halves),
            took_ms=max(h.took_ms for h in halves),
            hits=hits,
        )

    async def label_counts(
        self,
        *,
        q: str | None = None,
        filters: SearchFilters = NO_FILTERS,
        size: int = 100,
    ) -> dict[str, int]:
        """Documents per label among those matching ``q`` and the filters."""
        body = build_label_counts_query(q=q, filters=filters.clauses(), size=size)
        return parse_label_counts(await self._search(body))

    async def recent_outputs(
        self, model_version: str, *, size: int = 1000, since: DateLike | None = None
    ) -> list[tuple[str | None, dict[str, float]]]:
        """(label, scores) of the latest ``size`` predictions of ``model_version`` (by
        processed_ts), for comparing what a model predicts live with its evaluation split."""
        _check_k(size)
        body = build_recent_outputs_query(model_version, size=size, since=since)
        hits = (await self._search(body)).get("hits", {}).get("hits", [])
        out: list[tuple[str | None, dict[str, float]]] = []
        for hit in hits:
            source = hit.get("_source", {})
            scores = source.get("scores") or {}
            out.append((source.get("label"), {k: float(v) for k, v in scores.items()}))
        return out

    async def time_histogram(
        self,
        *,
        interval: str = "1h",
        q: str | None = None,
        filters: SearchFilters = NO_FILTERS,
        by_label: bool = False,
    ) -> list[TimeBucket]:
        """Documents per ``interval`` (e.g. ``"1m"``, ``"1h"``, ``"1d"``) of the filters'
        ``time_field``."""
        body = build_time_histogram_query(
            interval=interval,
            q=q,
            filters=filters.clauses(),
            time_field=filters.time_field,
            by_label=by_label,
        )
        return parse_time_histogram(await self._search(body))

    async def latency_percentiles(
        self,
        *,
        percents: Sequence[float] = DEFAULT_PERCENTS,
        q: str | None = None,
        filters: SearchFilters = NO_FILTERS,
    ) -> LatencyPercentiles:
        """Percentiles of the event-to-prediction latency of the matching documents (those
        with an ``event_ts``)."""
        body = build_latency_percentiles_query(percents=percents, q=q, filters=filters.clauses())
        return parse_latency_percentiles(await self._search(body))

    async def count(self, *, filters: SearchFilters = NO_FILTERS) -> int:
        """How many documents match the filters (all of them without filters)."""
        body = build_count_query(filters.clauses())
        es = self._slot.get()
        try:
            response = await es.count(index=self._alias, body=body)
        except (TransportError, ApiError) as exc:
            raise _translate(exc) from exc
        return int(response.body["count"])

    async def _search(self, body: dict[str, Any]) -> Mapping[str, Any]:
        es = self._slot.get()
        try:
            response = await es.search(index=self._alias, body=body)
        except (TransportError, ApiError) as exc:
            raise _translate(exc) from exc
        result: Mapping[str, Any] = response.body
        return result


def _lacks_rrf(exc: IndexRequestError) -> bool:
    """The cluster has no ``rrf`` retriever: unknown (no x-pack, as on the node built from
    Maven jars) or not licensed (x-pack on a basic licence)."""
    reason = str(exc).lower()
    return (
        exc.status in (400, 403)
        and "rrf" in reason
        and ("unknown" in reason or "license" in reason or "non-compliant" in reason)
    )


def _translate(exc: TransportError | ApiError) -> IndexUnavailable | IndexRequestError:
    """Client errors as the indexer's typed errors: retriable ones as ``IndexUnavailable``."""
    reason = describe_es_error(exc)
    if isinstance(exc, TransportError):
        return IndexUnavailable(reason, attempts=1, pending_ids=[])
    status = exc.meta.status
    if status == 429 or status >= 500:
        return IndexUnavailable(reason, attempts=1, pending_ids=[])
    return IndexRequestError(f"search refused: {reason}", status=status)
