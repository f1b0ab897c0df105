"""Build an engine version: export/compile, gate it against the torch reference, register it.

  build(backend, precision, ...) -> Manifest   one version (accepted or rejected)
  ensure(...) -> Manifest                       an active engine exists afterwards
Export, training and torch are imported lazily: this is tooling, not serving code.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from engines.assets import models_dir, registry_dir
from engines.builder.parity import (
    ParityReport,
    Thresholds,
    compare,
    fp16_numerics,
    reference_outputs,
)
from engines.errors import BackendUnavailable, BuildError, EngineError
from engines.modeldir import (
    DEFAULT_MODEL_NAME,
    ENCODER_SUBDIR,
    HEAD_FILE,
    KIND_HEAD,
    MODEL_JSON,
    TASK_CLASSIFICATION,
    TOKENIZER_FILE,
    ModelInfo,
    find_model,
    hf_content_files,
    read_model,
)
from engines.registry import ACCEPTED, REJECTED, Manifest, Registry

BACKENDS: dict[str, tuple[str, ...]] = {
    "onnxruntime": ("fp32", "int8"),
    "torch": ("fp32", "fp16"),
    "tensorrt": ("fp16", "fp32"),
}
DEFAULT_PRECISION = {"onnxruntime": "int8", "torch": "fp32", "tensorrt": "fp16"}
DEFAULT_PARITY_TEXTS = 500
DEFAULT_MODEL_REVIEWS = 500  # out-of-domain IMDB reviews scored when ensure trains the default
Echo = Callable[[str], None]


def _silent(_msg: str) -> None:
    return None


def resolve_model(
    model: Path | str | None = None,
    models_root: Path | None = None,
    progress: bool = True,
    echo: Echo = print,
) -> ModelInfo:
    """The given model folder, else the newest default sentiment head (trained if missing)."""
    if model is not None:
        return read_model(Path(model))
    root = models_root or models_dir()
    found = find_model(root, DEFAULT_MODEL_NAME)
    if found is not None:
        return read_model(found)
    echo(f"no trained {DEFAULT_MODEL_NAME} model in {root}: fine-tuning it (a few minutes)")
    from engines.builder.train import train

    path = train(
        "sentiment",
        frozen=False,
        out_dir=root,
        progress=progress,
        echo=echo,
        out_of_domain=DEFAULT_MODEL_REVIEWS,
        compare_frozen=False,
    )
    return read_model(path)


def drift_baseline(info: ModelInfo, probs: Any, n: int) -> dict[str, Any]:
    """The drift watch's reference: labels and confidence of an engine's class probabilities
    on the evaluation split (`parity_examples`)."""
    from engines.drift import Distribution

    source = str(info.meta.get("train", {}).get("source", "sentiment"))
    return Distribution.of_scores(
        info.labels, probs.tolist(), source=f"validation split of {source} (n={n})"
    ).to_dict()


def baseline_is_current(manifest: Manifest) -> bool:
    from engines.drift import Distribution

    return Distribution.is_current(manifest.baseline)


def record_baseline(
    version: str | None = None,
    registry_root: Path | str | None = None,
    models_root: Path | None = None,
    parity_texts: int = DEFAULT_PARITY_TEXTS,
    echo: Echo = print,
) -> Manifest:
    """Record the drift baseline of a version built before builds recorded one: the engine
    runs on the same evaluation split as its parity gate."""
    from engines.load import open_engine

    registry = Registry(Path(registry_root) if registry_root is not None else registry_dir())
    version = version or registry.active_version()
    if version is None:
        raise BuildError(f"no active engine in {registry.root}: name a version")
    manifest = registry.verify(version)
    if manifest.task != TASK_CLASSIFICATION:
        raise BuildError(f"{version} is an embedder: drift is watched on classifiers' labels")
    folder = (models_root or models_dir()) / f"{manifest.model_name}-{manifest.model_hash[:12]}"
    info = read_model(folder) if folder.is_dir() else None
    if info is None or info.hash != manifest.model_hash:
        raise BuildError(f"the model of {version} is not under {folder}: cannot recreate its split")
    examples = parity_examples(info, parity_texts)
    engine = open_engine(registry.path(version), manifest, warmup=False)
    try:
        probs, _, _ = engine.run_raw([t for t, _ in examples])
    finally:
        engine.close()
    updated = registry.record_baseline(version, drift_baseline(info, probs, len(examples)))
    echo(f"recorded the drift baseline of {version} on {len(examples)} evaluation texts")
    return updated


def _evaluation(info: ModelInfo) -> dict[str, Any]:
    """The per-domain scores `inflow train` stored with the model (empty for other models)."""
    scores = info.meta.get("train", {}).get("scores", {})
    return scores if isinstance(scores, dict) else {}


def parity_examples(info: ModelInfo, n: int = DEFAULT_PARITY_TEXTS) -> list[tuple[str, str]]:
    """Held-back validation examples of the dataset the model was trained on."""
    from engines.builder.data import dataset_of, validation_examples

    return validation_examples(n, dataset_of(info.meta.get("train", {}).get("source")))


def _check_combo(backend: str, precision: str) -> None:
    if backend not in BACKENDS:
        raise BuildError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if precision not in BACKENDS[backend]:
        hint = {
            (
                "onnxruntime",
                "fp16",
            ): " (fp16 brings no speed on CPU; use int8, or tensorrt on a GPU)",
            ("tensorrt", "int8"): " (use fp16)",
        }.get((backend, precision), "")
        raise BuildError(
            f"{backend} does not build {precision} engines: choose "
            f"{' or '.join(BACKENDS[backend])}{hint}"
        )


def _require_tensorrt() -> None:
    """Fail fast (before exporting anything) where TensorRT cannot be imported."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        raise BackendUnavailable(
            "tensorrt is not installed: pip install 'inflow[gpu]' on a host with an NVIDIA GPU "
            "(on CPU hosts build onnxruntime engines)"
        )


def _stage_artifacts(
    info: ModelInfo,
    staging: Path,
    backend: str,
    precision: str,
    max_batch: int,
    max_seq: int,
    progress: bool,
    echo: Echo,
) -> tuple[str, dict[str, Any]]:
    """Copy/compile the runtime files into `staging`; returns (artifact name, extra info)."""
    shutil.copyfile(info.tokenizer_path, staging / TOKENIZER_FILE)
    extra: dict[str, Any] = {}
    if backend == "onnxruntime":
        from engines.builder.export import INT8_SETTINGS, export_model

        onnx_path = export_model(info, precision, progress=progress, fused=True)
        shutil.copyfile(onnx_path, staging / "model.onnx")
        if precision == "int8":
            extra["quantization"] = {"method": "dynamic", **INT8_SETTINGS}
        return "model.onnx", extra
    if backend == "torch" and info.kind != KIND_HEAD:  # a Hugging Face folder: its own files
        for name in hf_content_files(info.path):
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(info.path / name, staging / name)
        return "config.json", extra
    if backend == "torch":
        shutil.copyfile(info.path / MODEL_JSON, staging / MODEL_JSON)
        shutil.copyfile(info.path / HEAD_FILE, staging / HEAD_FILE)
        if (info.path / ENCODER_SUBDIR).is_dir() and info.encoder == ENCODER_SUBDIR:
            shutil.copytree(info.path / ENCODER_SUBDIR, staging / ENCODER_SUBDIR)
        else:
            extra["encoder"] = info.encoder
        return MODEL_JSON, extra
    # tensorrt
    from engines.builder.export import export_model
    from engines.builder.tensorrt import build_plan

    onnx_path = export_model(info, "fp32", progress=progress)
    echo(f"building TensorRT {precision} plan (max batch {max_batch}, max seq {max_seq}) ...")
    extra["tensorrt"] = build_plan(
        onnx_path,
        staging / "model.plan",
        max_batch=max_batch,
        max_seq=max_seq,
        fp16=precision == "fp16",
        echo=echo if progress else None,
    )
    return "model.plan", extra


def manifest_for(
    info: ModelInfo,
    *,
    version: str,
    backend: str,
    precision: str,
    max_batch: int,
    max_seq: int,
    artifact: str,
    tokenizer: str = TOKENIZER_FILE,
    status: str = REJECTED,
    created: str = "",
    extra: dict[str, Any] | None = None,
) -> Manifest:
    """The manifest of an engine of the model `info` (its name, hash, labels, task and
    width), with no files listed yet: `Registry.commit` fills them in."""
    return Manifest(
        version=version,
        model_name=info.name,
        model_hash=info.hash,
        labels=info.labels,
        backend=backend,
        precision=precision,
        max_batch=max_batch,
        max_seq=max_seq,
        artifact=artifact,
        tokenizer=tokenizer,
        files={},
        status=status,
        created=created,
        extra=dict(extra or {}),
        task=info.task,
        embedding_dim=info.embedding_dim,
    )


def gate(
    candidate: Any,
    info: ModelInfo,
    examples: list[tuple[str, str]],
    thresholds: Thresholds,
    precision: str,
    max_seq: int,
    baseline: dict[str, Any] | None = None,
) -> ParityReport:
    """Run the parity gate of a loaded candidate engine on labelled examples. A classifier's
    label and confidence distribution on them goes into `baseline` when given (the drift
    watch's reference, engines.drift)."""
    texts = [t for t, _ in examples]
    gold = [label for _, label in examples]
    ref_p, ref_e = reference_outputs(info, texts, max_seq)
    cand_p, cand_e, _ = candidate.run_raw(texts)
    if baseline is not None and info.task == TASK_CLASSIFICATION:
        baseline.update(drift_baseline(info, cand_p, len(texts)))
    numerics = fp16_numerics(info, texts, "float16", max_seq) if precision == "fp16" else None
    labels_known = set(gold) <= set(info.labels)
    return compare(
        ref_p,
        ref_e,
        cand_p,
        cand_e,
        info.labels,
        gold=gold if labels_known else None,
        thresholds=thresholds,
        numerics=numerics,
        texts=texts,
    )


def build(
    backend: str = "onnxruntime",
    precision: str | None = None,
    max_batch: int = 64,
    max_seq: int = 256,
    model: Path | str | None = None,
    registry_root: Path | str | None = None,
    thresholds: Thresholds | None = None,
    parity_texts: int = DEFAULT_PARITY_TEXTS,
    activate: bool = False,
    force: bool = False,
    models_root: Path | None = None,
    progress: bool = True,
    echo: Echo | None = print,
) -> Manifest:
    """Build, gate and register one engine version; activate it when asked and accepted.

    `precision` defaults per backend: onnxruntime int8, torch fp32, tensorrt fp16.

    A build that fails the gate is registered with status "rejected" (its reasons in
    `manifest.reason`) and is only activated with `force`.
    """
    say = echo or _silent
    precision = precision or DEFAULT_PRECISION.get(backend, "fp32")
    _check_combo(backend, precision)
    if max_batch < 1 or max_seq < 8 or max_seq > 512:
        raise BuildError("max_batch must be >= 1 and max_seq within 8..512")
    if backend == "tensorrt":
        _require_tensorrt()
    th = thresholds or Thresholds()
    registry = Registry(Path(registry_root) if registry_root is not None else registry_dir())
    info = resolve_model(model, models_root, progress, say)
    if max_seq > info.max_seq_len:
        raise BuildError(f"max_seq {max_seq} exceeds the model's {info.max_seq_len}")
    started = time.perf_counter()
    staging = registry.stage()
    try:
        artifact, extra = _stage_artifacts(
            info, staging, backend, precision, max_batch, max_seq, progress, say
        )
        draft = manifest_for(
            info,
            version="candidate",
            backend=backend,
            precision=precision,
            max_batch=max_batch,
            max_seq=max_seq,
            artifact=artifact,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            extra={
                **extra,
                "model_kind": info.kind,
                "pooling": info.pooling,
                "normalize": info.normalize,
                # The model's evaluation per domain (`inflow train`), shown by `engine list`.
                **({"evaluation": scores} if (scores := _evaluation(info)) else {}),
            },
        )
        from engines.load import open_engine

        say(f"parity gate: {backend} {precision} vs torch fp32 on {parity_texts} texts ...")
        candidate = open_engine(staging, draft, warmup=True)
        baseline: dict[str, Any] = {}
        try:
            report = gate(
                candidate,
                info,
                parity_examples(info, parity_texts),
                th,
                precision,
                max_seq,
                baseline,
            )
        finally:
            candidate.close()
        draft.parity = report.to_dict()
        draft.baseline = baseline or None
        draft.status = ACCEPTED if report.passed else REJECTED
        draft.reason = "; ".join(report.failures)
        draft.extra["build_seconds"] = round(time.perf_counter() - started, 1)
        draft.extra["thresholds"] = asdict(th)
        manifest = registry.commit(staging, draft)
    except BaseException:
        registry.discard(staging)
        raise
    say(report.summary())
    say(f"registered {manifest.version} ({manifest.status}) in {registry.root}")
    if activate and (manifest.accepted or force):
        registry.activate(manifest.version, force=force)
        say(f"active engine: {manifest.version}")
    elif activate:
        say(f"not activated: {manifest.version} was rejected (use --force to override)")
    return manifest


def ensure(
    registry_root: Path | str | None = None,
    models_root: Path | None = None,
    thresholds: Thresholds | None = None,
    progress: bool = True,
    echo: Echo | None = print,
) -> Manifest:
    """Make sure an active, intact engine exists: train the default model if missing, build
    onnxruntime int8, gate it, activate it; fall back to fp32 when int8 is rejected."""
    say = echo or _silent
    registry = Registry(Path(registry_root) if registry_root is not None else registry_dir())
    current = registry.active_version()
    if current is not None:
        try:
            manifest = registry.verify(current)
        except EngineError as exc:
            say(f"active engine {current} is unusable ({exc}); building a new one")
        else:
            say(f"active engine: {current} ({manifest.backend} {manifest.precision})")
            if manifest.task == TASK_CLASSIFICATION and not baseline_is_current(manifest):
                manifest = record_baseline(current, registry.root, models_root, echo=say)
            return manifest
    info = resolve_model(None, models_root, progress, say)
    for precision in ("int8", "fp32"):
        for existing in reversed(registry.list()):
            if (
                existing.model_hash == info.hash
                and existing.backend == "onnxruntime"
                and existing.precision == precision
                and existing.accepted
            ):
                try:
                    registry.activate(existing.version)
                except EngineError:
                    continue
                say(f"activated existing engine {existing.version}")
                return existing
    # INT8 first (fastest on CPU); fp32 when the gate rejects it.
    for precision in ("int8", "fp32"):
        manifest = build(
            "onnxruntime",
            precision,
            model=info.path,
            registry_root=registry.root,
            thresholds=thresholds,
            activate=True,
            progress=progress,
            echo=say,
        )
        if manifest.accepted:
            return manifest
        say(f"{precision} was rejected by the parity gate ({manifest.reason})")
    raise BuildError(
        f"even the fp32 engine failed the parity gate ({manifest.reason}): "
        "retrain the model or relax the thresholds"
    )
