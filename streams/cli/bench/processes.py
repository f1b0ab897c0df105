"""The processes a bench measures: the local Kafka and search server, and `inflow worker`s."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from streams.config import Settings
from streams.dev.process import free_port


@contextlib.contextmanager
def local_services(settings: Settings) -> Iterator[Settings]:
    """`settings` pointed at Kafka and the search server: the configured ones, else the dev
    services, started here (and stopped after) unless they already run."""
    if settings.kafka_bootstrap and settings.es_url:
        yield settings
        return
    from streams.dev.services import DevServices

    dev = DevServices.for_state_dir(settings.state_dir)
    started_here = not dev.running("kafka") or not dev.running("search")
    endpoints = dev.up()
    try:
        yield settings.with_overrides(
            kafka_bootstrap=endpoints.kafka_bootstrap, es_url=endpoints.es_url
        )
    finally:
        if started_here:
            dev.down()  # else someone else's services: leave them running


def service_pids(settings: Settings) -> dict[str, int]:
    """PIDs of the broker and the search server when they run on this machine."""
    from streams.dev.services import DevServices

    dev = DevServices.for_state_dir(settings.state_dir)
    pids = {}
    for name, record in dev.status().items():
        if (
            record is not None
            and record.address
            and (record.address in settings.kafka_bootstrap or record.address in settings.es_url)
        ):
            pids["kafka" if name == "kafka" else "search"] = record.pid
    return pids


def isolated_run(settings: Settings, tag: str) -> tuple[Settings, str]:
    run = f"bench-{tag}-{uuid.uuid4().hex[:8]}"
    return (
        settings.with_overrides(
            app_id=run,
            texts_topic=f"{run}.texts",
            predictions_topic=f"{run}.predictions",
            texts_dlq_topic=f"{run}.texts.dlq",
            predictions_dlq_topic=f"{run}.predictions.dlq",
            es_alias=run,
            web_port=free_port(),
        ),
        run,
    )


def start_worker(
    settings: Settings,
    port: int,
    log_name: str,
    *,
    env: Mapping[str, str] | None = None,
    cores: frozenset[int] | None = None,
) -> subprocess.Popen[bytes]:
    """An `inflow worker` process on `settings`' topics, alias and engine, serving `port`,
    logging to `<tmp>/<log_name>.log`. With `cores`, it is pinned to them before exec, so its
    engine sizes itself to those cores."""
    full = {
        **os.environ,
        **{f"INFLOW_{k.upper()}": str(v) for k, v in _env_fields(settings).items()},
        "INFLOW_WEB_PORT": str(port),
        **(env or {}),
    }

    def place() -> None:
        if cores is not None:
            os.sched_setaffinity(0, cores)

    log = Path(tempfile.gettempdir()) / f"{log_name}.log"
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "streams.cli.main", "worker", "--web-port", str(port)],
            env=full,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=None if cores is None else place,
        )


def _env_fields(s: Settings) -> dict[str, Any]:
    names = [
        "kafka_bootstrap",
        "es_url",
        "engine_dir",
        "app_id",
        "texts_topic",
        "predictions_topic",
        "texts_dlq_topic",
        "predictions_dlq_topic",
        "es_alias",
        "web_port",
        "state_dir",
    ]
    return {name: getattr(s, name) for name in names}


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the worker exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"the worker was not ready within {timeout_s:.0f} s")


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
