"""TensorRT FP16 engines on a real GPU, checked against onnxruntime FP32.

Runs only where `tensorrt` imports and torch sees a CUDA device; skipped elsewhere with the
reason. The graph is a tiny BERT-like model with the serving contract
(`engines.build.trt.testing.TinyServingModel`, exported here), or the real exported serving graph
when INFLOW_TEST_ONNX names one. Each available typing mode is built once per module:
weakly typed FP16 with FP32 pins (TensorRT 10) and strongly typed with the autocast graph.

    INFLOW_TEST_ONNX=/path/model.onnx pytest tests/gpu -m gpu
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch

try:
    import tensorrt as trt
except (ImportError, OSError) as exc:  # OSError: the wheel is there, its libraries are not
    pytest.skip(
        f"tensorrt is not importable ({type(exc).__name__}: {exc}); these tests need "
        "pip install 'inflow[gpu]' on a host with an NVIDIA GPU",
        allow_module_level=True,
    )

from engines.backends.tensorrt import TensorRTBackend
from engines.build.trt.builder import build_engine
from engines.trt.errors import ShapeError
from engines.trt.meta import read_sidecar

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="torch.cuda.is_available() is False: TensorRT needs a CUDA device",
    ),
]

MAX_BATCH = 16
MAX_SEQ = 128
SEQ_BUCKETS = (32,)  # two profiles: 1..32 and 33..128
REAL_ONNX = os.environ.get("INFLOW_TEST_ONNX")
TYPING_MODES = [
    pytest.param(False, id="weak-fp16"),
    pytest.param(True, id="strong-autocast"),
]

Tokens = tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]


def tokens(batch: int, seq: int, seed: int, *, full: bool = False) -> Tokens:
    """Random ids (valid for the tiny vocab and BERT's), each row its own length, padded."""
    rng = np.random.default_rng(seed)
    low, high = (1000, 30000) if REAL_ONNX else (1, 1000)
    ids = rng.integers(low, high, size=(batch, seq), dtype=np.int64)
    lengths = np.full(batch, seq) if full else rng.integers(1, seq + 1, size=batch)
    lengths[0] = seq  # the batch is padded to its longest row
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    return ids * mask, mask


def cosine(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> npt.NDArray[Any]:
    cos: npt.NDArray[Any] = (
        (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    )
    return cos


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if REAL_ONNX:
        path = Path(REAL_ONNX)
        if not path.is_file():
            pytest.fail(f"INFLOW_TEST_ONNX={REAL_ONNX} is not a file")
        return path
    from engines.build.trt.testing import export_tiny_onnx

    return export_tiny_onnx(tmp_path_factory.mktemp("tiny") / "tiny.onnx")


@pytest.fixture(scope="module")
def reference(onnx_path: Path) -> Any:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])

    def run(ids: npt.NDArray[np.int64], mask: npt.NDArray[np.int64]) -> Any:
        return session.run(["probs", "embedding"], {"input_ids": ids, "attention_mask": mask})

    return run


@pytest.fixture(scope="module", params=TYPING_MODES)
def plan(
    request: pytest.FixtureRequest, onnx_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    strongly_typed: bool = request.param
    if not strongly_typed and not hasattr(trt.BuilderFlag, "FP16"):
        pytest.skip(f"TensorRT {trt.__version__} has no weakly typed FP16 (removed in 11)")
    out = tmp_path_factory.mktemp("plan") / "model.plan"
    build_engine(
        onnx_path,
        out,
        max_batch=MAX_BATCH,
        max_seq=MAX_SEQ,
        seq_buckets=SEQ_BUCKETS,
        workspace_gib=2,
        strongly_typed=strongly_typed,
    )
    return out


@pytest.fixture(scope="module")
def backend(plan: Path) -> Iterator[TensorRTBackend]:
    b = TensorRTBackend.load(plan)
    yield b
    b.close()


@pytest.mark.parametrize(("batch", "seq"), [(MAX_BATCH, 100), (8, 24)])  # one per profile
def test_fp16_matches_onnxruntime_fp32(
    backend: TensorRTBackend, reference: Any, batch: int, seq: int
) -> None:
    ids, mask = tokens(batch, seq, seed=batch * 1000 + seq)
    probs, emb = backend.run(ids, mask)
    ref_probs, ref_emb = reference(ids, mask)
    assert probs.shape == ref_probs.shape and emb.shape == ref_emb.shape
    agreement = float((probs.argmax(axis=1) == ref_probs.argmax(axis=1)).mean())
    if REAL_ONNX:
        assert agreement >= 0.99
    else:
        assert agreement == 1.0
        np.testing.assert_allclose(probs, ref_probs, atol=2e-2)
    assert cosine(emb, ref_emb).min() > 0.99


def test_batched_equals_one_at_a_time(backend: TensorRTBackend) -> None:
    ids, mask = tokens(8, 40, seed=11)
    probs, emb = backend.run(ids, mask)
    for i in range(len(ids)):
        p1, e1 = backend.run(ids[i : i + 1], mask[i : i + 1])  # same padded width
        assert p1.argmax() == probs[i].argmax()
        assert cosine(e1, emb[i : i + 1])[0] > 0.999
        n = int(mask[i].sum())
        p2, e2 = backend.run(ids[i : i + 1, :n], mask[i : i + 1, :n])  # its own length
        assert p2.argmax() == probs[i].argmax()
        assert cosine(e2, emb[i : i + 1])[0] > 0.99


@pytest.mark.parametrize(
    ("batch", "seq"), [(1, 1), (1, MAX_SEQ), (MAX_BATCH, 1), (MAX_BATCH, MAX_SEQ), (3, 33)]
)
def test_smoke_batch_1_and_max_batch(backend: TensorRTBackend, batch: int, seq: int) -> None:
    probs, emb = backend.run(*tokens(batch, seq, seed=batch + seq, full=True))
    assert probs.shape == (batch, backend.num_labels) and emb.shape == (batch, 384)
    assert probs.dtype == np.float32 and emb.dtype == np.float32
    assert np.isfinite(probs).all() and np.isfinite(emb).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-2)


def test_limits_and_sidecar(backend: TensorRTBackend, plan: Path) -> None:
    assert (backend.max_batch_size, backend.max_seq_len) == (MAX_BATCH, MAX_SEQ)
    assert backend.precision == "fp16" and len(backend.profiles) == 2
    with pytest.raises(ShapeError, match="exceeds the engine's max_batch"):
        backend.run(*tokens(MAX_BATCH + 1, 8, seed=0))
    with pytest.raises(ShapeError, match="exceeds the engine's max_seq"):
        backend.run(*tokens(1, MAX_SEQ + 1, seed=0))
    info = read_sidecar(plan)
    assert info is not None
    assert info.tensorrt_version == trt.__version__
    assert info.compute_capability == tuple(torch.cuda.get_device_capability(0))
    assert info.plan_bytes == plan.stat().st_size
