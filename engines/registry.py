"""Versioned engine artifacts with an atomically switched `active` pointer.

Layout of a registry root (default `.inflow/engines/`):
  versions/<version>/manifest.json   what was built, from what, its file hashes, parity, status
  versions/<version>/<artifacts>     model.onnx | model.plan | head + model.json, tokenizer.json
  active                             the active version (one line; replaced atomically)
  history.json                       stack of activations; `rollback` pops it
  .lock                              serialises writers (flock)
Versions are named `v<N>-<backend>-<precision>-<model hash 8>` (N grows by one per build).
Reading is lock-free: `active_version()` is one small file read, cheap enough to poll.
No torch/onnxruntime imports here.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from engines.errors import (
    ActivationRefused,
    EngineLoadError,
    EngineNotFound,
    IntegrityError,
    NothingToRollBack,
)
from engines.hashing import sha256_file

MANIFEST = "manifest.json"
ACTIVE = "active"
HISTORY = "history.json"
VERSIONS = "versions"
ACCEPTED = "accepted"
REJECTED = "rejected"
_VERSION_RE = re.compile(r"^v(\d+)-[a-z0-9]+-[a-z0-9]+-[0-9a-f]+$")
MANIFEST_FORMAT = 1


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_atomic(path: Path, text: str) -> None:
    """Write a small file so readers see either the old or the new content, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@dataclass(slots=True)
class Manifest:
    """Everything needed to load, trust and explain one engine build."""

    version: str
    model_name: str
    model_hash: str
    labels: list[str]
    backend: str  # "onnxruntime" | "tensorrt" | "torch"
    precision: str  # "fp32" | "fp16" | "int8"
    max_batch: int
    max_seq: int
    artifact: str  # the runtime's main file, relative to the version folder
    tokenizer: str  # relative path of tokenizer.json
    files: dict[str, str]  # relative path -> sha256, every artifact file
    status: str  # "accepted" | "rejected"
    created: str
    parity: dict[str, Any] | None = None
    reason: str = ""  # why it was rejected (one line), empty when accepted
    extra: dict[str, Any] = field(default_factory=dict)
    format: int = MANIFEST_FORMAT
    # Manifests written before these fields existed are the default classifier's.
    task: str = "classification"  # "classification" | "embedding"
    embedding_dim: int = 384
    # What the engine predicts on the evaluation split of its model's data (labels and
    # confidence, engines.drift.Distribution.to_dict): the reference of the live drift watch.
    # None for an embedder, or for a build that predates it (`inflow engine baseline`).
    baseline: dict[str, Any] | None = None

    @property
    def accepted(self) -> bool:
        return self.status == ACCEPTED

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def read(cls, path: Path) -> Manifest:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise EngineNotFound(f"{path} is missing") from None
        except (ValueError, TypeError) as exc:
            raise EngineLoadError(f"{path} is not a valid manifest ({exc}): rebuild it") from None


StrList = list[str]
ManifestList = list[Manifest]


def version_number(version: str) -> int:
    m = _VERSION_RE.match(version)
    return int(m.group(1)) if m else 0


class Registry:
    """Engine versions under one root folder. Safe for several processes (flock on writes)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    # ----------------------------------------------------------------- paths & reading
    @property
    def versions_dir(self) -> Path:
        return self.root / VERSIONS

    def path(self, version: str) -> Path:
        if not version or "/" in version or version.startswith("."):
            raise EngineNotFound(f"{version!r} is not an engine version name")
        return self.versions_dir / version

    def exists(self, version: str) -> bool:
        return (self.path(version) / MANIFEST).is_file()

    def get(self, version: str) -> Manifest:
        path = self.path(version) / MANIFEST
        if not path.is_file():
            raise EngineNotFound(
                f"no engine {version!r} in {self.root}: `inflow engine list` shows the versions"
            )
        return Manifest.read(path)

    def list(self) -> ManifestList:
        """Every version, oldest first."""
        if not self.versions_dir.is_dir():
            return []
        out: ManifestList = []
        for child in self.versions_dir.iterdir():
            if (child / MANIFEST).is_file():
                try:
                    out.append(Manifest.read(child / MANIFEST))
                except EngineLoadError:
                    continue
        out.sort(key=lambda m: (version_number(m.version), m.created))
        return out

    def active_version(self) -> str | None:
        """The active version, or None. One small file read: cheap enough to poll."""
        try:
            text = (self.root / ACTIVE).read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return text or None

    def active(self) -> Manifest | None:
        version = self.active_version()
        return None if version is None else self.get(version)

    def embedding_dim(self, version: str | None = None) -> int | None:
        """The embedding width of `version` (default: the active one); None without one."""
        version = version or self.active_version()
        return None if version is None else self.get(version).embedding_dim

    def history(self) -> StrList:
        """Activations, oldest first; the last entry is the active version."""
        try:
            data = json.loads((self.root / HISTORY).read_text())
        except (FileNotFoundError, ValueError):
            return []
        stack = data.get("stack", []) if isinstance(data, dict) else []
        return [str(v) for v in stack]

    # ------------------------------------------------------------------ verification
    def verify(self, version: str) -> Manifest:
        """Check every artifact's sha256 against the manifest; raise IntegrityError if not."""
        manifest = self.get(version)
        verify_files(self.path(version), manifest)
        return manifest

    # ----------------------------------------------------------------------- writing
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("a") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def stage(self) -> Path:
        """A private folder inside the registry to assemble a build in (see `commit`)."""
        self.root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root))

    def discard(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    def commit(self, staging: Path, manifest: Manifest) -> Manifest:
        """Hash the staged files, name the version, write its manifest, move it in place.

        `manifest.version` and `manifest.files` are filled in here.
        """
        staging = Path(staging)
        files = {
            str(p.relative_to(staging)): sha256_file(p)
            for p in sorted(staging.rglob("*"))
            if p.is_file() and p.name != MANIFEST
        }
        for required in (manifest.artifact, manifest.tokenizer):
            if required not in files and not (staging / required).is_dir():
                raise EngineLoadError(f"build is missing {required}: nothing was registered")
        manifest.files = files
        with self._locked():
            self.versions_dir.mkdir(parents=True, exist_ok=True)
            n = 1 + max((version_number(p.name) for p in self.versions_dir.iterdir()), default=0)
            version = f"v{n}-{manifest.backend}-{manifest.precision}-{manifest.model_hash[:8]}"
            manifest.version = version
            (staging / MANIFEST).write_text(manifest.to_json())
            os.chmod(staging, 0o755)
            os.replace(staging, self.path(version))
        return manifest

    def activate(self, version: str, force: bool = False) -> Manifest:
        """Point `active` at `version` (verified first). Rejected builds need `force`."""
        manifest = self.verify(version)
        if not manifest.accepted and not force:
            why = f": {manifest.reason}" if manifest.reason else ""
            raise ActivationRefused(
                f"engine {version} was {manifest.status} by the parity gate{why}; "
                f"pass --force to activate it anyway"
            )
        with self._locked():
            stack = self.history()
            current = self.active_version()
            if current is not None and (not stack or stack[-1] != current):
                stack.append(current)
            if not stack or stack[-1] != version:
                stack.append(version)
            self._write_history(stack)
            write_atomic(self.root / ACTIVE, version + "\n")
        return manifest

    def rollback(self) -> str:
        """Re-activate the previously active version; returns it."""
        with self._locked():
            stack = self.history()
            current = self.active_version()
            if current is not None and (not stack or stack[-1] != current):
                stack.append(current)
            while len(stack) >= 2:
                stack.pop()
                previous = stack[-1]
                if self.exists(previous):
                    verify_files(self.path(previous), self.get(previous))
                    self._write_history(stack)
                    write_atomic(self.root / ACTIVE, previous + "\n")
                    return previous
            raise NothingToRollBack(
                f"no earlier active engine recorded in {self.root}: "
                "`inflow engine activate VERSION` picks one"
            )

    def record_baseline(self, version: str, baseline: dict[str, Any]) -> Manifest:
        """Write `version`'s drift baseline into its manifest (for builds made before builds
        recorded one). The artifacts and their hashes are untouched."""
        with self._locked():
            manifest = self.get(version)
            manifest.baseline = baseline
            write_atomic(self.path(version) / MANIFEST, manifest.to_json())
        return manifest

    def deactivate(self) -> None:
        with self._locked(), contextlib.suppress(FileNotFoundError):
            os.unlink(self.root / ACTIVE)

    def remove(self, version: str) -> None:
        """Delete a version's folder (refuses the active one)."""
        if version == self.active_version():
            raise ActivationRefused(f"{version} is active: activate another version first")
        with self._locked():
            shutil.rmtree(self.path(version), ignore_errors=True)

    def _write_history(self, stack: StrList) -> None:
        write_atomic(self.root / HISTORY, json.dumps({"stack": stack[-100:]}, indent=2) + "\n")


def verify_files(folder: Path, manifest: Manifest) -> None:
    """Raise IntegrityError (one line) when an artifact is missing or its sha256 differs."""
    if not manifest.files:
        raise IntegrityError(f"engine {manifest.version} lists no files: rebuild it")
    for name, expected in manifest.files.items():
        path = folder / name
        if not path.is_file():
            raise IntegrityError(
                f"engine {manifest.version}: artifact {name} is missing; rebuild with "
                "`inflow engine build`"
            )
        actual = sha256_file(path)
        if actual != expected:
            raise IntegrityError(
                f"engine {manifest.version}: artifact {name} has sha256 {actual[:12]}…, the "
                f"manifest says {expected[:12]}… (modified after the build); rebuild with "
                "`inflow engine build`"
            )
