"""Fine-tune a Hugging Face sequence classifier from the packaged MiniLM and save it in the
standard Hugging Face folder layout (config.json with id2label, model.safetensors,
tokenizer.json): a user's own model, made here, for `inflow engine build --model`.

`layers` keeps the encoder's first N layers (2 of MiniLM's 6 trains in about a minute on 2
cores), so tests and CI can afford it; the folder is cached by its settings under
`<models root>/hf/`, like the default model.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engines.assets import encoder_dir, models_dir, set_offline
from engines.builder.data import DEFAULT_SEED, load_dataset, stratified_sample, stratified_split
from engines.hashing import combined_hash
from engines.modeldir import TOKENIZER_FILE

REPORT = "inflow_report.json"


def train_hf_classifier(
    dataset: str = "topic",
    layers: int = 2,
    max_train: int = 600,
    max_eval: int = 400,
    epochs: int = 2,
    max_seq: int = 128,
    batch_size: int = 16,
    lr: float = 3e-4,
    seed: int = DEFAULT_SEED,
    out_dir: Path | None = None,
    echo: Callable[[str], None] | None = print,
) -> Path:
    """The folder `<out_dir or models root>/hf/minilm-l<layers>-<dataset>-<hash>/` (trained
    once per settings): BertForSequenceClassification, labels from the dataset."""
    settings = {
        "dataset": dataset,
        "layers": layers,
        "max_train": max_train,
        "epochs": epochs,
        "max_seq": max_seq,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
    }
    name = f"minilm-l{layers}-{dataset}-{combined_hash(settings)[:8]}"
    final = (out_dir or models_dir()) / "hf" / name
    if (final / "model.safetensors").is_file() and (final / REPORT).is_file():
        return final
    say = echo or (lambda _m: None)
    set_offline()
    import torch
    from transformers import AutoModelForSequenceClassification

    from engines.builder.metrics import evaluate
    from engines.tokenize import Tokenizer

    started = time.perf_counter()
    torch.manual_seed(seed)
    ds = load_dataset(dataset)
    labels = ds.labels
    split = stratified_split(ds.examples, seed=seed)
    train = stratified_sample(split.train, max_train, seed)
    test = stratified_sample(split.test, max_eval, seed)
    say(f"fine-tuning {name}: {len(train)} train / {len(test)} test examples ({', '.join(labels)})")
    model: Any = AutoModelForSequenceClassification.from_pretrained(
        str(encoder_dir()),
        local_files_only=True,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        num_hidden_layers=layers,
    )
    tokenizer = Tokenizer(encoder_dir() / TOKENIZER_FILE, max_seq)
    index = {label: i for i, label in enumerate(labels)}
    items = tokenizer.tokenize([t for t, _ in train])
    order = list(range(len(train)))
    # Frozen embeddings, as in engines.builder.train: a fifth of a step's cost, no measured gain.
    for param in model.base_model.embeddings.parameters():
        param.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.01)
    model.train()
    rng = random.Random(seed)
    for _ in range(epochs):
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = tokenizer.pad([items[i] for i in idx])
            out = model(
                input_ids=torch.from_numpy(enc.input_ids),
                attention_mask=torch.from_numpy(enc.attention_mask),
                labels=torch.tensor([index[train[i][1]] for i in idx]),
            )
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
    model.eval()
    predicted: list[str] = []
    with torch.inference_mode():
        test_items = tokenizer.tokenize([t for t, _ in test])
        for start in range(0, len(test), 32):
            enc = tokenizer.pad(test_items[start : start + 32])
            logits = model(
                input_ids=torch.from_numpy(enc.input_ids),
                attention_mask=torch.from_numpy(enc.attention_mask),
            ).logits
            predicted += [labels[int(i)] for i in logits.argmax(dim=1)]
    report = evaluate([label for _, label in test], predicted, labels)
    model.config.inflow_dataset = dataset  # the parity gate's gold labels
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        shutil.copyfile(encoder_dir() / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
        summary = {
            **settings,
            "accuracy": report.accuracy,
            "macro_f1": report.macro_f1,
            "n_test": report.n,
            "seconds": round(time.perf_counter() - started, 1),
        }
        (tmp / REPORT).write_text(json.dumps(summary, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(
        f"{name}: accuracy {report.accuracy:.4f}, macro-F1 {report.macro_f1:.4f} on {report.n} "
        f"held-back examples ({summary['seconds']}s)"
    )
    return final
