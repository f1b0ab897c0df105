"""What a team installs: the built wheel, no extras, in a fresh virtualenv without torch.

The wheel is built from a copy of this checkout's files as git sees them (tracked, or untracked
and not ignored: what a clean clone holds; setuptools' `build/` then stays out of the tree),
installed into a new virtualenv (its dependencies come from the package index, through pip's
cache), and its `inflow` console script runs a worker against the suite's genuine services on
the engine that the build install (this checkout's `[build]` extra) made: texts in, predictions
and documents out."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from engines.builder.data import sample_texts
from schemas import Prediction, decode_prediction, encode_event
from tests.e2e.conftest import ROOT, Names, WorkerFactory, read_topic
from tests.e2e.test_pipeline import _indexed_ids, _produce

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]

PACKAGES = ("streams", "engines", "indexer", "schemas")
BUILD_ONLY = {"torch", "transformers", "sklearn", "onnx", "onnxscript", "tqdm", "safetensors"}

# Imports every module of the installed packages (not the checkout): serving modules must
# import; build modules (engines.builder.*) may only fail for want of the `build` extra.
IMPORT_ALL = """
import importlib, json, pkgutil, sys
failed, build_missing, imported = {}, {}, []
for top in PACKAGES:
    package = importlib.import_module(top)
    assert 'site-packages' in package.__file__, package.__file__
    for info in pkgutil.walk_packages(package.__path__, top + '.'):
        try:
            importlib.import_module(info.name)
            imported.append(info.name)
        except ModuleNotFoundError as exc:
            target = build_missing if info.name.startswith('engines.builder') else failed
            target[info.name] = exc.name
        except Exception as exc:
            failed[info.name] = repr(exc)
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'sklearn'))
print(json.dumps({"failed": failed, "build_missing": build_missing, "imported": imported,
                  "heavy": heavy}))
""".replace("PACKAGES", repr(PACKAGES))


@pytest.fixture(scope="session")
def serving_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh virtualenv with `pip install inflow-*.whl` (no extras)."""
    root = tmp_path_factory.mktemp("serving")
    dist = root / "dist"
    source = root / "source"
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():  # a tracked file deleted in the work tree is not copied
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            str(source),
        ],
        check=True,
        timeout=300,
    )
    wheel = next(dist.glob("inflow-*.whl"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    print(f"installing {wheel.name} into {venv} (dependencies from the package index)")
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)],
        check=True,
        timeout=1200,
    )
    yield venv


def _run(
    venv: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=venv.parent,  # never the checkout: nothing may import from the source tree
        env=env,
    )


def _tracked_python_dirs() -> set[str]:
    """Folders of the four packages that hold Python files git tracks (what a clone has)."""
    listed = subprocess.run(
        ["git", "ls-files", "--", *PACKAGES], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    return {str(Path(f).parent) for f in listed if f.endswith(".py")}


def test_the_wheel_holds_every_package_and_no_build_dependency(serving_venv: Path) -> None:
    wheel = next((serving_venv.parent / "dist").glob("inflow-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    for folder in sorted(_tracked_python_dirs()):
        assert f"{folder}/__init__.py" in names, f"{folder} is not a package in the wheel"
        tracked = subprocess.run(
            ["git", "ls-files", f"{folder}/__init__.py"], cwd=ROOT, capture_output=True, text=True
        ).stdout
        assert tracked.strip(), f"{folder}/__init__.py exists here but git does not track it"

    listed = _run(serving_venv, "python", "-m", "pip", "list", "--format=json")
    installed = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert not installed & {"torch", "transformers", "scikit-learn", "onnx", "triton"}, installed

    result = _run(serving_venv, "python", "-c", IMPORT_ALL)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["failed"] == {}, report["failed"]
    assert report["heavy"] == [], "a serving module imported a build dependency"
    assert set(report["build_missing"].values()) <= BUILD_ONLY, report["build_missing"]
    serving = ["streams.worker", "streams.app", "streams.cli.main", "engines.load"]
    serving += ["engines.backends.onnxruntime", "engines.backends.tensorrt", "indexer.bulk"]
    for must in serving:
        assert must in report["imported"], f"{must} missing from the wheel"

    help_ = _run(serving_venv, "inflow", "--help")
    assert help_.returncode == 0 and "worker" in help_.stdout, help_.stderr


async def test_a_serving_install_runs_a_worker_on_an_engine_built_elsewhere(
    serving_venv: Path,
    workers: WorkerFactory,
    names: Names,
    kafka_bootstrap: str,
    es_url: str,
    engine_dir: Path,
) -> None:
    env = {**workers.env, "INFLOW_KAFKA_BOOTSTRAP": kafka_bootstrap, "INFLOW_ES_URL": es_url}
    listed = _run(serving_venv, "inflow", "--registry", str(engine_dir), "engine", "list", env=env)
    assert listed.returncode == 0 and "*" in listed.stdout, listed.stderr

    worker = workers.start(inflow=[str(serving_venv / "bin" / "inflow")])
    texts = sample_texts(60, seed=5)
    events = [(f"wheel-{i}", text) for i, text in enumerate(texts)]
    await _produce(
        kafka_bootstrap,
        names.texts,
        [(eid.encode(), encode_event(text, id=eid)) for eid, text in events],
    )
    records = await read_topic(kafka_bootstrap, names.predictions, len(events))
    decoded = [decode_prediction(value or b"") for _, value, _ in records]
    predictions = [p for p in decoded if isinstance(p, Prediction)]
    assert sorted(p.id for p in predictions) == sorted(eid for eid, _ in events)
    assert all(p.model.backend == "onnxruntime" for p in predictions)
    ids = await _indexed_ids(es_url, names.alias, len(events))
    assert sorted(ids) == sorted(eid for eid, _ in events)
    assert worker.proc.poll() is None

    search = _run(serving_venv, "inflow", "search", texts[0], "-k", "1", "--json",
                  env=env)  # fmt: skip
    assert search.returncode == 0, search.stderr[-2000:]
    assert json.loads(search.stdout)["hits"], search.stdout
