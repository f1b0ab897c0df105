"""Access to the packaged JSON Schema files (for tests, docs and non-Python producers)."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

SCHEMA_NAMES = ("text_event", "prediction", "dead_letter_headers")
# The version each name defaults to: the one producers write today.
CURRENT_VERSIONS = {"text_event": "v1", "prediction": "v2", "dead_letter_headers": "v1"}


def load_json_schema(name: str) -> dict[str, Any]:
    """Read `schemas/json/<name>.<version>.json` as a dict (a fresh copy on every call).

    `name` is one of SCHEMA_NAMES, optionally with the version and `.json` suffix
    (`"prediction"`, `"prediction.v1"`, `"prediction.v1.json"`); the version defaults to
    the current one (CURRENT_VERSIONS).
    """
    base = name.removesuffix(".json")
    stem, _, version = base.partition(".")
    # A fixed list, so a name can never reach outside the package folder.
    if stem not in SCHEMA_NAMES:
        raise ValueError(f"unknown schema {name!r}; expected one of {', '.join(SCHEMA_NAMES)}")
    filename = f"{stem}.{version or CURRENT_VERSIONS[stem]}.json"
    resource = resources.files("schemas").joinpath("json", filename)
    if not resource.is_file():
        raise ValueError(f"no schema file {filename!r} in schemas/json")
    loaded: dict[str, Any] = json.loads(resource.read_text(encoding="utf-8"))
    return loaded
