"""Genuine Elasticsearch: its jars, the compiled launcher, its settings and readiness."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import urllib.error
import urllib.request
import uuid
from importlib import resources
from pathlib import Path

from streams.dev.console import DevError, Progress, print_progress
from streams.dev.maven import fetch_jars
from streams.dev.process import LOOPBACK, log_tail

# The launcher (java/org/elasticsearch/node/InflowNode.java) uses server internals of 8.15.
DEFAULT_ES_VERSION = "8.15.3"
ES_FAILURE_MARKER = "Inflow node failed to start:"  # see InflowNode.java


def elasticsearch_failure(path: Path) -> str:
    """The launcher's one-line reason when it logged one, else the log's tail."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    reasons = [line for line in text.splitlines() if ES_FAILURE_MARKER in line]
    if reasons:
        return reasons[-1].split(ES_FAILURE_MARKER, 1)[1].strip()
    return log_tail(path)


def elasticsearch_ready(es_url: str) -> bool:
    """True once `GET /` answers 200 with the product header the official clients check."""
    try:
        with urllib.request.urlopen(es_url, timeout=2) as response:
            product = response.headers.get("X-elastic-product")
            return bool(response.status == 200 and product == "Elasticsearch")
    except (OSError, ValueError, urllib.error.URLError):
        return False


def search_version(es_url: str) -> str | None:
    try:
        with urllib.request.urlopen(es_url, timeout=2) as response:
            body = json.loads(response.read())
        return str(body["version"]["number"])
    except (OSError, ValueError, KeyError, urllib.error.URLError):
        return None


def elasticsearch_pom() -> Path:
    return Path(str(resources.files("streams.dev").joinpath("elasticsearch-pom.xml")))


def elasticsearch_launcher_source() -> Path:
    source = resources.files("streams.dev").joinpath(
        "java", "org", "elasticsearch", "node", "InflowNode.java"
    )
    return Path(str(source))


def fetch_elasticsearch_jars(
    version: str, cache_dir: Path, progress: Progress = print_progress
) -> Path:
    """Genuine Elasticsearch server jars from Maven Central, in
    `cache_dir/elasticsearch-<version>/libs`."""
    return fetch_jars(
        pom=elasticsearch_pom(),
        version_property=f"-Des.version={version}",
        libs=cache_dir / f"elasticsearch-{version}" / "libs",
        main_jar=f"elasticsearch-{version}.jar",
        product="Elasticsearch",
        version=version,
        fallback="--search noida",
        version_hint=f"{version} is a released 8.15.x version (INFLOW_ES_VERSION)",
        progress=progress,
    )


def launcher_classes(version: str, cache_dir: Path) -> Path:
    """Where the compiled launcher lives: keyed by a hash of its source, so an edit recompiles."""
    digest = hashlib.sha256(elasticsearch_launcher_source().read_bytes()).hexdigest()[:12]
    return cache_dir / f"elasticsearch-{version}" / f"launcher-{digest}"


def launcher_compiled(classes: Path) -> bool:
    return (classes / "org" / "elasticsearch" / "node" / "InflowNode.class").exists()


def compile_elasticsearch_launcher(
    version: str, cache_dir: Path, libs: Path, progress: Progress = print_progress
) -> Path:
    """javac the launcher against the server jars (once per source version), staged and renamed."""
    classes = launcher_classes(version, cache_dir)
    if launcher_compiled(classes):
        return classes
    javac = shutil.which("javac")
    if javac is None:
        raise DevError(
            "javac not found: install a JDK 17+ (apt-get install openjdk-17-jdk-headless) to "
            "build the Elasticsearch launcher, or run with --search noida"
        )
    source = elasticsearch_launcher_source()
    staging = classes.parent / f"{classes.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True, exist_ok=True)
    progress(f"compiling the Elasticsearch launcher ({source.name}) into {classes}")
    cmd = [javac, "-nowarn", "-encoding", "UTF-8", "-d", str(staging), "-cp", f"{libs}/*"]
    result = subprocess.run([*cmd, str(source)], capture_output=True, text=True, check=False)
    if result.returncode != 0 or not launcher_compiled(staging):
        shutil.rmtree(staging, ignore_errors=True)
        errors = [line for line in result.stderr.splitlines() if "error:" in line]
        detail = errors[0].strip() if errors else result.stderr.strip()[-300:]
        raise DevError(
            f"could not compile the Elasticsearch launcher against {libs} "
            f"(javac exit {result.returncode}): {detail}"
        )
    if classes.exists():  # another process won the race: keep theirs
        shutil.rmtree(staging, ignore_errors=True)
    else:
        staging.rename(classes)
    return classes


# The official distribution's system JVM options that matter for this node (see
# org.elasticsearch.server.cli.SystemJvmOptions in 8.15); es.distribution.type names the build.
ES_JVM_OPTIONS = (
    "-XX:+UseG1GC",
    "-Xss1m",
    "-Djava.awt.headless=true",
    "-Dfile.encoding=UTF-8",
    "-Djna.nosys=true",
    "-XX:-OmitStackTraceInFastThrow",
    "-Dio.netty.noUnsafe=true",
    "-Dio.netty.noKeySetOptimization=true",
    "-Dio.netty.recycler.maxCapacityPerThread=0",
    "-Dlog4j.shutdownHookEnabled=false",
    "-Dlog4j2.disable.jmx=true",
    "-Dlog4j2.formatMsgNoLookups=true",
    "-Des.distribution.type=tar",
)


# Console only: the process's stdout goes to <state>/logs/search.log.
ES_LOG4J2_PROPERTIES = """\
status = error
appender.console.type = Console
appender.console.name = console
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d{ISO8601}][%-5p][%-25c{1.}] [%node_name]%marker %m%n
rootLogger.level = info
rootLogger.appenderRef.console.ref = console
logger.deprecation.name = org.elasticsearch.deprecation
logger.deprecation.level = error
"""


def elasticsearch_yml(*, home: Path, http_port: int, transport_port: int) -> str:
    settings = {
        "cluster.name": "inflow-dev",
        "node.name": "inflow-dev",
        "discovery.type": "single-node",
        "network.host": LOOPBACK,
        "http.port": str(http_port),
        "transport.port": str(transport_port),
        "path.data": str(home / "data"),
        "path.logs": str(home / "logs"),
        # A dev disk may be nearly full; the watermarks would turn indices read-only.
        "cluster.routing.allocation.disk.threshold_enabled": "false",
    }
    return "".join(f"{key}: {json.dumps(value)}\n" for key, value in settings.items())
