"""Services configured for security, made at test time and shared per module.

- `pki`: a test CA (server and client certificates signed by it) and an unrelated CA, made
  with `openssl`.
- `secure_kafka`: a genuine Apache Kafka broker of its own (not the suite's dev broker) with
  a SASL_SSL listener (SCRAM-SHA-512), an SSL listener that requires client certificates, a
  SASL_PLAINTEXT listener (SCRAM-SHA-512) and a PLAINTEXT listener for the broker itself and
  the readiness probe; the SCRAM user is created by `kafka-storage format --add-scram`.
- `secure_es`: nginx in front of the suite's search server, terminating TLS with the test
  CA's certificate and letting through only one API key or one user/password (as
  Elasticsearch's security would; the Maven-built node has no x-pack).
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from streams.dev.console import DevError
from streams.dev.kafka import fetch_kafka_jars, kafka_server_properties, launch_apache_kafka
from streams.dev.process import free_port
from streams.dev.services import DevServices, ServiceRecord, stop_service
from tests.e2e.conftest import engine_dir  # noqa: F401  (the e2e fixture, shared)

ROOT = Path(__file__).resolve().parents[2]


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"openssl {args[0]} failed: {result.stderr[-500:]}"


@dataclass(frozen=True)
class Pki:
    dir: Path
    ca: Path  # the CA every server and client certificate here is signed by
    other_ca: Path  # an unrelated CA: trusting only it must fail
    server_cert: Path  # leaf + CA, for 127.0.0.1 and localhost
    server_key: Path
    server_keystore: Path  # key + chain in one PEM file (Kafka's ssl.keystore.type=PEM)
    client_cert: Path
    client_key: Path


def _self_signed_ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", str(key), "-out", str(cert), "-subj", f"/CN=Inflow test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    return key, cert


def _leaf(directory: Path, name: str, ca_key: Path, ca: Path, extensions: str) -> tuple[Path, Path]:
    key, csr, cert = directory / f"{name}.key", directory / f"{name}.csr", directory / f"{name}.pem"
    ext = directory / f"{name}.ext"
    ext.write_text(extensions)
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
        "-subj", f"/CN={name}", cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-days", "2", "-out", str(cert), "-extfile", str(ext),
        cwd=directory,
    )  # fmt: skip
    return key, cert


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make the test certificates")
    directory = tmp_path_factory.mktemp("pki")
    ca_key, ca = _self_signed_ca(directory, "ca")
    _, other_ca = _self_signed_ca(directory, "other-ca")
    server_key, server_leaf = _leaf(
        directory,
        "localhost",
        ca_key,
        ca,
        "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    client_key, client_cert = _leaf(
        directory,
        "inflow-client",
        ca_key,
        ca,
        "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
    )
    chain = directory / "server-chain.pem"
    chain.write_text(server_leaf.read_text() + ca.read_text())
    keystore = directory / "server-keystore.pem"
    keystore.write_text(server_key.read_text() + chain.read_text())
    return Pki(directory, ca, other_ca, chain, server_key, keystore, client_cert, client_key)


@dataclass(frozen=True)
class SecureKafka:
    sasl_ssl: str  # bootstrap of each listener
    ssl: str
    sasl_plaintext: str
    plaintext: str  # for the broker itself and the test's own checks
    username: str
    password: str


@pytest.fixture(scope="module")
def secure_kafka(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureKafka]:
    if shutil.which("java") is None:
        pytest.skip("genuine Apache Kafka needs a JDK (java)")
    state = tmp_path_factory.mktemp("secure-kafka")
    dev = DevServices.for_state_dir(state)
    try:
        libs = fetch_kafka_jars(dev.kafka_version, dev.cache_dir)
    except DevError as exc:
        pytest.skip(f"no Kafka jars: {exc}")
    ports = {name: free_port() for name in ("INTERNAL", "SASL_SSL", "SSL", "SASL_PLAINTEXT")}
    controller = free_port()
    listeners = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
    properties = kafka_server_properties(
        port=ports["INTERNAL"], controller_port=controller, data_dir=state / "data"
    )
    jaas = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
    properties.update(
        {
            "listeners": ",".join(
                [f"{n}://{a}" for n, a in listeners.items()]
                + [f"CONTROLLER://127.0.0.1:{controller}"]
            ),
            "advertised.listeners": ",".join(f"{n}://{a}" for n, a in listeners.items()),
            "listener.security.protocol.map": "INTERNAL:PLAINTEXT,SASL_SSL:SASL_SSL,SSL:SSL,"
            "SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "INTERNAL",
            "sasl.enabled.mechanisms": "SCRAM-SHA-512",
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": jaas,
            "listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config": jaas,
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(pki.server_keystore),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(pki.ca),
            "listener.name.ssl.ssl.client.auth": "required",
        }
    )
    config = state / "server.properties"
    config.write_text("".join(f"{key}={value}\n" for key, value in properties.items()))
    username, password = "inflow", secrets.token_hex(16)
    log = state / "kafka.log"
    proc = launch_apache_kafka(
        libs,
        config,
        log,
        listeners["INTERNAL"],
        format_args=["--add-scram", f"SCRAM-SHA-512=[name={username},password={password}]"],
    )
    record = ServiceRecord(
        "secure-kafka", "apache-kafka", proc.pid, str(config), listeners["SASL_SSL"],
        dev.kafka_version, str(log),
    )  # fmt: skip
    dev.save_record(record)
    try:
        yield SecureKafka(
            listeners["SASL_SSL"],
            listeners["SSL"],
            listeners["SASL_PLAINTEXT"],
            listeners["INTERNAL"],
            username,
            password,
        )
    finally:
        stop_service(record)


@dataclass(frozen=True)
class SecureEs:
    url: str
    api_key: str
    username: str
    password: str
    log_dir: Path


NGINX_CONF = """\
{user}worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 256; }}
http {{
  access_log {dir}/access.log;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  client_max_body_size 100m;
  client_body_buffer_size 16m;
  map_hash_bucket_size 256;
  map $http_authorization $inflow_auth {{
    default 0;
    "ApiKey {api_key}" 1;
    "Basic {basic}" 1;
  }}
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    location / {{
      default_type application/json;
      if ($inflow_auth = 0) {{
        add_header WWW-Authenticate 'ApiKey' always;
        add_header X-elastic-product Elasticsearch always;
        return 401 '{refusal}';
      }}
      proxy_pass {upstream};
      proxy_set_header Authorization "";
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}
}}
"""


def _nginx() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


@pytest.fixture(scope="module")
def secure_es(
    pki: Pki, es_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SecureEs]:
    nginx = _nginx()
    if nginx is None:
        pytest.skip(
            "nginx is needed for the HTTPS, API-key-checking front (apt-get install nginx-light)"
        )
    directory = tmp_path_factory.mktemp("secure-es")
    api_key, username, password = secrets.token_hex(20), "inflow", secrets.token_hex(12)
    port = free_port()
    conf = directory / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            user="user root;\n" if os.geteuid() == 0 else "",
            dir=directory,
            api_key=api_key,
            basic=base64.b64encode(f"{username}:{password}".encode()).decode(),
            port=port,
            cert=pki.server_cert,
            key=pki.server_key,
            upstream=es_url.rstrip("/"),
            refusal='{"error":{"type":"security_exception","reason":"unable to authenticate"},'
            '"status":401}',
        )
    )
    with open(directory / "nginx.out", "wb") as out:
        proc = subprocess.Popen(
            [nginx, "-p", str(directory), "-c", str(conf), "-e", str(directory / "error.log")],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    record = ServiceRecord(
        "secure-es", "nginx", proc.pid, str(conf), f"https://127.0.0.1:{port}", "", str(directory)
    )
    DevServices.for_state_dir(directory).save_record(record)
    url = f"https://127.0.0.1:{port}"
    context = ssl.create_default_context(cafile=str(pki.ca))
    deadline = time.monotonic() + 30
    try:
        while True:
            request = urllib.request.Request(url, headers={"Authorization": f"ApiKey {api_key}"})
            try:
                with urllib.request.urlopen(request, timeout=2, context=context) as response:
                    if response.status == 200:
                        break
            except (OSError, urllib.error.URLError):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                errors = (directory / "error.log").read_text(errors="replace")[-1000:]
                raise AssertionError(f"nginx did not come up: {errors}")
            time.sleep(0.2)
        yield SecureEs(url, api_key, username, password, directory)
    finally:
        stop_service(record)
