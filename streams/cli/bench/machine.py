"""The machine the benches run on: its CPU, its other load, and each process's CPU seconds."""

from __future__ import annotations

import itertools
import os
import platform
import subprocess
import threading
import time
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class CpuSampler:
    """Samples the CPU seconds of some processes every `interval_s`, to read any window."""

    def __init__(self, pids: dict[str, int], interval_s: float = 0.1) -> None:
        self.pids = pids
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> CpuSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            now = time.time()
            reading = {}
            for name, pid in self.pids.items():
                try:
                    reading[name] = cpu_seconds(pid)
                except (OSError, IndexError, ValueError):
                    continue
            self.samples.append((now, reading))
            self._stop.wait(self._interval)

    def at(self, name: str, when: float) -> float:
        """CPU seconds of `name` at wall time `when`, interpolated between samples."""
        points = [(t, r[name]) for t, r in self.samples if name in r]
        if not points:
            return float("nan")
        if when <= points[0][0]:
            return points[0][1]
        for (t0, c0), (t1, c1) in itertools.pairwise(points):
            if t0 <= when <= t1:
                return c0 + (c1 - c0) * (when - t0) / max(t1 - t0, 1e-9)
        return points[-1][1]

    def used(self, name: str, start: float, end: float) -> float:
        return self.at(name, end) - self.at(name, start)


def cpu_description() -> dict[str, str]:
    """The CPU model and the flags that decide INT8 speed, from `lscpu`."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    info = {}
    for line in out.splitlines():
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    flags = set(info.get("Flags", "").split())
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"]
    return {
        "model": info.get("Model name", platform.processor() or "unknown"),
        "cpus": info.get("CPU(s)", str(os.cpu_count())),
        "flags": " ".join(f for f in wanted if f in flags) or "none of " + ",".join(wanted),
    }


def other_load() -> str:
    """What else runs here (load average and the busiest other processes), for the report."""
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    try:
        top = subprocess.run(
            ["ps", "-eo", "pcpu,comm", "--sort=-pcpu", "--no-headers"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.splitlines()[:5]
    except (OSError, subprocess.TimeoutExpired):
        top = []
    return f"load average {load}; busiest: " + "; ".join(" ".join(t.split()) for t in top)
