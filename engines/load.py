"""Load an engine from the registry: the only engines module serving code needs.

`load_engine(root)` reads the active (or named) version's manifest, verifies every
artifact's sha256, opens the backend the manifest names and warms it up. Loading an
onnxruntime engine imports neither torch nor any export/training code.
"""

from __future__ import annotations

from pathlib import Path

from engines.backends.base import Backend
from engines.errors import EngineError, EngineLoadError, EngineNotFound
from engines.registry import Manifest, Registry, verify_files
from engines.runtime import LoadedEngine
from engines.tokenize import Tokenizer
from engines.types import Engine, ModelIdentity


def open_engine(
    folder: Path,
    manifest: Manifest,
    *,
    warmup: bool = True,
    threads: int | None = None,
    providers: list[str] | None = None,
    max_passages: int = 1,
) -> LoadedEngine:
    """Open the artifacts in `folder` as described by `manifest` (no hash check here)."""
    folder = Path(folder)
    artifact = folder / manifest.artifact
    backend: Backend
    try:
        if manifest.backend == "onnxruntime":
            from engines.backends.onnxruntime import OnnxRuntimeBackend

            backend = OnnxRuntimeBackend(
                artifact,
                manifest.precision,
                manifest.max_batch,
                manifest.max_seq,
                intra_op_threads=threads,
                providers=providers,
            )
        elif manifest.backend == "torch":
            from engines.builder.model import load_serving_model
            from engines.builder.torch_backend import TorchBackend

            backend = TorchBackend(
                load_serving_model(folder),
                manifest.precision,
                manifest.max_batch,
                manifest.max_seq,
                threads=threads,
            )
        elif manifest.backend == "tensorrt":
            from engines.backends.tensorrt import TensorRTBackend

            backend = TensorRTBackend.load(artifact)
        else:
            raise EngineLoadError(
                f"engine {manifest.version} names unknown backend {manifest.backend!r}: rebuild it"
            )
    except EngineError:
        raise
    except ImportError as exc:
        raise EngineLoadError(
            f"engine {manifest.version} needs {exc.name or 'a missing package'}: install it or "
            "activate an onnxruntime engine"
        ) from exc
    except Exception as exc:  # the runtime refused the artifact (onnxruntime's own types)
        raise EngineLoadError(
            f"engine {manifest.version} cannot be opened: {describe_failure(exc)}"
        ) from exc
    try:
        max_seq = min(manifest.max_seq, backend.max_seq_len)
        tokenizer = Tokenizer(folder / manifest.tokenizer, max_seq)
        identity = ModelIdentity(
            name=manifest.model_name,
            version=manifest.version,
            backend=manifest.backend,
            precision=manifest.precision,
            task=manifest.task,
            embedding_dim=manifest.embedding_dim,
        )
        engine = LoadedEngine(tokenizer, backend, identity, manifest.labels, max_passages)
    except Exception as exc:
        backend.close()  # the session is open: give its memory back
        if isinstance(exc, EngineError):
            raise
        raise EngineLoadError(
            f"engine {manifest.version} cannot be opened: {describe_failure(exc)}"
        ) from exc
    if warmup:
        try:
            engine.warmup()
        except Exception as exc:
            # A graph that disagrees with its manifest, or a runtime that cannot run it here,
            # shows first in the warm-up: one typed, one-line error naming the version.
            engine.close()
            raise EngineLoadError(
                f"engine {manifest.version} failed its warm-up: {describe_failure(exc)}"
            ) from exc
    return engine


def describe_failure(exc: BaseException) -> str:
    """An exception as one line (runtime errors span lines): ours say what to do as they are;
    any other is prefixed with its type, which often is the cause (onnxruntime's Fail)."""
    text = " ".join(str(exc).split())
    if isinstance(exc, EngineError):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def load_engine(
    registry_root: Path | str,
    version: str | None = None,
    *,
    warmup: bool = True,
    verify: bool = True,
    threads: int | None = None,
    providers: list[str] | None = None,
    max_passages: int = 1,
) -> Engine:
    """The active engine (or `version`) of the registry at `registry_root`, warmed up.

    Raises EngineNotFound when there is none, IntegrityError when an artifact was changed,
    EngineLoadError when it cannot be opened here. Messages are one line saying what to do.
    """
    registry = Registry(Path(registry_root))
    if version is None:
        version = registry.active_version()
        if version is None:
            raise EngineNotFound(
                f"no active engine in {registry.root}: run `inflow engine ensure` "
                "(or `inflow engine build`)"
            )
    manifest = registry.get(version)
    folder = registry.path(version)
    if verify:
        verify_files(folder, manifest)
    return open_engine(
        folder,
        manifest,
        warmup=warmup,
        threads=threads,
        providers=providers,
        max_passages=max_passages,
    )
