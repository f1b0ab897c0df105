"""The JSON sidecar written next to every TensorRT plan, and the load-time check (pure).

A serialized plan only runs on the TensorRT version and the GPU architecture (compute
capability) that built it; TensorRT's own failure is a log line and a `None`. The sidecar
records both, so `check_compatible` can say in one line what was built where.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engines.trt.errors import TensorRTLoadError
from engines.trt.profiles import Profile

SIDECAR_VERSION = 1


def sidecar_path(plan_path: Path) -> Path:
    """`model.plan` -> `model.plan.json`."""
    return plan_path.with_name(plan_path.name + ".json")


@dataclass(frozen=True, slots=True)
class BuildInfo:
    """What `build_engine` made, where, and how."""

    plan_path: Path
    tensorrt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]
    precision: str  # "fp16" | "fp32"
    strongly_typed: bool  # True: precision written into the graph (engines.build.trt.autocast)
    max_batch: int
    max_seq: int
    profiles: tuple[Profile, ...]
    fp32_layers: tuple[str, ...]  # layers pinned to FP32 (weak typing) / MatMuls kept FP32
    onnx_sha256: str
    plan_bytes: int
    build_seconds: float
    workspace_gib: float

    @property
    def sidecar_path(self) -> Path:
        return sidecar_path(self.plan_path)

    def to_json(self) -> dict[str, Any]:
        return {
            "sidecar_version": SIDECAR_VERSION,
            "plan": self.plan_path.name,
            "tensorrt_version": self.tensorrt_version,
            "gpu_name": self.gpu_name,
            "compute_capability": list(self.compute_capability),
            "precision": self.precision,
            "strongly_typed": self.strongly_typed,
            "max_batch": self.max_batch,
            "max_seq": self.max_seq,
            "profiles": [p.to_json() for p in self.profiles],
            "fp32_layers": list(self.fp32_layers),
            "onnx_sha256": self.onnx_sha256,
            "plan_bytes": self.plan_bytes,
            "build_seconds": self.build_seconds,
            "workspace_gib": self.workspace_gib,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], plan_path: Path) -> BuildInfo:
        try:
            profiles = tuple(_profile(p) for p in data["profiles"])
            cc = data["compute_capability"]
            return cls(
                plan_path=plan_path,
                tensorrt_version=str(data["tensorrt_version"]),
                gpu_name=str(data["gpu_name"]),
                compute_capability=(int(cc[0]), int(cc[1])),
                precision=str(data["precision"]),
                strongly_typed=bool(data["strongly_typed"]),
                max_batch=int(data["max_batch"]),
                max_seq=int(data["max_seq"]),
                profiles=profiles,
                fp32_layers=tuple(str(n) for n in data["fp32_layers"]),
                onnx_sha256=str(data["onnx_sha256"]),
                plan_bytes=int(data["plan_bytes"]),
                build_seconds=float(data["build_seconds"]),
                workspace_gib=float(data["workspace_gib"]),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise TensorRTLoadError(
                f"{sidecar_path(plan_path)} is not a valid plan sidecar ({exc!r}); rebuild the plan"
            ) from exc


def _profile(data: dict[str, Any]) -> Profile:
    (b0, s0), (b1, s1), (b2, s2) = data["min"], data["opt"], data["max"]
    return Profile(int(data["index"]), b0, b1, b2, s0, s1, s2)


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file and a rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_sidecar(info: BuildInfo) -> Path:
    path = info.sidecar_path
    write_atomic(path, (json.dumps(info.to_json(), indent=2) + "\n").encode())
    return path


def read_sidecar(plan_path: Path) -> BuildInfo | None:
    """The plan's BuildInfo, or None when it has no sidecar."""
    path = sidecar_path(plan_path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TensorRTLoadError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise TensorRTLoadError(f"{path} is not a JSON object; rebuild the plan")
    return BuildInfo.from_json(data, plan_path)


def _release(version: str) -> tuple[str, ...]:
    return tuple(version.split(".")[:3])


def check_compatible(
    info: BuildInfo, *, tensorrt_version: str, compute_capability: tuple[int, int]
) -> None:
    """Raise `TensorRTLoadError` unless this TensorRT release and GPU architecture can
    deserialize the plan `info` describes."""
    problems: list[str] = []
    if _release(info.tensorrt_version) != _release(tensorrt_version):
        problems.append(
            f"built with TensorRT {info.tensorrt_version}, this host has {tensorrt_version}"
        )
    if tuple(info.compute_capability) != tuple(compute_capability):
        built = ".".join(map(str, info.compute_capability))
        here = ".".join(map(str, compute_capability))
        problems.append(
            f"built for compute capability {built} ({info.gpu_name}), this GPU is {here}"
        )
    if problems:
        raise TensorRTLoadError(
            f"{info.plan_path.name}: " + "; ".join(problems) + ": rebuild the plan on this host"
        )
