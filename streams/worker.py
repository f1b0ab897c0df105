"""`inflow worker`: start-up reads top-down: settings -> Kafka (topics) -> app -> consume.

The engine is not built here, ever: the worker loads the registry's active version (a one-shot
engine-build job writes it) and waits, not ready, while there is none (`streams.app`). Kafka that
cannot be used at start (down, wrong credentials, untrusted certificate) does not stop the
worker either: it serves `/health/*` saying why it is not ready and tries again with backoff,
one log line per attempt, until the broker accepts it.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType

from streams.config import Settings
from streams.errors import KafkaUnavailable
from streams.ops.health import HealthReport
from streams.topics import ensure_topics_sync

log = logging.getLogger("inflow.worker")

KAFKA_RETRY_BASE_S = 5.0
KAFKA_RETRY_CAP_S = 60.0


def run_worker(settings: Settings, loglevel: str = "info") -> int:
    import faust

    from engines.registry import Registry
    from streams.app import create_app

    logging.basicConfig(
        level=loglevel.upper(), format="[%(asctime)s] %(levelname)s %(name)s: %(message)s"
    )
    settings.require_kafka()
    settings.require_es()
    try:
        lines = wait_for_kafka(settings)
    except _Stopped:
        log.info("stopped while waiting for Kafka")
        return 0
    for line in lines:
        log.info("topic %s", line)
    app = create_app(settings, Registry(settings.engine_dir))
    worker = faust.Worker(app, loglevel=loglevel, override_logging=False)
    log.info("web views on http://%s:%d", settings.web_host, settings.web_port)
    try:
        worker.execute_from_commandline()
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


class _Stopped(Exception):
    """SIGTERM/SIGINT while waiting for Kafka."""


def wait_for_kafka(settings: Settings) -> list[str]:
    """Create the topics; while Kafka refuses, serve not-ready health and retry with backoff."""
    attempt = 0
    server: _WaitingHealth | None = None
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def stop(signum: int, frame: FrameType | None) -> None:
        raise _Stopped

    try:
        while True:
            try:
                return ensure_topics_sync(settings)
            except KafkaUnavailable as exc:
                attempt += 1
                if server is None:
                    for sig in previous:
                        signal.signal(sig, stop)
                    server = _WaitingHealth(settings.web_host, settings.web_port)
                server.problem = str(exc)
                delay = min(KAFKA_RETRY_CAP_S, KAFKA_RETRY_BASE_S * 2 ** (attempt - 1))
                log.error(
                    "%s (attempt %d; next in %.0fs; /health/ready answers 503 meanwhile)",
                    exc,
                    attempt,
                    delay,
                )
                time.sleep(delay)
    finally:
        if server is not None:
            server.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class _WaitingHealth:
    """`/health/live` 200 and `/health/ready` (and `/health`) 503 with the reason, on the
    worker's web address, until the Faust web server takes the port over."""

    def __init__(self, host: str, port: int) -> None:
        self.problem = "starting"
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.startswith("/health/live"):
                    report = HealthReport(True, {"consumer": "ok"})
                elif self.path.startswith("/health"):
                    report = HealthReport(False, {"kafka": owner.problem})
                else:
                    self.send_error(404, "not serving until Kafka is reachable: see /health")
                    return
                body = json.dumps(report.body()).encode()
                self.send_response(report.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # probes every few seconds would drown the log

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
