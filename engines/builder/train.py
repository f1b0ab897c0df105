"""Train a classifier head on MiniLM: frozen encoder + logistic regression, or fine-tuning.

`train()` writes a model folder `<models_root>/<name>-<hash12>/` (see engines/modeldir.py)
and returns its path. Training code: never imported by the serving path.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from tqdm import tqdm

from engines.assets import ENCODER_NAME, encoder_dir, models_dir, set_offline
from engines.builder.calibration import (
    Calibration,
    calibrate,
    expected_calibration_error,
    softmax,
)
from engines.builder.data import (
    DEFAULT_SEED,
    Dataset,
    Example,
    load_dataset,
    review_examples,
    review_sentences,
    stratified_sample,
    stratified_split,
)
from engines.builder.metrics import EvalReport, describe, evaluate
from engines.builder.model import ServingModel, load_encoder
from engines.errors import DataError
from engines.modeldir import (
    ENCODER_SUBDIR,
    HEAD_FILE,
    MODEL_JSON,
    PACKAGE_ENCODER,
    REPORT_FILE,
    TOKENIZER_FILE,
    compute_hash,
)
from engines.tokenize import DEFAULT_MAX_SEQ_LEN, Tokenizer

# Training examples of the dataset's own domain (sentiment: tweets; the review sentences come
# on top, all of them).
DEFAULT_MAX_TRAIN_FROZEN = 6000
DEFAULT_MAX_TRAIN_FINETUNE = 4000
DEFAULT_MAX_EVAL = 2000
DEFAULT_EPOCHS = 1
DEFAULT_FINETUNE_LR = 1e-4  # 125 steps of 16 tweets: 3e-5 barely moved the frozen head's scores
DEFAULT_OUT_OF_DOMAIN = 500  # IMDB reviews scored after training a sentiment model
FINETUNE_HEAD_INIT = 3000  # training texts the head is fitted on before fine-tuning
POOLED_WINDOWS = 8  # windows a whole review is read in, for the pooled out-of-domain figures
TWEETS, REVIEWS = "tweets", "reviews"  # the sentiment head's training domains
OUT_OF_DOMAIN, OUT_OF_DOMAIN_POOLED = "imdb", "imdb_pooled"
DOMAIN_TITLES = {
    TWEETS: "tweets (in domain)",
    REVIEWS: "review sentences (in domain)",
    OUT_OF_DOMAIN: "IMDB reviews, first window (ood)",
    OUT_OF_DOMAIN_POOLED: "IMDB reviews, pooled windows (ood)",
}
EMBED_BATCH = 64
C_GRID = (1.0, 4.0, 16.0)

Float32Array = npt.NDArray[np.float32]
log = logging.getLogger(__name__)


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (minimises padding)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def embed_texts(
    model: ServingModel,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    batch_size: int = EMBED_BATCH,
    progress: bool = True,
    desc: str = "embedding",
) -> Float32Array:
    """L2-normalised embeddings [n, 384] in input order, batched by length, no grad."""
    items = tokenizer.tokenize(texts)
    out = np.zeros((len(texts), model.head.in_features), dtype=np.float32)
    batches = length_sorted_batches([len(t.ids) for t in items], batch_size)
    bar = tqdm(total=len(texts), desc=desc, unit="text", disable=not progress, leave=False)
    with torch.inference_mode():
        for idx in batches:
            enc = tokenizer.pad([items[i] for i in idx])
            emb = model.embed(torch.from_numpy(enc.input_ids), torch.from_numpy(enc.attention_mask))
            out[idx] = emb.float().numpy()
            bar.update(len(idx))
    bar.close()
    return out


def fit_logistic_head(
    x: Float32Array,
    y: Sequence[str],
    labels: Sequence[str],
    seed: int = DEFAULT_SEED,
    c_grid: Sequence[float] = C_GRID,
) -> tuple[Float32Array, Float32Array, float]:
    """Multinomial logistic regression; C picked by 3-fold CV. Returns (weight, bias, C)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    index = {label: i for i, label in enumerate(labels)}
    target = np.array([index[label] for label in y])
    best_c, best_score = c_grid[0], -1.0
    if len(c_grid) > 1:
        for c in c_grid:
            clf = LogisticRegression(C=c, max_iter=2000, random_state=seed)
            score = float(cross_val_score(clf, x, target, cv=3).mean())
            if score > best_score:
                best_c, best_score = c, score
    clf = LogisticRegression(C=best_c, max_iter=2000, random_state=seed).fit(x, target)
    weight = np.asarray(clf.coef_, dtype=np.float32)
    bias = np.asarray(clf.intercept_, dtype=np.float32)
    if weight.shape[0] == 1:  # binary: sklearn keeps one row; softmax needs two
        weight = np.concatenate([-weight / 2, weight / 2]).astype(np.float32)
        bias = np.concatenate([-bias / 2, bias / 2]).astype(np.float32)
    return weight, bias, best_c


def _logits(
    model: ServingModel, tokenizer: Tokenizer, texts: Sequence[str], progress: bool
) -> npt.NDArray[np.float64]:
    emb = embed_texts(model, tokenizer, texts, progress=progress, desc="evaluating")
    with torch.inference_mode():
        logits: npt.NDArray[np.float64] = model.head(torch.from_numpy(emb)).numpy()
    return logits.astype(np.float64)


def _window_probs(
    model: ServingModel, tokenizer: Tokenizer, texts: Sequence[str], progress: bool
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Class probabilities of whole texts: of their first window (what truncation reads), and
    pooled over up to `POOLED_WINDOWS` windows as the worker pools them with
    INFLOW_PASSAGES_MAX (engines.runtime: half the first window, half the mean of the rest)."""
    spans = [tokenizer.windows(text, POOLED_WINDOWS)[0] for text in texts]
    pieces = [
        text[span.start : span.end]
        for text, found in zip(texts, spans, strict=True)
        for span in found
    ]
    probs = softmax(_logits(model, tokenizer, pieces, progress))
    first = np.zeros((len(texts), probs.shape[1]))
    pooled = np.zeros_like(first)
    at = 0
    for i, found in enumerate(spans):
        own = probs[at : at + len(found)]
        at += len(found)
        first[i] = own[0]
        pooled[i] = own[0] if len(found) == 1 else 0.5 * own[0] + 0.5 * own[1:].mean(axis=0)
    return first, pooled


def _report(
    gold: Sequence[str], probs: npt.NDArray[np.float64], labels: Sequence[str], scored: list[str]
) -> EvalReport:
    """An EvalReport over `scored` labels (a review set has no neutral), with the calibration
    error and the share of texts called each label."""
    predicted = [labels[i] for i in probs.argmax(axis=1)]
    index = {label: i for i, label in enumerate(labels)}
    report = evaluate(gold, predicted, scored)
    ece = expected_calibration_error(probs, [index[g] for g in gold])
    shares = {label: predicted.count(label) / max(1, len(predicted)) for label in labels}
    return dataclasses.replace(report, extra={"ece": ece, "predicted_share": shares})


def _scores(
    model: ServingModel,
    tokenizer: Tokenizer,
    domains: Sequence[Domain],
    reviews: Sequence[Example],
    progress: bool,
) -> dict[str, EvalReport]:
    """Each training domain's held-back test split and, for sentiment, whole IMDB reviews no
    training saw: read as truncation reads them (the first window) and pooled over windows."""
    labels = model.labels
    out: dict[str, EvalReport] = {}
    for domain in domains:
        gold = [label for _, label in domain.test]
        probs = softmax(_logits(model, tokenizer, [t for t, _ in domain.test], progress))
        out[domain.name] = _report(gold, probs, labels, sorted(set(gold)) or labels)
    if reviews:
        gold = [label for _, label in reviews]
        texts = [t for t, _ in reviews]
        scored = sorted(set(gold))
        first, pooled = _window_probs(model, tokenizer, texts, progress)
        out[OUT_OF_DOMAIN] = _report(gold, first, labels, scored)
        out[OUT_OF_DOMAIN_POOLED] = _report(gold, pooled, labels, scored)
    return out


def _summary(scores: dict[str, EvalReport]) -> dict[str, dict[str, Any]]:
    """Per domain: what `inflow engine list` shows, and the confusion matrix."""
    return {
        key: {
            "accuracy": round(r.accuracy, 4),
            "balanced_accuracy": round(r.balanced_accuracy, 4),
            "macro_f1": round(r.macro_f1, 4),
            "ece": round(float(r.extra.get("ece", float("nan"))), 4),
            "predicted_share": {
                k: round(v, 4) for k, v in r.extra.get("predicted_share", {}).items()
            },
            "labels": r.labels,
            "confusion": r.confusion,
            "n": r.n,
        }
        for key, r in scores.items()
    }


def _calibrate_head(
    model: ServingModel, tokenizer: Tokenizer, domains: Sequence[Domain], progress: bool
) -> tuple[Calibration, dict[str, dict[str, float]]]:
    """Fit and fold class-prior offsets and a temperature on the domains' validation splits;
    also returns each domain's validation ECE before and after."""
    index = {label: i for i, label in enumerate(model.labels)}
    data = {
        d.name: (
            _logits(model, tokenizer, [t for t, _ in d.validation], progress),
            [index[label] for _, label in d.validation],
        )
        for d in domains
        if d.validation
    }
    calibration = calibrate(list(data.values()), len(model.labels))
    ece = {
        name: {
            "before": round(expected_calibration_error(softmax(z), y), 4),
            "after": round(
                expected_calibration_error(
                    softmax((z + np.asarray(calibration.offsets)) / calibration.temperature), y
                ),
                4,
            ),
        }
        for name, (z, y) in data.items()
    }
    with torch.no_grad():
        weight, bias = calibration.fold(
            model.head.weight.detach().numpy(), model.head.bias.detach().numpy()
        )
        model.head.weight.copy_(torch.from_numpy(weight))
        model.head.bias.copy_(torch.from_numpy(bias))
    return calibration, ece


@dataclass(frozen=True, slots=True)
class Domain:
    """One source of labelled text, split on its own, so each is tested on its own."""

    name: str
    train: list[Example]
    validation: list[Example]
    test: list[Example]


def _domains(
    ds: Dataset, cap: int, max_eval: int, seed: int, say: Callable[[str], None]
) -> list[Domain]:
    """The dataset as training domains: sentiment is tweets (capped at `cap` training examples)
    plus every review sentence of the training split (6,826: with 4,000 they left 1-2 points of
    IMDB accuracy behind); any other dataset is its own one domain."""
    sources = [(TWEETS if ds.name == "sentiment" else ds.name, ds.examples)]
    if ds.name == "sentiment":
        try:
            sources.append((REVIEWS, review_sentences()))
        except DataError as exc:
            say(f"training on tweets only: {exc}")
    out = []
    for i, (name, examples) in enumerate(sources):
        split = stratified_split(examples, seed=seed)
        out.append(
            Domain(
                name,
                stratified_sample(split.train, cap, seed) if i == 0 else split.train,
                stratified_sample(split.validation, max_eval, seed),
                stratified_sample(split.test, max_eval, seed),
            )
        )
    return out


def _finetune(
    model: ServingModel,
    tokenizer: Tokenizer,
    train: Sequence[Example],
    epochs: int,
    batch_size: int,
    lr: float,
    head_lr: float,
    seed: int,
    progress: bool,
) -> list[float]:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    index = {label: i for i, label in enumerate(model.labels)}
    items = tokenizer.tokenize([t for t, _ in train])
    targets = [index[label] for _, label in train]
    # The embeddings stay as pre-trained: their gradient is a dense 30,522 x 384 matrix, and its
    # backward pass and AdamW update made a step 1.27x as long (457 against 359 ms for 16 texts
    # of 32 tokens, 2-vCPU EPYC) for no measured gain (tweets 0.760 and IMDB 0.840 either way).
    embeddings: torch.nn.Module = getattr(model.encoder, "embeddings")  # noqa: B009
    for param in embeddings.parameters():
        param.requires_grad_(False)
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in model.encoder.parameters() if p.requires_grad], "lr": lr},
            {"params": model.head.parameters(), "lr": head_lr},
        ],
        weight_decay=0.01,
    )
    batches = length_sorted_batches([len(t.ids) for t in items], batch_size)
    total = epochs * len(batches)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: max(0.0, 1.0 - step / max(1, total))
    )
    loss_fn = torch.nn.CrossEntropyLoss()
    losses: list[float] = []
    model.train()
    bar = tqdm(total=total, desc="fine-tuning", unit="batch", disable=not progress)
    for epoch in range(epochs):
        rng.shuffle(batches)
        running = 0.0
        for step, idx in enumerate(batches, 1):
            enc = tokenizer.pad([items[i] for i in idx])
            logits = model.logits(
                torch.from_numpy(enc.input_ids), torch.from_numpy(enc.attention_mask)
            )
            loss = loss_fn(logits, torch.tensor([targets[i] for i in idx]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            running += float(loss.item())
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{running / step:.4f}")
        losses.append(running / max(1, len(batches)))
    bar.close()
    model.eval()
    return losses


def _model_name(dataset: str, frozen: bool) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in dataset.lower())
    return f"{ENCODER_NAME}-{safe}" + ("" if frozen else "-ft")


def train(
    dataset: str | Path = "sentiment",
    frozen: bool = True,
    out_dir: Path | None = None,
    max_train: int | None = None,
    max_eval: int = DEFAULT_MAX_EVAL,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = 16,
    lr: float = DEFAULT_FINETUNE_LR,
    head_lr: float = 1e-3,
    seed: int = DEFAULT_SEED,
    threads: int | None = None,
    progress: bool = True,
    echo: Callable[[str], None] | None = print,
    out_of_domain: int = DEFAULT_OUT_OF_DOMAIN,
    compare_frozen: bool = True,
    calibrated: bool = True,
) -> Path:
    """Train a head (frozen encoder) or fine-tune encoder + head; write a model folder.

    `max_train` caps the (stratified) training examples: default 6,000 frozen, 2,000 fine-tuned.
    Evaluation uses the held-back test split, capped at `max_eval` examples; a sentiment model
    is also scored on `out_of_domain` IMDB movie reviews (positive/negative) that training never
    sees; with `compare_frozen`, a fine-tuned one is compared with the frozen-encoder head it
    starts from (the same training texts) on the same test texts and reviews.
    Returns `<out_dir>/<name>-<hash12>`; out_dir defaults to env INFLOW_MODEL_DIR or .inflow/models.
    """
    set_offline()
    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    say = echo or (lambda _msg: None)
    ds = load_dataset(dataset)
    labels = ds.labels
    cap = max_train or (DEFAULT_MAX_TRAIN_FROZEN if frozen else DEFAULT_MAX_TRAIN_FINETUNE)
    domains = _domains(ds, cap, max_eval, seed, say)
    train_set = [example for d in domains for example in d.train]
    random.Random(seed).shuffle(train_set)  # the domains interleaved in every epoch
    if not train_set or not all(d.test for d in domains):
        raise DataError(f"dataset {ds.name!r} is too small to split into train and test")
    name = _model_name(ds.name, frozen)
    say(
        f"training {name}: "
        + ", ".join(f"{d.name} {len(d.train)} train / {len(d.test)} test" for d in domains)
        + f" ({', '.join(labels)}), frozen={frozen}"
    )
    enc_path = encoder_dir()
    tokenizer = Tokenizer(enc_path / TOKENIZER_FILE, DEFAULT_MAX_SEQ_LEN)
    model = ServingModel(load_encoder(enc_path, "sdpa"), labels)
    model.eval()

    t0 = time.perf_counter()
    # Fine-tuning moves the head anyway: it starts from one fit on a sample of the training
    # texts, not a cross-validated fit on all of them.
    head_set = train_set if frozen else train_set[:FINETUNE_HEAD_INIT]
    x_train = embed_texts(model, tokenizer, [t for t, _ in head_set], progress=progress)
    embed_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    weight, bias, c = fit_logistic_head(
        x_train, [label for _, label in head_set], labels, seed, C_GRID if frozen else (1.0,)
    )
    head_s = time.perf_counter() - t0
    with torch.no_grad():
        model.head.weight.copy_(torch.from_numpy(weight))
        model.head.bias.copy_(torch.from_numpy(bias))
    reviews: list[Example] = []
    if ds.name == "sentiment" and out_of_domain:
        try:
            reviews = review_examples(out_of_domain, seed)
        except DataError as exc:
            say(f"no out-of-domain figures: {exc}")
    losses: list[float] = []
    baseline: dict[str, EvalReport] = {}
    if not frozen and compare_frozen:
        baseline = _scores(model, tokenizer, domains, reviews, progress)
    if not frozen:
        losses = _finetune(
            model, tokenizer, train_set, epochs, batch_size, lr, head_lr, seed, progress
        )
    t0 = time.perf_counter()
    calibration, validation_ece = (
        _calibrate_head(model, tokenizer, domains, progress)
        if calibrated
        else (Calibration(1.0, [0.0] * len(labels)), {})
    )
    calibrate_s = time.perf_counter() - t0
    fit_s = time.perf_counter() - started
    t0 = time.perf_counter()
    scores = _scores(model, tokenizer, domains, reviews, progress)
    eval_s = time.perf_counter() - t0
    report = scores[domains[0].name]
    train_info: dict[str, Any] = {
        "dataset": ds.name,
        "source": str(Path(dataset).resolve())
        if ds.name not in ("sentiment", "topic")
        else ds.name,
        "domains": {
            d.name: {"train": len(d.train), "validation": len(d.validation), "test": len(d.test)}
            for d in domains
        },
        "frozen": frozen,
        "n_train": len(train_set),
        "n_test": sum(len(d.test) for d in domains),
        "seed": seed,
        "C": c,
        "epochs": epochs if not frozen else 0,
        "losses": losses,
        "embed_texts_per_s": round(len(head_set) / embed_s, 1) if embed_s else None,
        "embed_seconds": round(embed_s, 2),
        "head_fit_seconds": round(head_s, 2),
        "calibrate_seconds": round(calibrate_s, 2),
        "fit_seconds": round(fit_s, 2),
        "eval_seconds": round(eval_s, 2),
        "threads": torch.get_num_threads(),
        "scores": _summary(scores),
    }
    if calibrated:
        train_info["calibration"] = {
            "temperature": round(calibration.temperature, 4),
            "offsets": dict(zip(labels, (round(v, 4) for v in calibration.offsets), strict=True)),
            "validation_ece": validation_ece,
        }
    if baseline:
        train_info["frozen_head_scores"] = _summary(baseline)

    root = Path(out_dir) if out_dir is not None else models_dir()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    os.chmod(tmp, 0o755)
    try:
        model.save_head(tmp / HEAD_FILE)
        shutil.copyfile(enc_path / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
        encoder_ref = PACKAGE_ENCODER
        if not frozen:
            encoder_ref = ENCODER_SUBDIR
            save_pretrained: Any = getattr(model.encoder, "save_pretrained")  # noqa: B009
            save_pretrained(str(tmp / ENCODER_SUBDIR), safe_serialization=True)
        content_hash = compute_hash(tmp, name, labels, encoder_ref)
        total_s = time.perf_counter() - started
        train_info["total_seconds"] = round(total_s, 2)
        full = EvalReport(
            labels=report.labels,
            n=report.n,
            accuracy=report.accuracy,
            macro_f1=report.macro_f1,
            per_label=report.per_label,
            confusion=report.confusion,
            extra={"split": "test", **train_info},
        )
        meta = {
            "format": 1,
            "name": name,
            "labels": labels,
            "encoder": encoder_ref,
            "max_seq_len": DEFAULT_MAX_SEQ_LEN,
            "hash": content_hash,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "train": train_info,
            "metrics": {"accuracy": report.accuracy, "macro_f1": report.macro_f1},
        }
        (tmp / REPORT_FILE).write_text(json.dumps(full.to_dict(), indent=2) + "\n")
        (tmp / MODEL_JSON).write_text(json.dumps(meta, indent=2) + "\n")
        for written in tmp.rglob("*"):
            os.chmod(written, 0o755 if written.is_dir() else 0o644)
        final = root / f"{name}-{content_hash[:12]}"
        if final.exists():
            shutil.rmtree(tmp)
            os.utime(final / MODEL_JSON)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(full.table())
    say("")
    if calibrated:
        say(
            f"calibrated on {sum(len(d.validation) for d in domains)} validation texts: "
            f"temperature {calibration.temperature:.3f}, offsets "
            + ", ".join(f"{k} {v:+.3f}" for k, v in zip(labels, calibration.offsets, strict=True))
            + "; validation ECE "
            + ", ".join(
                f"{k} {v['before']:.3f} -> {v['after']:.3f}" for k, v in validation_ece.items()
            )
        )
    for title, found in (("frozen-encoder head", baseline), (name, scores)):
        for key, report_of in found.items():
            say(f"{title:<26} {DOMAIN_TITLES.get(key, key):<34} {describe(report_of)}")
    say(f"model written to {final} in {total_s:.1f}s")
    return final
