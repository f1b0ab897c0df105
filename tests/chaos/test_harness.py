"""The chaos accounting itself can fail: an event indexed twice behind one alias (in two model
indices, or under two `_id`s of one index) and a prediction published twice are seen and
counted. Before, the check compared the `_id`s of the alias's documents, which one index never
holds twice, so an event indexed twice in one index could not show.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
from elasticsearch import AsyncElasticsearch

from indexer.mapping import prediction_mappings
from tests.chaos.harness import (
    duplicates,
    indexed_documents,
    indexed_more_than_once,
    predictions_per_id,
)
from tests.unit.test_stages import _predictions


@pytest.mark.integration
async def test_an_event_indexed_twice_behind_the_alias_is_seen(
    es_url: str, unique_name: Callable[[str], str]
) -> None:
    alias = unique_name("dups")
    first, second = f"{alias}-model1", f"{alias}-model2"
    async with AsyncElasticsearch(es_url, request_timeout=30) as es:
        for index, write in ((first, False), (second, True)):
            await es.indices.create(
                index=index,
                mappings=prediction_mappings(),
                aliases={alias: {"is_write_index": write}},
            )
        try:
            # e-1 in both model indices; e-3 twice in one index, under two _ids.
            for index, doc_id, event_id in (
                (first, "e-1", "e-1"),
                (second, "e-1", "e-1"),
                (first, "e-2", "e-2"),
                (first, "e-3", "e-3"),
                (first, "e-3-again", "e-3"),
            ):
                await es.index(index=index, id=doc_id, document={"id": event_id, "text": "t"})
            docs = await indexed_documents(es_url, alias, 5, timeout_s=30)
        finally:
            await es.indices.delete(index=[first, second])
    assert len(docs) == 5
    twice = indexed_more_than_once(docs)
    assert set(twice) == {"e-1", "e-3"}
    assert sorted(twice["e-1"]) == sorted([f"{first}/e-1", f"{second}/e-1"])
    assert sorted(twice["e-3"]) == sorted([f"{first}/e-3", f"{first}/e-3-again"])
    # The old check (`_id`s unique) sees nothing wrong within the first index.
    ids_in_first = [d.doc_id for d in docs if d.index == first]
    assert len(ids_in_first) == len(set(ids_in_first))


async def test_predictions_are_counted_per_decoded_id() -> None:
    p0, p1, p2 = await _predictions(3)  # ids p0, p1, p2
    records: list[tuple[bytes | None, bytes | None, dict[str, bytes]]] = [
        (b"p0", p0, {}),
        (b"p1", p1, {}),
        (b"p0", p0, {}),
        (b"p2", p2, {}),
    ]
    counts = predictions_per_id(records)
    assert counts == Counter({"p0": 2, "p1": 1, "p2": 1})
    assert duplicates(counts) == 1
    with pytest.raises(AssertionError, match="keyed by"):
        predictions_per_id([(None, p0, {})])
    with pytest.raises(AssertionError):
        predictions_per_id([(b"x", b"not a prediction", {})])
