"""Genuine Apache Kafka (KRaft, one node): its jars, its settings, its start and readiness."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import shutil
import subprocess
import uuid
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from streams.dev.console import DevError, Progress, print_progress
from streams.dev.maven import fetch_jars
from streams.dev.process import LOOPBACK, spawn, wait_until

DEFAULT_KAFKA_VERSION = "4.1.1"


def kafka_pom() -> Path:
    return Path(str(resources.files("streams.dev").joinpath("kafka-pom.xml")))


def kafka_log4j_config() -> Path:
    return Path(str(resources.files("streams.dev").joinpath("log4j2.xml")))


def fetch_kafka_jars(version: str, cache_dir: Path, progress: Progress = print_progress) -> Path:
    """Genuine Kafka jars from Maven Central, cached in `cache_dir/kafka-<version>/libs`."""
    return fetch_jars(
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
    proc = spawn(cmd, log)
    wait_until(lambda: kafka_ready(probe_bootstrap), proc, "Apache Kafka", log, timeout_s)
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


def _kafka_cluster_id() -> str:
    """Kafka's Uuid string form: 16 random bytes, URL-safe base64 without padding."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def server_properties_text(*, port: int, controller_port: int, data_dir: Path) -> str:
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
