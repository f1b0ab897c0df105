"""The TensorRT backend up to the library boundary: runs without tensorrt or a GPU.

Pure decisions (profiles, shape checks, dtypes, output shapes, I/O contract, FP32 policy,
sidecar checks) are tested directly; `TensorRTBackend` is driven through a fake engine and
context of our own plus host-memory `DeviceBuffers`, so the binding sequence (profile,
shapes, addresses, execute, copies back) is asserted call by call.
"""

from __future__ import annotations

import contextlib
import enum
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from engines.backends.base import Backend
from engines.backends.tensorrt import TensorRTBackend
from engines.build.trt.builder import build_engine, check_network_io, choose_strongly_typed
from engines.build.trt.precision import LayerInfo, fp32_layer_names, overflow_layers
from engines.errors import BackendUnavailable, EngineError, EngineLoadError
from engines.trt import profiles as P
from engines.trt.bindings import TensorSpec, check_io, to_input_dtype
from engines.trt.errors import (
    INSTALL_HINT,
    ShapeError,
    TensorRTBuildError,
    TensorRTLoadError,
    TensorRTRuntimeError,
    TensorRTUnavailable,
)
from engines.trt.lib import NO_CUDA_HINT, LogSink, capture_errors, forward_log, shared_logger
from engines.trt.meta import BuildInfo, check_compatible, read_sidecar, sidecar_path, write_sidecar
from engines.types import EMBEDDING_DIM

# --- profiles -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_batch", "max_seq", "buckets"),
    [(1, 1, ()), (8, 64, ()), (32, 256, (64,)), (16, 512, (32, 128, 512)), (4, 10, (1, 2, 3))],
)
def test_profiles_cover_every_batch_and_sequence_exactly_once(
    max_batch: int, max_seq: int, buckets: tuple[int, ...]
) -> None:
    profiles = P.make_profiles(max_batch, max_seq, seq_buckets=buckets)
    assert [p.index for p in profiles] == list(range(len(profiles)))
    assert P.max_shape(profiles) == (max_batch, max_seq)
    for batch in range(1, max_batch + 1):
        for seq in range(1, max_seq + 1):
            covering = [p for p in profiles if p.covers(batch, seq)]
            assert len(covering) == 1, (batch, seq)
            assert P.select_profile(profiles, batch, seq) == covering[0].index
    for p in profiles:
        mn, opt, mx = p.input_shapes()
        assert mn <= opt <= mx
        assert (mn[0], mx[0]) == (1, max_batch)


def test_seq_buckets_split_the_sequence_axis() -> None:
    short, long_ = P.make_profiles(8, 256, seq_buckets=(64,), opt_batch=4)
    assert short.input_shapes() == ((1, 1), (4, 64), (8, 64))
    assert long_.input_shapes() == ((1, 65), (4, 256), (8, 256))
    assert P.select_profile((short, long_), 8, 64) == 0
    assert P.select_profile((short, long_), 1, 65) == 1
    assert short.to_json() == {"index": 0, "min": [1, 1], "opt": [4, 64], "max": [8, 64]}


def test_select_profile_prefers_the_tightest_of_nested_profiles() -> None:
    wide = P.Profile(0, 1, 8, 8, 1, 256, 256)
    narrow = P.Profile(1, 1, 8, 8, 1, 32, 32)
    assert P.select_profile((wide, narrow), 3, 20) == 1
    assert P.select_profile((wide, narrow), 3, 33) == 0
    with pytest.raises(ShapeError, match="no optimization profile covers batch=9"):
        P.select_profile((wide, narrow), 9, 20)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch": 0, "max_seq": 8}, "max_batch must be >= 1"),
        ({"max_batch": 8, "max_seq": 0}, "max_seq must be >= 1"),
        ({"max_batch": 8, "max_seq": 64, "seq_buckets": (32, 16)}, "strictly increasing"),
        ({"max_batch": 8, "max_seq": 64, "seq_buckets": (128,)}, "must lie in 1..64"),
        ({"max_batch": 8, "max_seq": 64, "opt_batch": 9}, "opt_batch must be in 1..8"),
    ],
)
def test_make_profiles_rejects_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        P.make_profiles(**kwargs)


def test_check_request_accepts_the_limits_and_names_them_when_exceeded() -> None:
    assert P.check_request((8, 64), (8, 64), max_batch=8, max_seq=64) == (8, 64)
    assert P.check_request((1, 1), (1, 1), max_batch=8, max_seq=64) == (1, 1)
    with pytest.raises(ShapeError, match=r"batch 9 exceeds the engine's max_batch 8"):
        P.check_request((9, 10), (9, 10), max_batch=8, max_seq=64)
    with pytest.raises(ShapeError, match=r"sequence length 65 exceeds the engine's max_seq 64"):
        P.check_request((2, 65), (2, 65), max_batch=8, max_seq=64)
    with pytest.raises(ShapeError, match="differ in shape"):
        P.check_request((2, 10), (2, 11), max_batch=8, max_seq=64)
    with pytest.raises(ShapeError, match="must be 2-D"):
        P.check_request((10,), (10,), max_batch=8, max_seq=64)
    with pytest.raises(ShapeError, match="empty request"):
        P.check_request((0, 10), (0, 10), max_batch=8, max_seq=64)
    assert issubclass(ShapeError, ValueError) and issubclass(ShapeError, EngineError)


def test_profiles_from_engine_reads_back_and_checks_both_inputs() -> None:
    shapes = {n: ((1, 1), (4, 32), (8, 32)) for n in P.INPUT_NAMES}
    (profile,) = P.profiles_from_engine([shapes])
    assert profile == P.Profile(0, 1, 4, 8, 1, 32, 32)
    bad = dict(shapes, attention_mask=((1, 1), (4, 32), (8, 64)))
    with pytest.raises(TensorRTLoadError, match="ranges differ"):
        P.profiles_from_engine([bad])
    with pytest.raises(TensorRTLoadError, match="no optimization profile"):
        P.profiles_from_engine([])


class FakeDataType(enum.Enum):  # the member names TensorRT's DataType has
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8
    INT4 = 9
    FP4 = 10


class FakeSeverity(enum.Enum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class FakeIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


def test_dtype_table_maps_tensorrt_names_to_numpy_and_torch() -> None:
    import torch

    assert P.dtype_name(FakeDataType.HALF) == "HALF"
    assert P.dtype_name("DataType.INT64") == "INT64"  # str() form, when no .name
    assert P.enum_name(FakeIOMode.INPUT) == "INPUT"
    expected = {
        "FLOAT": (np.float32, torch.float32),
        "HALF": (np.float16, torch.float16),
        "INT32": (np.int32, torch.int32),
        "INT64": (np.int64, torch.int64),
        "INT8": (np.int8, torch.int8),
        "UINT8": (np.uint8, torch.uint8),
        "BOOL": (np.bool_, torch.bool),
    }
    for name, (np_type, torch_type) in expected.items():
        assert P.numpy_dtype(name) == np.dtype(np_type)
        assert P.torch_dtype(name) is torch_type
        assert P.DTYPES[name].itemsize == np.dtype(np_type).itemsize
    assert P.torch_dtype("BF16") is torch.bfloat16
    with pytest.raises(TensorRTLoadError, match="no numpy equivalent"):
        P.numpy_dtype("BF16")
    with pytest.raises(TensorRTLoadError, match="unknown TensorRT dtype"):
        P.numpy_dtype("COMPLEX")
    assert {m.name for m in FakeDataType} <= set(P.DTYPES)


def test_output_shapes_follow_the_serving_contract() -> None:
    assert P.output_shape("probs", 5, 3) == (5, 3)
    assert P.output_shape("embedding", 5, 3) == (5, EMBEDDING_DIM)
    with pytest.raises(ValueError, match="unknown output"):
        P.output_shape("logits", 5, 3)


# --- I/O contract ---------------------------------------------------------------------


def specs(
    ids: str = "INT64", probs: str = "FLOAT", emb: str = "FLOAT", labels: int = 3
) -> list[TensorSpec]:
    return [
        TensorSpec("probs", False, probs, (-1, labels)),
        TensorSpec("input_ids", True, ids, (-1, -1)),
        TensorSpec("embedding", False, emb, (-1, EMBEDDING_DIM)),
        TensorSpec("attention_mask", True, ids, (-1, -1)),
    ]


def test_check_io_orders_tensors_by_contract_and_reads_num_labels() -> None:
    layout = check_io(specs(ids="INT32", emb="HALF", labels=5))
    assert [s.name for s in layout.tensors] == [
        "input_ids",
        "attention_mask",
        "probs",
        "embedding",
    ]
    assert layout.num_labels == 5
    assert layout.buffer_shapes(8, 64) == {
        "input_ids": (8, 64),
        "attention_mask": (8, 64),
        "probs": (8, 5),
        "embedding": (8, EMBEDDING_DIM),
    }
    assert layout.output_shapes(2) == {"probs": (2, 5), "embedding": (2, EMBEDDING_DIM)}


def test_check_io_names_every_difference() -> None:
    wrong = [s for s in specs() if s.name != "embedding"]
    with pytest.raises(TensorRTLoadError, match=r"outputs are \['probs'\]"):
        check_io(wrong)
    bad = specs(ids="FLOAT", emb="BF16")
    bad[2] = TensorSpec("embedding", False, "BF16", (-1, 768))
    with pytest.raises(TensorRTLoadError) as info:
        check_io(bad)
    text = str(info.value)
    assert "input_ids is FLOAT" in text and "embedding is BF16" in text
    assert "embedding width is 768" in text
    with pytest.raises(TensorRTLoadError, match="probs width must be static"):
        check_io(specs(labels=-1))


def test_inputs_are_converted_to_the_declared_dtype_with_a_range_check() -> None:
    ids = np.array([[101, 2023, 102]], dtype=np.int64)
    as32 = to_input_dtype(ids, "INT32")
    assert as32.dtype == np.int32 and as32.flags.c_contiguous
    np.testing.assert_array_equal(as32, ids)
    assert to_input_dtype(ids, "INT64").dtype == np.int64
    with pytest.raises(ShapeError, match="do not fit the engine's int32 inputs"):
        to_input_dtype(np.array([[2**31]], dtype=np.int64), "INT32")
    with pytest.raises(ShapeError, match="must hold integers"):
        to_input_dtype(np.zeros((1, 3), dtype=np.float32), "INT64")


def test_network_io_check_for_the_builder() -> None:
    check_network_io(["attention_mask", "input_ids"], ["embedding", "probs"])
    with pytest.raises(TensorRTBuildError, match="needs inputs"):
        check_network_io(["input_ids"], ["probs", "embedding"])


# --- FP32 precision policy ------------------------------------------------------------


def L(
    name: str,
    type_: str,
    op: str | None,
    ins: Sequence[str],
    outs: Sequence[str],
    dt: str = "FLOAT",
) -> LayerInfo:
    return LayerInfo(name, type_, op, tuple(ins), tuple(outs), tuple(dt for _ in outs))


# A BERT-ish network as TensorRT's parser lays it out (decomposed layer norm, attention
# softmax, masked mean pooling, L2 norm, head softmax) plus int64 shape arithmetic.
SYNTHETIC = [
    L("emb/Gather", "GATHER", None, ["input_ids", "W_emb"], ["x0"]),
    L("ln/ReduceMean", "REDUCE", "AVG", ["x0"], ["mu"]),
    L("ln/Sub", "ELEMENTWISE", "SUB", ["x0", "mu"], ["xc"]),
    L("ln/Pow", "ELEMENTWISE", "POW", ["xc", "two"], ["sq"]),
    L("ln/two", "CONSTANT", None, [], ["two"]),
    L("ln/ReduceMean_1", "REDUCE", "AVG", ["sq"], ["var"]),
    L("ln/eps", "CONSTANT", None, [], ["eps"]),
    L("ln/Add", "ELEMENTWISE", "SUM", ["var", "eps"], ["ve"]),
    L("ln/Sqrt", "UNARY", "SQRT", ["ve"], ["sd"]),
    L("ln/Div", "ELEMENTWISE", "DIV", ["xc", "sd"], ["xn"]),
    L("ln/Mul", "ELEMENTWISE", "PROD", ["xn", "gamma"], ["xg"]),
    L("ln/Add_1", "ELEMENTWISE", "SUM", ["xg", "beta"], ["h"]),
    L("attn/MatMul", "MATRIX_MULTIPLY", None, ["h", "h"], ["scores"]),
    L("attn/Div", "ELEMENTWISE", "DIV", ["scores", "scale"], ["scaled"]),
    L("attn/Add", "ELEMENTWISE", "SUM", ["scaled", "maskbias"], ["masked"]),
    L("attn/Softmax", "SOFTMAX", None, ["masked"], ["attn"]),
    L("attn/MatMul_1", "MATRIX_MULTIPLY", None, ["attn", "h"], ["ctx"]),
    L("ffn/Gelu", "ACTIVATION", "GELU_ERF", ["ctx"], ["act"]),
    L("shape/Shape", "SHAPE", None, ["act"], ["shp"], dt="INT64"),
    L("shape/ReduceSum", "REDUCE", "SUM", ["shp"], ["n"], dt="INT64"),
    L("pool/Mul", "ELEMENTWISE", "PROD", ["act", "maskf"], ["masked_act"]),
    L("pool/ReduceSum", "REDUCE", "SUM", ["masked_act"], ["summed"]),
    L("pool/Div", "ELEMENTWISE", "DIV", ["summed", "count"], ["pooled"]),
    L("l2/Mul", "ELEMENTWISE", "PROD", ["pooled", "pooled"], ["p2"]),
    L("l2/ReduceSum", "REDUCE", "SUM", ["p2"], ["ss"]),
    L("l2/Sqrt", "UNARY", "SQRT", ["ss"], ["norm"]),
    L("l2/Max", "ELEMENTWISE", "MAX", ["norm", "tiny"], ["clamped"]),
    L("l2/Expand", "SLICE", None, ["clamped"], ["clamped_b"]),
    L("l2/Div", "ELEMENTWISE", "DIV", ["pooled", "clamped_b"], ["embedding"]),
    L("head/MatMul", "MATRIX_MULTIPLY", None, ["embedding", "W_head"], ["logits0"]),
    L("head/Add", "ELEMENTWISE", "SUM", ["logits0", "b_head"], ["logits"]),
    L("head/Softmax", "SOFTMAX", None, ["logits"], ["probs"]),
]


def test_fp32_policy_pins_softmax_layernorm_pooling_and_l2_norm() -> None:
    plan = fp32_layer_names(SYNTHETIC)
    pinned = set(plan.fp32_layers)
    assert pinned == {
        # layer normalisation: the whole chain
        "ln/ReduceMean", "ln/Sub", "ln/Pow", "ln/ReduceMean_1", "ln/Add", "ln/Sqrt", "ln/Div",
        # attention: scale, mask bias and softmax
        "attn/Div", "attn/Add", "attn/Softmax",
        # mean pooling and the L2 norm (the eps clamp and its broadcast between Sqrt and Div)
        "pool/ReduceSum", "pool/Div", "l2/ReduceSum", "l2/Sqrt", "l2/Max", "l2/Expand",
        "l2/Div", "l2/Mul",
        # the classification head's softmax
        "head/Softmax",
    }  # fmt: skip
    # FP16 keeps the matrix multiplications, the residual/affine part and int64 shape math
    for name in ("attn/MatMul", "attn/MatMul_1", "head/MatMul", "ln/Mul", "ln/Add_1", "pool/Mul"):
        assert name not in pinned
    assert not pinned & {"shape/ReduceSum", "shape/Shape", "ln/two", "ln/eps"}
    assert list(plan.fp32_layers) == [ly.name for ly in SYNTHETIC if ly.name in pinned]
    assert plan.reasons["ln/Sub"] == "between fp32 layers"
    assert plan.reasons["ln/Pow"] == "elementwise pow in fp32"
    assert plan.reasons["head/Softmax"] == "softmax in fp32"
    assert plan.unmatched == ()


def test_fp32_policy_never_pins_casts_and_a_cast_ends_a_bridge() -> None:
    layers = [
        L("r", "REDUCE", "AVG", ["x"], ["a"]),
        L("c", "CAST", None, ["a"], ["b"]),
        L("s", "UNARY", "SQRT", ["b"], ["y"]),
        L("r2", "REDUCE", "SUM", ["y"], ["z"]),
        L("i", "IDENTITY", None, ["z"], ["w"]),
        L("d", "ELEMENTWISE", "DIV", ["w", "y"], ["out"]),
    ]
    assert fp32_layer_names(layers).fp32_layers == ("r", "s", "r2", "d")


def test_fp32_policy_adds_caller_names_and_reports_unknown_ones() -> None:
    layers = [*SYNTHETIC, L("ffn/MatMul_2", "MATRIX_MULTIPLY", None, ["act"], ["y"])]
    plan = fp32_layer_names(layers, ["attn/MatMul", "ffn/MatMul", "no/such/layer"])
    assert "attn/MatMul" in plan.fp32_layers
    assert "ffn/MatMul_2" in plan.fp32_layers  # a layer TensorRT derived from node ffn/MatMul
    assert plan.reasons["attn/MatMul"] == "requested (fp16 parity check)"
    assert plan.unmatched == ("no/such/layer",)


def test_fp32_policy_speaks_onnx_op_types_too() -> None:
    nodes = [
        LayerInfo("n0", "LayerNormalization"),
        LayerInfo("n1", "MatMul"),
        LayerInfo("n2", "Softmax"),
        LayerInfo("n3", "ReduceL2"),
        LayerInfo("n4", "Sqrt"),
        LayerInfo("n5", "Gelu"),
        LayerInfo("n6", "ReduceSum", output_dtypes=("INT64",)),
    ]
    assert fp32_layer_names(nodes).fp32_layers == ("n0", "n2", "n3", "n4")
    assert fp32_layer_names(SYNTHETIC, max_gap=0).reasons.get("ln/Sub") is None


def test_overflow_layers_flags_activations_beyond_fp16() -> None:
    stats = {"a": 1e3, "b": 7e4, "c": -7e4, "d": float("nan"), "e": 40000.0}
    assert overflow_layers(stats) == ["b", "c", "d"]
    assert overflow_layers(stats, headroom=2.0) == ["b", "c", "d", "e"]
    with pytest.raises(ValueError):
        overflow_layers(stats, headroom=0.5)


# --- library missing: one-line typed errors -------------------------------------------


@pytest.fixture
def no_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` -> ImportError


@pytest.mark.usefixtures("no_tensorrt")
def test_build_engine_without_tensorrt_raises_one_line_unavailable(tmp_path: Path) -> None:
    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(b"\x08\x07")
    with pytest.raises(TensorRTUnavailable) as info:
        build_engine(onnx_path, tmp_path / "model.plan", max_batch=8, max_seq=64)
    assert str(info.value) == (
        "tensorrt is not installed: pip install 'inflow[gpu]' on a host with an NVIDIA GPU "
        "and CUDA 12/13"
    )
    assert str(info.value) == INSTALL_HINT and "\n" not in INSTALL_HINT
    assert isinstance(info.value, BackendUnavailable | RuntimeError)
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, EngineError)
    assert not (tmp_path / "model.plan").exists()


@pytest.mark.usefixtures("no_tensorrt")
def test_backend_load_without_tensorrt_raises_unavailable(tmp_path: Path) -> None:
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"plan")
    with pytest.raises(TensorRTUnavailable, match="tensorrt is not installed"):
        TensorRTBackend.load(plan)
    with pytest.raises(TensorRTLoadError, match="plan not found"):
        TensorRTBackend.load(tmp_path / "missing.plan")


def test_no_cuda_device_is_its_own_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import types

    import torch

    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(b"\x08\x07")
    with pytest.raises(TensorRTUnavailable) as info:
        build_engine(onnx_path, tmp_path / "model.plan", max_batch=8, max_seq=64)
    assert str(info.value) == NO_CUDA_HINT and "\n" not in NO_CUDA_HINT


def test_build_engine_checks_arguments_before_touching_the_library(
    tmp_path: Path, no_tensorrt: None
) -> None:
    with pytest.raises(ValueError, match="max_batch"):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.plan", max_batch=0, max_seq=64)
    with pytest.raises(ValueError, match="workspace_gib"):
        build_engine(
            tmp_path / "m.onnx", tmp_path / "m.plan", max_batch=1, max_seq=8, workspace_gib=0
        )
    with pytest.raises(TensorRTBuildError, match="ONNX graph not found"):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.plan", max_batch=1, max_seq=8)


def test_typing_choice() -> None:
    assert choose_strongly_typed(None, fp16=True, has_weak_flags=True) is False  # TensorRT 10
    assert choose_strongly_typed(None, fp16=True, has_weak_flags=False) is True  # TensorRT 11
    assert choose_strongly_typed(True, fp16=True, has_weak_flags=True) is True
    assert choose_strongly_typed(False, fp16=False, has_weak_flags=False) is True
    with pytest.raises(TensorRTBuildError, match="strongly_typed=True"):
        choose_strongly_typed(False, fp16=True, has_weak_flags=False)


def test_tensorrt_log_goes_to_logging_and_errors_to_the_current_capture(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("DEBUG", logger="engines.trt")
    forward_log("ERROR", "outside any capture")
    with capture_errors() as sink:
        forward_log("INFO", "tactic 42")
        forward_log("WARNING", "weak typing is deprecated")
        forward_log("ERROR", "  out of memory \n")
        forward_log("INTERNAL_ERROR", "assertion failed")
    forward_log("ERROR", "after the capture")
    assert sink.errors == ["out of memory", "assertion failed"]
    assert sink.summary() == "out of memory | assertion failed"
    assert LogSink().summary() == "no error was logged"
    messages = [r.getMessage() for r in caplog.records]
    assert "tensorrt: tactic 42" not in messages
    assert "tensorrt: weak typing is deprecated" in messages
    assert "tensorrt: out of memory" in messages and "tensorrt: after the capture" in messages


def test_one_shared_logger_per_tensorrt_module() -> None:
    import types

    class ILogger:
        def __init__(self) -> None:
            pass

    trt = types.ModuleType("tensorrt")
    trt.ILogger = ILogger  # type: ignore[attr-defined]
    first = shared_logger(trt)
    assert issubclass(type(first), ILogger) and shared_logger(trt) is first
    with capture_errors() as sink:
        first.log(FakeSeverity.ERROR, "boom")
    assert sink.errors == ["boom"]


# --- sidecar --------------------------------------------------------------------------


def build_info(tmp_path: Path) -> BuildInfo:
    return BuildInfo(
        plan_path=tmp_path / "model.plan",
        tensorrt_version="10.13.2.6",
        gpu_name="NVIDIA H100 80GB HBM3",
        compute_capability=(9, 0),
        precision="fp16",
        strongly_typed=False,
        max_batch=32,
        max_seq=256,
        profiles=P.make_profiles(32, 256, seq_buckets=(64,)),
        fp32_layers=("ln/Pow", "head/Softmax"),
        onnx_sha256="ab" * 32,
        plan_bytes=123,
        build_seconds=61.5,
        workspace_gib=4.0,
    )


def test_sidecar_round_trips_and_guards_version_and_gpu(tmp_path: Path) -> None:
    info = build_info(tmp_path)
    assert read_sidecar(info.plan_path) is None
    path = write_sidecar(info)
    assert path == sidecar_path(info.plan_path) == tmp_path / "model.plan.json"
    assert read_sidecar(info.plan_path) == info
    check_compatible(info, tensorrt_version="10.13.2.6", compute_capability=(9, 0))
    check_compatible(info, tensorrt_version="10.13.2.99", compute_capability=(9, 0))
    with pytest.raises(TensorRTLoadError, match=r"built with TensorRT 10\.13\.2\.6, this host has"):
        check_compatible(info, tensorrt_version="10.14.1.48", compute_capability=(9, 0))
    with pytest.raises(TensorRTLoadError, match=r"compute capability 9\.0 .*this GPU is 8\.9"):
        check_compatible(info, tensorrt_version="10.13.2.6", compute_capability=(8, 9))
    path.write_text('{"plan": "model.plan"}')
    with pytest.raises(TensorRTLoadError, match="not a valid plan sidecar"):
        read_sidecar(info.plan_path)
    assert issubclass(TensorRTLoadError, EngineLoadError)


# --- the backend through a fake engine ------------------------------------------------

STREAM = 0xC0FFEE


class HostBuffers:
    """`DeviceBuffers` in host memory: "addresses" are the numpy arrays' data pointers."""

    def __init__(self) -> None:
        self.arrays: dict[str, npt.NDArray[Any]] = {}
        self.calls: list[tuple[Any, ...]] = []
        self.released = 0

    @property
    def stream_handle(self) -> int:
        return STREAM

    def activate(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def allocate(self, name: str, shape: P.Shape, dtype: str) -> int:
        self.arrays[name] = np.full(math.prod(shape), 7, dtype=P.numpy_dtype(dtype))
        self.calls.append(("allocate", name, shape, dtype))
        return int(self.arrays[name].ctypes.data)

    def by_address(self, address: int) -> npt.NDArray[Any]:
        (array,) = [a for a in self.arrays.values() if a.ctypes.data == address]
        return array

    def upload(self, name: str, array: npt.NDArray[Any]) -> None:
        assert array.dtype == self.arrays[name].dtype and array.flags.c_contiguous
        self.arrays[name][: array.size] = array.reshape(-1)
        self.calls.append(("upload", name, array.shape))

    def download(self, name: str, shape: P.Shape) -> npt.NDArray[Any]:
        self.calls.append(("download", name, shape))
        return self.arrays[name][: math.prod(shape)].reshape(shape)

    def synchronize(self) -> None:
        self.calls.append(("synchronize",))

    def release(self) -> None:
        self.released += 1


class FakeContext:
    """Records every call; `execute_async_v3` computes a recognisable answer per row:
    label = (sum of unmasked ids) % num_labels, embedding row = that sum / 1000."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.calls: list[tuple[Any, ...]] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.execute_ok = True

    def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool:
        self.calls.append(("profile", profile_index, stream_handle))
        return 0 <= profile_index < len(self.engine.profiles)

    def set_input_shape(self, name: str, shape: Sequence[int]) -> bool:
        self.calls.append(("shape", name, tuple(shape)))
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name: str, memory: int) -> bool:
        self.calls.append(("address", name, memory))
        self.addresses[name] = memory
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        self.calls.append(("execute", stream_handle))
        if not self.execute_ok:
            return False
        buffers = self.engine.buffers
        batch, seq = self.shapes["input_ids"]
        ids = buffers.by_address(self.addresses["input_ids"])[: batch * seq].reshape(batch, seq)
        mask = buffers.by_address(self.addresses["attention_mask"])
        mask = mask[: batch * seq].reshape(batch, seq)
        sums = (ids.astype(np.int64) * mask).sum(axis=1)
        labels = self.engine.num_labels
        probs = np.zeros((batch, labels))
        probs[np.arange(batch), sums % labels] = 1.0
        emb = np.repeat((sums / 1000.0)[:, None], EMBEDDING_DIM, axis=1)
        for name, value in (("probs", probs), ("embedding", emb)):
            out = buffers.by_address(self.addresses[name])
            out[: value.size] = value.reshape(-1)
        return True


class FakeEngine:
    """The `ICudaEngine` surface the backend reads; I/O deliberately not in contract order."""

    def __init__(
        self,
        buffers: HostBuffers,
        *,
        ids_dtype: FakeDataType = FakeDataType.INT64,
        out_dtype: FakeDataType = FakeDataType.FLOAT,
        num_labels: int = 3,
        profiles: Sequence[P.Profile] = P.make_profiles(4, 16),
        skip: str = "",
    ) -> None:
        self.buffers = buffers
        self.num_labels = num_labels
        self.profiles = list(profiles)
        io = {
            "probs": (FakeIOMode.OUTPUT, out_dtype, (-1, num_labels)),
            "attention_mask": (FakeIOMode.INPUT, ids_dtype, (-1, -1)),
            "embedding": (FakeIOMode.OUTPUT, out_dtype, (-1, EMBEDDING_DIM)),
            "input_ids": (FakeIOMode.INPUT, ids_dtype, (-1, -1)),
        }
        self.io = {k: v for k, v in io.items() if k != skip}
        self.contexts: list[FakeContext] = []

    @property
    def num_io_tensors(self) -> int:
        return len(self.io)

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.profiles)

    def get_tensor_name(self, index: int) -> str:
        return list(self.io)[index]

    def get_tensor_mode(self, name: str) -> FakeIOMode:
        return self.io[name][0]

    def get_tensor_dtype(self, name: str) -> FakeDataType:
        return self.io[name][1]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.io[name][2]

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
        assert name in P.INPUT_NAMES
        return list(self.profiles[profile_index].input_shapes())

    def create_execution_context(self) -> FakeContext:
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]


def make_backend(**kwargs: Any) -> tuple[TensorRTBackend, FakeEngine, HostBuffers]:
    buffers = HostBuffers()
    engine = FakeEngine(buffers, **kwargs)
    return TensorRTBackend(engine, buffers=buffers, precision="fp16"), engine, buffers


def request(batch: int, seq: int, seed: int = 0) -> tuple[npt.NDArray[np.int64], ...]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 30000, size=(batch, seq), dtype=np.int64)
    lengths = rng.integers(1, seq + 1, size=batch)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    return ids * mask, mask


def expected(ids: npt.NDArray[np.int64], mask: npt.NDArray[np.int64], labels: int = 3) -> Any:
    sums = (ids * mask).sum(axis=1)
    return sums % labels, np.repeat((sums / 1000.0)[:, None], EMBEDDING_DIM, axis=1)


def test_backend_satisfies_the_protocol_and_reads_limits_from_the_engine() -> None:
    backend, engine, buffers = make_backend(profiles=P.make_profiles(4, 16, seq_buckets=(8,)))
    as_protocol: Backend = backend
    assert (as_protocol.name, as_protocol.precision) == ("tensorrt", "fp16")
    assert (backend.max_batch_size, backend.max_seq_len, backend.num_labels) == (4, 16, 3)
    assert backend.profiles == tuple(engine.profiles)
    assert len(engine.contexts) == 1
    # one buffer per I/O tensor at its largest shape, in contract order, declared dtypes
    assert buffers.calls == [
        ("allocate", "input_ids", (4, 16), "INT64"),
        ("allocate", "attention_mask", (4, 16), "INT64"),
        ("allocate", "probs", (4, 3), "FLOAT"),
        ("allocate", "embedding", (4, EMBEDDING_DIM), "FLOAT"),
    ]


def test_run_binds_shapes_and_addresses_then_executes_then_copies_back() -> None:
    backend, engine, buffers = make_backend()
    buffers.calls.clear()
    ids, mask = request(3, 10)
    probs, emb = backend.run(ids, mask)
    (context,) = engine.contexts
    addr = {n: int(a.ctypes.data) for n, a in buffers.arrays.items()}
    assert context.calls == [
        ("shape", "input_ids", (3, 10)),
        ("shape", "attention_mask", (3, 10)),
        ("address", "input_ids", addr["input_ids"]),
        ("address", "attention_mask", addr["attention_mask"]),
        ("address", "probs", addr["probs"]),
        ("address", "embedding", addr["embedding"]),
        ("execute", STREAM),
    ]
    assert buffers.calls == [
        ("upload", "input_ids", (3, 10)),
        ("upload", "attention_mask", (3, 10)),
        ("download", "probs", (3, 3)),
        ("download", "embedding", (3, EMBEDDING_DIM)),
        ("synchronize",),
    ]
    labels, embedding = expected(ids, mask)
    assert probs.dtype == np.float32 and probs.shape == (3, 3)
    assert emb.dtype == np.float32 and emb.shape == (3, EMBEDDING_DIM)
    np.testing.assert_array_equal(probs.argmax(axis=1), labels)
    np.testing.assert_allclose(emb, embedding, rtol=1e-6)


def test_outputs_are_owned_copies_sliced_to_the_batch() -> None:
    backend, _, buffers = make_backend()
    ids, mask = request(4, 16, seed=1)
    probs4, emb4 = backend.run(ids, mask)
    ids1, mask1 = request(1, 5, seed=2)
    probs1, emb1 = backend.run(ids1, mask1)
    assert probs1.shape == (1, 3) and emb1.shape == (1, EMBEDDING_DIM)
    labels, embedding = expected(ids, mask)
    np.testing.assert_array_equal(probs4.argmax(axis=1), labels)  # not overwritten by run 2
    np.testing.assert_allclose(emb4, embedding, rtol=1e-6)
    assert not np.shares_memory(emb1, buffers.arrays["embedding"])


def test_batched_equals_one_at_a_time() -> None:
    backend, _, _ = make_backend()
    ids, mask = request(4, 12, seed=3)
    probs, emb = backend.run(ids, mask)
    for i in range(4):
        p1, e1 = backend.run(ids[i : i + 1], mask[i : i + 1])
        np.testing.assert_array_equal(p1[0], probs[i])
        np.testing.assert_array_equal(e1[0], emb[i])


def test_int32_engine_inputs_and_fp16_outputs_are_converted() -> None:
    backend, _, buffers = make_backend(ids_dtype=FakeDataType.INT32, out_dtype=FakeDataType.HALF)
    assert buffers.arrays["input_ids"].dtype == np.int32
    assert buffers.arrays["embedding"].dtype == np.float16
    ids, mask = request(2, 8, seed=4)
    probs, emb = backend.run(ids, mask)
    labels, embedding = expected(ids, mask)
    assert probs.dtype == np.float32 and emb.dtype == np.float32
    np.testing.assert_array_equal(probs.argmax(axis=1), labels)
    np.testing.assert_allclose(emb, embedding, rtol=1e-3)
    with pytest.raises(ShapeError, match="int32"):
        backend.run(np.full((1, 4), 2**40, dtype=np.int64), np.ones((1, 4), dtype=np.int64))


def test_profile_switches_only_when_the_bucket_changes() -> None:
    backend, engine, _ = make_backend(profiles=P.make_profiles(4, 64, seq_buckets=(16,)))
    (context,) = engine.contexts

    def switches() -> list[tuple[Any, ...]]:
        return [c for c in context.calls if c[0] == "profile"]

    backend.run(*request(2, 10))
    assert switches() == []  # a new context starts on profile 0
    backend.run(*request(2, 40))
    assert switches() == [("profile", 1, STREAM)]
    backend.run(*request(4, 64))
    backend.run(*request(1, 16))
    assert switches() == [("profile", 1, STREAM), ("profile", 0, STREAM)]
    # the switch precedes the shapes of its run
    last = context.calls.index(("profile", 0, STREAM))
    assert context.calls[last + 1] == ("shape", "input_ids", (1, 16))


def test_run_rejects_bad_requests_before_touching_the_engine() -> None:
    backend, engine, _ = make_backend()
    (context,) = engine.contexts
    with pytest.raises(ShapeError, match="batch 5 exceeds the engine's max_batch 4"):
        backend.run(*request(5, 4))
    with pytest.raises(ShapeError, match="sequence length 17 exceeds the engine's max_seq 16"):
        backend.run(*request(1, 17))
    ids, mask = request(2, 4)
    with pytest.raises(ShapeError, match="differ in shape"):
        backend.run(ids, mask[:, :3])
    with pytest.raises(ShapeError, match="integers"):
        backend.run(ids.astype(np.float32), mask)
    assert context.calls == []


def test_execute_failure_is_typed_and_still_synchronizes() -> None:
    backend, engine, buffers = make_backend()
    engine.contexts[0].execute_ok = False
    buffers.calls.clear()
    with pytest.raises(TensorRTRuntimeError, match="execute_async_v3 failed for batch=2"):
        backend.run(*request(2, 4))
    assert buffers.calls[-1] == ("synchronize",)


def test_engine_io_is_checked_at_construction() -> None:
    with pytest.raises(TensorRTLoadError, match="outputs are"):
        make_backend(skip="embedding")
    with pytest.raises(TensorRTLoadError, match="embedding is BF16"):
        make_backend(out_dtype=FakeDataType.BF16)


def test_close_releases_once_and_refuses_later_runs() -> None:
    backend, _, buffers = make_backend()
    backend.close()
    backend.close()
    assert buffers.released == 1
    with pytest.raises(TensorRTRuntimeError, match="closed"):
        backend.run(*request(1, 4))
