"""sha256 helpers shared by model folders and the registry (no heavy imports)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of a JSON value in canonical form (sorted keys, no spaces)."""
    data = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(data).hexdigest()


def hash_files(root: Path, names: list[str]) -> dict[str, str]:
    """{relative path: sha256} for the named files under root."""
    return {name: sha256_file(root / name) for name in sorted(names)}


def combined_hash(parts: Mapping[str, Any]) -> str:
    return sha256_json(dict(parts))
