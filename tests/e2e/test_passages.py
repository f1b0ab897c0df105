"""Passages on genuine Kafka and Elasticsearch: a worker with INFLOW_PASSAGES_MAX=8 indexes a long
business article whose only passage about a cat lies past the engine's first 256 tokens. kNN over
passages finds it first and names that passage; kNN over the document's own embedding (the first
window, what truncation keeps) ranks it below short texts about other animals."""

from __future__ import annotations

from pathlib import Path

import pytest

from engines.load import load_engine
from indexer import EsSettings, Searcher
from indexer.evaluation import load_beir, shipped_set
from schemas import Prediction, decode_prediction, encode_event
from tests.e2e.conftest import Names, WorkerFactory, read_topic
from tests.e2e.test_pipeline import _produce
from tests.e2e.test_reindex import _wait_count

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

CAT = (
    "At home, though, the cat had other plans. The small grey kitten slept all afternoon on "
    "the warm windowsill, curled up in the sunshine, purring softly. Every day the kitten "
    "chose the same sunny spot by the window, stretched out its paws, and dozed while the "
    "light moved across the room. When it woke, the kitten washed its fur, yawned, and went "
    "straight back to sleep in the sun. Cats love a warm window seat, and this little cat "
    "napped there for hours, dreaming, until the evening came and it was time for dinner."
)
ANIMALS = {
    "dog": "The old dog at the rescue shelter is looking for a family with a big garden.",
    "horse": "Two horses grazed in the wet field behind the farm while the farmer mended a gate.",
    "birds": "Flocks of birds gathered on the telegraph wires before flying south for winter.",
}
QUERY = "a kitten asleep in the sunshine on the windowsill"


def _business_filler(words: int = 240) -> tuple[str, list[tuple[str, str]]]:
    """About `words` words of BBC business news (past one 256-token window), and short
    texts from other articles as the rest of the corpus."""
    corpus = load_beir(shipped_set()).corpus
    business = [d.text for d in corpus if d.id.startswith("business-")]
    filler = " ".join(" ".join(business[:3]).split()[:words])
    others = [(d.id, d.text[:300]) for d in corpus if not d.id.startswith("business-")][:15]
    return filler, others


async def test_knn_finds_a_passage_past_the_first_window_and_names_it(
    workers: WorkerFactory, names: Names, kafka_bootstrap: str, es_url: str, engine_dir: Path
) -> None:
    workers.start(INFLOW_PASSAGES_MAX="8")
    filler, others = _business_filler()
    long_text = f"{filler} {CAT}"
    texts = {"long": long_text, **ANIMALS, **dict(others)}
    records = [(i.encode(), encode_event(t, id=i)) for i, t in texts.items()]
    await _produce(kafka_bootstrap, names.texts, records)
    await _wait_count(es_url, names.alias, len(texts))

    # The prediction on the topic carries the windows; the cat lies past the first one.
    published = await read_topic(kafka_bootstrap, names.predictions, len(texts))
    by_id = {p.id: p for p in (decode_prediction(v or b"") for _, v, _ in published)}
    long_prediction = by_id["long"]
    assert isinstance(long_prediction, Prediction), long_prediction
    windows = long_prediction.passages
    assert windows is not None and len(windows) >= 2
    cat_at = long_text.index(CAT)
    assert cat_at >= windows[0].end, "the cat must lie past what truncation keeps"
    shorts = [p for i, p in by_id.items() if i != "long"]
    assert all(isinstance(p, Prediction) and len(p.passages or ()) == 1 for p in shorts)

    engine = load_engine(engine_dir)
    try:
        vector = [float(x) for x in engine.predict([QUERY]).embeddings[0]]
    finally:
        engine.close()
    settings = EsSettings(url=es_url)
    async with Searcher(settings, alias=names.alias, passages=True) as searcher:
        with_passages = await searcher.search_similar(vector, k=5)
    async with Searcher(settings, alias=names.alias, passages=False) as searcher:
        without = await searcher.search_similar(vector, k=len(texts))

    top = with_passages.hits[0]
    assert top.id == "long", [h.id for h in with_passages.hits]
    assert top.passage is not None and top.passage.index >= 1
    assert top.passage.end > cat_at and "kitten" in (top.passage.text or "")
    ranked = [h.id for h in without.hits]
    # Truncation cannot see the cat: below every text about another animal.
    assert ranked.index("long") > max(ranked.index(a) for a in ANIMALS), ranked
