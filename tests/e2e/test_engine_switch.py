"""Activate a new engine version and roll back while a worker runs: nothing lost or doubled."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engines.assets import models_dir
from engines.builder.data import sample_texts
from engines.registry import Registry
from schemas import Prediction, decode_prediction, encode_event
from tests.e2e.conftest import ROOT, Names, Worker, WorkerFactory, read_topic
from tests.e2e.test_pipeline import _indexed_ids, _produce

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]


def _inflow(registry: Path, *args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "streams.cli.main", "--registry", str(registry), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def fp32_candidate(
    engine_dir: Path, tmp_path: Path, *build_args: str
) -> tuple[Path, Registry, str, str]:
    """A copy of the shared registry (activations must not touch it) with a second, inactive
    version: the active model at fp32. The same model at another precision: one embedding
    space, so one index behind the alias (another model would get its own index, searched only
    after `inflow reindex`). Returns (registry dir, registry, active version, the fp32 one)."""
    registry_dir = tmp_path / "engines"
    shutil.copytree(engine_dir, registry_dir)
    registry = Registry(registry_dir)
    first = registry.active_version()
    assert first is not None
    active = registry.get(first)
    model = ROOT / models_dir() / f"{active.model_name}-{active.model_hash[:12]}"
    _inflow(
        registry_dir,
        "engine",
        "build",
        "--model",
        str(model),
        "--precision",
        "fp32",
        "--no-activate",
        *build_args,
        "--quiet",
    )
    second = next(m.version for m in registry.list() if m.version != first and m.accepted)
    return registry_dir, registry, first, second


async def _serving(worker: Worker, version: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        health = worker.health() or {}
        engine = health.get("engine")
        if isinstance(engine, dict) and engine.get("version") == version:
            return
        await asyncio.sleep(0.25)
    raise AssertionError(f"worker never switched to {version}: {worker.health()}")


async def test_activate_and_roll_back_while_the_worker_runs(
    workers: WorkerFactory,
    names: Names,
    kafka_bootstrap: str,
    es_url: str,
    engine_dir: Path,
    tmp_path: Path,
) -> None:
    registry_dir, _registry, first, second = fp32_candidate(engine_dir, tmp_path)

    worker = workers.start(INFLOW_ENGINE_DIR=str(registry_dir))
    await _serving(worker, first)
    texts = sample_texts(600, seed=5)
    phases = {"a": texts[:200], "b": texts[200:400], "c": texts[400:]}

    async def publish(phase: str) -> None:
        records = [
            (f"{phase}-{i}".encode(), encode_event(text, id=f"{phase}-{i}"))
            for i, text in enumerate(phases[phase])
        ]
        await _produce(kafka_bootstrap, names.texts, records)

    await publish("a")
    # Activate while phase "a" is still in flight: the swap happens between two batches.
    await asyncio.sleep(1.0)
    _inflow(registry_dir, "engine", "activate", second)
    await _serving(worker, second)
    await publish("b")
    await read_topic(kafka_bootstrap, names.predictions, 400)
    assert _inflow(registry_dir, "engine", "rollback").strip().endswith(first)
    await _serving(worker, first)
    await publish("c")

    predictions = await read_topic(kafka_bootstrap, names.predictions, 600)
    versions: dict[str, list[str]] = {}
    for _, value, _ in predictions:
        prediction = decode_prediction(value or b"")
        assert isinstance(prediction, Prediction)
        versions.setdefault(prediction.id, []).append(prediction.model.version)
    expected_ids = {f"{p}-{i}" for p, items in phases.items() for i in range(len(items))}
    assert set(versions) == expected_ids, "no event lost"
    assert all(len(v) == 1 for v in versions.values()), "no event predicted twice"
    by_phase = {p: {versions[f"{p}-{i}"][0] for i in range(200)} for p in phases}
    assert first in by_phase["a"]
    assert by_phase["b"] == {second}, "after activation every prediction names the new version"
    assert by_phase["c"] == {first}, "after rollback every prediction names the old version"
    ids = await _indexed_ids(es_url, names.alias, 600)
    assert sorted(ids) == sorted(expected_ids)
