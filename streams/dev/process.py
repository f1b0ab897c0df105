"""Processes and ports of the dev services: free ports, spawning, readiness waits, stop by PID."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from streams.dev.console import DevError

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    """Whether a server could listen on `port` now. SO_REUSEADDR as servers set it: a port
    whose last connections sit in TIME_WAIT after a stop is free for them, and for us."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def ensure_port_free(port: int, what: str, host: str = LOOPBACK) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # see port_is_free
        try:
            sock.bind((host, port))
        except OSError:
            raise DevError(
                f"port {port} on {host} (wanted for {what}) is already in use: "
                f"stop what holds it, or pass port 0 to pick a free one"
            ) from None


def pick_port(port: int, what: str) -> int:
    if port == 0:
        return free_port()
    ensure_port_free(port, what)
    return port


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace")


def is_running(pid: int, marker: str) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
    except (OSError, IndexError):
        return False
    return state != "Z" and marker in _cmdline(pid)


def _exited(pid: int) -> bool:
    """True once the PID is gone or a zombie. (While a process exits, its /proc cmdline reads
    empty before its threads are done: the marker check alone would return too early.)"""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
    except (OSError, IndexError):
        return True
    return state in "ZX"


def stop_pid(pid: int, marker: str, timeout_s: float = 20.0) -> bool:
    """SIGTERM the PID if it still runs our command, wait until it has exited, then SIGKILL
    as a last resort. True when there was something to stop."""
    if not is_running(pid, marker):
        return False
    with contextlib.suppress(ProcessLookupError):  # it may die between the check and now
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it when it is our child (tests start it in-process)
        if _exited(pid):
            return True
        time.sleep(0.1)
    if is_running(pid, marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    deadline = time.monotonic() + 10
    while not _exited(pid) and time.monotonic() < deadline:  # not our child: let it finish
        time.sleep(0.1)
    return True


def spawn(cmd: list[str], log_path: Path, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        # Own session: the service outlives `inflow dev up` and ignores the terminal's Ctrl-C.
        return subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            start_new_session=True,
        )


_STACK_FRAME = re.compile(r"(^|\] )\s*(at |\.\.\. \d+ more)")


def log_tail(path: Path, lines: int = 3) -> str:
    """The last lines of a log, without Java stack frames (the message is above them)."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    kept = [line.strip() for line in text if line.strip() and not _STACK_FRAME.search(line)]
    return " | ".join(kept[-lines:])


def wait_until(
    ready: Callable[[], bool],
    proc: subprocess.Popen[bytes],
    what: str,
    log: Path,
    timeout_s: float,
    reason: Callable[[Path], str] = log_tail,
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DevError(f"{what} exited with code {proc.returncode} at start-up: {reason(log)}")
        if ready():
            return
        time.sleep(0.3)
    proc.terminate()  # never leave a half-started service behind
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=15)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    raise DevError(f"{what} did not become ready within {timeout_s:.0f}s: see {log}")
