"""Users' own models: Hugging Face classifiers and sentence-transformers embedders of every
supported encoder family (BERT, DistilBERT, MPNet; any width, depth, sequence length).

Tiny random models in the standard Hugging Face folder layout (tokenizer from the packaged
MiniLM) go through the real build: export, onnxruntime fp32 and int8, the torch reference,
the parity gate, the registry and `load_engine`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engines.assets import encoder_dir
from engines.modeldir import KIND_CLASSIFIER, KIND_EMBEDDER, read_model

WHY = "the build extra (pip install -e '.[build]') trains and exports with torch and transformers"
pytest.importorskip("torch", reason=WHY)
pytest.importorskip("transformers", reason=WHY)

LABELS = ["alpha", "beta", "gamma"]
TEXTS = ["A short text.", "Another, somewhat longer text about markets and films."]


def _config(family: str, width: int, layers: int) -> Any:
    import transformers as tf

    common: dict[str, Any] = {"vocab_size": 30522, "max_position_embeddings": 130}
    if family == "bert":
        return tf.BertConfig(
            hidden_size=width,
            num_hidden_layers=layers,
            num_attention_heads=4,
            intermediate_size=2 * width,
            **common,
        )
    if family == "distilbert":
        return tf.DistilBertConfig(
            dim=width, n_layers=layers, n_heads=4, hidden_dim=2 * width, **common
        )
    return tf.MPNetConfig(
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * width,
        pad_token_id=0,
        **common,
    )


def make_classifier(root: Path, family: str, width: int, layers: int = 2) -> Path:
    import torch
    import transformers as tf

    torch.manual_seed(width + layers)
    config = _config(family, width, layers)
    config.id2label = dict(enumerate(LABELS))
    config.label2id = {label: i for i, label in enumerate(LABELS)}
    model = tf.AutoModelForSequenceClassification.from_config(config).eval()
    folder = root / f"{family}-{width}-classifier"
    model.save_pretrained(str(folder), safe_serialization=True)
    shutil.copyfile(encoder_dir() / "tokenizer.json", folder / "tokenizer.json")
    return folder


def make_embedder(root: Path, family: str, width: int, pooling: str, normalize: bool) -> Path:
    import torch
    import transformers as tf

    torch.manual_seed(width)
    model = tf.AutoModel.from_config(_config(family, width, 2)).eval()
    folder = root / f"{family}-{width}-{pooling}-embedder"
    model.save_pretrained(str(folder), safe_serialization=True)
    shutil.copyfile(encoder_dir() / "tokenizer.json", folder / "tokenizer.json")
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    if normalize:
        modules.append(
            {
                "idx": 2,
                "name": "2",
                "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize",
            }
        )
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": width,
                "pooling_mode_cls_token": pooling == "cls",
                "pooling_mode_mean_tokens": pooling == "mean",
                "pooling_mode_max_tokens": pooling == "max",
                "pooling_mode_mean_sqrt_len_tokens": False,
            }
        )
    )
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64}))
    return folder


@pytest.fixture(autouse=True)
def _models_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFLOW_MODEL_DIR", str(tmp_path / "models"))


@pytest.mark.parametrize(("family", "width"), [("bert", 48), ("distilbert", 64), ("mpnet", 32)])
def test_classifier_folders_build_gate_and_serve(tmp_path: Path, family: str, width: int) -> None:
    from engines.builder.pipeline import build
    from engines.load import load_engine

    folder = make_classifier(tmp_path, family, width)
    info = read_model(folder)
    assert (info.kind, info.labels, info.embedding_dim) == (KIND_CLASSIFIER, LABELS, width)
    registry = tmp_path / "engines"
    for backend, precision in (("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("torch", "fp32")):
        manifest = build(
            backend,
            precision,
            max_batch=8,
            max_seq=64,
            model=folder,
            registry_root=registry,
            parity_texts=48,
            activate=False,
            echo=None,
            progress=False,
        )
        assert (manifest.task, manifest.embedding_dim, manifest.labels) == (
            "classification",
            width,
            LABELS,
        )
        assert manifest.parity is not None
        if precision == "fp32":  # int8 of random weights may be rejected, with its reasons
            assert manifest.accepted, manifest.reason
        else:
            assert manifest.accepted or manifest.reason
        engine = load_engine(registry, manifest.version)
        result = engine.predict(TEXTS)
        engine.close()
        assert result.embeddings.shape == (2, width)
        assert all(label in LABELS for label in result.labels)
        assert all(abs(sum(s.values()) - 1.0) < 1e-4 for s in result.scores)
        assert np.allclose(np.linalg.norm(result.embeddings, axis=1), 1.0, atol=1e-4)
        assert result.model.task == "classification" and result.model.embedding_dim == width


@pytest.mark.parametrize(
    ("family", "width", "pooling", "normalize"),
    [("bert", 40, "mean", True), ("distilbert", 32, "cls", False), ("mpnet", 48, "max", True)],
)
def test_embedder_folders_build_gate_and_serve(
    tmp_path: Path, family: str, width: int, pooling: str, normalize: bool
) -> None:
    from engines.builder.model import load_serving_model
    from engines.builder.pipeline import build
    from engines.load import load_engine

    folder = make_embedder(tmp_path, family, width, pooling, normalize)
    info = read_model(folder)
    assert (info.kind, info.labels, info.embedding_dim) == (KIND_EMBEDDER, [], width)
    assert (info.pooling, info.normalize, info.max_seq_len) == (pooling, normalize, 64)
    module = load_serving_model(info)
    assert (module.pooling, module.normalize) == (pooling, normalize)
    registry = tmp_path / "engines"
    manifest = build(
        "onnxruntime",
        "fp32",
        max_batch=8,
        max_seq=64,
        model=folder,
        registry_root=registry,
        parity_texts=32,
        activate=True,
        echo=None,
        progress=False,
    )
    assert manifest.accepted, manifest.reason
    assert (manifest.task, manifest.embedding_dim, manifest.labels) == ("embedding", width, [])
    assert manifest.parity is not None and manifest.parity["cosine_min"] > 0.999
    assert manifest.extra["pooling"] == pooling and manifest.extra["normalize"] == normalize
    engine = load_engine(registry)
    batch = engine.predict(TEXTS)
    single = [engine.predict([t]) for t in TEXTS]
    engine.close()
    assert batch.labels == [None, None] and batch.scores == [{}, {}]
    assert batch.embeddings.shape == (2, width)
    for i, one in enumerate(single):  # batched == one at a time
        assert float(one.embeddings[0] @ batch.embeddings[i]) > 0.9999


@pytest.mark.parametrize(
    ("files", "words"),
    [
        ({}, "missing config.json, tokenizer.json, model.safetensors or pytorch_model.bin"),
        (
            {
                "config.json": {"architectures": ["BertModel"], "hidden_size": 8},
                "tokenizer.json": {},
                "model.safetensors": "",
            },
            "no modules.json",
        ),
        (
            {
                "config.json": {
                    "architectures": ["BertForSequenceClassification"],
                    "hidden_size": 8,
                },
                "tokenizer.json": {},
                "model.safetensors": "",
            },
            "no id2label",
        ),
    ],
)
def test_unsupported_folder_is_one_line_naming_what_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], files: dict[str, Any], words: str
) -> None:
    from streams.cli.engine import main

    folder = tmp_path / "not-a-model"
    folder.mkdir()
    for name, content in files.items():
        (folder / name).write_text(content if isinstance(content, str) else json.dumps(content))
    code = main(
        ["--registry", str(tmp_path / "engines"), "engine", "build", "--model", str(folder)]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("inflow: error: ") and words in err
