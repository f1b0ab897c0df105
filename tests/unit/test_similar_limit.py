"""/similar's bounded share of the live engine: N embed at once, one more is a 429 at once."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import aiohttp
import faust
import pytest
from multidict import CIMultiDict

from indexer import SearchResult
from streams.config import Settings
from streams.delivery.batcher import NoEngine
from streams.ops.auth import ApiKeys, new_key
from streams.ops.metrics import Metrics
from streams.ops.web import SearchAccess, SearchServer, SearchViews, register_views

LIMIT = 2


class _BlockingBatcher:
    """The batcher's `embed_query`, held until `release` is set (a busy engine)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.embedding = 0
        self.embedded = 0
        self.error: Exception | None = None  # raised once released, when set
        self._changed = asyncio.Condition()

    async def embed_query(self, text: str) -> list[float]:
        await self._count(+1)
        try:
            await self.release.wait()
        finally:
            self.embedding -= 1
        if self.error is not None:
            raise self.error
        self.embedded += 1
        return [1.0] * 384

    async def _count(self, step: int) -> None:
        async with self._changed:
            self.embedding += step
            self._changed.notify_all()

    async def until_embedding(self, n: int) -> None:
        async with asyncio.timeout(5), self._changed:
            await self._changed.wait_for(lambda: self.embedding == n)


class _Searcher:
    async def search_similar(self, vector: list[float], **kwargs: Any) -> SearchResult:
        return SearchResult(total=0, total_is_exact=True, took_ms=1, hits=[])

    async def search_text(self, q: str, **kwargs: Any) -> SearchResult:
        return SearchResult(total=0, total_is_exact=True, took_ms=1, hits=[])


def _views(batcher: _BlockingBatcher, metrics: Metrics, access: SearchAccess) -> SearchViews:
    return SearchViews(
        batcher=batcher,
        searcher=_Searcher(),
        access=access,
        similar_max_concurrent=LIMIT,
        on_rejected=metrics.similar_rejected.inc,
    )


OPEN = SearchAccess(ApiKeys.parse(""), bind_host="127.0.0.1", allow_anonymous=False)


async def test_one_more_than_the_limit_is_refused_at_once_then_served_after_release(
    caplog: pytest.LogCaptureFixture,
) -> None:
    batcher, metrics = _BlockingBatcher(), Metrics()
    views = _views(batcher, metrics, OPEN)
    caplog.set_level("INFO", logger="inflow.audit")

    def similar(text: str) -> Any:
        return views.handle("similar", [("text", text)], 10, CIMultiDict(), "127.0.0.1")

    held = [asyncio.create_task(similar(f"held {i}")) for i in range(LIMIT)]
    await batcher.until_embedding(LIMIT)

    # Answered without waiting for the held ones: a short timeout proves it is not queued.
    status, body, extra = await asyncio.wait_for(similar("one more"), timeout=1)
    assert status == 429 and extra == {"Retry-After": "1"}
    assert "too many /similar requests" in body["error"]
    assert batcher.embedding == LIMIT, "the refused request never reached the engine"
    assert metrics.total("inflow_similar_rejected_total") == 1
    # /search does not use the engine and is not bounded by it.
    status, _, _ = await asyncio.wait_for(
        views.handle("search", [("q", "x")], 3, CIMultiDict(), None), timeout=1
    )
    assert status == 200

    batcher.release.set()
    assert [r[0] for r in await asyncio.gather(*held)] == [200] * LIMIT
    status, _, _ = await asyncio.wait_for(similar("after release"), timeout=1)
    assert status == 200 and batcher.embedded == LIMIT + 1
    assert metrics.total("inflow_similar_rejected_total") == 1

    audit = [json.loads(r.getMessage()) for r in caplog.records if r.name == "inflow.audit"]
    refused = [a for a in audit if a["status"] == 429]
    assert len(refused) == 1 and refused[0]["query"] == "one more"
    assert refused[0]["view"] == "similar" and refused[0]["hits"] is None


async def test_a_slot_is_given_back_when_the_embed_fails_or_is_cancelled() -> None:
    batcher, metrics = _BlockingBatcher(), Metrics()
    views = _views(batcher, metrics, OPEN)
    held = [
        asyncio.create_task(views.handle("similar", [("text", "t")], 6, CIMultiDict(), None))
        for _ in range(LIMIT)
    ]
    await batcher.until_embedding(LIMIT)
    for task in held:  # a client gone mid-search
        task.cancel()
    await asyncio.gather(*held, return_exceptions=True)
    batcher.release.set()
    batcher.error = NoEngine("no engine loaded")
    failed = await asyncio.gather(
        *(views.handle("similar", [("text", "t")], 6, CIMultiDict(), None) for _ in range(LIMIT))
    )
    assert [a[0] for a in failed] == [503] * LIMIT
    batcher.error = None
    answers = await asyncio.gather(
        *(views.handle("similar", [("text", "t")], 6, CIMultiDict(), None) for _ in range(LIMIT))
    )
    assert [a[0] for a in answers] == [200] * LIMIT
    assert metrics.total("inflow_similar_rejected_total") == 0


async def test_keys_and_bounds_come_before_the_limit() -> None:
    key, entry = new_key("ops")
    access = SearchAccess(ApiKeys.parse(entry), bind_host="0.0.0.0", allow_anonymous=False)
    batcher, metrics = _BlockingBatcher(), Metrics()
    views = _views(batcher, metrics, access)
    good = CIMultiDict({"Authorization": f"ApiKey {key}"})
    held = [
        asyncio.create_task(views.handle("similar", [("text", "t")], 6, good, None))
        for _ in range(LIMIT)
    ]
    await batcher.until_embedding(LIMIT)
    no_key = await views.handle("similar", [("text", "t")], 6, CIMultiDict(), None)
    bad = await views.handle("similar", [("text", "t"), ("k", "0")], 10, good, None)
    busy = await views.handle("similar", [("text", "t")], 6, good, None)
    assert (no_key[0], bad[0], busy[0]) == (401, 400, 429)
    batcher.release.set()
    await asyncio.gather(*held)


async def test_the_search_server_answers_429_with_retry_after_over_http() -> None:
    batcher, metrics = _BlockingBatcher(), Metrics()
    server = SearchServer(_views(batcher, metrics, OPEN), "127.0.0.1", 0)
    await server.start()
    try:
        url = f"http://127.0.0.1:{server.port}/similar"
        async with aiohttp.ClientSession() as session:

            async def get(text: str) -> tuple[int, str | None, dict[str, Any]]:
                async with session.get(url, params={"text": text}) as response:
                    return (
                        response.status,
                        response.headers.get("Retry-After"),
                        (await response.json()),
                    )

            held = [asyncio.create_task(get(f"held {i}")) for i in range(LIMIT)]
            await batcher.until_embedding(LIMIT)
            status, retry_after, body = await asyncio.wait_for(get("one more"), timeout=2)
            assert (status, retry_after) == (429, "1") and "error" in body
            batcher.release.set()
            assert [r[0] for r in await asyncio.gather(*held)] == [200] * LIMIT
            status, retry_after, _ = await asyncio.wait_for(get("again"), timeout=2)
            assert (status, retry_after) == (200, None)
        assert b"inflow_similar_rejected_total 1.0" in metrics.render()
    finally:
        batcher.release.set()  # a failed assertion must not leave the server waiting on it
        await server.stop()


async def test_the_faust_web_server_takes_the_limit_from_settings() -> None:
    """register_views wires INFLOW_SIMILAR_MAX_CONCURRENT and the counter into /similar."""
    with socket.socket() as probe:  # a free port: Faust's web server reports none it picked
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = Settings.load(env={"INFLOW_SIMILAR_MAX_CONCURRENT": "1"})
    app = faust.App(
        "inflow-test-similar-limit",
        broker="memory://",
        web_bind="127.0.0.1",
        web_host="127.0.0.1",
        web_port=port,
        web_router_enabled=False,
        web_tables_enabled=False,
    )
    batcher, metrics = _BlockingBatcher(), Metrics()
    state = {"batcher": batcher, "metrics": metrics, "searcher": _Searcher(), "infer": None}
    register_views(app, {**state, "health": None, "settings": settings})
    await app.web.start()
    try:
        url = f"http://127.0.0.1:{port}/similar"
        async with aiohttp.ClientSession() as session:

            async def get() -> tuple[int, str | None]:
                async with session.get(url, params={"text": "x"}) as response:
                    return response.status, response.headers.get("Retry-After")

            held = asyncio.create_task(get())
            await batcher.until_embedding(1)
            assert await asyncio.wait_for(get(), timeout=2) == (429, "1")
            batcher.release.set()
            assert await held == (200, None)
        assert metrics.total("inflow_similar_rejected_total") == 1
    finally:
        batcher.release.set()
        await app.web.stop()


def test_the_limit_must_be_at_least_one() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        SearchViews(batcher=None, searcher=None, access=OPEN, similar_max_concurrent=0)
