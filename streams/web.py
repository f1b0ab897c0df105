"""HTTP views on the worker: /health/ready, /health/live, /health, /metrics, /search, /similar.

JSON unless noted; the health views answer 503 with the reason when not ok."""

from __future__ import annotations

import dataclasses
from typing import Any

import faust
from faust.web import Request, Response, View

from indexer import IndexerError, SearchResult
from streams.batcher import NoEngine
from streams.metrics import CONTENT_TYPE_LATEST


def _result_json(result: SearchResult) -> dict[str, Any]:
    return {
        "total": result.total,
        "took_ms": result.took_ms,
        "hits": [
            {k: v for k, v in dataclasses.asdict(hit).items() if k != "doc"} for hit in result.hits
        ],
    }


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    value = int(raw)  # ValueError -> 400 below
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}")
    return value


def register_views(app: faust.App, state: dict[str, Any]) -> None:
    batcher = state["batcher"]
    searcher = state["searcher"]
    metrics = state["metrics"]
    infer = state["infer"]
    health = state["health"]

    def bad_request(web: View, message: str) -> Response:
        return web.json({"error": message}, status=400)

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

    @app.page("/search")
    async def search(web: View, request: Request) -> Response:
        query = request.query.get("q", "").strip()
        if not query:
            return bad_request(web, "give a query: /search?q=words[&label=L][&k=N]")
        try:
            k = _int_param(request, "k", 10, 1, 1000)
            result = await searcher.search_text(query, label=request.query.get("label"), k=k)
        except ValueError as exc:
            return bad_request(web, str(exc))
        except IndexerError as exc:
            return web.json({"error": str(exc)}, status=503)
        return web.json(_result_json(result))

    @app.page("/similar")
    async def similar(web: View, request: Request) -> Response:
        text = request.query.get("text", "").strip()
        if not text:
            return bad_request(web, "give a text: /similar?text=words[&label=L][&k=N]")
        try:
            k = _int_param(request, "k", 10, 1, 1000)
            vector = await batcher.embed_query(text)
            result = await searcher.search_similar(vector, k=k, label=request.query.get("label"))
        except NoEngine:
            return web.json({"error": "no engine loaded yet: see /health/ready"}, status=503)
        except ValueError as exc:
            return bad_request(web, str(exc))
        except IndexerError as exc:
            return web.json({"error": str(exc)}, status=503)
        return web.json(_result_json(result))
