"""`inflow search`: full-text or similar-meaning search over indexed predictions."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Literal

from indexer import Searcher, SearchResult
from indexer.search import SearchFilters
from streams.app import es_settings
from streams.config import Settings


def embed_query(settings: Settings, text: str) -> list[float]:
    """The query's embedding from the active engine (the same model that embedded the docs)."""
    from engines.load import load_engine

    engine = load_engine(settings.engine_dir, settings.engine_version or None)
    try:
        return [float(x) for x in engine.predict([text]).embeddings[0]]
    finally:
        engine.close()


SearchMode = Literal["text", "similar", "hybrid"]


async def search(
    settings: Settings, query: str, *, filters: SearchFilters, mode: SearchMode, k: int
) -> SearchResult:
    async with Searcher(
        es_settings(settings), alias=settings.es_alias, passages=settings.passages_max > 1
    ) as searcher:
        if mode == "text":
            return await searcher.search_text(query, filters=filters, k=k)
        vector = await asyncio.to_thread(embed_query, settings, query)
        if mode == "similar":
            return await searcher.search_similar(vector, k=k, filters=filters)
        return await searcher.search_hybrid(query, vector, k=k, filters=filters)


def format_result(result: SearchResult, width: int = 100) -> str:
    lines = [f"{result.total} match(es), {result.took_ms} ms"]
    for rank, hit in enumerate(result.hits, 1):
        text = " ".join((hit.text or "").split())
        if len(text) > width:
            text = text[: width - 3] + "..."
        score = f"{hit.score:.3f}" if hit.score is not None else "-"
        lines.append(f"{rank:>3}. {score:>7}  {hit.label or '-':<9} {hit.id}  {text}")
        if hit.passage is not None:
            p = hit.passage
            words = " ".join((p.text or "").split())
            snippet = words if len(words) <= width else words[: width - 3] + "..."
            lines.append(f"     passage {p.index} [{p.start}:{p.end}]  {snippet}")
    return "\n".join(lines)


def run_search(
    settings: Settings, query: str, *, label: str | None, mode: SearchMode, k: int, as_json: bool
) -> int:
    filters = SearchFilters(label=label)
    result = asyncio.run(search(settings, query, filters=filters, mode=mode, k=k))
    if as_json:
        hits = [
            {key: value for key, value in dataclasses.asdict(hit).items() if key != "doc"}
            for hit in result.hits
        ]
        print(json.dumps({"total": result.total, "hits": hits}, ensure_ascii=False))
    else:
        print(format_result(result))
    return 0
