"""The build side without a GPU: `build_engine` against a fake `tensorrt` module, and the
ONNX-level pieces (autocast rewrite, FP32 policy on ONNX nodes) on a small serving graph
checked with onnxruntime."""

from __future__ import annotations

import contextlib
import enum
import json
import sys
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from engines.build.trt import builder as builder_mod
from engines.build.trt.autocast import matmuls_to_fp16
from engines.build.trt.precision import LayerInfo, fp32_layer_names, layers_from_onnx
from engines.trt.errors import TensorRTBuildError
from engines.trt.lib import CudaDevice
from engines.trt.meta import read_sidecar
from engines.types import EMBEDDING_DIM

H = EMBEDDING_DIM
VOCAB = 64
LABELS = 3


# --- a small serving graph in ONNX (same I/O contract as the real one) ----------------


def serving_graph(seed: int = 0, big_head: bool = False) -> onnx.ModelProto:
    """Embedding -> layer norm (decomposed) -> FFN -> one self-attention -> masked mean
    pooling -> L2 norm -> linear head -> softmax."""
    rng = np.random.default_rng(seed)

    def init(name: str, arr: npt.NDArray[Any]) -> TensorProto:
        return numpy_helper.from_array(arr, name)

    f32 = np.float32
    head = rng.normal(0, 3, (H, LABELS)).astype(f32)
    if big_head:
        head[0, 0] = 1e5  # beyond FP16's range
    inits = [
        init("W_emb", rng.normal(0, 1, (VOCAB, H)).astype(f32)),
        init("gamma", np.ones(H, f32)),
        init("beta", np.zeros(H, f32)),
        init("W1", rng.normal(0, 0.05, (H, H)).astype(f32)),
        init("b1", np.zeros(H, f32)),
        init("W_head", head),
        init("b_head", np.zeros(LABELS, f32)),
        init("ax_last", np.array([-1], np.int64)),
        init("ax_seq", np.array([1], np.int64)),
        init("two", np.array(2.0, f32)),
        init("eps", np.array(1e-12, f32)),
        init("scale", np.array(np.sqrt(H), f32)),
        init("tiny", np.array(1e-9, f32)),
    ]
    n = helper.make_node
    nodes = [
        n("Gather", ["W_emb", "input_ids"], ["x0"], name="emb/Gather"),
        n("ReduceMean", ["x0", "ax_last"], ["mu"], name="ln/ReduceMean"),
        n("Sub", ["x0", "mu"], ["xc"], name="ln/Sub"),
        n("Pow", ["xc", "two"], ["sq"], name="ln/Pow"),
        n("ReduceMean", ["sq", "ax_last"], ["var"], name="ln/ReduceMean_1"),
        n("Add", ["var", "eps"], ["ve"], name="ln/Add"),
        n("Sqrt", ["ve"], ["sd"], name="ln/Sqrt"),
        n("Div", ["xc", "sd"], ["xn"], name="ln/Div"),
        n("Mul", ["xn", "gamma"], ["xg"], name="ln/Mul"),
        n("Add", ["xg", "beta"], ["h"], name="ln/Add_1"),
        n("MatMul", ["h", "W1"], ["h1"], name="ffn/MatMul"),
        n("Add", ["h1", "b1"], ["h2"], name="ffn/Add"),
        n("Relu", ["h2"], ["h3"], name="ffn/Relu"),
        n("Transpose", ["h3"], ["h3t"], name="attn/Transpose", perm=[0, 2, 1]),
        n("MatMul", ["h3", "h3t"], ["scores"], name="attn/MatMul"),
        n("Div", ["scores", "scale"], ["scaled"], name="attn/Div"),
        n("Softmax", ["scaled"], ["att"], name="attn/Softmax", axis=-1),
        n("MatMul", ["att", "h3"], ["ctx"], name="attn/MatMul_1"),
        n("Cast", ["attention_mask"], ["maskf"], name="pool/Cast", to=TensorProto.FLOAT),
        n("Unsqueeze", ["maskf", "ax_last"], ["m3"], name="pool/Unsqueeze"),
        n("Mul", ["ctx", "m3"], ["mc"], name="pool/Mul"),
        n("ReduceSum", ["mc", "ax_seq"], ["summed"], name="pool/ReduceSum", keepdims=0),
        n("ReduceSum", ["m3", "ax_seq"], ["cnt"], name="pool/ReduceSum_1", keepdims=0),
        n("Max", ["cnt", "tiny"], ["cntc"], name="pool/Max"),
        n("Div", ["summed", "cntc"], ["pooled"], name="pool/Div"),
        n("Mul", ["pooled", "pooled"], ["p2"], name="l2/Mul"),
        n("ReduceSum", ["p2", "ax_last"], ["ss"], name="l2/ReduceSum", keepdims=1),
        n("Sqrt", ["ss"], ["norm"], name="l2/Sqrt"),
        n("Max", ["norm", "tiny"], ["nc"], name="l2/Max"),
        n("Div", ["pooled", "nc"], ["embedding"], name="l2/Div"),
        n("MatMul", ["embedding", "W_head"], ["lg0"], name="head/MatMul"),
        n("Add", ["lg0", "b_head"], ["logits"], name="head/Add"),
        n("Softmax", ["logits"], ["probs"], name="head/Softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "serving",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", LABELS]),
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", H]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def run_ort(model: onnx.ModelProto, ids: Any, mask: Any) -> tuple[Any, Any]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    probs, emb = sess.run(["probs", "embedding"], {"input_ids": ids, "attention_mask": mask})
    return probs, emb


def tokens(batch: int = 4, seq: int = 12) -> tuple[Any, Any]:
    rng = np.random.default_rng(7)
    ids = rng.integers(1, VOCAB, size=(batch, seq), dtype=np.int64)
    lengths = np.array([seq, 1, seq // 2, 3][:batch])
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    return ids * mask, mask


def elem_types(model: onnx.ModelProto) -> dict[str, int]:
    g = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph
    out = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.value_info, *g.output]}
    out.update({t.name: t.data_type for t in g.initializer})
    return out


MATMULS = ("ffn/MatMul", "attn/MatMul", "attn/MatMul_1", "head/MatMul")


def test_autocast_puts_every_matmul_in_fp16_and_keeps_the_rest_fp32() -> None:
    model = serving_graph()
    before = model.SerializeToString()
    half, report = matmuls_to_fp16(model)
    assert model.SerializeToString() == before  # the input is not changed
    assert report.converted == MATMULS and report.kept_fp32 == () and report.unmatched == ()
    onnx.checker.check_model(half, full_check=True)
    types_ = elem_types(half)
    for node in half.graph.node:
        if node.op_type == "MatMul":
            assert all(types_[t] == TensorProto.FLOAT16 for t in node.input), node.name
        elif node.op_type in ("Softmax", "ReduceMean", "ReduceSum", "Pow", "Sqrt", "Div"):
            assert all(types_[t] == TensorProto.FLOAT for t in node.output), node.name
    assert {i.name: i.type.tensor_type.elem_type for i in half.graph.input} == {
        "input_ids": TensorProto.INT64,
        "attention_mask": TensorProto.INT64,
    }
    assert [o.type.tensor_type.elem_type for o in half.graph.output] == [TensorProto.FLOAT] * 2
    names = {t.name for t in half.graph.initializer}
    assert {"W1__fp16", "W_head__fp16"} <= names and not {"W1", "W_head"} & names
    # the activation shared by two MatMuls is cast once
    assert sum(n.op_type == "Cast" and n.input[0] == "h3" for n in half.graph.node) == 1

    ids, mask = tokens()
    p32, e32 = run_ort(model, ids, mask)
    p16, e16 = run_ort(half, ids, mask)
    assert p16.dtype == np.float32 and e16.dtype == np.float32
    cos = (e32 * e16).sum(axis=1) / np.linalg.norm(e32, axis=1) / np.linalg.norm(e16, axis=1)
    assert cos.min() > 0.999
    np.testing.assert_allclose(p16, p32, atol=2e-2)
    assert (p16.argmax(axis=1) == p32.argmax(axis=1)).all()


def test_autocast_keeps_named_and_out_of_range_matmuls_fp32() -> None:
    half, report = matmuls_to_fp16(serving_graph(), keep_fp32=["attn/MatMul", "nope"])
    assert "attn/MatMul" in report.kept_fp32 and "attn/MatMul" not in report.converted
    assert report.unmatched == ("nope",)
    _, report = matmuls_to_fp16(serving_graph(big_head=True))
    assert report.kept_fp32 == ("head/MatMul",)
    onnx.checker.check_model(half)


def test_fp32_policy_on_the_onnx_serving_graph() -> None:
    layers = layers_from_onnx(serving_graph())
    assert len(layers) == 33 and layers[0] == LayerInfo(
        "emb/Gather", "Gather", None, ("W_emb", "input_ids"), ("x0",), ("FLOAT",)
    )
    pinned = set(fp32_layer_names(layers).fp32_layers)
    must = {
        "ln/ReduceMean", "ln/Sub", "ln/Pow", "ln/ReduceMean_1", "ln/Add", "ln/Sqrt", "ln/Div",
        "attn/Div", "attn/Softmax", "pool/ReduceSum", "pool/ReduceSum_1", "pool/Max",
        "pool/Div", "l2/Mul", "l2/ReduceSum", "l2/Sqrt", "l2/Max", "l2/Div", "head/Softmax",
    }  # fmt: skip
    assert must <= pinned
    assert not pinned & {*MATMULS, "ffn/Relu", "pool/Cast", "ln/Mul", "emb/Gather"}


# --- build_engine against a fake tensorrt ---------------------------------------------


class LayerType(enum.Enum):
    GATHER = 0
    REDUCE = 1
    ELEMENTWISE = 2
    UNARY = 3
    MATRIX_MULTIPLY = 4
    SOFTMAX = 5
    CONSTANT = 6
    SHAPE = 7


class Op(enum.Enum):
    SUM = 0
    SUB = 1
    POW = 2
    DIV = 3
    AVG = 4
    SQRT = 5
    PROD = 6


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT64 = 8


class Severity(enum.Enum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class FakeTensor:
    def __init__(self, name: str, dtype: DataType = DataType.FLOAT) -> None:
        self.name, self.dtype = name, dtype


class FakeLayer:
    def __init__(self, info: LayerInfo, tensors: dict[str, FakeTensor]) -> None:
        self.name = info.name
        self.type = LayerType[info.type]
        self.op = Op[info.op] if info.op else None
        self._in = [tensors.setdefault(t, FakeTensor(t)) for t in info.inputs]
        self._out = [
            tensors.setdefault(t, FakeTensor(t, DataType[d]))
            for t, d in zip(info.outputs, info.output_dtypes or ["FLOAT"], strict=True)
        ]
        self.precision: Any = None
        self.output_types: dict[int, Any] = {}

    @property
    def num_inputs(self) -> int:
        return len(self._in) + 1  # one optional input left unset, as TensorRT reports it

    def get_input(self, j: int) -> FakeTensor | None:
        return self._in[j] if j < len(self._in) else None

    @property
    def num_outputs(self) -> int:
        return len(self._out)

    def get_output(self, j: int) -> FakeTensor:
        return self._out[j]

    def set_output_type(self, j: int, dtype: Any) -> None:
        self.output_types[j] = dtype


def info(
    name: str, t: str, op: str | None, ins: Sequence[str], out: str, dt: str = "FLOAT"
) -> LayerInfo:
    return LayerInfo(name, t, op, tuple(ins), (out,), (dt,))


NETWORK = [
    info("emb/Gather", "GATHER", None, ["input_ids"], "x0"),
    info("ln/ReduceMean", "REDUCE", "AVG", ["x0"], "mu"),
    info("ln/Sub", "ELEMENTWISE", "SUB", ["x0", "mu"], "xc"),
    info("ln/Pow", "ELEMENTWISE", "POW", ["xc"], "sq"),
    info("ln/ReduceMean_1", "REDUCE", "AVG", ["sq"], "var"),
    info("ln/Add", "ELEMENTWISE", "SUM", ["var"], "ve"),
    info("ln/Sqrt", "UNARY", "SQRT", ["ve"], "sd"),
    info("ln/Div", "ELEMENTWISE", "DIV", ["xc", "sd"], "h"),
    info("shape/Shape", "SHAPE", None, ["h"], "shp", dt="INT64"),
    info("ffn/MatMul", "MATRIX_MULTIPLY", None, ["h"], "embedding"),
    info("head/MatMul", "MATRIX_MULTIPLY", None, ["embedding", "attention_mask"], "logits"),
    info("head/Softmax", "SOFTMAX", None, ["logits"], "probs"),
]


class FakeTRT:
    """Builds the fake `tensorrt` module and records what the builder did with it."""

    def __init__(self, *, weak_flags: bool = True, parse_ok: bool = True, build_ok: bool = True):
        self.events: list[tuple[Any, ...]] = []
        self.networks: list[Any] = []
        fake = self
        tensors: dict[str, FakeTensor] = {}

        class ILogger:
            Severity = Severity

            def __init__(self) -> None:
                pass

        class Network:
            def __init__(self, flags: int) -> None:
                self.flags = flags
                self.layers = [FakeLayer(i, tensors) for i in NETWORK]
                self.inputs = [tensors["input_ids"], tensors["attention_mask"]]
                self.outputs = [tensors["probs"], tensors["embedding"]]
                fake.networks.append(self)

            num_layers = property(lambda self: len(self.layers))
            num_inputs = property(lambda self: len(self.inputs))
            num_outputs = property(lambda self: len(self.outputs))

            def get_layer(self, i: int) -> FakeLayer:
                return self.layers[i]

            def get_input(self, i: int) -> FakeTensor:
                return self.inputs[i]

            def get_output(self, i: int) -> FakeTensor:
                return self.outputs[i]

        class OnnxParser:
            def __init__(self, network: Network, logger: Any) -> None:
                self.num_errors = 0 if parse_ok else 1

            def parse_from_file(self, path: str) -> bool:
                fake.events.append(("parse_from_file", path))
                return parse_ok

            def parse(self, data: bytes, path: str) -> bool:
                fake.events.append(("parse", data, path))
                return parse_ok

            def get_error(self, i: int) -> str:
                return "In node 3 (Foo): UNSUPPORTED_NODE"

        class Profile:
            def set_shape(self, name: str, lo: Any, opt: Any, hi: Any) -> None:
                fake.events.append(("set_shape", name, lo, opt, hi))

        class Config:
            def set_memory_pool_limit(self, pool: Any, size: int) -> None:
                fake.events.append(("pool", pool, size))

            def set_flag(self, flag: Any) -> None:
                fake.events.append(("flag", flag.name))

            def add_optimization_profile(self, profile: Profile) -> None:
                fake.events.append(("add_profile",))

        class Builder:
            def __init__(self, logger: Any) -> None:
                self.logger = logger

            def create_network(self, flags: int) -> Network:
                return Network(flags)

            def create_builder_config(self) -> Config:
                return Config()

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network: Network, config: Config) -> Any:
                fake.events.append(("build",))
                if not build_ok:
                    self.logger.log(Severity.ERROR, "out of device memory")
                    return None
                return memoryview(b"PLAN" * 8)

        flag_names = ["FP16", "OBEY_PRECISION_CONSTRAINTS"] if weak_flags else ["TF32"]
        module = types.ModuleType("tensorrt")
        module.__dict__.update(
            __version__="10.13.0.35" if weak_flags else "11.4.0.1",
            ILogger=ILogger,
            Builder=Builder,
            OnnxParser=OnnxParser,
            NetworkDefinitionCreationFlag=enum.IntEnum("NDCF", {"STRONGLY_TYPED": 1}),
            BuilderFlag=enum.Enum("BuilderFlag", flag_names),
            MemoryPoolType=enum.Enum("MemoryPoolType", ["WORKSPACE"]),
            float32=DataType.FLOAT,
            IElementWiseLayer=FakeLayer,
            IUnaryLayer=FakeLayer,
            IReduceLayer=FakeLayer,
        )
        self.module = module


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    import torch

    device = CudaDevice(0, "Fake H100", (9, 0))
    monkeypatch.setattr(builder_mod, "cuda_device", lambda index=0: device)
    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
    yield


def install(monkeypatch: pytest.MonkeyPatch, **kwargs: Any) -> FakeTRT:
    fake = FakeTRT(**kwargs)
    monkeypatch.setitem(sys.modules, "tensorrt", fake.module)
    return fake


@pytest.fixture
def onnx_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save(serving_graph(), str(path))
    return path


@pytest.mark.usefixtures("fake_gpu")
def test_weakly_typed_fp16_build_pins_layers_and_writes_plan_and_sidecar(
    tmp_path: Path, onnx_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = install(monkeypatch)
    said: list[str] = []
    out = tmp_path / "engines" / "model.plan"
    info = builder_mod.build_engine(
        onnx_file, out, max_batch=16, max_seq=128, seq_buckets=(32,), progress=said.append
    )
    (network,) = fake.networks
    assert network.flags == 0
    assert fake.events[0] == ("parse_from_file", str(onnx_file))
    assert ("pool", fake.module.MemoryPoolType.WORKSPACE, 4 << 30) in fake.events
    shapes = [e for e in fake.events if e[0] == "set_shape"]
    assert shapes == [
        ("set_shape", "input_ids", (1, 1), (16, 32), (16, 32)),
        ("set_shape", "attention_mask", (1, 1), (16, 32), (16, 32)),
        ("set_shape", "input_ids", (1, 33), (16, 128), (16, 128)),
        ("set_shape", "attention_mask", (1, 33), (16, 128), (16, 128)),
    ]
    assert fake.events.count(("add_profile",)) == 2
    flags = [e[1] for e in fake.events if e[0] == "flag"]
    assert flags == ["FP16", "OBEY_PRECISION_CONSTRAINTS"]
    assert fake.events[-1] == ("build",)

    pinned = {ly.name for ly in network.layers if ly.precision is not None}
    assert pinned == {
        "ln/ReduceMean", "ln/Sub", "ln/Pow", "ln/ReduceMean_1", "ln/Add", "ln/Sqrt",
        "ln/Div", "head/Softmax",
    }  # fmt: skip
    for layer in network.layers:
        if layer.name in pinned:
            assert layer.precision is DataType.FLOAT and layer.output_types == {0: DataType.FLOAT}
        else:
            assert layer.output_types == {}
    assert info.fp32_layers == tuple(ly.name for ly in network.layers if ly.name in pinned)

    assert out.read_bytes() == b"PLAN" * 8
    assert info.plan_bytes == 32 and info.precision == "fp16" and not info.strongly_typed
    assert (info.gpu_name, info.compute_capability) == ("Fake H100", (9, 0))
    assert info.tensorrt_version == "10.13.0.35"
    assert read_sidecar(out) == info
    data = json.loads((tmp_path / "engines" / "model.plan.json").read_text())
    assert data["profiles"][1] == {"index": 1, "min": [1, 33], "opt": [16, 128], "max": [16, 128]}
    assert data["fp32_layers"] == list(info.fp32_layers)
    assert any("pinned to fp32" in m for m in said) and said[-1].startswith("wrote ")


@pytest.mark.usefixtures("fake_gpu")
def test_weak_build_adds_caller_layers_and_rejects_unknown_ones(
    tmp_path: Path, onnx_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = install(monkeypatch)
    info = builder_mod.build_engine(
        onnx_file, tmp_path / "m.plan", max_batch=2, max_seq=8, fp32_layers=["ffn/MatMul"]
    )
    assert "ffn/MatMul" in info.fp32_layers
    assert fake.networks[0].layers[9].precision is DataType.FLOAT
    with pytest.raises(TensorRTBuildError, match="name no layer of the network"):
        builder_mod.build_engine(
            onnx_file, tmp_path / "m.plan", max_batch=2, max_seq=8, fp32_layers=["typo"]
        )


@pytest.mark.usefixtures("fake_gpu")
def test_fp32_build_sets_no_precision_flags(
    tmp_path: Path, onnx_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = install(monkeypatch)
    info = builder_mod.build_engine(
        onnx_file, tmp_path / "m.plan", max_batch=2, max_seq=8, fp16=False
    )
    assert [e for e in fake.events if e[0] == "flag"] == []
    assert info.precision == "fp32" and info.fp32_layers == ()
    assert all(ly.precision is None for ly in fake.networks[0].layers)


@pytest.mark.usefixtures("fake_gpu")
def test_strongly_typed_build_parses_the_autocast_graph(
    tmp_path: Path, onnx_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = install(monkeypatch, weak_flags=False)  # TensorRT 11: no BuilderFlag.FP16
    info = builder_mod.build_engine(
        onnx_file, tmp_path / "m.plan", max_batch=2, max_seq=8, fp32_layers=["head/MatMul"]
    )
    assert fake.networks[0].flags == 1 << 1
    (parse,) = [e for e in fake.events if e[0] == "parse"]
    parsed = onnx.load_from_string(parse[1])
    matmul_inputs = {n.name: list(n.input) for n in parsed.graph.node if n.op_type == "MatMul"}
    assert matmul_inputs["ffn/MatMul"] == ["h__fp16", "W1__fp16"]
    assert matmul_inputs["head/MatMul"] == ["embedding", "W_head"]  # kept fp32 as asked
    assert [e for e in fake.events if e[0] == "flag"] == []
    assert all(ly.precision is None for ly in fake.networks[0].layers)
    assert info.strongly_typed and info.fp32_layers == ("head/MatMul",)
    with pytest.raises(TensorRTBuildError, match="strongly_typed=True"):
        builder_mod.build_engine(
            onnx_file, tmp_path / "m.plan", max_batch=2, max_seq=8, strongly_typed=False
        )


@pytest.mark.usefixtures("fake_gpu")
def test_parse_and_build_failures_are_typed_with_the_library_message(
    tmp_path: Path, onnx_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install(monkeypatch, parse_ok=False)
    with pytest.raises(TensorRTBuildError, match=r"cannot parse model\.onnx: In node 3"):
        builder_mod.build_engine(onnx_file, tmp_path / "m.plan", max_batch=2, max_seq=8)
    install(monkeypatch, build_ok=False)
    with pytest.raises(
        TensorRTBuildError, match=r"could not build model\.onnx: out of device memory"
    ):
        builder_mod.build_engine(onnx_file, tmp_path / "m.plan", max_batch=2, max_seq=8)
    assert not (tmp_path / "m.plan").exists()


@pytest.mark.slow
def test_policy_and_autocast_on_an_exported_bert_like_graph(tmp_path: Path) -> None:
    """The torch.onnx (dynamo) export of the tiny serving model: Gemm and MatMul nodes,
    fused LayerNormalization, ReduceL2; what the GPU tests build engines from."""
    import torch

    from engines.build.trt.testing import TinyServingModel, export_tiny_onnx

    model = onnx.load(str(export_tiny_onnx(tmp_path / "tiny.onnx")))
    ops = {n.name: n.op_type for n in model.graph.node}
    plan = fp32_layer_names(layers_from_onnx(model))
    pinned_ops = {ops[name] for name in plan.fp32_layers}
    assert {"LayerNormalization", "Softmax", "ReduceL2", "ReduceSum", "Div"} <= pinned_ops
    assert not pinned_ops & {"MatMul", "Gemm", "Cast", "Erf"}
    for name, op in ops.items():
        if op in ("LayerNormalization", "Softmax"):
            assert name in plan.fp32_layers

    half, report = matmuls_to_fp16(model)
    assert len(report.converted) == sum(op in ("MatMul", "Gemm") for op in ops.values())
    rng = np.random.default_rng(5)
    ids = rng.integers(1, 1000, size=(16, 48), dtype=np.int64)
    mask = (np.arange(48)[None, :] < rng.integers(1, 49, size=16)[:, None]).astype(np.int64)
    p32, e32 = run_ort(model, ids, mask)
    p16, e16 = run_ort(half, ids, mask)
    with torch.no_grad():
        tp, te = TinyServingModel()(torch.from_numpy(ids), torch.from_numpy(mask))
    np.testing.assert_allclose(p32, tp.numpy(), atol=1e-4)
    np.testing.assert_allclose(e32, te.numpy(), atol=1e-4)
    assert (p16.argmax(axis=1) == p32.argmax(axis=1)).all()
    cos = (e16 * e32).sum(axis=1) / np.linalg.norm(e16, axis=1) / np.linalg.norm(e32, axis=1)
    assert cos.min() > 0.999
