"""What the dev services tell the operator: DevError (one actionable line) and progress."""

from __future__ import annotations

import sys
from collections.abc import Callable

Progress = Callable[[str], None]


class DevError(Exception):
    """A one-line, actionable failure of the local services (printed without a traceback)."""


def print_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
