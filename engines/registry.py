"""Versioned engine artifacts with an atomically switched `active` pointer.

Layout of a registry root (default `.inflow/engines/`):
  versions/<version>/manifest.json   what was built, from what, its file hashes, parity, status
  versions/<version>/<artifacts>     model.onnx | model.plan | head + model.json, tokenizer.json
  active                             the active version (one line; replaced atomically)
  history.json                       stack of activations; `rollback` pops it
  rollout.json                       the latest shadow or canary of a candidate (RolloutRecord)
  rollout-stats/<worker>.json        each worker's live comparison of the candidate (opaque here)
  failed.json                        versions that failed to load, warm up or run on a worker
                                     (FailedRecord each); workers skip them until activated anew
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
ROLLOUT = "rollout.json"
ROLLOUT_STATS = "rollout-stats"
FAILED = "failed.json"
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
RecordList = list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class FailedRecord:
    """A version that failed to load, warm up or run somewhere (`failed.json`): workers do not
    load it again (a restart would only fail the same way) until it is activated anew."""

    version: str
    reason: str  # one line: the exception's type and message
    time: str = field(default_factory=_now)
    worker: str = ""  # who found it (app id, host, pid), empty when unknown

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FailedRecord:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: str(v) for k, v in data.items() if k in known})


FailedMap = dict[str, FailedRecord]

SHADOW = "shadow"  # the candidate predicts a share of events beside the active; never published
CANARY = "canary"  # the candidate predicts and publishes a share of keys; the active the rest
RUNNING = "running"
PROMOTED = "promoted"
ROLLED_BACK = "rolled_back"


@dataclass(frozen=True, slots=True)
class RolloutRule:
    """When a worker rolls a rollout back by itself: over at least `min_samples` events compared
    (or sent to the candidate), label agreement below `min_agreement` or the candidate's error
    rate above `max_error_rate`. None turns a check off."""

    min_agreement: float | None = 0.9
    max_error_rate: float | None = 0.05
    min_samples: int = 200

    def __post_init__(self) -> None:
        if self.min_agreement is not None and not 0.0 <= self.min_agreement <= 1.0:
            raise ValueError(f"min_agreement must be within 0..1, got {self.min_agreement}")
        if self.max_error_rate is not None and not 0.0 <= self.max_error_rate <= 1.0:
            raise ValueError(f"max_error_rate must be within 0..1, got {self.max_error_rate}")
        if self.min_samples < 1:
            raise ValueError(f"min_samples must be >= 1, got {self.min_samples}")


@dataclass(frozen=True, slots=True)
class RolloutRecord:
    """A candidate version served beside the active one (`rollout.json`).

    `active` is the version the rollout was started against; `started` with `candidate` names
    this rollout (stats files carry it). Workers serve a candidate only while `status` is
    running and the active pointer still names `active`.
    """

    mode: str  # SHADOW | CANARY
    candidate: str
    share: float  # of keys (by key hash, streams.rollout.canary.bucket)
    active: str
    rule: RolloutRule = field(default_factory=RolloutRule)
    started: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    status: str = RUNNING  # RUNNING | PROMOTED | ROLLED_BACK
    ended: str = ""
    reason: str = ""  # why it ended (one line)

    def __post_init__(self) -> None:
        if self.mode not in (SHADOW, CANARY):
            raise ValueError(f"rollout mode must be {SHADOW} or {CANARY}, got {self.mode!r}")
        if not 0.0 < self.share <= 1.0:
            raise ValueError(f"rollout share must be within (0, 1], got {self.share}")
        if self.status not in (RUNNING, PROMOTED, ROLLED_BACK):
            raise ValueError(f"unknown rollout status {self.status!r}")

    @property
    def running(self) -> bool:
        return self.status == RUNNING

    @property
    def key(self) -> str:
        """Names this rollout (a later rollout of the same candidate gets another key)."""
        return f"{self.candidate}@{self.started}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RolloutRecord:
        known = set(cls.__dataclass_fields__)
        values = {k: v for k, v in data.items() if k in known}
        rule = values.get("rule")
        values["rule"] = RolloutRule(**rule) if isinstance(rule, dict) else RolloutRule()
        return cls(**values)


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
        """The embedding width of `version` (default: the one workers serve, `serving_version`:
        a failed active version's width is not what gets indexed); None without one."""
        version = version or self.serving_version()
        return None if version is None else self.get(version).embedding_dim

    def history(self) -> StrList:
        """Activations, oldest first; the last entry is the active version."""
        try:
            data = json.loads((self.root / HISTORY).read_text())
        except (FileNotFoundError, ValueError):
            return []
        stack = data.get("stack", []) if isinstance(data, dict) else []
        return [str(v) for v in stack]

    def failed(self) -> FailedMap:
        """Versions marked failed (version -> record). One small file read: cheap to poll.
        An unreadable file counts as no marks: a worker then tries the version once more."""
        try:
            data = json.loads((self.root / FAILED).read_text())
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return {}
        records = data.get("versions", {}) if isinstance(data, dict) else {}
        out: FailedMap = {}
        for version, record in records.items() if isinstance(records, dict) else ():
            if isinstance(record, dict):
                with contextlib.suppress(TypeError):
                    out[str(version)] = FailedRecord.from_dict({**record, "version": version})
        return out

    def last_good(self, failed: FailedMap | None = None) -> str | None:
        """The newest version of the activation history that still exists and is not marked
        failed: what a worker serves while the active pointer names a failed version."""
        marks = self.failed() if failed is None else failed
        for version in reversed(self.history()):
            if version not in marks and self.exists(version):
                return version
        return None

    def serving_version(self, pinned: str | None = None) -> str | None:
        """The version a worker serves: `pinned`, else the active one, else (when the active one
        is marked failed) the newest good one of the history."""
        if pinned:
            return pinned
        active = self.active_version()
        if active is None:
            return None
        marks = self.failed()
        return active if active not in marks else self.last_good(marks)

    def rollout(self) -> RolloutRecord | None:
        """The latest rollout (running or ended), or None. One small file read: cheap to poll."""
        try:
            data = json.loads((self.root / ROLLOUT).read_text())
            return RolloutRecord.from_dict(data)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (ValueError, TypeError) as exc:
            raise EngineLoadError(
                f"{self.root / ROLLOUT} is not a rollout record ({exc})"
            ) from None

    def rollout_stats(self) -> RecordList:
        """Every worker's latest rollout statistics (as they wrote them)."""
        folder = self.root / ROLLOUT_STATS
        out: RecordList = []
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict):
                out.append(data)
        return out

    def write_rollout_stats(self, worker: str, stats: dict[str, Any]) -> None:
        """A worker's statistics of the running rollout (no lock: one file per worker)."""
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", worker).strip(".") or "worker"
        write_atomic(self.root / ROLLOUT_STATS / f"{name}.json", json.dumps(stats) + "\n")

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
        """Point `active` at `version` (verified first). Rejected builds need `force`. Clears
        its failed mark. It does not load the engine (no onnxruntime here): `inflow engine
        activate` checks that first; workers contain a version that fails anyway."""
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
            # Activated anew: workers try it again (it may have been fixed, e.g. a package
            # installed); the mark goes before the pointer moves, so none skips it.
            self._unmark(version)
            write_atomic(self.root / ACTIVE, version + "\n")
        return manifest

    def rollback(self) -> str:
        """Re-activate the previously active version (skipping those marked failed, which
        workers would not load); returns it."""
        with self._locked():
            stack = self.history()
            current = self.active_version()
            if current is not None and (not stack or stack[-1] != current):
                stack.append(current)
            marks = self.failed()
            while len(stack) >= 2:
                stack.pop()
                previous = stack[-1]
                # A failed version would not be served anyway: go back to one workers load.
                if self.exists(previous) and previous not in marks:
                    verify_files(self.path(previous), self.get(previous))
                    self._write_history(stack)
                    write_atomic(self.root / ACTIVE, previous + "\n")
                    return previous
            raise NothingToRollBack(
                f"no earlier active engine recorded in {self.root}: "
                "`inflow engine activate VERSION` picks one"
            )

    # ---------------------------------------------------------------------- rollouts
    def start_rollout(
        self, mode: str, candidate: str, share: float, rule: RolloutRule | None = None
    ) -> RolloutRecord:
        """Serve `candidate` beside the active version (replaces a running rollout)."""
        manifest = self.verify(candidate)
        if not manifest.accepted:
            raise ActivationRefused(
                f"engine {candidate} was {manifest.status} by the parity gate: it cannot take "
                "live traffic"
            )
        with self._locked():
            active = self.active_version()
            if active is None:
                raise EngineNotFound(f"no active engine in {self.root}: activate one first")
            if candidate == active:
                raise ActivationRefused(f"{candidate} is the active engine already")
            if mode == CANARY:
                self._check_same_space(self.get(active), manifest)
            record = RolloutRecord(mode, candidate, share, active, rule or RolloutRule())
            self._unmark(candidate)  # a new rollout is a new attempt, as an activation is
            write_atomic(self.root / ROLLOUT, record.to_json())
            shutil.rmtree(self.root / ROLLOUT_STATS, ignore_errors=True)
        return record

    @staticmethod
    def _check_same_space(active: Manifest, candidate: Manifest) -> None:
        """A canary publishes the candidate's embeddings beside the active's in the searched
        index: only a build of the same model (same vectors, within the parity gate) may."""
        same = (
            active.model_hash == candidate.model_hash
            and active.embedding_dim == candidate.embedding_dim
        )
        if not same:
            raise ActivationRefused(
                f"{candidate.version} is another model than the active {active.version} (model "
                f"{candidate.model_hash[:8]} vs {active.model_hash[:8]}): its vectors belong in "
                "their own index; shadow it, then move with `inflow reindex --version "
                f"{candidate.version}`"
            )

    def promote(self) -> RolloutRecord:
        """Activate the running rollout's candidate and end the rollout, as one write."""
        with self._locked():
            record = self._running_rollout()
        self.activate(record.candidate)
        return self.end_rollout(PROMOTED, f"promoted by hand: {record.candidate} is active")

    def end_rollout(self, status: str, reason: str, *, only: str | None = None) -> RolloutRecord:
        """End the running rollout (`status` PROMOTED or ROLLED_BACK; the active pointer is not
        touched). With `only` (a RolloutRecord.key), end it only if it is still that rollout:
        workers that detect a breach together end it once; others get NothingToRollBack."""
        with self._locked():
            record = self._running_rollout()
            if only is not None and record.key != only:
                raise NothingToRollBack(f"rollout {only} has ended already")
            ended = RolloutRecord.from_dict(
                {**asdict(record), "status": status, "ended": _now(), "reason": reason}
            )
            write_atomic(self.root / ROLLOUT, ended.to_json())
        return ended

    def _running_rollout(self) -> RolloutRecord:
        record = self.rollout()
        if record is None or not record.running:
            raise NothingToRollBack(
                f"no rollout running in {self.root}: `inflow engine shadow|canary VERSION` "
                "starts one"
            )
        return record

    def record_baseline(self, version: str, baseline: dict[str, Any]) -> Manifest:
        """Write `version`'s drift baseline into its manifest (for builds made before builds
        recorded one). The artifacts and their hashes are untouched."""
        with self._locked():
            manifest = self.get(version)
            manifest.baseline = baseline
            write_atomic(self.path(version) / MANIFEST, manifest.to_json())
        return manifest

    def mark_failed(self, version: str, reason: str, worker: str = "") -> FailedRecord:
        """Record that `version` failed to load, warm up or run (the first mark is kept: it
        names who found it first). Workers skip it until `activate` or `start_rollout`."""
        self.path(version)  # refuses a name that is no version
        one_line = " ".join(reason.split())[:500]
        with self._locked():
            marks = self.failed()
            if version in marks:  # another worker found it first
                return marks[version]
            marks[version] = record = FailedRecord(version, one_line, worker=worker)
            self._write_failed(marks)
        return record

    def _unmark(self, version: str) -> None:
        """Drop `version`'s failed mark (call with the lock held)."""
        marks = self.failed()
        if marks.pop(version, None) is not None:
            self._write_failed(marks)

    def _write_failed(self, marks: FailedMap) -> None:
        versions = {
            v: {"reason": r.reason, "time": r.time, "worker": r.worker} for v, r in marks.items()
        }
        write_atomic(self.root / FAILED, json.dumps({"versions": versions}, indent=2) + "\n")

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
