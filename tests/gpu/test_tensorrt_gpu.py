"""TensorRT on a real GPU: build, load, predict, and parity with the FP32 reference.

Runs only where `tensorrt` imports and torch sees a CUDA device; skipped elsewhere with the
reason. Two graphs: the default model's real serving graph, built through the pipeline
(`inflow engine build --backend tensorrt`: export, FP16 plan, the parity gate against the
torch FP32 reference, registry) and compared with onnxruntime FP32 on the same ONNX file;
and the small serving graph of tests/unit/test_tensorrt.py at width 768, so a plan takes its
width from the model.

    pytest tests/gpu -m gpu
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
import torch

try:
    import tensorrt  # noqa: F401
except (ImportError, OSError) as exc:  # OSError: the wheel is there, its libraries are not
    pytest.skip(
        f"tensorrt is not importable ({type(exc).__name__}: {exc}); these tests need "
        "pip install 'inflow[gpu]' on a host with an NVIDIA GPU",
        allow_module_level=True,
    )

from engines.backends.tensorrt import TensorRTBackend, record_path
from engines.builder.tensorrt import build_plan
from engines.load import load_engine
from tests.unit.test_tensorrt import serving_graph

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="torch.cuda.is_available() is False: TensorRT needs a CUDA device",
    ),
]

MAX_BATCH, MAX_SEQ = 16, 128
Array = npt.NDArray[Any]


def tokens(batch: int, seq: int, seed: int, high: int) -> tuple[Array, Array]:
    """Random ids, each row its own length, padded to the longest."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000 if high > 1000 else 1, high, size=(batch, seq), dtype=np.int64)
    lengths = rng.integers(1, seq + 1, size=batch)
    lengths[0] = seq
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    return ids * mask, mask


def cosine(a: Array, b: Array) -> Array:
    out: Array = (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return out


def ort_fp32(onnx_path: Path, ids: Array, mask: Array) -> dict[str, Array]:
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(
        zip(names, sess.run(names, {"input_ids": ids, "attention_mask": mask}), strict=True)
    )


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model built through the pipeline: FP16 plan, parity gate, registry."""
    from engines.builder.pipeline import build

    root = tmp_path_factory.mktemp("registry")
    manifest = build(
        "tensorrt", "fp16", max_batch=MAX_BATCH, max_seq=MAX_SEQ, registry_root=root,
        activate=True, progress=False, echo=None,
    )  # fmt: skip
    assert manifest.accepted, manifest.reason  # the gate compared it with torch fp32
    assert manifest.parity is not None
    return root


def test_the_pipeline_builds_a_plan_the_gate_accepts_and_serving_loads_it(
    registry: Path,
) -> None:
    engine = load_engine(registry)
    try:
        texts = ["what a wonderful day", "this is awful, I want a refund", "the bus is at 9"]
        result = engine.predict(texts)
        assert engine.identity.backend == "tensorrt" and engine.identity.precision == "fp16"
        assert set(result.labels) <= {"negative", "neutral", "positive"} and len(result.labels) == 3
        assert result.embeddings.shape == (3, engine.identity.embedding_dim)
    finally:
        engine.close()


def test_fp16_plan_matches_onnxruntime_fp32_and_batched_equals_single(registry: Path) -> None:
    from engines.builder.export import export_model
    from engines.builder.pipeline import resolve_model

    onnx_path = export_model(resolve_model(progress=False, echo=lambda _m: None), "fp32")
    plan = next(registry.rglob("model.plan"))
    backend = TensorRTBackend.load(plan)
    try:
        assert (backend.max_batch_size, backend.max_seq_len) == (MAX_BATCH, MAX_SEQ)
        ids, mask = tokens(MAX_BATCH, 100, seed=1, high=30000)
        probs, emb = backend.run(ids, mask)
        ref = ort_fp32(onnx_path, ids, mask)
        assert cosine(emb, ref["embedding"]).min() > 0.995
        np.testing.assert_allclose(probs, ref["probs"], atol=3e-2)
        assert (probs.argmax(axis=1) == ref["probs"].argmax(axis=1)).mean() >= 0.9
        one = np.concatenate([backend.run(ids[i : i + 1], mask[i : i + 1])[1] for i in range(4)])
        assert cosine(one, emb[:4]).min() > 0.999
        with pytest.raises(ValueError, match="exceeds"):
            backend.run(*tokens(MAX_BATCH + 1, 8, seed=2, high=30000))
    finally:
        backend.close()
        backend.close()


def test_a_768_wide_plan_takes_its_width_from_the_model(tmp_path: Path) -> None:
    onnx_path = tmp_path / "wide.onnx"
    onnx.save_model(serving_graph(768), str(onnx_path))
    record = build_plan(onnx_path, tmp_path / "wide.plan", max_batch=8, max_seq=32)
    assert record_path(tmp_path / "wide.plan").is_file() and record["precision"] == "fp16"
    backend = TensorRTBackend.load(tmp_path / "wide.plan")
    try:
        ids, mask = tokens(8, 32, seed=3, high=64)
        probs, emb = backend.run(ids, mask)
        ref = ort_fp32(onnx_path, ids, mask)
        assert emb.shape == (8, 768) and backend.embedding_dim == 768
        assert cosine(emb, ref["embedding"]).min() > 0.999
        np.testing.assert_allclose(probs, ref["probs"], atol=2e-2)
    finally:
        backend.close()
