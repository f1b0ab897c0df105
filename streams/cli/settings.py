"""`inflow settings`: the effective settings, one per line, each with where it came from.

    INFLOW_NAME=value  (source)

The source is flag, env, the path of the dev.env file, or default; secrets show as *** when set
(empty when not). `--json` prints the same as a list of {name, value, source}. The values and
their sources come from streams.config.effective_settings, which `Settings.load` shares.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from streams.config import Effective, effective_settings


def format_value(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def settings_lines(rows: list[Effective]) -> list[str]:
    return [f"{row.name}={format_value(row.value)}  ({row.source})" for row in rows]


def run_settings(as_json: bool = False, env: Mapping[str, str] | None = None) -> int:
    rows = effective_settings(env)
    if as_json:
        listed = [{"name": r.name, "value": r.value, "source": r.source} for r in rows]
        print(json.dumps(listed, indent=2))
    else:
        for line in settings_lines(rows):
            print(line)
    return 0
