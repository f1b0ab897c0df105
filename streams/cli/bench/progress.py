"""The progress bar on stderr that each bench phase shows."""

from __future__ import annotations

import sys
from typing import Any


def progress(total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)
