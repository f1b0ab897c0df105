"""A bad engine version is contained: the running worker keeps serving the previous version, the
version is marked failed in the registry, and a restarted worker does not load it again.

The bad version is a copy of the built one whose manifest says another embedding width (or label
count): committed through the registry, so its hashes are recomputed and `verify` passes; only
the warm-up finds that the graph disagrees (a plain ValueError, not an EngineError).
`inflow engine activate` runs the same check and refuses it; here the pointer is moved the way a
tool that skips the check would (the registry's own `activate`), as the workers must survive it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engines.registry import Manifest, Registry
from schemas import Prediction, decode_prediction, encode_event
from tests.e2e.conftest import ROOT, Names, Worker, WorkerFactory, read_topic
from tests.e2e.test_engine_switch import _serving
from tests.e2e.test_pipeline import _produce

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]

# Manifest fields that make the built graph disagree with its manifest.
MISMATCHES: dict[str, dict[str, Any]] = {
    "width": {"embedding_dim": 256},
    "labels": {"labels": ["negative", "positive"]},
}


def _registry_copy(engine_dir: Path, tmp_path: Path) -> tuple[Path, Registry, str]:
    """A copy of the shared registry (activations must not touch it) and its active version."""
    registry_dir = tmp_path / "engines"
    shutil.copytree(engine_dir, registry_dir)
    registry = Registry(registry_dir)
    active = registry.active_version()
    assert active is not None
    return registry_dir, registry, active


def mismatched_copy(registry: Registry, version: str, **changes: Any) -> str:
    """A new, inactive version: `version`'s artifacts under a manifest changed by `changes`."""
    source = registry.get(version)
    staging = registry.stage()
    for name in source.files:
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(registry.path(version) / name, staging / name)
    draft = Manifest.from_dict({**dataclasses.asdict(source), **changes, "files": {}})
    bad = registry.commit(staging, draft).version
    registry.verify(bad)  # every hash matches: only loading it can tell
    return bad


async def _until(what: str, check: Callable[[], bool], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        await asyncio.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def _lines(worker: Worker, level: str, *words: str) -> list[str]:
    """The worker's log lines at `level` (its format: `[time] LEVEL logger: message`)."""
    return [
        line
        for line in worker.log.read_text(errors="replace").splitlines()
        if f"] {level} " in line and all(word in line for word in words)
    ]


def _healthy(worker: Worker) -> None:
    for path in ("/health/live", "/health/ready"):
        answer = worker.probe(path)
        assert answer is not None and answer[0] == 200, (path, answer)


async def _versions_of(
    kafka_bootstrap: str, names: Names, phase: str, n: int, expected: int
) -> set[str]:
    """Publish `n` events of `phase`; the versions that predicted them."""
    records = [
        (f"{phase}-{i}".encode(), encode_event(f"i love phase {phase} {i}", id=f"{phase}-{i}"))
        for i in range(n)
    ]
    await _produce(kafka_bootstrap, names.texts, records)
    versions: dict[str, str] = {}
    for _, value, _ in await read_topic(kafka_bootstrap, names.predictions, expected):
        prediction = decode_prediction(value or b"")
        assert isinstance(prediction, Prediction)
        versions[prediction.id] = prediction.model.version
    assert {f"{phase}-{i}" for i in range(n)} <= set(versions), "every event predicted"
    return {v for id_, v in versions.items() if id_.startswith(f"{phase}-")}


async def test_a_version_that_fails_its_warm_up_is_contained_and_skipped_after_a_restart(
    workers: WorkerFactory,
    names: Names,
    kafka_bootstrap: str,
    engine_dir: Path,
    tmp_path: Path,
) -> None:
    registry_dir, registry, first = _registry_copy(engine_dir, tmp_path)
    bad = mismatched_copy(registry, first, **MISMATCHES["width"])

    worker = workers.start(INFLOW_ENGINE_DIR=str(registry_dir))
    await _serving(worker, first)
    registry.activate(bad)  # as a tool that skips the CLI's load check would
    await _until(
        f"{bad} marked failed", lambda: bad in registry.failed() or worker.proc.poll() is not None
    )
    assert worker.proc.poll() is None, "the bad version ended the worker"
    mark = registry.failed()[bad]
    assert "made 384-wide embeddings, its manifest says 256" in mark.reason
    assert mark.worker.startswith(names.app_id)
    for _ in range(8):  # polls every 0.5 s: it keeps serving, and does not try again
        _healthy(worker)
        engine = (worker.health() or {}).get("engine")
        assert isinstance(engine, dict) and engine["version"] == first
        await asyncio.sleep(0.5)
    assert await _versions_of(kafka_bootstrap, names, "a", 30, 30) == {first}
    assert worker.proc.poll() is None, "the worker is still running"
    [error] = _lines(worker, "ERROR", bad)
    assert f"failed to load, keeping {first}" in error
    assert len(_lines(worker, "ERROR", "streams.rollout.follower")) == 1
    assert "Traceback" not in worker.log.read_text(errors="replace")

    # A restart must not load it: the pointer still names it, the registry says it failed.
    assert worker.stop() == 0
    restarted = workers.start(INFLOW_ENGINE_DIR=str(registry_dir))
    await _serving(restarted, first)
    _healthy(restarted)
    assert await _versions_of(kafka_bootstrap, names, "b", 30, 60) == {first}
    [warning] = _lines(restarted, "WARNING", bad, "marked failed")
    assert f"serving {first}" in warning
    assert not _lines(restarted, "ERROR", bad) and not _lines(restarted, "INFO", f"loading {bad}")
    assert registry.active_version() == bad, "the pointer is the operator's to move"


@pytest.mark.parametrize("mismatch", sorted(MISMATCHES))
def test_engine_activate_refuses_a_version_that_fails_its_warm_up(
    engine_dir: Path, tmp_path: Path, mismatch: str
) -> None:
    registry_dir, registry, first = _registry_copy(engine_dir, tmp_path)
    bad = mismatched_copy(registry, first, **MISMATCHES[mismatch])
    cli = [sys.executable, "-m", "streams.cli.main", "--registry", str(registry_dir), "engine"]
    for force in ([], ["--force"]):  # force skips the parity gate, never the load check
        result = subprocess.run(
            [*cli, "activate", bad, *force],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode != 0, result.stdout
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith(f"inflow: error: engine {bad} was not activated")
        assert ("its manifest says 256" if mismatch == "width" else "lists 2 labels") in lines[0]
        assert registry.active_version() == first, "the pointer is unchanged"
    assert registry.history() == [first]
