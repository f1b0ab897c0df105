"""One index per model behind one read alias, against the genuine search server."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import pytest
from elasticsearch import AsyncElasticsearch

from indexer.mapping import (
    ModelIndices,
    alias_dims,
    alias_indices,
    ensure_index,
    first_index_name,
    index_meta,
    switch_alias,
)

pytestmark = pytest.mark.integration


def _doc(i: int, version: str, dims: int) -> dict[str, object]:
    rng = random.Random(i)
    v = [rng.gauss(0.0, 1.0) for _ in range(dims)]
    norm = math.sqrt(sum(x * x for x in v))
    return {
        "id": f"d{i}",
        "text": "t",
        "label": "x",
        "model": {"version": version},
        "embedding": [x / norm for x in v],
        "embedding_dim": dims,
    }


async def test_each_model_writes_to_its_own_index_and_the_alias_switches_atomically(
    es_url: str, unique_name: Callable[[str], str]
) -> None:
    alias = unique_name("models")
    old, new = "v1-onnxruntime-int8-aaaa1111", "v2-onnxruntime-fp32-bbbb2222"
    async with AsyncElasticsearch(es_url) as es:
        await ensure_index(es, alias, dims=384)
        route = ModelIndices(es, alias)
        # The alias's first index, made before models had indices, is adopted by the first.
        first = await route.target(_doc(0, old, 384))
        assert first == f"{alias}.aaaa1111"
        assert (await index_meta(es, first_index_name(alias)))["version"] == old
        assert await route.target(_doc(1, "v7-onnxruntime-fp16-aaaa1111", 384)) == first
        # Another model, of another width, gets its own index, not behind the read alias.
        second = await route.target(_doc(2, new, 768))
        assert second == f"{alias}.bbbb2222"
        assert await alias_indices(es, alias) == [first_index_name(alias)]
        assert await alias_dims(es, f"{alias}-bbbb2222") == 768
        before = await switch_alias(es, alias, f"{alias}-bbbb2222")
        assert before == [first_index_name(alias)]
        assert await alias_indices(es, alias) == [f"{alias}-bbbb2222"]
        assert await alias_dims(es, alias) == 768
        await es.indices.delete(index=f"{first_index_name(alias)},{alias}-bbbb2222")
