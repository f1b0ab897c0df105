"""The engine follower (streams.rollout.follower): a bad version is contained, marked, skipped.

A real registry in a temporary folder and a real Batcher; the engines are FakeEngines and the
loader a function that raises what a broken version raises.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from engines.errors import EngineLoadError
from engines.registry import ACCEPTED, Manifest, Registry
from engines.types import Engine
from streams.delivery.batcher import Batcher, BatchPolicy
from streams.ops.health import WorkerHealth
from streams.ops.metrics import Metrics
from streams.rollout.follower import EngineFollower
from tests.fakes import LABELS, FakeEngine


def _version(registry: Registry, payload: str) -> str:
    staging = registry.stage()
    (staging / "model.onnx").write_text(payload)
    (staging / "tokenizer.json").write_text("{}")
    manifest = Manifest(
        version="",
        model_name="m",
        model_hash="b12d8b7e00",
        labels=list(LABELS),
        backend="onnxruntime",
        precision="int8",
        max_batch=8,
        max_seq=32,
        artifact="model.onnx",
        tokenizer="tokenizer.json",
        files={},
        status=ACCEPTED,
        created="2026-01-01T00:00:00+00:00",
    )
    return registry.commit(staging, manifest).version


@dataclass
class Loader:
    """Loads FakeEngines; a version in `broken` raises its exception instead."""

    broken: dict[str, Exception] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)

    def __call__(self, version: str) -> Engine:
        self.calls.append(version)
        if version in self.broken:
            raise self.broken[version]
        return FakeEngine(version)


@dataclass
class World:
    registry: Registry
    v1: str
    v2: str
    loader: Loader
    metrics: Metrics
    health: WorkerHealth
    batcher: Batcher
    make: Callable[..., EngineFollower]

    def serving(self) -> str | None:
        identity = self.batcher.identity
        return None if identity is None else identity.version

    def engine_check(self) -> str:
        return self.health.ready().checks["engine"]


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    registry = Registry(tmp_path / "engines")
    v1, v2 = _version(registry, "one"), _version(registry, "two")
    registry.activate(v1)
    loader = Loader()
    metrics = Metrics()
    health = WorkerHealth(assignment=lambda: [0], lag=lambda: None, stall_after_s=60)
    batcher = Batcher(None, BatchPolicy(8, 4096, 1))
    await batcher.start()

    def make(pinned: str | None = None) -> EngineFollower:
        return EngineFollower(
            registry,
            swap=batcher.swap_engine,
            serving=lambda: batcher.identity,
            load=loader,
            set_health=health.set,
            swaps=metrics.engine_swaps,
            failures=metrics.engine_swap_failures,
            pinned=pinned,
            worker="w1",
        )

    yield World(registry, v1, v2, loader, metrics, health, batcher, make)
    await batcher.stop()


def _lines(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


# Whatever a broken version raises: our own error, a graph unlike its manifest (a plain
# ValueError from the warm-up), an onnxruntime run error (its own types, not ours).
BROKEN = [
    EngineLoadError("engine v2 cannot be opened: bad graph"),
    ValueError("engine v2 made 384-wide embeddings, its manifest says 256: rebuild it"),
    RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code\nwhile running MatMul"),
]


@pytest.mark.parametrize("error", BROKEN, ids=lambda e: type(e).__name__)
async def test_a_version_that_fails_keeps_the_previous_one_serving(
    world: World, error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    follower = world.make()
    assert (await follower.sync()) is not None and world.serving() == world.v1
    world.loader.broken[world.v2] = error
    world.registry.activate(world.v2)
    caplog.set_level(logging.DEBUG, logger="streams.rollout.follower")
    caplog.clear()
    for _ in range(3):  # later polls neither retry it nor say it again
        identity = await follower.sync()
        assert identity is not None and identity.version == world.v1
    assert world.serving() == world.v1 and world.engine_check() == "ok"
    assert world.loader.calls == [world.v1, world.v2], "tried once, not at every poll"
    [line] = _lines(caplog, logging.ERROR)
    assert line.startswith(f"engine {world.v2} failed to load, keeping {world.v1}: ")
    assert "\n" not in line and " ".join(str(error).split()) in line
    if not isinstance(error, EngineLoadError):  # ours say what they are; others get a type
        assert f"{type(error).__name__}: " in line
    assert not _lines(caplog, logging.WARNING)
    mark = world.registry.failed()[world.v2]
    assert mark.worker == "w1" and mark.reason in line and mark.time
    assert world.metrics.total("inflow_engine_swap_failures_total") == 1
    assert world.metrics.total("inflow_engine_swaps_total") == 0
    assert world.registry.active_version() == world.v2, "the pointer is the operator's"


async def test_a_restarted_worker_serves_the_newest_good_version_of_the_history(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.registry.activate(world.v2)
    world.registry.mark_failed(world.v2, "ValueError: width 384, manifest 256", worker="w0")
    caplog.set_level(logging.INFO, logger="streams.rollout.follower")
    follower = world.make()  # a new process: nothing remembered but the registry
    for _ in range(3):
        identity = await follower.sync()
        assert identity is not None and identity.version == world.v1
    assert world.loader.calls == [world.v1], "the failed version is never loaded"
    assert world.engine_check() == "ok"
    [warning] = _lines(caplog, logging.WARNING)
    assert f"active version {world.v2} is marked failed" in warning
    assert f"serving {world.v1}" in warning and "width 384" in warning
    assert not _lines(caplog, logging.ERROR)


async def test_a_fresh_worker_whose_first_version_fails_is_not_ready_then_falls_back(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.registry.activate(world.v2)  # history: v1, v2; nobody tried v2 yet
    world.loader.broken[world.v2] = ValueError("3 scores per text, the manifest lists 2 labels")
    caplog.set_level(logging.INFO, logger="streams.rollout.follower")
    follower = world.make()
    assert await follower.sync() is None
    assert world.engine_check().startswith(f"engine {world.v2} failed to load: ValueError: 3")
    [error] = _lines(caplog, logging.ERROR)
    assert error.startswith(f"engine {world.v2} failed to load, keeping nothing")
    identity = await follower.sync()  # the next poll: the newest good one
    assert identity is not None and identity.version == world.v1
    assert world.engine_check() == "ok"
    assert len(_lines(caplog, logging.ERROR)) == 1


async def test_without_a_good_version_in_the_history_the_worker_is_not_ready(
    tmp_path: Path, world: World, caplog: pytest.LogCaptureFixture
) -> None:
    registry = Registry(tmp_path / "other")
    only = _version(registry, "alone")
    registry.activate(only)
    registry.mark_failed(only, "RuntimeError: no kernel", worker="w0")
    follower = EngineFollower(
        registry,
        swap=world.batcher.swap_engine,
        serving=lambda: world.batcher.identity,
        load=world.loader,
        set_health=world.health.set,
        swaps=world.metrics.engine_swaps,
        failures=world.metrics.engine_swap_failures,
    )
    caplog.set_level(logging.INFO, logger="streams.rollout.follower")
    assert await follower.sync() is None and await follower.sync() is None
    assert world.loader.calls == []
    problem = world.engine_check()
    assert f"active engine {only} is marked failed (RuntimeError: no kernel)" in problem
    assert "no earlier good version" in problem and f"engine activate {only}" in problem
    assert len(_lines(caplog, logging.WARNING)) == 1 and not _lines(caplog, logging.ERROR)


async def test_activating_a_failed_version_anew_makes_workers_try_it_again(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    follower = world.make()
    await follower.sync()
    world.loader.broken[world.v2] = RuntimeError("missing provider")
    world.registry.activate(world.v2)
    await follower.sync()
    assert world.v2 in world.registry.failed()
    del world.loader.broken[world.v2]  # fixed on the hosts (a package installed)
    world.registry.activate(world.v2)
    assert world.v2 not in world.registry.failed(), "activation clears the mark"
    identity = await follower.sync()
    assert identity is not None and identity.version == world.v2
    assert world.metrics.total("inflow_engine_swaps_total") == 1


async def test_a_pinned_worker_does_not_load_its_failed_version(world: World) -> None:
    world.registry.mark_failed(world.v2, "ValueError: x", worker="w0")
    follower = world.make(pinned=world.v2)
    assert await follower.sync() is None
    assert world.loader.calls == [], "a pin has no fallback: it names the one version"
    assert world.engine_check().startswith(f"pinned engine {world.v2} is marked failed")


async def test_a_registry_that_refuses_the_mark_still_contains_the_failure(
    world: World, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    follower = world.make()
    await follower.sync()

    def read_only(*_args: object, **_kwargs: object) -> None:
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(world.registry, "mark_failed", read_only)
    world.loader.broken[world.v2] = ValueError("bad width")
    world.registry.activate(world.v2)
    caplog.set_level(logging.INFO, logger="streams.rollout.follower")
    for _ in range(3):
        await follower.sync()
    assert world.serving() == world.v1 and world.loader.calls == [world.v1, world.v2]
    [line] = _lines(caplog, logging.ERROR)
    assert "could not mark it failed in the registry: PermissionError" in line


async def test_an_unreadable_registry_is_reported_once_and_changes_nothing(
    world: World, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    follower = world.make()
    await follower.sync()

    def broken() -> str:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(world.registry, "active_version", broken)
    caplog.set_level(logging.INFO, logger="streams.rollout.follower")
    for _ in range(3):
        identity = await follower.sync()
        assert identity is not None and identity.version == world.v1
    assert len(_lines(caplog, logging.ERROR)) == 1


async def test_a_version_marked_failed_elsewhere_keeps_running_where_it_loaded(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.registry.activate(world.v2)
    follower = world.make()
    await follower.sync()
    assert world.serving() == world.v2
    world.registry.mark_failed(world.v2, "RuntimeError: on another host", worker="w9")
    identity = await follower.sync()
    assert identity is not None and identity.version == world.v2, "nothing to gain by dropping it"
