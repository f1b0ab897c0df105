"""The parity gate: a candidate engine against the fp32 torch reference on real texts.

Pure comparison (`compare`) on arrays, plus helpers that produce the arrays: the torch
fp32 reference outputs (cached per model and text set) and, for fp16 candidates, a CPU
emulation of fp16/bf16 numerics (NaN/Inf counts, largest activation vs fp16's 65504).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from engines.modeldir import ModelInfo

FP16_MAX = 65504.0
Array = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class Thresholds:
    min_agreement: float = 0.95  # share of texts whose top label matches the reference
    min_cosine: float = 0.97  # smallest embedding cosine to the reference over all texts
    max_accuracy_drop: float = 0.02  # reference accuracy - candidate accuracy (labelled data)
    max_score_diff: float | None = None  # largest |p_cand - p_ref|; None: not checked
    min_fp16_headroom: float = 2.0  # fp16 max / largest activation, fp16 candidates only


@dataclass(frozen=True, slots=True)
class Fp16Numerics:
    """How the reference model behaves when its math runs in a 16-bit float type on CPU."""

    dtype: str  # "float16" | "bfloat16"
    n: int
    nonfinite_outputs: int  # NaN/Inf values in probs or embeddings
    nonfinite_activations: int  # modules whose output held a NaN/Inf
    max_abs_activation: float  # largest |value| any module produced (fp32 run)
    headroom: float  # FP16_MAX / max_abs_activation
    agreement: float  # top-label agreement of the 16-bit run with fp32
    cosine_min: float


@dataclass(frozen=True, slots=True)
class ParityReport:
    n: int
    agreement: float
    max_abs_score_diff: float
    mean_abs_score_diff: float
    cosine_min: float
    cosine_mean: float
    accuracy_candidate: float | None
    accuracy_reference: float | None
    thresholds: Thresholds
    passed: bool
    failures: list[str]
    numerics: Fp16Numerics | None = None
    disagreements: list[dict[str, Any]] = field(default_factory=list)

    @property
    def accuracy_drop(self) -> float | None:
        if self.accuracy_candidate is None or self.accuracy_reference is None:
            return None
        return self.accuracy_reference - self.accuracy_candidate

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def summary(self) -> str:
        acc = ""
        if self.accuracy_candidate is not None and self.accuracy_reference is not None:
            acc = (
                f"  accuracy {self.accuracy_candidate:.4f} (reference "
                f"{self.accuracy_reference:.4f})"
            )
        lines = [
            f"parity on {self.n} texts: agreement {self.agreement:.4f}  cosine min "
            f"{self.cosine_min:.4f} mean {self.cosine_mean:.5f}  max |Δp| "
            f"{self.max_abs_score_diff:.4f}{acc}",
        ]
        if self.numerics is not None:
            nm = self.numerics
            lines.append(
                f"{nm.dtype} emulation: agreement {nm.agreement:.4f}  non-finite outputs "
                f"{nm.nonfinite_outputs}  max |activation| {nm.max_abs_activation:.1f} "
                f"(fp16 headroom x{nm.headroom:.1f})"
            )
        lines.append("PASSED" if self.passed else "REJECTED: " + "; ".join(self.failures))
        return "\n".join(lines)


def cosine_rows(a: Array, b: Array) -> Array:
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    dots = np.einsum("ij,ij->i", a.astype(np.float64), b.astype(np.float64))
    result: Array = (dots / np.maximum(na * nb, 1e-12)).astype(np.float32)
    return result


def compare(
    ref_probs: Array,
    ref_emb: Array,
    cand_probs: Array,
    cand_emb: Array,
    labels: Sequence[str],
    gold: Sequence[str] | None = None,
    thresholds: Thresholds | None = None,
    numerics: Fp16Numerics | None = None,
    texts: Sequence[str] | None = None,
    max_examples: int = 10,
) -> ParityReport:
    """Compare candidate outputs with reference outputs (row i = text i)."""
    th = thresholds or Thresholds()
    if ref_probs.shape != cand_probs.shape or ref_emb.shape != cand_emb.shape:
        raise ValueError(
            f"shape mismatch: reference {ref_probs.shape}/{ref_emb.shape}, "
            f"candidate {cand_probs.shape}/{cand_emb.shape}"
        )
    n = int(ref_probs.shape[0])
    if n == 0:
        raise ValueError("parity needs at least one text")
    classifies = ref_probs.shape[1] > 0  # an embedder has no labels: embeddings alone decide
    ref_top = ref_probs.argmax(axis=1) if classifies else np.zeros(n, dtype=np.int64)
    cand_top = cand_probs.argmax(axis=1) if classifies else np.zeros(n, dtype=np.int64)
    finite = bool(np.isfinite(cand_probs).all() and np.isfinite(cand_emb).all())
    agreement = float((ref_top == cand_top).mean())
    diff = np.abs(ref_probs.astype(np.float64) - cand_probs.astype(np.float64))
    if not classifies:
        diff = np.zeros((n, 1))
    cos = cosine_rows(ref_emb, cand_emb)
    cos = np.where(np.isfinite(cos), cos, -1.0)
    acc_c = acc_r = None
    if gold is not None and classifies:
        if len(gold) != n:
            raise ValueError("gold labels and outputs differ in length")
        label_arr = np.array(list(labels))
        gold_arr = np.array(list(gold))
        acc_r = float((label_arr[ref_top] == gold_arr).mean())
        acc_c = float((label_arr[cand_top] == gold_arr).mean())
    failures: list[str] = []
    eps = 1e-9  # 0.63 - 0.61 must not count as a drop above 0.02
    if not finite:
        failures.append("candidate produced NaN/Inf")
    if agreement < th.min_agreement - eps:
        failures.append(f"label agreement {agreement:.4f} < {th.min_agreement}")
    if float(cos.min()) < th.min_cosine - eps:
        failures.append(f"embedding cosine min {float(cos.min()):.4f} < {th.min_cosine}")
    if acc_c is not None and acc_r is not None and acc_r - acc_c > th.max_accuracy_drop + eps:
        failures.append(f"accuracy drop {acc_r - acc_c:.4f} > {th.max_accuracy_drop}")
    if th.max_score_diff is not None and float(diff.max()) > th.max_score_diff + eps:
        failures.append(f"max score difference {float(diff.max()):.4f} > {th.max_score_diff}")
    if numerics is not None:
        if numerics.nonfinite_outputs or numerics.nonfinite_activations:
            failures.append(
                f"{numerics.dtype} emulation produced NaN/Inf "
                f"({numerics.nonfinite_outputs} outputs, {numerics.nonfinite_activations} modules)"
            )
        if numerics.headroom < th.min_fp16_headroom:
            failures.append(
                f"largest activation {numerics.max_abs_activation:.0f} leaves fp16 headroom "
                f"x{numerics.headroom:.2f} < x{th.min_fp16_headroom}"
            )
    examples: list[dict[str, Any]] = []
    if texts is not None:
        for i in np.flatnonzero(ref_top != cand_top)[:max_examples]:
            examples.append(
                {
                    "text": texts[int(i)][:200],
                    "reference": labels[int(ref_top[i])],
                    "candidate": labels[int(cand_top[i])],
                    "reference_p": round(float(ref_probs[i, ref_top[i]]), 4),
                }
            )
    return ParityReport(
        n=n,
        agreement=agreement,
        max_abs_score_diff=float(diff.max()),
        mean_abs_score_diff=float(diff.mean()),
        cosine_min=float(cos.min()),
        cosine_mean=float(cos.mean()),
        accuracy_candidate=acc_c,
        accuracy_reference=acc_r,
        thresholds=th,
        passed=not failures,
        failures=failures,
        numerics=numerics,
        disagreements=examples,
    )


def _texts_key(model_hash: str, texts: Sequence[str], max_seq: int) -> str:
    h = hashlib.sha256(f"{model_hash}:{max_seq}".encode())
    for t in texts:
        h.update(t.encode("utf-8", "replace"))
        h.update(b"\x00")
    return h.hexdigest()[:16]


def reference_outputs(
    info: ModelInfo, texts: Sequence[str], max_seq: int = 256, cache: bool = True
) -> tuple[Array, Array]:
    """fp32 torch outputs (probs, embeddings) for `texts`, cached beside the model's exports."""
    path = info.export_dir / f"reference-{_texts_key(info.hash, texts, max_seq)}.npz"
    if cache and path.is_file():
        with np.load(path) as data:
            return data["probs"].astype(np.float32), data["embedding"].astype(np.float32)
    from engines.builder.model import load_serving_model
    from engines.builder.torch_backend import TorchBackend
    from engines.runtime import LoadedEngine
    from engines.tokenize import Tokenizer
    from engines.types import ModelIdentity

    backend = TorchBackend(load_serving_model(info), "fp32", 64, max_seq, device="cpu")
    engine = LoadedEngine(
        Tokenizer(info.tokenizer_path, max_seq),
        backend,
        ModelIdentity(info.name, "reference", "torch", "fp32", info.task, info.embedding_dim),
        info.labels,
    )
    probs, emb, _ = engine.run_raw(list(texts))
    engine.close()
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, probs=probs, embedding=emb)
        tmp.replace(path)
    return probs, emb


def fp16_numerics(
    info: ModelInfo,
    texts: Sequence[str],
    dtype: str = "float16",
    max_seq: int = 256,
    batch_size: int = 32,
) -> Fp16Numerics:
    """Run the reference in fp32 (recording every module's largest |output|) and in
    `dtype` on CPU (counting NaN/Inf, comparing labels and embeddings with fp32)."""
    import torch

    from engines.builder.model import load_serving_model
    from engines.tokenize import Tokenizer

    tokenizer = Tokenizer(info.tokenizer_path, max_seq)
    model = load_serving_model(info)
    max_abs = 0.0
    bad_modules: set[str] = set()

    def watch(name: str) -> Any:
        def hook(_mod: Any, _inp: Any, out: Any) -> None:
            nonlocal max_abs
            tensors = out if isinstance(out, tuple) else (out,)
            for t in tensors:
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
                    value = t.detach().abs().float()
                    if not torch.isfinite(value).all():
                        bad_modules.add(name)
                        value = torch.nan_to_num(value, nan=0.0, posinf=0.0)
                    max_abs = max(max_abs, float(value.max()))

        return hook

    items = tokenizer.tokenize(texts)
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    ref_p: list[Any] = []
    ref_e: list[Any] = []
    handles = [m.register_forward_hook(watch(n)) for n, m in model.named_modules() if n]
    with torch.inference_mode():
        for chunk in batches:
            enc = tokenizer.pad(chunk)
            p, e = model(torch.from_numpy(enc.input_ids), torch.from_numpy(enc.attention_mask))
            ref_p.append(p.numpy())
            ref_e.append(e.numpy())
    for h in handles:
        h.remove()
    fp32_bad = len(bad_modules)
    half = model.to(getattr(torch, dtype))
    bad_half: set[str] = set()

    def watch_half(name: str) -> Any:
        def hook(_mod: Any, _inp: Any, out: Any) -> None:
            tensors = out if isinstance(out, tuple) else (out,)
            for t in tensors:
                if (
                    isinstance(t, torch.Tensor)
                    and t.is_floating_point()
                    and not torch.isfinite(t).all()
                ):
                    bad_half.add(name)

        return hook

    handles = [m.register_forward_hook(watch_half(n)) for n, m in half.named_modules() if n]
    cand_p: list[Any] = []
    cand_e: list[Any] = []
    with torch.inference_mode():
        for chunk in batches:
            enc = tokenizer.pad(chunk)
            p, e = half(torch.from_numpy(enc.input_ids), torch.from_numpy(enc.attention_mask))
            cand_p.append(p.float().numpy())
            cand_e.append(e.float().numpy())
    for h in handles:
        h.remove()
    rp, re_ = np.concatenate(ref_p), np.concatenate(ref_e)
    cp, ce = np.concatenate(cand_p), np.concatenate(cand_e)
    nonfinite = int((~np.isfinite(cp)).sum() + (~np.isfinite(ce)).sum())
    cos = cosine_rows(re_, np.nan_to_num(ce))
    return Fp16Numerics(
        dtype=dtype,
        n=len(texts),
        nonfinite_outputs=nonfinite,
        nonfinite_activations=len(bad_half) + fp32_bad,
        max_abs_activation=max_abs,
        headroom=FP16_MAX / max(max_abs, 1e-6),
        agreement=float((rp.argmax(1) == cp.argmax(1)).mean()) if rp.shape[1] else 1.0,
        cosine_min=float(cos.min()),
    )


def write_report(report: ParityReport, path: Path) -> None:
    path.write_text(report.to_json())
