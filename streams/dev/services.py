"""Local services for development and tests: genuine Apache Kafka (KRaft) and genuine
Elasticsearch, both run from Maven Central jars; noida-db is the fallback for either when Java
or Maven is missing.

Everything binds to 127.0.0.1 on free ports. Each process we start gets a PID file under
`<state>/pids/` that records what it is, so `down` stops exactly what `up` started (by PID,
after checking the PID still runs our command line) and nothing else.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from streams.dev.console import DevError, Progress, print_progress
from streams.dev.elasticsearch import (
    DEFAULT_ES_VERSION,
    ES_JVM_OPTIONS,
    ES_LOG4J2_PROPERTIES,
    compile_elasticsearch_launcher,
    elasticsearch_failure,
    elasticsearch_ready,
    elasticsearch_yml,
    fetch_elasticsearch_jars,
    launcher_classes,
    launcher_compiled,
    search_version,
)
from streams.dev.kafka import (
    DEFAULT_KAFKA_VERSION,
    fetch_kafka_jars,
    kafka_ready,
    launch_apache_kafka,
    server_properties_text,
)
from streams.dev.noida import noida_binary, noida_version
from streams.dev.process import (
    LOOPBACK,
    ensure_port_free,
    free_port,
    is_running,
    pick_port,
    port_is_free,
    spawn,
    stop_pid,
    wait_until,
)

BrokerChoice = Literal["auto", "kafka", "noida"]
SearchChoice = Literal["auto", "elasticsearch", "noida"]
JDK_HINT = "install a JDK 17+ and Maven (apt-get install openjdk-17-jdk-headless maven)"


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


class DevServices:
    """Starts, reports and stops the local broker and search server under one state folder."""

    def __init__(
        self,
        state_dir: Path,
        cache_dir: Path,
        kafka_version: str = DEFAULT_KAFKA_VERSION,
        progress: Progress = print_progress,
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
        if record is not None and is_running(record.pid, record.marker):
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
                stop_pid(search_record.pid, search_record.marker)
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
        if not launcher_compiled(launcher_classes(self.es_version, self.cache_dir)):
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
            if stop_pid(record.pid, record.marker):
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
        proc = spawn(cmd, log)
        url = f"http://{LOOPBACK}:{port}"
        wait_until(lambda: search_version(url) is not None, proc, "the search server", log, 30)
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
            elasticsearch_yml(home=home, http_port=port, transport_port=transport_port)
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
        proc = spawn(cmd, log)
        ready = functools.partial(elasticsearch_ready, url)
        wait_until(ready, proc, "Elasticsearch", log, 120, reason=elasticsearch_failure)
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
        proc = spawn(cmd, log)
        bootstrap = f"{LOOPBACK}:{port}"
        wait_until(lambda: kafka_ready(bootstrap), proc, "the noida-db broker", log, 30)
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
            server_properties_text(port=port, controller_port=controller_port, data_dir=data_dir)
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


def stop_service(record: ServiceRecord) -> bool:
    """Stop a process we started, by its PID, once sure the PID still runs our command.
    True when it was running."""
    return stop_pid(record.pid, record.marker)


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
