"""The serving graph in torch, one module per model kind (see `engines/modeldir.py`):
  head        encoder -> masked mean pooling -> L2 norm -> linear head -> softmax
  classifier  a Hugging Face sequence classifier: softmax(logits), and the masked mean of
              its last hidden state (L2-normalised) as the embedding
  embedder    a sentence-transformers encoder with its pooling (mean, cls or max) and its
              Normalize module when it has one; probs has zero columns

`forward(input_ids, attention_mask) -> (probs, embedding)` is exactly the contract in
`engines/backends/base.py`; ONNX export, the torch backend and the parity reference all use
these modules. Imports torch and transformers: never import this
from the onnxruntime serving path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from engines.assets import set_offline
from engines.errors import ModelNotFound
from engines.modeldir import HEAD_FILE, KIND_CLASSIFIER, KIND_EMBEDDER, ModelInfo, read_model
from engines.types import EMBEDDING_DIM


def load_encoder(path: Path, attn_implementation: str = "eager") -> nn.Module:
    """The BERT encoder from a local folder (offline; never touches a model hub)."""
    set_offline()
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    try:
        model: nn.Module = AutoModel.from_pretrained(
            str(path), local_files_only=True, attn_implementation=attn_implementation
        )
    except (OSError, ValueError) as exc:
        raise ModelNotFound(f"cannot load encoder from {path}: {exc}".splitlines()[0]) from None
    model.eval()
    return model


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of token vectors weighted by the attention mask (padding contributes nothing)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * mask).sum(dim=1)
    count = mask.sum(dim=1).clamp(min=1.0)
    pooled: torch.Tensor = summed / count
    return pooled


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    norm = x.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-12)
    out: torch.Tensor = x / norm
    return out


class ServingModel(nn.Module):
    """Encoder + pooling + normalisation + linear head, one graph for every runtime."""

    def __init__(self, encoder: nn.Module, labels: Sequence[str]) -> None:
        super().__init__()
        if len(labels) < 2:
            raise ValueError("a classifier head needs at least two labels")
        self.encoder = encoder
        self.labels = list(labels)
        hidden = int(getattr(getattr(encoder, "config", None), "hidden_size", EMBEDDING_DIM))
        self.head = nn.Linear(hidden, len(self.labels))

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=torch.zeros_like(input_ids),
        )
        hidden: torch.Tensor = out[0]
        return l2_normalize(mean_pool(hidden, attention_mask))

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.head(self.embed(input_ids, attention_mask))
        return result

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.embed(input_ids, attention_mask)
        probs = torch.softmax(self.head(embedding), dim=-1)
        return probs, embedding

    def save_head(self, path: Path) -> None:
        state = {
            k: v.detach().cpu().float().contiguous() for k, v in self.head.state_dict().items()
        }
        save_file(state, str(path))

    def load_head(self, path: Path) -> None:
        state = load_file(str(path))
        self.head.load_state_dict(state)


def _encoder_kwargs(model: nn.Module, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """token_type_ids (zeros) for encoders that take them (BERT), none for DistilBERT/MPNet."""
    config = getattr(model, "config", None)
    if int(getattr(config, "type_vocab_size", 0) or 0) > 0:
        return {"token_type_ids": torch.zeros_like(input_ids)}
    return {}


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        mask = attention_mask.unsqueeze(-1).to(torch.bool)
        filled = hidden.masked_fill(~mask, torch.finfo(hidden.dtype).min)
        out: torch.Tensor = filled.max(dim=1).values
        return out
    return mean_pool(hidden, attention_mask)


class ClassifierServingModel(nn.Module):
    """A Hugging Face *ForSequenceClassification model behind the serving contract."""

    def __init__(self, model: nn.Module, labels: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.labels = list(labels)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=True,
            **_encoder_kwargs(self.model, input_ids),
        )
        embedding = l2_normalize(mean_pool(out.hidden_states[-1], attention_mask))
        return torch.softmax(out.logits, dim=-1), embedding


class EmbedderServingModel(nn.Module):
    """A sentence-transformers encoder + its pooling (+ its Normalize module)."""

    def __init__(self, encoder: nn.Module, pooling: str, normalize: bool) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.normalize = normalize
        self.labels: list[str] = []

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            **_encoder_kwargs(self.encoder, input_ids),
        )
        pooled = pool(out[0], attention_mask, self.pooling)
        return l2_normalize(pooled) if self.normalize else pooled

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.embed(input_ids, attention_mask)
        return embedding.new_zeros((embedding.shape[0], 0)), embedding


class EmbeddingOnly(nn.Module):
    """The graph exported for an embedder: one output, `embedding`."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.inner(input_ids, attention_mask)[1]
        return out


def load_classifier(path: Path, attn_implementation: str = "eager") -> nn.Module:
    set_offline()
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        model: nn.Module = AutoModelForSequenceClassification.from_pretrained(
            str(path), local_files_only=True, attn_implementation=attn_implementation
        )
    except (OSError, ValueError) as exc:
        raise ModelNotFound(f"cannot load classifier from {path}: {exc}".splitlines()[0]) from None
    model.eval()
    return model


def load_serving_model(
    model_dir: Path | ModelInfo, attn_implementation: str = "eager"
) -> nn.Module:
    """A model folder (any kind) as an eval-mode float32 serving module on CPU."""
    info = model_dir if isinstance(model_dir, ModelInfo) else read_model(Path(model_dir))
    if info.kind == KIND_CLASSIFIER:
        return ClassifierServingModel(
            load_classifier(info.path, attn_implementation), info.labels
        ).eval()
    if info.kind == KIND_EMBEDDER:
        encoder = load_encoder(info.path, attn_implementation)
        return EmbedderServingModel(encoder, info.pooling, info.normalize).eval()
    encoder = load_encoder(info.encoder_path(), attn_implementation)
    model = ServingModel(encoder, info.labels)
    model.load_head(info.path / HEAD_FILE)
    model.eval()
    return model


def set_torch_threads(threads: int | None) -> None:
    if threads is not None and threads > 0:
        torch.set_num_threads(threads)


def to_tensors(*arrays: Any) -> list[torch.Tensor]:
    return [torch.from_numpy(a) for a in arrays]
