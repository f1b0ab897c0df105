"""Test support: a tiny BERT-like serving model with the real serving-graph contract.

`TinyServingModel` has the same inputs and outputs as the exported MiniLM graph
(input_ids/attention_mask int64 [batch, seq] -> probs [batch, num_labels],
embedding [batch, 384]) and the same parts that matter for FP16 (attention softmax with a
mask bias, LayerNorm, GELU, masked mean pooling, L2 norm, linear head, softmax), with
random weights and a head scaled so labels are well separated. `export_tiny_onnx` writes
it as ONNX. Used by the TensorRT tests; imports torch (never import from serving code).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engines.types import EMBEDDING_DIM


class _Block(nn.Module):
    def __init__(self, hidden: int, heads: int, ff: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.ln1 = nn.LayerNorm(hidden, eps=1e-12)
        self.ff1 = nn.Linear(hidden, ff)
        self.ff2 = nn.Linear(ff, hidden)
        self.ln2 = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        d = h // self.heads
        q, k, v = (
            t.reshape(b, s, self.heads, d).transpose(1, 2) for t in self.qkv(x).split(h, dim=-1)
        )
        scores = q @ k.transpose(-1, -2) / math.sqrt(d) + bias
        ctx = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, s, h)
        x = self.ln1(x + self.out(ctx))
        u = self.ff1(x)
        gelu = 0.5 * u * (1.0 + torch.erf(u / math.sqrt(2.0)))  # Erf, not opset-20 Gelu
        out: torch.Tensor = self.ln2(x + self.ff2(gelu))
        return out


class TinyServingModel(nn.Module):
    """Embeddings -> `layers` transformer blocks -> masked mean pool -> L2 norm -> head."""

    def __init__(
        self,
        *,
        vocab: int = 1000,
        layers: int = 2,
        heads: int = 4,
        ff: int = 512,
        num_labels: int = 3,
        max_positions: int = 512,
        head_scale: float = 40.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        hidden = EMBEDDING_DIM
        self.vocab = vocab
        self.tok = nn.Embedding(vocab, hidden)
        self.pos = nn.Embedding(max_positions, hidden)
        self.ln = nn.LayerNorm(hidden, eps=1e-12)
        self.blocks = nn.ModuleList(_Block(hidden, heads, ff) for _ in range(layers))
        self.head = nn.Linear(hidden, num_labels)
        with torch.no_grad():  # every weight from `seed`: two instances are the same model
            for module in self.modules():
                if isinstance(module, nn.Linear | nn.Embedding):
                    module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * 0.05)
                if isinstance(module, nn.Linear):
                    module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.02)
            self.tok.weight.mul_(20.0)  # BERT-scale embeddings (|x| ~ 1)
            self.head.weight.mul_(head_scale)  # well separated labels
        self.eval()

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, s = input_ids.shape
        positions = torch.arange(s, device=input_ids.device)
        # index_select, not nn.Embedding: the exporter names embedding values "embedding",
        # which would clash with the graph output of that name
        tokens = torch.index_select(self.tok.weight, 0, input_ids.reshape(-1)).reshape(b, s, -1)
        x = self.ln(tokens + torch.index_select(self.pos.weight, 0, positions).unsqueeze(0))
        mask = attention_mask.to(x.dtype)
        bias = (1.0 - mask)[:, None, None, :] * -10000.0
        for block in self.blocks:
            x = block(x, bias)
        m = mask.unsqueeze(-1)
        pooled = (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
        embedding = F.normalize(pooled, p=2.0, dim=1)
        probs = torch.softmax(self.head(embedding), dim=-1)
        return probs, embedding


def export_tiny_onnx(path: Path, model: TinyServingModel | None = None) -> Path:
    """Export `model` (default: `TinyServingModel()`) to `path` with dynamic batch and
    sequence axes, weights inside the one file."""
    import onnx

    model = model if model is not None else TinyServingModel()
    ids = torch.randint(1, model.vocab, (2, 8))
    batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", min=1, max=512)
    axes = {0: batch, 1: seq}
    with warnings.catch_warnings():  # both inputs share the axes; the exporter says so
        warnings.filterwarnings("ignore", message=".*shares the same shape constraints.*")
        program = torch.onnx.export(
            model,
            (ids, torch.ones_like(ids)),
            input_names=["input_ids", "attention_mask"],
            output_names=["probs", "embedding"],
            dynamic_shapes={"input_ids": axes, "attention_mask": axes},
            dynamo=True,
            optimize=True,
        )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(program.model_proto, str(path), save_as_external_data=False)
    return path
