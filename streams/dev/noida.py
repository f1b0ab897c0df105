"""noida-db, the zero-Java fallback for the broker and the search server: its binary, version."""

from __future__ import annotations

from pathlib import Path

from streams.dev.console import DevError


def noida_binary() -> Path:
    """The noida-db server binary itself (not its console-script wrapper, whose kill orphans it)."""
    import noida_db

    path = Path(noida_db.__file__).parent / "noida-db"
    if not path.exists():
        raise DevError(f"noida-db binary missing at {path}: pip install noida-db==0.2.3")
    return path


def noida_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("noida-db")
