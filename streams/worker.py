"""`inflow worker`: start-up reads top-down: settings -> topics -> app -> consume.

The engine is not built here, ever: the worker loads the registry's active version (a one-shot
engine-build job writes it) and waits, not ready, while there is none (`streams.app`).
"""

from __future__ import annotations

import logging

from streams.config import Settings
from streams.topics import ensure_topics_sync

log = logging.getLogger("inflow.worker")


def run_worker(settings: Settings, loglevel: str = "info") -> int:
    import faust

    from engines.registry import Registry
    from streams.app import create_app

    logging.basicConfig(
        level=loglevel.upper(), format="[%(asctime)s] %(levelname)s %(name)s: %(message)s"
    )
    settings.require_kafka()
    settings.require_es()
    for line in ensure_topics_sync(settings):
        log.info("topic %s", line)
    app = create_app(settings, Registry(settings.engine_dir))
    worker = faust.Worker(app, loglevel=loglevel, override_logging=False)
    log.info("web views on http://%s:%d", settings.web_host, settings.web_port)
    try:
        worker.execute_from_commandline()
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0
