"""HTTP views on the worker: /health/ready, /health/live, /health, /metrics, /search, /similar.

JSON unless noted; the health views answer 503 with the reason when not ok.

The search views hand out the indexed texts, so they are guarded (`SearchAccess`): with
`INFLOW_WEB_API_KEYS` set every request needs one of those keys (401 otherwise); without keys
they answer only when served on loopback, or when the operator set
`INFLOW_WEB_ALLOW_ANONYMOUS=true` (403 otherwise). Their parameters are bounded and checked
(`parse_search_params`) and only ever become values in the query body, never query syntax.
Every search request, answered or refused, writes one JSON line to the `inflow.audit` logger.
/similar runs its text on the engine that serves the stream, so at most
`INFLOW_SIMILAR_MAX_CONCURRENT` of them embed at once; one more is answered 429 with
`Retry-After: 1` at once (not queued behind the stream), counted in `inflow_similar_rejected`.
With `INFLOW_SEARCH_PORT` set they move to their own server (`SearchServer`), and the Faust
web server keeps only /metrics and /health/* (for probes and scrapes on a private address).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import faust
from aiohttp import web as aioweb
from faust.web import Request, Response, View

from indexer import IndexerError, SearchResult
from indexer.search import SearchFilters
from streams.config import Settings
from streams.delivery.batcher import NoEngine
from streams.ops.auth import ApiKeys, is_loopback, presented_key
from streams.ops.metrics import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)
audit_log = logging.getLogger("inflow.audit")

MAX_QUERY_CHARS = 1000  # q and text
MAX_QUERY_STRING = 4096  # the whole raw query string
MAX_K = 100
DEFAULT_K = 10
LABEL_RE = re.compile(r"^[\w.:-]{1,64}$")
_K_RE = re.compile(r"^[0-9]{1,4}$")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
PARAMETERS = {"search": ("q", "label", "k", "mode"), "similar": ("text", "label", "k")}
SEARCH_MODES = ("text", "hybrid")  # /search?mode=: BM25 alone, or fused with kNN
TEXT_PARAMETER = {"search": "q", "similar": "text"}


class BadRequest(ValueError):
    """A search request outside the bounds: answered 400 with this one-line message."""


@dataclasses.dataclass(frozen=True, slots=True)
class SearchRequest:
    view: str  # "search" | "similar"
    text: str
    filters: SearchFilters  # /search and /similar filter alike: label
    k: int
    mode: str = "text"  # /search only: "text" | "hybrid"


def parse_search_params(
    view: str, items: Iterable[tuple[str, str]], raw_length: int = 0
) -> SearchRequest:
    """The checked parameters of /search (q, label, k, mode) or /similar (text, label, k).

    Refused: unknown or repeated parameters, a raw query string over MAX_QUERY_STRING, text
    that is blank, over MAX_QUERY_CHARS or holds control characters, a label that is not 1-64
    word characters, '.', ':' or '-', and k outside 1..MAX_K."""
    allowed = PARAMETERS[view]
    text_name = TEXT_PARAMETER[view]
    modes = "[&mode=text|hybrid]" if view == "search" else ""
    usage = f"/{view}?{text_name}=words[&label=L][&k=1..{MAX_K}]{modes}"
    if raw_length > MAX_QUERY_STRING:
        raise BadRequest(f"query string longer than {MAX_QUERY_STRING} characters")
    values: dict[str, str] = {}
    for name, value in items:
        if name not in allowed:
            raise BadRequest(f"unknown parameter {name[:40]!r}: {usage}")
        if name in values:
            raise BadRequest(f"parameter {name!r} given more than once")
        values[name] = value
    text = values.get(text_name, "").strip()
    if not text:
        raise BadRequest(f"give a text: {usage}")
    if len(text) > MAX_QUERY_CHARS:
        raise BadRequest(f"{text_name} is longer than {MAX_QUERY_CHARS} characters")
    if _CONTROL_RE.search(text):
        raise BadRequest(f"{text_name} holds control characters")
    label = values.get("label")
    if label is not None and not LABEL_RE.fullmatch(label):
        raise BadRequest("label must be 1-64 letters, digits, '_', '.', ':' or '-'")
    raw_k = values.get("k")
    k = DEFAULT_K
    if raw_k is not None:
        if not _K_RE.fullmatch(raw_k) or not 1 <= int(raw_k) <= MAX_K:
            raise BadRequest(f"k must be a whole number between 1 and {MAX_K}")
        k = int(raw_k)
    mode = values.get("mode", "text")
    if mode not in SEARCH_MODES:
        raise BadRequest(f"mode must be one of {', '.join(SEARCH_MODES)}")
    return SearchRequest(view, text, SearchFilters(label=label), k, mode)


class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Busy(Exception):
    """Every /similar engine slot is taken: answered 429 with Retry-After, never queued."""


class SearchAccess:
    """Who may use the search views (see the module docstring)."""

    def __init__(self, keys: ApiKeys, *, bind_host: str, allow_anonymous: bool) -> None:
        self.keys = keys
        self.bind_host = bind_host
        self.open_without_key = not keys and (allow_anonymous or is_loopback(bind_host))

    @classmethod
    def from_settings(cls, settings: Settings) -> SearchAccess:
        return cls(
            ApiKeys.parse(settings.web_api_keys),
            bind_host=search_bind(settings)[0],
            allow_anonymous=settings.web_allow_anonymous,
        )

    def describe(self) -> str:
        if self.keys:
            return f"API key required ({len(self.keys.ids)} active: {', '.join(self.keys.ids)})"
        if self.open_without_key:
            return "open without a key (loopback or INFLOW_WEB_ALLOW_ANONYMOUS=true)"
        return "refused: no INFLOW_WEB_API_KEYS configured and not served on loopback"

    def authorize(self, headers: Mapping[str, str]) -> str:
        """The caller's key id ("anonymous" where no key is needed); raises `Refused`."""
        if self.keys:
            presented = presented_key(headers)
            if presented is None:
                raise Refused(401, "an API key is required: send 'Authorization: ApiKey KEY'")
            key_id = self.keys.identify(presented)
            if key_id is None:
                raise Refused(401, "invalid API key")
            return key_id
        if self.open_without_key:
            return "anonymous"
        raise Refused(
            403,
            "search is off: this worker serves it off loopback and has no INFLOW_WEB_API_KEYS; "
            "set keys, or INFLOW_WEB_ALLOW_ANONYMOUS=true to serve it to anyone",
        )


def search_bind(settings: Settings) -> tuple[str, int | None]:
    """(host, port) the search views are served on; port None = the Faust web server's."""
    host = settings.search_host or settings.web_host
    if settings.search_port < 0:
        return settings.web_host, None
    return host, settings.search_port


def _result_json(result: SearchResult) -> dict[str, Any]:
    return {
        "total": result.total,
        "took_ms": result.took_ms,
        "hits": [
            {k: v for k, v in dataclasses.asdict(hit).items() if k != "doc"} for hit in result.hits
        ],
    }


class SearchViews:
    """/search and /similar, independent of the web server that mounts them.

    `similar_max_concurrent` bounds the /similar requests embedding their text at once: the
    engine is the stream's, and each embed takes a place in its batches. `on_rejected` is
    called for each request refused for that bound (a metric)."""

    def __init__(
        self,
        *,
        batcher: Any,
        searcher: Any,
        access: SearchAccess,
        similar_max_concurrent: int = 2,
        on_rejected: Callable[[], object] | None = None,
    ) -> None:
        if similar_max_concurrent < 1:
            raise ValueError("similar_max_concurrent must be at least 1")
        self._batcher = batcher
        self._searcher = searcher
        self.access = access
        self.similar_max_concurrent = similar_max_concurrent
        self._similar_running = 0
        self._on_rejected = on_rejected

    async def handle(
        self,
        view: str,
        items: Iterable[tuple[str, str]],
        raw_length: int,
        headers: Mapping[str, str],
        remote: str | None,
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        """(status, JSON body, extra headers); one audit line per call."""
        started = time.perf_counter()
        items = list(items)
        key_id: str | None = None
        request: SearchRequest | None = None
        hits: int | None = None
        try:
            key_id = self.access.authorize(headers)
            request = parse_search_params(view, items, raw_length)
            result = await self._run(request)
            hits = len(result.hits)
            status, body, extra = 200, _result_json(result), {}
        except Refused as exc:
            challenge = {"WWW-Authenticate": "ApiKey"} if exc.status == 401 else {}
            status, body, extra = exc.status, {"error": str(exc)}, challenge
        except BadRequest as exc:
            status, body, extra = 400, {"error": str(exc)}, {}
        except Busy as exc:
            status, body, extra = 429, {"error": str(exc)}, {"Retry-After": "1"}
        except NoEngine:
            status, body, extra = 503, {"error": "no engine loaded yet: see /health/ready"}, {}
        except IndexerError as exc:
            status, body, extra = 503, {"error": str(exc)}, {}
        except Exception as exc:  # never a 500 with a trace: one line, logged
            log.error("%s failed: %s: %s", view, type(exc).__name__, exc)
            status, body, extra = 500, {"error": f"internal error ({type(exc).__name__})"}, {}
        self._audit(view, key_id, request, items, status, hits, remote, started)
        return status, body, extra

    async def _run(self, request: SearchRequest) -> SearchResult:
        if request.view == "search" and request.mode == "text":
            result: SearchResult = await self._searcher.search_text(
                request.text, filters=request.filters, k=request.k
            )
            return result
        vector = await self._embed_bounded(request.text)
        if request.view == "search":  # hybrid: the same text as words and as meaning
            hybrid: SearchResult = await self._searcher.search_hybrid(
                request.text, vector, k=request.k, filters=request.filters
            )
            return hybrid
        similar: SearchResult = await self._searcher.search_similar(
            vector, k=request.k, filters=request.filters
        )
        return similar

    async def _embed_bounded(self, text: str) -> list[float]:
        # Refuse rather than wait: a waiting search would still hold its connection, and the
        # caller can retry sooner than a queue behind a backlog would answer. Check and count
        # with no await between them (one event loop), so the bound holds without a lock.
        if self._similar_running >= self.similar_max_concurrent:
            if self._on_rejected is not None:
                self._on_rejected()
            raise Busy(
                f"too many /similar requests at once (at most {self.similar_max_concurrent} "
                "share the engine with the stream): retry after 1 s"
            )
        self._similar_running += 1
        try:
            vector: list[float] = await self._batcher.embed_query(text)
            return vector
        finally:
            self._similar_running -= 1

    def _audit(
        self,
        view: str,
        key_id: str | None,
        request: SearchRequest | None,
        items: list[tuple[str, str]],
        status: int,
        hits: int | None,
        remote: str | None,
        started: float,
    ) -> None:
        """One JSON line: who, what, when, how many hits. Never the key itself."""
        if request is not None:
            what: dict[str, Any] = {
                "query": request.text,
                "label": request.filters.label,
                "k": request.k,
                "mode": request.mode,
            }
        else:  # refused or malformed: what was asked, cut short
            what = {"params": {name[:40]: value[:200] for name, value in items[:8]}}
        record = {
            "audit": "search",
            "ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "view": view,
            "key_id": key_id,
            "remote": remote,
            **what,
            "status": status,
            "hits": hits,
            "ms": round((time.perf_counter() - started) * 1000, 1),
        }
        audit_log.info("%s", json.dumps(record, ensure_ascii=False))


def _request_items(request: Any) -> tuple[list[tuple[str, str]], int]:
    return list(request.query.items()), len(request.query_string)


class SearchServer:
    """The search views on their own aiohttp server (INFLOW_SEARCH_PORT)."""

    def __init__(self, views: SearchViews, host: str, port: int) -> None:
        self._views = views
        self.host = host
        self.port = port
        self._runner: aioweb.AppRunner | None = None

    async def _serve(self, view: str, request: aioweb.Request) -> aioweb.Response:
        items, raw_length = _request_items(request)
        status, body, extra = await self._views.handle(
            view, items, raw_length, request.headers, request.remote
        )
        return aioweb.json_response(body, status=status, headers=extra)

    async def start(self) -> None:
        if self._runner is not None:
            return
        app = aioweb.Application()

        async def search(request: aioweb.Request) -> aioweb.Response:
            return await self._serve("search", request)

        async def similar(request: aioweb.Request) -> aioweb.Response:
            return await self._serve("similar", request)

        app.router.add_get("/search", search)
        app.router.add_get("/similar", similar)
        runner = aioweb.AppRunner(app, access_log=None)
        await runner.setup()
        site = aioweb.TCPSite(runner, self.host, self.port)
        await site.start()
        if self.port == 0:  # report the port the system picked
            server = getattr(site, "_server", None)
            sockets = getattr(server, "sockets", None) or []
            if sockets:
                self.port = int(sockets[0].getsockname()[1])
        self._runner = runner

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()


def _rollout_summary(rollout: Any) -> dict[str, Any] | None:
    """The candidate this worker serves beside the active engine (streams.rollout.canary), if
    any."""
    record = None if rollout is None else rollout.record
    if record is None:
        return None
    return {
        "mode": record.mode,
        "candidate": record.candidate,
        "share": record.share,
        "status": record.status,
        "live": rollout.stats.to_dict(),
    }


def register_views(app: faust.App, state: dict[str, Any]) -> None:
    batcher = state["batcher"]
    metrics = state["metrics"]
    infer = state["infer"]
    health = state["health"]
    settings: Settings = state["settings"]
    views = SearchViews(
        batcher=batcher,
        searcher=state["searcher"],
        access=SearchAccess.from_settings(settings),
        similar_max_concurrent=settings.similar_max_concurrent,
        on_rejected=metrics.similar_rejected.inc,
    )
    host, port = search_bind(settings)

    @app.page("/health/ready")
    async def health_ready(web: View, request: Request) -> Response:
        report = health.ready()
        return web.json(report.body(), status=report.status)

    @app.page("/health/live")
    async def health_live(web: View, request: Request) -> Response:
        report = health.live()
        return web.json(report.body(), status=report.status)

    @app.page("/health")
    async def health_summary(web: View, request: Request) -> Response:
        """Readiness plus what the worker is doing (for people; probes use /health/ready)."""
        report = health.ready()
        identity = batcher.identity
        body = {
            **report.body(),
            "live": health.live().body(),
            "engine": dataclasses.asdict(identity) if identity else None,
            "rollout": _rollout_summary(state.get("rollout")),
            "in_flight": infer.in_flight,
            "queued_for_batch": batcher.pending,
            "batches": batcher.stats.batches,
            "texts": batcher.stats.texts,
        }
        return web.json(body, status=report.status)

    @app.page("/metrics")
    async def prometheus(web: View, request: Request) -> Response:
        # The header carries a charset, which aiohttp refuses in `content_type=`.
        return web.bytes(metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    if port is None:

        async def on_web(web: View, request: Request, view: str) -> Response:
            items, raw_length = _request_items(request)
            status, body, extra = await views.handle(
                view, items, raw_length, request.headers, getattr(request, "remote", None)
            )
            return web.json(body, status=status, headers=extra)

        @app.page("/search")
        async def search(web: View, request: Request) -> Response:
            return await on_web(web, request, "search")

        @app.page("/similar")
        async def similar(web: View, request: Request) -> Response:
            return await on_web(web, request, "similar")

        log.info("search views on the web server: %s", views.access.describe())
        return

    server = SearchServer(views, host, port)
    state["search_server"] = server

    @app.task
    async def _serve_search() -> None:
        await server.start()
        log.info(
            "search views on http://%s:%d: %s", server.host, server.port, views.access.describe()
        )

    @app.on_before_shutdown.connect  # type: ignore[arg-type]
    async def _stop_search(app: faust.App, **kwargs: Any) -> None:
        await server.stop()
