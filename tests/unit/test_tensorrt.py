"""TensorRT without a GPU: the plan's I/O contract and build record (pure), the one-line
errors where tensorrt is missing, and the FP16 graph rewrite checked against the FP32 graph
with onnxruntime at two widths. Building and running plans: tests/gpu/test_tensorrt_gpu.py."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from engines.backends.tensorrt import (
    TensorRTBackend,
    TensorSpec,
    check_built_here,
    read_contract,
)
from engines.builder.tensorrt import build_plan, fp16_graph
from engines.errors import BackendUnavailable, EngineLoadError

VOCAB = 64
LABELS = 3


def specs(width: int, *, probs: bool = True, ids: str = "INT64") -> list[TensorSpec]:
    out = [
        TensorSpec("input_ids", True, ids, (-1, -1)),
        TensorSpec("attention_mask", True, ids, (-1, -1)),
        TensorSpec("embedding", False, "FLOAT", (-1, width)),
    ]
    return [*out, TensorSpec("probs", False, "HALF", (-1, LABELS))] if probs else out


@pytest.mark.parametrize("width", [384, 768])
def test_the_contract_takes_labels_and_width_from_the_plan(width: int) -> None:
    contract = read_contract(specs(width))
    assert (contract.num_labels, contract.width, contract.input_dtype) == (LABELS, width, "INT64")
    embedder = read_contract(specs(width, probs=False, ids="INT32"))
    assert (embedder.num_labels, embedder.width, embedder.input_dtype) == (0, width, "INT32")


def test_the_contract_names_every_difference() -> None:
    with pytest.raises(EngineLoadError, match=r"outputs are \['logits'\]"):
        read_contract([*specs(384)[:2], TensorSpec("logits", False, "FLOAT", (-1, 3))])
    bad = [
        TensorSpec("input_ids", True, "INT64", (-1, -1)),
        TensorSpec("attention_mask", True, "FLOAT", (-1,)),
        TensorSpec("embedding", False, "INT8", (-1, -1)),
    ]
    with pytest.raises(EngineLoadError) as info:
        read_contract(bad)
    message = str(info.value)
    assert "expected both INT32 or both INT64" in message
    assert "attention_mask has shape (-1,)" in message
    assert "embedding is INT8" in message and "with a fixed n" in message


def test_a_plan_runs_only_where_it_was_built() -> None:
    record = {"tensorrt_version": "10.9.0.34", "compute_capability": "9.0", "gpu": "H100"}
    check_built_here(record, "10.9.0.40", "9.0")  # another build of the same release
    with pytest.raises(EngineLoadError) as info:
        check_built_here(record, "10.13.0.1", "8.0")
    assert "built with TensorRT 10.9.0.34, this host has 10.13.0.1" in str(info.value)
    assert "compute capability 9.0 (H100), this GPU is 8.0" in str(info.value)
    assert "\n" not in str(info.value)


def test_without_tensorrt_load_and_build_are_one_line_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"x")
    with pytest.raises(BackendUnavailable, match="pip install 'inflow\\[gpu\\]'"):
        TensorRTBackend.load(plan)
    with pytest.raises(BackendUnavailable, match="tensorrt is not installed"):
        build_plan(tmp_path / "model.onnx", plan, max_batch=4, max_seq=16)
    with pytest.raises(EngineLoadError, match="TensorRT plan not found"):
        TensorRTBackend.load(tmp_path / "missing.plan")


# --- the FP16 rewrite, on a small serving graph with the real I/O contract --------------


def serving_graph(width: int, seed: int = 0, big_head: bool = False) -> onnx.ModelProto:
    """Embedding -> layer norm (decomposed) -> FFN -> self-attention -> masked mean pooling
    -> L2 norm -> linear head -> softmax."""
    rng = np.random.default_rng(seed)
    f32 = np.float32
    head = rng.normal(0, 3, (width, LABELS)).astype(f32)
    if big_head:
        head[0, 0] = 1e5  # beyond FP16's range
    arrays: dict[str, npt.NDArray[Any]] = {
        "W_emb": rng.normal(0, 1, (VOCAB, width)).astype(f32),
        "W1": rng.normal(0, 0.05, (width, width)).astype(f32),
        "W_head": head,
        "ax_last": np.array([-1], np.int64),
        "ax_seq": np.array([1], np.int64),
        "two": np.array(2.0, f32),
        "eps": np.array(1e-12, f32),
        "scale": np.array(np.sqrt(width), f32),
        "tiny": np.array(1e-9, f32),
    }
    n = helper.make_node
    nodes = [
        n("Gather", ["W_emb", "input_ids"], ["x0"]),
        n("ReduceMean", ["x0", "ax_last"], ["mu"]),
        n("Sub", ["x0", "mu"], ["xc"]),
        n("Pow", ["xc", "two"], ["sq"]),
        n("ReduceMean", ["sq", "ax_last"], ["var"]),
        n("Add", ["var", "eps"], ["ve"]),
        n("Sqrt", ["ve"], ["sd"]),
        n("Div", ["xc", "sd"], ["h"], name="ln/Div"),
        n("MatMul", ["h", "W1"], ["h1"], name="ffn/MatMul"),
        n("Relu", ["h1"], ["h3"]),
        n("Transpose", ["h3"], ["h3t"], perm=[0, 2, 1]),
        n("MatMul", ["h3", "h3t"], ["scores"], name="attn/MatMul"),
        n("Div", ["scores", "scale"], ["scaled"]),
        n("Softmax", ["scaled"], ["att"], name="attn/Softmax", axis=-1),
        n("MatMul", ["att", "h3"], ["ctx"], name="attn/MatMul_1"),
        n("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        n("Unsqueeze", ["maskf", "ax_last"], ["m3"]),
        n("Mul", ["ctx", "m3"], ["mc"]),
        n("ReduceSum", ["mc", "ax_seq"], ["summed"], keepdims=0),
        n("ReduceSum", ["m3", "ax_seq"], ["cnt"], keepdims=0),
        n("Max", ["cnt", "tiny"], ["cntc"]),
        n("Div", ["summed", "cntc"], ["pooled"]),
        n("Mul", ["pooled", "pooled"], ["p2"]),
        n("ReduceSum", ["p2", "ax_last"], ["ss"], keepdims=1),
        n("Sqrt", ["ss"], ["norm"], name="l2/Sqrt"),
        n("Max", ["norm", "tiny"], ["nc"]),
        n("Div", ["pooled", "nc"], ["embedding"], name="l2/Div"),
        n("MatMul", ["embedding", "W_head"], ["logits"], name="head/MatMul"),
        n("Softmax", ["logits"], ["probs"], name="head/Softmax", axis=-1),
    ]
    i64 = TensorProto.INT64
    graph = helper.make_graph(
        nodes,
        "serving",
        [
            helper.make_tensor_value_info(x, i64, ["batch", "seq"])
            for x in ("input_ids", "attention_mask")
        ],
        [
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", LABELS]),
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", width]),
        ],
        [numpy_helper.from_array(a, k) for k, a in arrays.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def run_ort(model: onnx.ModelProto, ids: Any, mask: Any) -> tuple[Any, Any]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    probs, emb = sess.run(["probs", "embedding"], {"input_ids": ids, "attention_mask": mask})
    return probs, emb


def elem_types(model: onnx.ModelProto) -> dict[str, int]:
    g = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph
    out = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.value_info, *g.output]}
    out.update({t.name: t.data_type for t in g.initializer})
    return out


@pytest.mark.parametrize("width", [384, 768])
def test_fp16_graph_puts_matmuls_in_fp16_keeps_norms_and_softmax_fp32_and_matches_fp32(
    width: int,
) -> None:
    model = serving_graph(width)
    before = model.SerializeToString()
    half, converted = fp16_graph(model)
    assert model.SerializeToString() == before  # the input is not changed
    assert converted == ["ffn/MatMul", "attn/MatMul", "attn/MatMul_1", "head/MatMul"]
    onnx.checker.check_model(half, full_check=True)
    types = elem_types(half)
    for node in half.graph.node:
        if node.op_type == "MatMul":
            assert all(types[t] == TensorProto.FLOAT16 for t in node.input), node.name
        elif node.op_type in ("Softmax", "ReduceMean", "ReduceSum", "Pow", "Sqrt", "Div"):
            assert all(types[t] == TensorProto.FLOAT for t in node.output), node.name
    assert [i.type.tensor_type.elem_type for i in half.graph.input] == [TensorProto.INT64] * 2
    assert [o.type.tensor_type.elem_type for o in half.graph.output] == [TensorProto.FLOAT] * 2
    names = {t.name for t in half.graph.initializer}
    assert {"W1__fp16", "W_head__fp16"} <= names and not {"W1", "W_head"} & names
    assert sum(n.op_type == "Cast" and n.input[0] == "h3" for n in half.graph.node) == 1

    rng = np.random.default_rng(7)
    ids = rng.integers(1, VOCAB, size=(4, 12), dtype=np.int64)
    mask = (np.arange(12)[None, :] < np.array([12, 1, 6, 3])[:, None]).astype(np.int64)
    p32, e32 = run_ort(model, ids * mask, mask)
    p16, e16 = run_ort(half, ids * mask, mask)
    assert e16.shape == (4, width) and p16.dtype == np.float32
    cos = (e32 * e16).sum(axis=1) / np.linalg.norm(e32, axis=1) / np.linalg.norm(e16, axis=1)
    assert cos.min() > 0.999
    np.testing.assert_allclose(np.linalg.norm(e16, axis=1), 1.0, atol=1e-5)  # FP32 L2 norm
    np.testing.assert_allclose(p16, p32, atol=2e-2)
    assert (p16.argmax(axis=1) == p32.argmax(axis=1)).all()


def test_a_matmul_with_weights_beyond_fp16_stays_fp32() -> None:
    half, converted = fp16_graph(serving_graph(384, big_head=True))
    assert "head/MatMul" not in converted and len(converted) == 3
    assert "W_head" in {t.name for t in half.graph.initializer}
    onnx.checker.check_model(half)
