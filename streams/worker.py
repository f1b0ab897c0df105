"""`inflow worker`: start-up reads top-down: engine -> warm-up -> topics -> app -> consume."""

from __future__ import annotations

import logging
import time

from streams.config import Settings
from streams.topics import ensure_topics_sync

log = logging.getLogger("inflow.worker")


def run_worker(settings: Settings, loglevel: str = "info") -> int:
    import faust

    from engines.load import load_engine
    from engines.registry import Registry
    from streams.app import create_app

    logging.basicConfig(
        level=loglevel.upper(), format="[%(asctime)s] %(levelname)s %(name)s: %(message)s"
    )
    settings.require_kafka()
    settings.require_es()
    started = time.perf_counter()
    engine = load_engine(settings.engine_dir, settings.engine_version or None)  # and warms it up
    identity = engine.identity
    log.info(
        "engine %s (%s %s) loaded and warm in %.1fs",
        identity.version,
        identity.backend,
        identity.precision,
        time.perf_counter() - started,
    )
    for line in ensure_topics_sync(settings):
        log.info("topic %s", line)
    app = create_app(settings, engine, registry=Registry(settings.engine_dir))
    worker = faust.Worker(app, loglevel=loglevel, override_logging=False)
    log.info("web views on http://%s:%d", settings.web_host, settings.web_port)
    try:
        worker.execute_from_commandline()
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0
