"""Unit tests of `engines/` with a tiny randomly initialised BERT (no real MiniLM weights).

The tiny model uses the real tokenizer (vocabulary) but 2 layers of width 32, so export,
onnxruntime, registry, gate and CLI paths run in seconds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engines.assets import encoder_dir
from engines.builder.bench import BenchRow, batches_for, format_table
from engines.builder.data import load_file, stratified_sample, stratified_split
from engines.builder.metrics import evaluate
from engines.builder.parity import Thresholds, compare, cosine_rows
from engines.errors import (
    ActivationRefused,
    DataError,
    EngineLoadError,
    EngineNotFound,
    IntegrityError,
    NothingToRollBack,
)
from engines.load import load_engine, open_engine
from engines.modeldir import (
    ENCODER_SUBDIR,
    HEAD_FILE,
    MODEL_JSON,
    TOKENIZER_FILE,
    ModelInfo,
    compute_hash,
    read_model,
)
from engines.registry import ACCEPTED, REJECTED, Manifest, Registry
from engines.tokenize import Tokenizer
from engines.types import BatchResult, Engine

LABELS = ["negative", "neutral", "positive"]
TEXTS = [
    "I love this, wonderful day!",
    "This is terrible, I hate it",
    "ok",
    "The meeting was moved to Thursday afternoon because the room was booked.",
    "self-driving cars will change everything, from insurance to the way cities look",
]


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> ModelInfo:
    """A model folder with a tiny random BERT encoder (fine-tuned layout) and a random head."""
    torch = pytest.importorskip(
        "torch", reason="the tiny model is made with torch, from the build extra"
    )
    from transformers import BertConfig, BertModel

    from engines.builder.model import ServingModel

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("models") / "tiny-sentiment-0"
    root.mkdir()
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    encoder = BertModel(config, add_pooling_layer=False).eval()
    encoder.save_pretrained(str(root / ENCODER_SUBDIR), safe_serialization=True)
    model = ServingModel(encoder, LABELS)
    with torch.no_grad():
        model.head.weight.mul_(20.0)  # make labels depend on the text, not only on the bias
    model.save_head(root / HEAD_FILE)
    shutil.copyfile(encoder_dir() / TOKENIZER_FILE, root / TOKENIZER_FILE)
    meta = {
        "format": 1,
        "name": "tiny-sentiment",
        "labels": LABELS,
        "encoder": ENCODER_SUBDIR,
        "max_seq_len": 256,
        "hash": compute_hash(root, "tiny-sentiment", LABELS, ENCODER_SUBDIR),
        "train": {"source": "sentiment"},
    }
    (root / MODEL_JSON).write_text(json.dumps(meta))
    return read_model(root)


@pytest.fixture(scope="session")
def tiny_onnx(tiny_model: ModelInfo) -> Path:
    from engines.builder.export import export_model

    return export_model(tiny_model, "fp32", progress=False)


def _manifest(info: ModelInfo, backend: str, precision: str, artifact: str, **kw: Any) -> Manifest:
    fields: dict[str, Any] = {
        "version": "candidate",
        "model_name": info.name,
        "model_hash": info.hash,
        "labels": info.labels,
        "backend": backend,
        "precision": precision,
        "max_batch": 64,
        "max_seq": 256,
        "artifact": artifact,
        "tokenizer": TOKENIZER_FILE,
        "files": {},
        "status": ACCEPTED,
        "created": "2026-01-01T00:00:00+00:00",
        "task": info.task,
        "embedding_dim": info.embedding_dim,
    }
    fields.update(kw)
    return Manifest(**fields)


def _ort_folder(tiny_model: ModelInfo, tiny_onnx: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tiny_onnx, dest / "model.onnx")
    shutil.copyfile(tiny_model.tokenizer_path, dest / TOKENIZER_FILE)
    return dest


@pytest.fixture()
def ort_engine(tiny_model: ModelInfo, tiny_onnx: Path, tmp_path: Path) -> Any:
    folder = _ort_folder(tiny_model, tiny_onnx, tmp_path / "ort")
    engine = open_engine(folder, _manifest(tiny_model, "onnxruntime", "fp32", "model.onnx"))
    yield engine
    engine.close()


@pytest.fixture()
def torch_engine(tiny_model: ModelInfo) -> Any:
    engine = open_engine(tiny_model.path, _manifest(tiny_model, "torch", "fp32", MODEL_JSON))
    yield engine
    engine.close()


def _fake_version(registry: Registry, status: str = ACCEPTED, payload: bytes = b"x") -> Manifest:
    staging = registry.stage()
    (staging / "model.onnx").write_bytes(payload)
    (staging / TOKENIZER_FILE).write_text("{}")
    manifest = Manifest(
        version="candidate",
        model_name="m",
        model_hash="0123456789abcdef",
        labels=LABELS,
        backend="onnxruntime",
        precision="int8",
        max_batch=8,
        max_seq=32,
        artifact="model.onnx",
        tokenizer=TOKENIZER_FILE,
        files={},
        status=status,
        created="2026-01-01T00:00:00+00:00",
        reason="" if status == ACCEPTED else "label agreement 0.9 < 0.95",
    )
    return registry.commit(staging, manifest)


# ------------------------------------------------------------------------ tokenizer
def test_tokenizer_pads_to_longest_and_flags_truncation() -> None:
    tok = Tokenizer(encoder_dir() / TOKENIZER_FILE, max_seq_len=8)
    enc = tok.encode(["hi", "one two three four five six seven eight nine ten"])
    assert enc.input_ids.shape == (2, 8)
    assert enc.input_ids.dtype == np.int64 and enc.attention_mask.dtype == np.int64
    assert enc.truncated == [False, True]
    assert enc.lengths == [3, 8]
    assert enc.attention_mask[0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert enc.input_ids[0, 3:].tolist() == [0] * 5
    short = tok.encode(["hi", "hello"])
    assert short.input_ids.shape == (2, 3)  # padded to the longest text, not to max_seq_len
    assert tok.count_tokens(["hi", "a " * 100]) == [3, 8]


def test_tokenizer_rejects_tiny_max_seq() -> None:
    with pytest.raises(ValueError):
        Tokenizer(encoder_dir() / TOKENIZER_FILE, max_seq_len=1)


# ----------------------------------------------------------------------- export/ORT
def test_export_has_dynamic_batch_and_sequence_axes(tiny_onnx: Path) -> None:
    import onnx

    graph = onnx.load(str(tiny_onnx)).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in graph.output] == ["probs", "embedding"]
    for value in graph.input:
        dims = value.type.tensor_type.shape.dim
        assert len(dims) == 2
        assert all(d.dim_param and not d.dim_value for d in dims), dims
        assert value.type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert not (tiny_onnx.parent / (tiny_onnx.name + ".data")).exists()  # one file


def test_export_is_cached_by_model_hash(tiny_model: ModelInfo, tiny_onnx: Path) -> None:
    from engines.builder.export import export_model

    before = tiny_onnx.stat().st_mtime_ns
    assert export_model(tiny_model, "fp32", progress=False) == tiny_onnx
    assert tiny_onnx.stat().st_mtime_ns == before


def test_onnxruntime_matches_torch(ort_engine: Any, torch_engine: Any) -> None:
    p_ort, e_ort, _ = ort_engine.run_raw(TEXTS)
    p_ref, e_ref, _ = torch_engine.run_raw(TEXTS)
    np.testing.assert_allclose(p_ort, p_ref, atol=1e-5)
    np.testing.assert_allclose(e_ort, e_ref, atol=1e-5)


@pytest.mark.parametrize(
    "env",
    [
        {"INFLOW_ORT_SPINNING": "1"},
        {"INFLOW_ORT_THREADS": "1", "INFLOW_ORT_OPTIMIZATION": "basic"},
        {"INFLOW_ORT_EXECUTION": "parallel", "INFLOW_ORT_INTER_THREADS": "2"},
    ],
)
def test_session_settings_keep_the_outputs(
    env: dict[str, str],
    tiny_model: ModelInfo,
    tiny_onnx: Path,
    tmp_path: Path,
    torch_engine: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every session setting the engine bench measures gives the reference's outputs."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    folder = _ort_folder(tiny_model, tiny_onnx, tmp_path / "ort")
    engine = open_engine(folder, _manifest(tiny_model, "onnxruntime", "fp32", "model.onnx"))
    try:
        p_ort, e_ort, _ = engine.run_raw(TEXTS)
    finally:
        engine.close()
    p_ref, e_ref, _ = torch_engine.run_raw(TEXTS)
    np.testing.assert_allclose(p_ort, p_ref, atol=1e-5)
    np.testing.assert_allclose(e_ort, e_ref, atol=1e-5)


def test_session_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from engines.backends.onnxruntime import SessionSettings

    for key in ("SPINNING", "OPTIMIZATION", "EXECUTION", "INTER_THREADS"):
        monkeypatch.delenv(f"INFLOW_ORT_{key}", raising=False)
    default = SessionSettings.from_env(2)
    assert (default.spinning, default.optimization, default.execution) == (
        False,
        "all",
        "sequential",
    )
    monkeypatch.setenv("INFLOW_ORT_SPINNING", "1")
    monkeypatch.setenv("INFLOW_ORT_OPTIMIZATION", "Extended")
    assert SessionSettings.from_env(2).spinning is True
    assert SessionSettings.from_env(2).optimization == "extended"
    monkeypatch.setenv("INFLOW_ORT_OPTIMIZATION", "fastest")
    with pytest.raises(ValueError, match="graph optimisation 'fastest'"):
        SessionSettings.from_env(2)


def test_session_runs_one_batch_per_core_unless_a_thread_count_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from engines.backends import onnxruntime

    monkeypatch.setattr(onnxruntime, "available_cores", lambda: 4)
    for key in ("THREADS", "CONCURRENT_RUNS"):
        monkeypatch.delenv(f"INFLOW_ORT_{key}", raising=False)

    def threads_and_runs(explicit: int | None = None) -> tuple[int, int]:
        settings = onnxruntime.SessionSettings.from_env(explicit)
        return settings.intra_op_threads, settings.concurrent_runs

    assert threads_and_runs() == (1, 4)
    assert threads_and_runs(explicit=2) == (2, 1)  # --threads: one batch at a time
    monkeypatch.setenv("INFLOW_ORT_THREADS", "4")
    assert threads_and_runs() == (4, 1)
    monkeypatch.delenv("INFLOW_ORT_THREADS")
    monkeypatch.setenv("INFLOW_ORT_CONCURRENT_RUNS", "2")
    assert threads_and_runs() == (2, 2)


def test_concurrent_batches_answer_like_one_at_a_time(
    tiny_model: ModelInfo, tiny_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.delenv("INFLOW_ORT_THREADS", raising=False)
    monkeypatch.setenv("INFLOW_ORT_CONCURRENT_RUNS", "3")
    folder = _ort_folder(tiny_model, tiny_onnx, tmp_path / "ort")
    engine = open_engine(folder, _manifest(tiny_model, "onnxruntime", "fp32", "model.onnx"))
    batches = [TEXTS[i % 5 :] + TEXTS[: i % 5 + 1] for i in range(20)]
    try:
        assert engine.concurrent_batches == 3
        alone = [engine.predict(batch) for batch in batches]
        with ThreadPoolExecutor(3) as threads:  # one session, three runs at once
            together = list(threads.map(engine.predict, batches))
    finally:
        engine.close()
    for got, expected in zip(together, alone, strict=True):
        assert got.labels == expected.labels
        np.testing.assert_allclose(got.embeddings, expected.embeddings, atol=1e-6)


def test_bench_spec_options() -> None:
    from engines.builder.bench import split_spec
    from engines.errors import BuildError

    assert split_spec("onnxruntime:int8") == ("onnxruntime:int8", {}, 0)
    assert split_spec("v1-x@threads=1, spinning=1,busy=2") == (
        "v1-x",
        {"INFLOW_ORT_THREADS": "1", "INFLOW_ORT_SPINNING": "1"},
        2,
    )
    with pytest.raises(BuildError, match="unknown option 'turbo'"):
        split_spec("v1-x@turbo=1")
    with pytest.raises(BuildError, match="not key=value"):
        split_spec("v1-x@threads")


@pytest.mark.parametrize("which", ["ort_engine", "torch_engine"])
def test_batched_equals_one_at_a_time(which: str, request: pytest.FixtureRequest) -> None:
    engine = request.getfixturevalue(which)
    batched = engine.predict(TEXTS)
    for i, text in enumerate(TEXTS):
        single = engine.predict([text])
        assert single.labels[0] == batched.labels[i]
        np.testing.assert_allclose(single.embeddings[0], batched.embeddings[i], atol=2e-5)
        for label in LABELS:
            assert single.scores[0][label] == pytest.approx(batched.scores[i][label], abs=2e-5)


def test_predict_contract(ort_engine: Any) -> None:
    assert isinstance(ort_engine, Engine)
    result = ort_engine.predict(TEXTS)
    assert isinstance(result, BatchResult)
    assert len(result) == len(TEXTS)
    assert result.embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(result.embeddings, axis=1), 1.0, atol=1e-5)
    for scores, label in zip(result.scores, result.labels, strict=True):
        assert set(scores) == set(LABELS)
        assert sum(scores.values()) == pytest.approx(1.0, abs=1e-5)
        assert label == max(scores, key=lambda k: scores[k])
    assert result.model.backend == "onnxruntime"
    empty = ort_engine.predict([])
    assert len(empty) == 0 and empty.embeddings.shape[0] == 0


def test_split_over_max_batch_keeps_order(
    tiny_model: ModelInfo, tiny_onnx: Path, tmp_path: Path
) -> None:
    folder = _ort_folder(tiny_model, tiny_onnx, tmp_path / "small")
    small = open_engine(
        folder, _manifest(tiny_model, "onnxruntime", "fp32", "model.onnx", max_batch=2)
    )
    big = open_engine(folder, _manifest(tiny_model, "onnxruntime", "fp32", "model.onnx"))
    texts = TEXTS * 3
    a, b = small.predict(texts), big.predict(texts)
    assert a.labels == b.labels
    np.testing.assert_allclose(a.embeddings, b.embeddings, atol=2e-5)
    with pytest.raises(ValueError):
        small.backend.run(np.zeros((3, 4), np.int64), np.ones((3, 4), np.int64))


def test_truncated_flags_from_engine(
    tiny_model: ModelInfo, tiny_onnx: Path, tmp_path: Path
) -> None:
    folder = _ort_folder(tiny_model, tiny_onnx, tmp_path / "trunc")
    engine = open_engine(
        folder, _manifest(tiny_model, "onnxruntime", "fp32", "model.onnx", max_seq=16)
    )
    result = engine.predict(["short text", "word " * 50])
    assert result.truncated == [False, True]
    assert engine.count_tokens(["word " * 50]) == [16]
    assert engine.max_seq_len == 16


def test_int8_quantization_runs(tiny_model: ModelInfo, tiny_onnx: Path, tmp_path: Path) -> None:
    from engines.builder.export import export_model

    path = export_model(tiny_model, "int8", progress=False)
    folder = tmp_path / "int8"
    folder.mkdir()
    shutil.copyfile(path, folder / "model.onnx")
    shutil.copyfile(tiny_model.tokenizer_path, folder / TOKENIZER_FILE)
    engine = open_engine(folder, _manifest(tiny_model, "onnxruntime", "int8", "model.onnx"))
    result = engine.predict(TEXTS)
    assert np.isfinite(result.embeddings).all()
    import onnx

    graph = onnx.load(str(path)).graph
    ops = {n.op_type for n in graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    # Each layer's down-projection keeps its widest input channels in an fp32 MatMul.
    kept = [n for n in graph.node if n.name.endswith("/outliers_fp32")]
    assert len(kept) == 2 and all(n.op_type == "MatMul" for n in kept)


def test_outlier_split_is_exact_in_fp32_and_tightens_int8(tmp_path: Path) -> None:
    """X @ W == (X * m) @ W_in + X[..., o] @ W[o]; quantized, the split keeps the error of the
    other channels small where one wide channel would set the shared activation scale."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from engines.builder.export import down_projections, split_outlier_channels

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 10, 128)).astype(np.float32)
    x[..., 7] *= 40.0  # one channel far wider than the others, as GELU outputs have
    w = rng.normal(scale=0.1, size=(128, 32)).astype(np.float32)

    def graph_bytes() -> onnx.ModelProto:
        g = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"], name="down")],
            "ffn",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 128])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(w, "w")],
        )
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    def run(model: onnx.ModelProto | str) -> Any:
        source = model if isinstance(model, str) else model.SerializeToString()
        return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, {"x": x})[
            0
        ]

    split = graph_bytes()
    projections = down_projections(split.graph, hidden=32)
    assert [n.name for n in projections] == ["down"]
    kept = split_outlier_channels(split.graph, projections, [np.abs(x).max(axis=(0, 1))], 4)
    exact = x @ w
    np.testing.assert_allclose(run(split), exact, rtol=1e-4, atol=1e-4)

    def int8_error(model: onnx.ModelProto, exclude: list[str]) -> float:
        onnx.save(model, str(tmp_path / "f.onnx"))
        quantize_dynamic(
            str(tmp_path / "f.onnx"),
            str(tmp_path / "q.onnx"),
            weight_type=QuantType.QInt8,
            per_channel=True,
            nodes_to_exclude=exclude,
        )
        return float(np.abs(run(str(tmp_path / "q.onnx")) - exact).mean())

    plain, with_split = int8_error(graph_bytes(), []), int8_error(split, kept)
    print(f"mean |error|: all int8 {plain:.4f}, outliers split {with_split:.4f}")
    assert with_split < plain / 3


def test_cpu_graphs_keep_residual_adds_out_of_skip_layer_norm(
    tiny_model: ModelInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxruntime's SkipLayerNormalization CPU kernel is 5-6x slower than the Add +
    LayerNormalization it replaces: neither the export nor the serving session may fuse it."""
    import onnx

    from engines.backends.onnxruntime import OnnxRuntimeBackend, SessionSettings
    from engines.builder.export import export_model

    fused = export_model(tiny_model, "fp32", progress=False, fused=True)
    ops = [n.op_type for n in onnx.load(str(fused)).graph.node]
    assert "Attention" in ops and "BiasGelu" in ops  # the fusions that pay are applied
    assert "SkipLayerNormalization" not in ops and "LayerNormalization" in ops

    # The session's own graph optimizer would fuse them again: look at what it runs.
    optimized = tmp_path / "optimized.onnx"
    plain_options = SessionSettings.options

    def options_saving_the_graph(self: SessionSettings) -> Any:
        opts = plain_options(self)
        opts.optimized_model_filepath = str(optimized)
        return opts

    monkeypatch.setattr(SessionSettings, "options", options_saving_the_graph)
    backend = OnnxRuntimeBackend(fused, "fp32", 8, 64, providers=["CPUExecutionProvider"])
    backend.close()
    served = {n.op_type for n in onnx.load(str(optimized)).graph.node}
    assert "SkipLayerNormalization" not in served and "LayerNormalization" in served


# ------------------------------------------------------------------------ registry
def test_registry_activate_rollback_and_history(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    assert reg.active_version() is None and reg.list() == []
    v1 = _fake_version(reg).version
    v2 = _fake_version(reg, payload=b"y").version
    assert v1.startswith("v1-onnxruntime-int8-01234567")
    assert v2.startswith("v2-")
    reg.activate(v1)
    reg.activate(v2)
    assert reg.active_version() == v2
    assert [m.version for m in reg.list()] == [v1, v2]
    assert reg.rollback() == v1
    assert reg.active_version() == v1
    with pytest.raises(NothingToRollBack):
        reg.rollback()
    assert not list(reg.root.glob(".staging-*"))


def test_registry_rejected_build_needs_force(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    bad = _fake_version(reg, status=REJECTED).version
    with pytest.raises(ActivationRefused, match="--force"):
        reg.activate(bad)
    assert reg.active_version() is None
    reg.activate(bad, force=True)
    assert reg.active_version() == bad


def test_registry_detects_tampered_artifact(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    version = _fake_version(reg).version
    reg.verify(version)
    (reg.path(version) / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(IntegrityError) as err:
        reg.activate(version)
    message = str(err.value)
    assert "model.onnx" in message and "\n" not in message
    with pytest.raises(IntegrityError):
        load_engine(reg.root, version, warmup=False)


def test_load_engine_without_active_engine(tmp_path: Path) -> None:
    with pytest.raises(EngineNotFound, match="engine ensure"):
        load_engine(tmp_path / "empty")
    with pytest.raises(EngineNotFound):
        Registry(tmp_path / "empty").get("v1-onnxruntime-int8-00000000")


def test_build_gate_registry_and_load(
    tiny_model: ModelInfo, tiny_onnx: Path, tmp_path: Path
) -> None:
    from engines.builder.pipeline import build

    root = tmp_path / "reg"
    loose = Thresholds(min_agreement=0.9, min_cosine=0.99, max_accuracy_drop=0.05)
    ok = build(
        "onnxruntime",
        "fp32",
        model=tiny_model.path,
        registry_root=root,
        thresholds=loose,
        parity_texts=40,
        activate=True,
        progress=False,
        echo=None,
    )
    assert ok.accepted and ok.parity is not None and ok.parity["agreement"] == 1.0
    assert set(ok.files) == {"model.onnx", TOKENIZER_FILE}
    strict = Thresholds(min_agreement=1.01)
    bad = build(
        "onnxruntime",
        "fp32",
        model=tiny_model.path,
        registry_root=root,
        thresholds=strict,
        parity_texts=40,
        activate=True,
        progress=False,
        echo=None,
    )
    assert bad.status == REJECTED and "agreement" in bad.reason
    reg = Registry(root)
    assert reg.active_version() == ok.version
    engine = load_engine(root)
    assert engine.identity.version == ok.version
    assert len(engine.predict(TEXTS)) == len(TEXTS)
    engine.close()


def test_onnxruntime_engine_loads_without_torch(
    tiny_model: ModelInfo, tiny_onnx: Path, tmp_path: Path
) -> None:
    reg = Registry(tmp_path / "reg")
    staging = _ort_folder(tiny_model, tiny_onnx, reg.stage())
    version = reg.commit(
        staging, _manifest(tiny_model, "onnxruntime", "fp32", "model.onnx")
    ).version
    reg.activate(version)
    code = (
        "import sys; from engines.load import load_engine; "
        f"e = load_engine({str(reg.root)!r}); e.predict(['hello']); "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'sklearn') "
        "or m.startswith('engines.builder')]; print(bad); sys.exit(1 if bad else 0)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- parity
def _arrays(n: int = 50, k: int = 3, d: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, k)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    emb = rng.normal(size=(n, d))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return probs.astype(np.float32), emb.astype(np.float32)


def test_parity_identical_passes() -> None:
    probs, emb = _arrays()
    gold = [LABELS[i] for i in probs.argmax(axis=1)]
    report = compare(probs, emb, probs.copy(), emb.copy(), LABELS, gold=gold)
    assert report.passed and report.agreement == 1.0
    assert report.cosine_min == pytest.approx(1.0, abs=1e-6)
    assert report.accuracy_candidate == report.accuracy_reference == 1.0
    assert report.accuracy_drop == 0.0
    assert json.loads(report.to_json())["passed"] is True


def test_parity_flags_label_flips_cosine_and_accuracy() -> None:
    probs, emb = _arrays()
    gold = [LABELS[i] for i in probs.argmax(axis=1)]
    cand = probs.copy()
    cand[:10] = cand[:10, ::-1]  # reverse scores: top label changes for most of 10 rows
    cand_emb = emb.copy()
    cand_emb[0] = -cand_emb[0]
    report = compare(
        probs, emb, cand, cand_emb, LABELS, gold=gold, texts=[str(i) for i in range(50)]
    )
    assert not report.passed
    text = " ".join(report.failures)
    assert "agreement" in text and "cosine" in text and "accuracy drop" in text
    assert report.cosine_min == pytest.approx(-1.0, abs=1e-5)
    assert report.disagreements and report.disagreements[0]["text"] == "0"


def test_parity_nan_and_score_threshold() -> None:
    probs, emb = _arrays()
    cand = probs.copy()
    cand[3, 0] = np.nan
    report = compare(probs, emb, cand, emb, LABELS, thresholds=Thresholds(max_score_diff=0.0))
    assert any("NaN" in f for f in report.failures)
    with pytest.raises(ValueError):
        compare(probs, emb, probs[:3], emb[:3], LABELS)


def test_cosine_rows() -> None:
    a = np.array([[1.0, 0.0], [0.0, 2.0]], dtype=np.float32)
    b = np.array([[1.0, 0.0], [2.0, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(cosine_rows(a, b), [1.0, 0.0], atol=1e-6)


# ---------------------------------------------------------------------------- bench
def test_bench_table_and_batches() -> None:
    rows = [
        BenchRow("torch:fp32", 1, 8, 60.0, 16.0, 20.0),
        BenchRow("onnxruntime:int8", 1, 8, 140.5, 7.0, 8.5),
        BenchRow("onnxruntime:int8", 32, 256, 262.0, 120.0, 130.0),
    ]
    table = format_table(rows)
    lines = table.splitlines()
    assert "batch 1" in lines[0] and "batch 32" in lines[0]
    assert any(line.startswith("onnxruntime:int8") and "262.0" in line for line in lines)
    torch_line = next(line for line in lines if line.startswith("torch:fp32"))
    assert torch_line.rstrip().endswith("-")  # no batch-32 result for torch
    assert format_table([]) == "(no results)"
    batches = batches_for(["a", "b", "c"], 2, min_batches=4)
    assert [len(b) for b in batches] == [2, 2, 2, 2]
    assert batches[1] == ["c", "a"]


def test_bench_and_build_describe_an_engine_by_the_same_manifest(tiny_model: ModelInfo) -> None:
    from engines.builder.bench import open_spec
    from engines.builder.pipeline import manifest_for

    draft = manifest_for(
        tiny_model,
        version="candidate",
        backend="torch",
        precision="fp32",
        max_batch=4,
        max_seq=32,
        artifact=MODEL_JSON,
    )
    assert (draft.model_name, draft.model_hash, draft.labels) == (
        tiny_model.name,
        tiny_model.hash,
        tiny_model.labels,
    )
    assert (draft.task, draft.embedding_dim) == (tiny_model.task, tiny_model.embedding_dim)
    assert (draft.status, draft.files, draft.tokenizer) == (REJECTED, {}, TOKENIZER_FILE)
    engine = open_spec("torch:fp32", tiny_model, 4, 32, None)  # straight from the model folder
    try:
        identity = engine.identity
        assert (identity.name, identity.version) == (tiny_model.name, "torch:fp32")
        assert (identity.backend, identity.precision) == ("torch", "fp32")
        assert identity.task == tiny_model.task
        assert len(engine.predict(["good", "bad"]).labels) == 2
    finally:
        engine.close()


# ----------------------------------------------------------------------- data/metrics
def test_stratified_split_is_deterministic_and_disjoint() -> None:
    examples = [(f"text {i}", LABELS[i % 3]) for i in range(300)]
    a = stratified_split(examples, seed=1)
    b = stratified_split(examples, seed=1)
    assert a == b
    assert len(a.validation) == len(a.test) == 30 and len(a.train) == 240
    sets = [set(a.train), set(a.validation), set(a.test)]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert sorted(label for _, label in a.validation) == sorted(LABELS * 10)
    assert stratified_split(examples, seed=2) != a
    sample = stratified_sample(examples, 30, seed=1)
    assert len(sample) == 30 and {label for _, label in sample} == set(LABELS)


def test_load_file_csv_and_jsonl(tmp_path: Path) -> None:
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("id,Text,label\n1,good,pos\n2,bad,neg\n3,good,pos\n4,,neg\n")
    assert load_file(csv_path) == [("good", "pos"), ("bad", "neg")]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "a", "sentiment": "x"}\n\n{"text": "b", "sentiment": "y"}\n')
    assert load_file(jsonl) == [("a", "x"), ("b", "y")]
    with pytest.raises(DataError, match="column"):
        load_file(csv_path, text_column="body")
    with pytest.raises(DataError):
        load_file(tmp_path / "missing.csv")


def test_evaluate_metrics_and_table() -> None:
    report = evaluate(["a", "a", "b", "b"], ["a", "b", "b", "b"], ["a", "b"])
    assert report.accuracy == 0.75
    assert report.confusion == [[1, 1], [0, 2]]
    assert report.per_label["a"]["precision"] == 1.0
    assert report.macro_f1 == pytest.approx((2 / 3 + 0.8) / 2)
    assert "macro-F1" in report.table()


def test_a_prediction_outside_the_gold_labels_is_a_miss() -> None:
    """A 3-class sentiment model on positive/negative reviews: "neutral" is wrong."""
    gold = ["positive"] * 3 + ["negative"]
    report = evaluate(
        gold, ["positive", "neutral", "neutral", "negative"], ["negative", "positive"]
    )
    assert report.accuracy == 0.5
    assert report.per_label["positive"]["recall"] == pytest.approx(1 / 3)
    assert report.per_label["positive"]["support"] == 3
    assert report.balanced_accuracy == pytest.approx((1 / 3 + 1) / 2)
    assert "balanced accuracy 0.667" in report.line()


def test_review_examples_are_labelled_imdb_reviews_outside_every_training_domain() -> None:
    from engines.builder.data import load_sentiment, review_examples, review_sentences

    reviews = review_examples(200)
    assert len(reviews) == 200 and {label for _, label in reviews} == {"negative", "positive"}
    assert 80 <= sum(label == "positive" for _, label in reviews) <= 120
    assert not any("<br />" in text for text, _ in reviews)
    every = {text for text, _ in review_examples(100_000)}
    assert len(every) > 24_000
    assert not every & {text for text, _ in load_sentiment()}
    sentences = review_sentences()
    assert len(sentences) > 8_000 and {label for _, label in sentences} == {"negative", "positive"}
    assert not every & {text for text, _ in sentences}


# ------------------------------------------------------------------------------ CLI
def _cli(argv: list[str]) -> int:
    from streams.cli.engine import add_commands

    parser = argparse.ArgumentParser()
    parser.add_argument("--registry", type=Path, default=None)
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    result: int = args.handler(args)
    return result


def _ort_version(reg: Registry, tiny_model: ModelInfo, tiny_onnx: Path, **manifest: Any) -> str:
    """A registered onnxruntime version of the tiny model (`manifest` overrides fields)."""
    staging = _ort_folder(tiny_model, tiny_onnx, reg.stage())
    draft = _manifest(tiny_model, "onnxruntime", "fp32", "model.onnx", **manifest)
    return reg.commit(staging, draft).version


def test_cli_list_activate_rollback(
    tiny_model: ModelInfo, tiny_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reg = Registry(tmp_path / "reg")
    v1 = _ort_version(reg, tiny_model, tiny_onnx)
    v2 = _ort_version(reg, tiny_model, tiny_onnx, status=REJECTED, reason="agreement 0.9")
    root = ["--registry", str(reg.root)]
    assert _cli([*root, "engine", "activate", v1]) == 0
    assert _cli([*root, "engine", "activate", v2]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--force" in err
    assert _cli([*root, "engine", "activate", v2, "--force"]) == 0
    assert _cli([*root, "engine", "list"]) == 0
    out = capsys.readouterr().out
    assert f"* {v2}" in out and "rejected" in out
    assert _cli([*root, "engine", "rollback"]) == 0
    assert reg.active_version() == v1
    assert _cli([*root, "engine", "verify"]) == 0
    assert _cli([*root, "engine", "activate", "nope"]) == 2
    assert _cli([*root, "engine"]) == 2


# A graph that disagrees with its manifest (hashes intact: `verify` passes): the warm-up fails.
MISMATCHES = {
    "width": {"embedding_dim": 256},
    "labels": {"labels": ["negative", "positive"]},
}


@pytest.mark.parametrize("mismatch", sorted(MISMATCHES))
def test_a_graph_unlike_its_manifest_fails_to_load_with_one_line(
    tiny_model: ModelInfo, tiny_onnx: Path, tmp_path: Path, mismatch: str
) -> None:
    reg = Registry(tmp_path / "reg")
    bad = _ort_version(reg, tiny_model, tiny_onnx, **MISMATCHES[mismatch])
    reg.verify(bad)
    with pytest.raises(EngineLoadError) as caught:
        load_engine(reg.root, bad)
    message = str(caught.value)
    assert (
        message.startswith(f"engine {bad} failed its warm-up: ValueError: ") and "\n" not in message
    )
    assert ("256" if mismatch == "width" else "2 labels") in message


@pytest.mark.parametrize("force", [False, True])
def test_cli_activate_refuses_a_version_that_fails_its_warm_up(
    tiny_model: ModelInfo,
    tiny_onnx: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    force: bool,
) -> None:
    reg = Registry(tmp_path / "reg")
    good = _ort_version(reg, tiny_model, tiny_onnx)
    bad = _ort_version(reg, tiny_model, tiny_onnx, embedding_dim=256)
    root = ["--registry", str(reg.root)]
    assert _cli([*root, "engine", "activate", good]) == 0
    capsys.readouterr()
    assert _cli([*root, "engine", "activate", bad, *(["--force"] if force else [])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"inflow: error: engine {bad} was not activated")
    assert "made 32-wide embeddings, its manifest says 256" in err
    assert reg.active_version() == good and reg.history() == [good], "the pointer is unchanged"
    assert _cli([*root, "engine", "shadow", bad]) == 2, "nor may it be a rollout's candidate"
    assert reg.rollout() is None


def test_registry_failed_marks_last_good_and_activation_anew(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reg = Registry(tmp_path / "reg")
    v1, v2, v3 = (_fake_version(reg, payload=p).version for p in (b"1", b"2", b"3"))
    assert reg.failed() == {} and reg.serving_version() is None
    for version in (v1, v2, v3):
        reg.activate(version)
    first = reg.mark_failed(v3, "ValueError: width\n384", worker="w1")
    assert first.reason == "ValueError: width 384" and first.worker == "w1" and first.time
    assert reg.mark_failed(v3, "again", worker="w2") == first, "the first finder is kept"
    assert reg.failed() == {v3: first}
    assert json.loads((reg.root / "failed.json").read_text())["versions"][v3]["worker"] == "w1"
    assert reg.last_good() == v2 and reg.serving_version() == v2
    assert reg.serving_version(pinned=v3) == v3
    reg.mark_failed(v2, "RuntimeError: x")
    assert reg.last_good() == v1 and reg.embedding_dim() == reg.get(v1).embedding_dim
    assert _cli(["--registry", str(reg.root), "engine", "list"]) == 0
    out = capsys.readouterr().out
    assert f"failed {first.time} on w1: ValueError: width 384" in out
    assert f"active {v3} is marked failed: workers serve {v1}" in out
    assert reg.rollback() == v1, "rollback skips the failed versions workers would not load"
    reg.activate(v3)
    assert v3 not in reg.failed() and v2 in reg.failed(), "only the activated one is cleared"
    reg.mark_failed(v1, "x")
    reg.mark_failed(v3, "x")
    assert reg.last_good() is None and reg.serving_version() is None
    (reg.root / "failed.json").write_text("{not json")
    assert reg.failed() == {}, "an unreadable file: no marks (each version is tried again)"


def test_build_rejects_bad_combinations_fast(tmp_path: Path) -> None:
    import importlib.util

    from engines.builder.pipeline import build
    from engines.errors import BackendUnavailable, BuildError

    with pytest.raises(BuildError, match="fp32 or int8"):
        build("onnxruntime", "fp16", registry_root=tmp_path, echo=None)
    with pytest.raises(BuildError, match="unknown backend"):
        build("tvm", "fp32", registry_root=tmp_path, echo=None)
    if importlib.util.find_spec("tensorrt") is None:
        with pytest.raises(BackendUnavailable, match="tensorrt is not installed"):
            build("tensorrt", registry_root=tmp_path, echo=None)
    assert not (tmp_path / "versions").exists()


# ------------------------------------------------------------------------ passages
_VOCAB = [
    "river",
    "stone",
    "market",
    "engine",
    "quiet",
    "yellow",
    "seven",
    "paper",
    "tiger",
    "window",
    "coffee",
    "planet",
]


@settings(max_examples=60, deadline=None)
@given(
    n_words=st.integers(1, 900),
    seed=st.integers(0, 10_000),
    max_windows=st.integers(1, 9),
    max_seq=st.sampled_from([16, 64, 256]),
)
def test_windows_fit_overlap_and_cover_the_text(
    n_words: int, seed: int, max_windows: int, max_seq: int
) -> None:
    from engines.tokenize import Tokenizer

    rng = random.Random(seed)
    text = " ".join(rng.choice(_VOCAB) + rng.choice(["", ",", "."]) for _ in range(n_words))
    tok = Tokenizer(encoder_dir() / TOKENIZER_FILE, max_seq)
    spans, complete = tok.windows(text, max_windows)
    first = tok.tokenize([text])[0]
    assert 1 <= len(spans) <= max_windows
    if not first.truncated:
        assert [(s.start, s.end) for s in spans] == [(0, len(text))] and complete
        return
    # Each window fits the engine whole; the first is what truncation keeps.
    windows = tok.tokenize([text[s.start : s.end] for s in spans])
    assert not any(w.truncated for w in windows)
    assert windows[0].ids == first.ids
    for before, after in itertools.pairwise(spans):
        assert after.start < before.end  # they overlap
        assert before.start < after.start
    # Complete exactly when the last window reaches the last word.
    assert complete == (spans[-1].end == len(text.rstrip()))


def test_passages_pool_the_windows_and_keep_the_first_embedding(
    tiny_model: ModelInfo, tiny_onnx: Path, tmp_path: Path
) -> None:
    folder = _ort_folder(tiny_model, tiny_onnx, tmp_path / "passages")
    manifest = _manifest(tiny_model, "onnxruntime", "fp32", "model.onnx")
    plain = open_engine(folder, manifest)
    windowed = open_engine(folder, manifest, max_passages=4)
    try:
        long_text = " ".join(_VOCAB[i % len(_VOCAB)] for i in range(400))  # ~1.6 windows
        texts = [TEXTS[0], long_text, long_text * 4]
        base, got = plain.predict(texts), windowed.predict(texts)
        assert got.passages is not None and [len(p) for p in got.passages] == [1, 2, 4]
        np.testing.assert_allclose(got.embeddings, base.embeddings, atol=1e-6)
        assert got.truncated == [False, False, True]  # 4 windows do not reach the end of x4
        for i, text in enumerate(texts):
            spans = got.passages[i]
            alone = plain.predict([text[p.start : p.end] for p in spans])
            for p, vector in zip(spans, alone.embeddings, strict=True):
                np.testing.assert_allclose(p.embedding, vector, atol=1e-5)
            rows = np.asarray([[s[label] for label in LABELS] for s in alone.scores])
            pooled = rows[0] if len(rows) == 1 else 0.5 * rows[0] + 0.5 * rows[1:].mean(axis=0)
            assert [got.scores[i][label] for label in LABELS] == pytest.approx(pooled, abs=1e-5)
            assert got.labels[i] == LABELS[int(np.argmax(pooled))]
    finally:
        plain.close()
        windowed.close()
