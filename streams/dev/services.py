"""Local services for development and tests: genuine Apache Kafka (KRaft) and genuine
Elasticsearch, both run from Maven Central jars; noida-db is the fallback for either when Java
or Maven is missing.

Everything binds to 127.0.0.1 on free ports. Each process we start gets a PID file under
`<state>/pids/` that records what it is, so `down` stops exactly what `up` started (by PID,
after checking the PID still runs our command line) and nothing else.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

DEFAULT_KAFKA_VERSION = "4.1.1"
# The launcher (java/org/elasticsearch/node/InflowNode.java) uses server internals of 8.15.
DEFAULT_ES_VERSION = "8.15.3"
LOOPBACK = "127.0.0.1"
BrokerChoice = Literal["auto", "kafka", "noida"]
SearchChoice = Literal["auto", "elasticsearch", "noida"]
JDK_HINT = "install a JDK 17+ and Maven (apt-get install openjdk-17-jdk-headless maven)"
Progress = Callable[[str], None]


class DevError(Exception):
    """A one-line, actionable failure of the local services (printed without a traceback)."""


@dataclass(frozen=True, slots=True)
class ServiceRecord:
    """What a PID file stores about one process we started."""

    name: str  # "kafka" | "search"
    kind: str  # "apache-kafka" | "elasticsearch" | "noida-db"
    pid: int
    marker: str  # a string unique to our command line, checked before we signal the PID
    address: str  # host:port for Kafka, URL for the search server
    version: str
    log: str

    @property
    def description(self) -> str:
        if self.kind == "apache-kafka":
            return f"Apache Kafka {self.version} (genuine, KRaft)"
        if self.kind == "elasticsearch":
            return f"Elasticsearch {self.version} (genuine)"
        if self.name == "kafka":
            return f"noida-db {self.version} (Kafka wire protocol imitation)"
        return f"noida-db {self.version} (Elasticsearch 8 API imitation)"


@dataclass(frozen=True, slots=True)
class Endpoints:
    kafka_bootstrap: str
    es_url: str
    broker: ServiceRecord
    search: ServiceRecord

    def env_lines(self) -> list[str]:
        return [f"INFLOW_KAFKA_BOOTSTRAP={self.kafka_bootstrap}", f"INFLOW_ES_URL={self.es_url}"]


def _print_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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


# --------------------------------------------------------------------------- process helpers


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace")


def _is_running(pid: int, marker: str) -> bool:
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


def _stop_pid(pid: int, marker: str, timeout_s: float = 20.0) -> bool:
    """SIGTERM the PID if it still runs our command, wait until it has exited, then SIGKILL
    as a last resort. True when there was something to stop."""
    if not _is_running(pid, marker):
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
    if _is_running(pid, marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    deadline = time.monotonic() + 10
    while not _exited(pid) and time.monotonic() < deadline:  # not our child: let it finish
        time.sleep(0.1)
    return True


def _spawn(cmd: list[str], log_path: Path, cwd: Path | None = None) -> subprocess.Popen[bytes]:
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


def _tail(path: Path, lines: int = 3) -> str:
    """The last lines of a log, without Java stack frames (the message is above them)."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    kept = [line.strip() for line in text if line.strip() and not _STACK_FRAME.search(line)]
    return " | ".join(kept[-lines:])


ES_FAILURE_MARKER = "Inflow node failed to start:"  # see InflowNode.java


def _elasticsearch_failure(path: Path) -> str:
    """The launcher's one-line reason when it logged one, else the log's tail."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    reasons = [line for line in text.splitlines() if ES_FAILURE_MARKER in line]
    if reasons:
        return reasons[-1].split(ES_FAILURE_MARKER, 1)[1].strip()
    return _tail(path)


# --------------------------------------------------------------------------- readiness probes


async def _kafka_metadata(bootstrap: str) -> int:
    from aiokafka.client import AIOKafkaClient

    # A broker that is still starting refuses connections; that is expected while probing.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)

    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
    try:
        await client.bootstrap()
        metadata = await client.fetch_all_metadata()
        return len(metadata.brokers())
    finally:
        await client.close()


def kafka_ready(bootstrap: str) -> bool:
    """True once a metadata request succeeds and names at least one broker."""
    try:
        return asyncio.run(asyncio.wait_for(_kafka_metadata(bootstrap), timeout=5)) > 0
    except Exception:
        return False


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


def _wait_until(
    ready: Callable[[], bool],
    proc: subprocess.Popen[bytes],
    what: str,
    log: Path,
    timeout_s: float,
    reason: Callable[[Path], str] = _tail,
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


# --------------------------------------------------------------------------- Kafka jars


def kafka_pom() -> Path:
    return Path(str(resources.files("streams.dev").joinpath("kafka-pom.xml")))


def kafka_log4j_config() -> Path:
    return Path(str(resources.files("streams.dev").joinpath("log4j2.xml")))


def fetch_kafka_jars(version: str, cache_dir: Path, progress: Progress = _print_progress) -> Path:
    """Genuine Kafka jars from Maven Central, cached in `cache_dir/kafka-<version>/libs`."""
    return _fetch_jars(
        pom=kafka_pom(),
        version_property=f"-Dkafka.version={version}",
        libs=cache_dir / f"kafka-{version}" / "libs",
        main_jar=f"kafka_2.13-{version}.jar",
        product="Apache Kafka",
        version=version,
        fallback="--broker noida",
        version_hint=f"{version} is a released 4.x version (INFLOW_KAFKA_VERSION)",
        progress=progress,
    )


def _fetch_jars(
    *,
    pom: Path,
    version_property: str,
    libs: Path,
    main_jar: str,
    product: str,
    version: str,
    fallback: str,
    version_hint: str,
    progress: Progress,
) -> Path:
    """`mvn dependency:copy-dependencies` into a staging folder renamed to `libs` when complete,
    so an interrupted fetch never leaves a cache that looks whole."""
    if (libs / main_jar).exists():
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise DevError(
            f"Maven (mvn) not found: install it (apt-get install maven) to fetch {product}, "
            f"or run with {fallback}"
        )
    staging = libs.parent / f"libs.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True, exist_ok=True)
    log_path = libs.parent / "fetch.log"
    cmd = [
        mvn, "-B", "-f", str(pom), version_property,
        "dependency:copy-dependencies", f"-DoutputDirectory={staging}",
    ]  # fmt: skip
    progress(f"fetching {product} {version} jars from Maven Central (once; cached in {libs})")
    downloaded = 0
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None  # for the type checker: stdout=PIPE above
        for line in proc.stdout:
            log.write(line)
            if "Downloaded from" in line:
                downloaded += 1
                if downloaded % 10 == 0:
                    progress(f"  ... {downloaded} artifacts downloaded")
        code = proc.wait()
    if code != 0 or not (staging / main_jar).exists():
        shutil.rmtree(staging, ignore_errors=True)
        raise DevError(
            f"could not fetch {product} {version} jars from Maven Central (mvn exit {code}; "
            f"log: {log_path}): check access to Maven Central and that {version_hint}"
        )
    if libs.exists():  # another process won the race: keep theirs
        shutil.rmtree(staging, ignore_errors=True)
    else:
        staging.rename(libs)
    progress(f"  fetched {sum(1 for _ in libs.glob('*.jar'))} jars")
    return libs


# --------------------------------------------------------------------------- Elasticsearch jars


def elasticsearch_pom() -> Path:
    return Path(str(resources.files("streams.dev").joinpath("elasticsearch-pom.xml")))


def elasticsearch_launcher_source() -> Path:
    source = resources.files("streams.dev").joinpath(
        "java", "org", "elasticsearch", "node", "InflowNode.java"
    )
    return Path(str(source))


def fetch_elasticsearch_jars(
    version: str, cache_dir: Path, progress: Progress = _print_progress
) -> Path:
    """Genuine Elasticsearch server jars from Maven Central, in
    `cache_dir/elasticsearch-<version>/libs`."""
    return _fetch_jars(
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


def _launcher_compiled(classes: Path) -> bool:
    return (classes / "org" / "elasticsearch" / "node" / "InflowNode.class").exists()


def compile_elasticsearch_launcher(
    version: str, cache_dir: Path, libs: Path, progress: Progress = _print_progress
) -> Path:
    """javac the launcher against the server jars (once per source version), staged and renamed."""
    classes = launcher_classes(version, cache_dir)
    if _launcher_compiled(classes):
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
    if result.returncode != 0 or not _launcher_compiled(staging):
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


# --------------------------------------------------------------------------- the services


class DevServices:
    """Starts, reports and stops the local broker and search server under one state folder."""

    def __init__(
        self,
        state_dir: Path,
        cache_dir: Path,
        kafka_version: str = DEFAULT_KAFKA_VERSION,
        progress: Progress = _print_progress,
        es_version: str = DEFAULT_ES_VERSION,
    ) -> None:
        self.state_dir = state_dir
        self.cache_dir = cache_dir
        self.kafka_version = kafka_version
        self.es_version = es_version
        self.progress = progress
        self.pid_dir = state_dir / "pids"
        self.log_dir = state_dir / "logs"

    @classmethod
    def for_state_dir(cls, state_dir: Path) -> DevServices:
        """The jar cache (INFLOW_CACHE_DIR, default ~/.cache/inflow), Kafka version
        (INFLOW_KAFKA_VERSION) and Elasticsearch version (INFLOW_ES_VERSION) from the
        environment: shared by the CLI, the demo and tests."""
        cache = Path(os.environ.get("INFLOW_CACHE_DIR", Path.home() / ".cache" / "inflow"))
        version = os.environ.get("INFLOW_KAFKA_VERSION", DEFAULT_KAFKA_VERSION)
        es_version = os.environ.get("INFLOW_ES_VERSION", DEFAULT_ES_VERSION)
        return cls(state_dir, cache, kafka_version=version, es_version=es_version)

    @property
    def env_file(self) -> Path:
        return self.state_dir / "dev.env"

    @property
    def ports_file(self) -> Path:
        return self.state_dir / "ports.json"

    def _remembered_ports(self) -> dict[str, int]:
        try:
            ports = json.loads(self.ports_file.read_text())
        except (OSError, ValueError):
            return {}
        return (
            {k: v for k, v in ports.items() if isinstance(v, int)}
            if isinstance(ports, dict)
            else {}
        )

    def _remember_port(self, name: str, port: int) -> None:
        ports = {**self._remembered_ports(), name: port}
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.ports_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(ports))
        os.replace(tmp, self.ports_file)

    def _port_for(self, name: str, asked: int) -> int:
        """The port asked for; else (0) the one this state folder used last time, when it is
        free, so that clients configured after an earlier `up` find the services again."""
        if asked:
            return asked
        last = self._remembered_ports().get(name, 0)
        if last and port_is_free(last):
            return last
        return 0

    # -- records

    def _record_path(self, name: str) -> Path:
        return self.pid_dir / f"{name}.json"

    def _save(self, record: ServiceRecord) -> None:
        port = record.address.rsplit(":", 1)[-1]
        if port.isdigit():
            self._remember_port(record.name, int(port))
        self.pid_dir.mkdir(parents=True, exist_ok=True)
        tmp = self._record_path(record.name).with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(record)))
        os.replace(tmp, self._record_path(record.name))

    def load(self, name: str) -> ServiceRecord | None:
        try:
            return ServiceRecord(**json.loads(self._record_path(name).read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def running(self, name: str) -> ServiceRecord | None:
        record = self.load(name)
        if record is not None and _is_running(record.pid, record.marker):
            return record
        return None

    # -- lifecycle

    def up(
        self,
        broker: BrokerChoice = "auto",
        kafka_port: int = 0,
        es_port: int = 0,
        search: SearchChoice = "auto",
    ) -> Endpoints:
        """Idempotent: reuses services that already run from this state folder.

        Everything that can fail cheaply (ports, tools, the jar fetches, the launcher's
        compilation) is checked before any process starts, and a failed broker start stops the
        search server this call started.
        """
        running_search = self.running("search")
        kafka = self.running("kafka")
        kafka_port = self._port_for("kafka", kafka_port) if kafka is None else kafka_port
        es_port = self._port_for("search", es_port) if running_search is None else es_port
        kind = self._broker_kind(broker) if kafka is None else kafka.kind
        search_kind = self._search_kind(search) if running_search is None else running_search.kind
        if running_search is None and es_port:
            ensure_port_free(es_port, "the search server")
        if kafka is None and kafka_port:
            ensure_port_free(kafka_port, "the Kafka broker")
        libs = (
            fetch_kafka_jars(self.kafka_version, self.cache_dir, self.progress)
            if (kafka is None and kind == "apache-kafka")
            else None
        )
        start_search: Callable[[int], ServiceRecord] = self._start_search
        if running_search is None and search_kind == "elasticsearch":
            es_libs = fetch_elasticsearch_jars(self.es_version, self.cache_dir, self.progress)
            classes = compile_elasticsearch_launcher(
                self.es_version, self.cache_dir, es_libs, self.progress
            )
            start_search = functools.partial(
                self._start_elasticsearch, libs=es_libs, classes=classes
            )
        search_record = running_search or _with_port_retries(start_search, es_port)
        try:
            if kafka is None:
                starter = (
                    functools.partial(self._start_apache_kafka, libs=libs)
                    if libs is not None
                    else self._start_noida_kafka
                )
                kafka = _with_port_retries(starter, kafka_port)
        except BaseException:
            if running_search is None:
                _stop_pid(search_record.pid, search_record.marker)
                self._record_path("search").unlink(missing_ok=True)
            raise
        endpoints = Endpoints(kafka.address, search_record.address, kafka, search_record)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.env_file.write_text("\n".join(endpoints.env_lines()) + "\n")
        return endpoints

    def _broker_kind(self, broker: BrokerChoice) -> str:
        """'apache-kafka' or 'noida-db'; auto falls back to noida-db only without Java/Maven."""
        if broker == "noida":
            return "noida-db"
        cached = (self.cache_dir / f"kafka-{self.kafka_version}" / "libs").exists()
        needed = ("java",) if cached else ("java", "mvn")
        missing = [tool for tool in needed if shutil.which(tool) is None]
        if not missing:
            return "apache-kafka"
        if broker == "kafka":
            raise DevError(f"{_and(missing)} not found: {JDK_HINT}, or use --broker noida")
        self.progress(
            f"{_and(missing)} not found, so the broker is noida-db (a Kafka imitation); "
            f"for genuine Apache Kafka, {JDK_HINT}"
        )
        return "noida-db"

    def _search_kind(self, search: SearchChoice) -> str:
        """'elasticsearch' or 'noida-db'; auto falls back to noida-db only without the JDK
        (java, and javac until the launcher is compiled) or Maven (until the jars are cached)."""
        if search == "noida":
            return "noida-db"
        libs = self.cache_dir / f"elasticsearch-{self.es_version}" / "libs"
        needed = ["java"]
        if not _launcher_compiled(launcher_classes(self.es_version, self.cache_dir)):
            needed.append("javac")
        if not libs.exists():
            needed.append("mvn")
        missing = [tool for tool in needed if shutil.which(tool) is None]
        if not missing:
            return "elasticsearch"
        if search == "elasticsearch":
            raise DevError(f"{_and(missing)} not found: {JDK_HINT}, or use --search noida")
        self.progress(
            f"{_and(missing)} not found, so the search server is noida-db (an Elasticsearch 8 API "
            f"imitation); for genuine Elasticsearch {self.es_version}, {JDK_HINT}"
        )
        return "noida-db"

    def down(self) -> list[ServiceRecord]:
        """Stop what runs from this state folder; return only what was really running (a PID
        file left by a crashed service is removed, not reported as stopped). Data and ports
        are kept for the next `up`."""
        stopped = []
        for name in ("kafka", "search"):
            record = self.load(name)
            if record is None:
                continue
            if _stop_pid(record.pid, record.marker):
                stopped.append(record)
            self._record_path(name).unlink(missing_ok=True)
        self.env_file.unlink(missing_ok=True)
        return stopped

    def status(self) -> dict[str, ServiceRecord | None]:
        return {name: self.running(name) for name in ("kafka", "search")}

    # -- starters

    def _start_search(self, port: int) -> ServiceRecord:
        port = pick_port(port, "the search server")
        data_dir = self.state_dir / "search-data"
        log = self.log_dir / "search.log"
        cmd = [
            str(noida_binary()), "start", "--only", "elasticsearch", "--host", LOOPBACK,
            "--elasticsearch-port", str(port), "--data-dir", str(data_dir),
        ]  # fmt: skip
        proc = _spawn(cmd, log)
        url = f"http://{LOOPBACK}:{port}"
        _wait_until(lambda: search_version(url) is not None, proc, "the search server", log, 30)
        record = ServiceRecord(
            "search", "noida-db", proc.pid, str(data_dir), url, noida_version(), str(log)
        )
        self._save(record)
        self.progress(f"search: {record.description}, ES API {search_version(url)}, pid {proc.pid}")
        return record

    def _start_elasticsearch(self, port: int, libs: Path, classes: Path) -> ServiceRecord:
        port = pick_port(port, "the search server")
        transport_port = free_port()
        home = self.state_dir / "elasticsearch"
        config = home / "config"
        config.mkdir(parents=True, exist_ok=True)
        (home / "tmp").mkdir(exist_ok=True)
        # The data folder is kept across down/up: indices survive a restart, as in production.
        (config / "elasticsearch.yml").write_text(
            _elasticsearch_yml(home=home, http_port=port, transport_port=transport_port)
        )
        (config / "log4j2.properties").write_text(ES_LOG4J2_PROPERTIES)
        java = shutil.which("java") or "java"
        heap = os.environ.get("INFLOW_ES_HEAP", "-Xms512m -Xmx1g").split()
        cmd = [
            java, *heap, *ES_JVM_OPTIONS, f"-Djava.io.tmpdir={home / 'tmp'}",
            "-cp", f"{classes}{os.pathsep}{libs}/*", "org.elasticsearch.node.InflowNode", str(home),
        ]  # fmt: skip
        log = self.log_dir / "search.log"
        url = f"http://{LOOPBACK}:{port}"
        self.progress(f"starting Elasticsearch {self.es_version} on {url}")
        started = time.monotonic()
        proc = _spawn(cmd, log)
        ready = functools.partial(elasticsearch_ready, url)
        _wait_until(ready, proc, "Elasticsearch", log, 120, reason=_elasticsearch_failure)
        record = ServiceRecord(
            "search", "elasticsearch", proc.pid, str(home), url, self.es_version, str(log)
        )
        self._save(record)
        self.progress(
            f"search: {record.description}, pid {proc.pid}, "
            f"ready in {time.monotonic() - started:.1f}s"
        )
        return record

    def _start_noida_kafka(self, port: int) -> ServiceRecord:
        port = pick_port(port, "the Kafka broker")
        data_dir = self.state_dir / "noida-kafka-data"
        log = self.log_dir / "kafka.log"
        cmd = [
            str(noida_binary()), "start", "--only", "kafka", "--host", LOOPBACK,
            "--kafka-port", str(port), "--data-dir", str(data_dir),
        ]  # fmt: skip
        proc = _spawn(cmd, log)
        bootstrap = f"{LOOPBACK}:{port}"
        _wait_until(lambda: kafka_ready(bootstrap), proc, "the noida-db broker", log, 30)
        record = ServiceRecord(
            "kafka", "noida-db", proc.pid, str(data_dir), bootstrap, noida_version(), str(log)
        )
        self._save(record)
        self.progress(f"broker: {record.description}, pid {proc.pid}")
        return record

    def _start_apache_kafka(self, port: int, libs: Path) -> ServiceRecord:
        port = pick_port(port, "the Kafka broker")
        # The data folder is kept across down/up and crashes (topics, offsets, transactions
        # survive, as in production); KRaft's quorum names the controller's address, so it
        # keeps its port too when it can.
        controller_port = self._remembered_ports().get("kafka-controller", 0)
        if not controller_port or controller_port == port or not port_is_free(controller_port):
            controller_port = free_port()
        self._remember_port("kafka-controller", controller_port)
        kafka_dir = self.state_dir / "kafka"
        data_dir = kafka_dir / "data"
        kafka_dir.mkdir(parents=True, exist_ok=True)
        properties = kafka_dir / "server.properties"
        properties.write_text(
            _server_properties(port=port, controller_port=controller_port, data_dir=data_dir)
        )
        log = self.log_dir / "kafka.log"
        self.progress(f"starting Apache Kafka {self.kafka_version} on {LOOPBACK}:{port}")
        bootstrap = f"{LOOPBACK}:{port}"
        proc = launch_apache_kafka(libs, properties, log, bootstrap)
        record = ServiceRecord(
            "kafka", "apache-kafka", proc.pid, str(properties), bootstrap, self.kafka_version,
            str(log),
        )  # fmt: skip
        self._save(record)
        self.progress(f"broker: {record.description}, pid {proc.pid}")
        return record

    def save_record(self, record: ServiceRecord) -> None:
        """Keep a PID file for a process started outside `up` (a test's own broker), so what
        runs can be found and stopped by PID (`stop_service`)."""
        self._save(record)


def launch_apache_kafka(
    libs: Path,
    properties: Path,
    log: Path,
    probe_bootstrap: str,
    *,
    format_args: Sequence[str] = (),
    timeout_s: float = 90,
) -> subprocess.Popen[bytes]:
    """Format KRaft storage for `properties` and start the broker; return once a metadata
    request to `probe_bootstrap` (a PLAINTEXT listener) succeeds. `format_args` go to
    `kafka-storage format` (e.g. `--add-scram` for SCRAM users)."""
    java = shutil.which("java") or "java"
    classpath = f"{libs}/*"
    if not _kafka_formatted(properties):  # a broker restarted on its data keeps its cluster id
        fmt = subprocess.run(
            [
                java, "-cp", classpath, "kafka.tools.StorageTool", "format", "--standalone",
                "--cluster-id", _kafka_cluster_id(), "--config", str(properties), *format_args,
            ],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if fmt.returncode != 0:
            lines = (fmt.stderr or fmt.stdout).strip().splitlines()
            detail = [line for line in lines if "Exception" in line][:1] or lines[-1:]
            raise DevError(f"Kafka storage format failed: {' '.join(detail)}")
    heap = os.environ.get("INFLOW_KAFKA_HEAP", "-Xms256m -Xmx1g").split()
    cmd = [
        java, *heap, "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={kafka_log4j_config()}",
        "-cp", classpath, "kafka.Kafka", str(properties),
    ]  # fmt: skip
    proc = _spawn(cmd, log)
    _wait_until(lambda: kafka_ready(probe_bootstrap), proc, "Apache Kafka", log, timeout_s)
    return proc


def _kafka_formatted(properties: Path) -> bool:
    """Whether every log dir that `properties` names already holds KRaft storage."""
    dirs = [
        line.split("=", 1)[1].strip()
        for line in properties.read_text().splitlines()
        if line.startswith("log.dirs=")
    ]
    paths = [Path(d) for entry in dirs for d in entry.split(",") if d]
    return bool(paths) and all((path / "meta.properties").exists() for path in paths)


def stop_service(record: ServiceRecord) -> bool:
    """Stop a process we started, by its PID, once sure the PID still runs our command.
    True when it was running."""
    return _stop_pid(record.pid, record.marker)


def _with_port_retries(start: Callable[[int], ServiceRecord], port: int) -> ServiceRecord:
    """A free port picked by us (port 0) can be taken by another process before the service
    binds it; then try again on a new one. A port the user chose is tried once."""
    attempts = 3 if port == 0 else 1
    for attempt in range(1, attempts + 1):
        try:
            return start(port)
        except DevError:
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


def _and(words: list[str]) -> str:
    """["a"] -> "a"; ["a", "b"] -> "a and b"; ["a", "b", "c"] -> "a, b and c"."""
    return " and ".join(filter(None, [", ".join(words[:-1]), words[-1]]))


def _kafka_cluster_id() -> str:
    """Kafka's Uuid string form: 16 random bytes, URL-safe base64 without padding."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


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


def _elasticsearch_yml(*, home: Path, http_port: int, transport_port: int) -> str:
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


def _server_properties(*, port: int, controller_port: int, data_dir: Path) -> str:
    settings = kafka_server_properties(
        port=port, controller_port=controller_port, data_dir=data_dir
    )
    return "".join(f"{key}={value}\n" for key, value in settings.items())


def kafka_server_properties(*, port: int, controller_port: int, data_dir: Path) -> dict[str, str]:
    """The single-node KRaft settings of the dev broker (a PLAINTEXT listener on `port`)."""
    settings = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.bootstrap.servers": f"{LOOPBACK}:{controller_port}",
        "listeners": f"PLAINTEXT://{LOOPBACK}:{port},CONTROLLER://{LOOPBACK}:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://{LOOPBACK}:{port}",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "inter.broker.listener.name": "PLAINTEXT",
        "log.dirs": str(data_dir),
        "num.partitions": "4",
        "auto.create.topics.enable": "false",  # Inflow creates its topics with the intended count
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "8",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        "num.network.threads": "2",
        "num.io.threads": "4",
        "log.retention.hours": "24",
    }
    return settings
