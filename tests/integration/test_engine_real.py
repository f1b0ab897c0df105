"""The real MiniLM-L6 + the default sentiment head: engines vs the torch fp32 reference.

Slow (CPU minutes on first run): trains the default head when no trained model exists
(in INFLOW_MODEL_DIR or .inflow/models) and builds engines into a temporary registry.
Exports are cached in the model folder, so later runs take well under a minute.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from engines.builder.pipeline import build, resolve_model
from engines.load import load_engine
from engines.modeldir import ModelInfo
from engines.registry import Manifest, Registry
from engines.types import Engine

pytestmark = pytest.mark.slow

OBVIOUS = {
    "I love this, wonderful day!": "positive",
    "This is terrible, I hate it": "negative",
}


@pytest.fixture(scope="session")
def real_model() -> ModelInfo:
    return resolve_model(None, progress=False, echo=lambda _m: None)


@pytest.fixture(scope="session")
def registry_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engines")


@pytest.fixture(scope="session")
def real_registry(real_model: ModelInfo, registry_root: Path) -> dict[str, Manifest]:
    """fp32 and int8 onnxruntime builds of the default model, int8 activated."""
    return {
        precision: build(
            "onnxruntime",
            precision,
            model=real_model.path,
            registry_root=registry_root,
            activate=precision == "int8",
            progress=False,
            echo=None,
        )
        for precision in ("fp32", "int8")
    }


@pytest.fixture(scope="session")
def int8_engine(real_registry: dict[str, Manifest], registry_root: Path) -> Iterator[Engine]:
    engine = load_engine(registry_root, real_registry["int8"].version)
    yield engine
    engine.close()


def test_int8_passes_the_gate(real_registry: dict[str, Manifest]) -> None:
    m = real_registry["int8"]
    assert m.accepted, m.reason
    parity = m.parity or {}
    assert parity["agreement"] >= 0.95
    assert parity["cosine_min"] >= 0.97
    assert parity["accuracy_reference"] - parity["accuracy_candidate"] <= 0.02
    assert parity["n"] == 500


def test_fp32_matches_torch_exactly(real_registry: dict[str, Manifest]) -> None:
    parity = real_registry["fp32"].parity or {}
    assert real_registry["fp32"].accepted
    assert parity["agreement"] == 1.0
    assert parity["cosine_min"] > 0.9999
    assert parity["max_abs_score_diff"] < 1e-3


def test_active_engine_is_the_int8_build(
    real_registry: dict[str, Manifest], registry_root: Path
) -> None:
    assert Registry(registry_root).active_version() == real_registry["int8"].version


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_obvious_texts_get_sensible_labels(
    precision: str, real_registry: dict[str, Manifest], registry_root: Path
) -> None:
    engine = load_engine(registry_root, real_registry[precision].version)
    try:
        result = engine.predict(list(OBVIOUS))
    finally:
        engine.close()
    assert result.labels == list(OBVIOUS.values())
    assert result.embeddings.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(result.embeddings, axis=1), 1.0, atol=1e-5)
    assert result.model.precision == precision


def test_similar_texts_are_closer(int8_engine: Engine) -> None:
    emb = int8_engine.predict(
        [
            "The flight was delayed for three hours.",
            "My plane left three hours late.",
            "I baked a chocolate cake for my sister.",
        ]
    ).embeddings
    assert float(emb[0] @ emb[1]) > float(emb[0] @ emb[2]) + 0.2


def test_default_head_quality(real_model: ModelInfo) -> None:
    metrics = real_model.meta["metrics"]
    assert metrics["accuracy"] >= 0.70
    assert metrics["macro_f1"] >= 0.66
