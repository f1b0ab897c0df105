"""The one settings object: built from INFLOW_* environment variables, `.inflow/dev.env`, and flags.

Precedence: command-line flag > environment variable > `.inflow/dev.env` (written by
`inflow dev up`) > default. Built once by the CLI and passed down; nothing reads the
environment elsewhere.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from schemas.models import MAX_PASSAGES  # the Prediction contract's bound


class ConfigError(Exception):
    """Bad configuration: a one-line message that names the setting and what to do."""


class Secret(str):
    """A string that does not print itself (passwords, API keys)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "Secret('***')" if self else "Secret('')"


NO_SECRET = Secret("")
SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
GUARANTEES = ("at_least_once", "exactly_once")


@dataclass(frozen=True, slots=True)
class Settings:
    # Where things are
    state_dir: Path = Path(".inflow")
    kafka_bootstrap: str = ""
    es_url: str = ""
    engine_dir: Path = Path(".inflow/engines")
    engine_version: str = ""  # pin a version; empty = follow the registry's active version

    # Kafka security (PLAINTEXT in dev; SASL/SSL for real clusters)
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_sasl_mechanism: str = "PLAIN"
    kafka_sasl_username: str = ""
    kafka_sasl_password: Secret = NO_SECRET
    kafka_ssl_cafile: str = ""
    # A client certificate for listeners that require one (SSL with ssl.client.auth=required)
    kafka_ssl_certfile: str = ""
    kafka_ssl_keyfile: str = ""
    kafka_ssl_key_password: Secret = NO_SECRET

    # Elasticsearch auth
    es_api_key: Secret = NO_SECRET
    es_username: str = ""
    es_password: Secret = NO_SECRET
    es_ca_certs: str = ""
    es_verify_certs: bool = True
    es_alias: str = "inflow-predictions"

    # Topics and the consumer group
    app_id: str = "inflow"
    texts_topic: str = "inflow.texts"
    predictions_topic: str = "inflow.predictions"
    texts_dlq_topic: str = "inflow.texts.dlq"
    predictions_dlq_topic: str = "inflow.predictions.dlq"
    topic_partitions: int = 4
    topic_replication: int = 1

    # Inference micro-batching on the CPU, measured with `inflow bench pipeline` (README): with
    # one batch per core on one thread each, batches of at most 8 drained as fast as 16
    # (451-512 against 498-523 events/s) and cut the p99 at half of capacity from 130-155 ms
    # to 38-74 (a batch of 16 holds its core ~50 ms). The 2048-token budget keeps long texts
    # from padding a batch. A GPU wants bigger batches: the TensorRT worker sets 64.
    max_batch_size: int = 8
    max_batch_tokens: int = 2048
    max_wait_ms: int = 10
    # A p99 target (ms) for "record taken -> prediction acknowledged": 0 keeps the three knobs
    # above fixed; > 0 makes them bounds, inside which each batch's size and wait are chosen
    # from the measured batch times, queue and p99 (streams.delivery.latency).
    latency_target_ms: float = 0.0
    # Events decoded but not yet answered: bounds memory and gives backpressure.
    max_in_flight: int = 256
    # The in-flight ceiling in bytes, for both agents (streams.delivery.flow): records taken and not
    # acked. Reached, consumption pauses (an index outage costs lag, not memory).
    max_in_flight_bytes: int = 32 * 1024 * 1024
    # Faust's per-partition prefetch buffer (records): with the ceiling, the worker's bound.
    stream_buffer_maxsize: int = 512

    # Delivery: at_least_once, or exactly_once (consume -> predict -> produce in Kafka
    # transactions with the input offsets; read_committed consumers see each prediction once).
    processing_guarantee: str = "at_least_once"
    # Group membership: a dead worker's partitions move after session_timeout_s (the broker's
    # group.min.session.timeout.ms, 6 s by default, is the floor).
    session_timeout_s: float = 6.0
    heartbeat_interval_s: float = 1.0
    rebalance_timeout_s: float = 20.0
    # A permanent error of the system (credentials, permissions) parks delivery, not ready;
    # it is checked again this often (streams.delivery.retry).
    permanent_recheck_s: float = 60.0
    # On SIGTERM: how long the worker waits for the records it took to be answered. What is
    # still unanswered then is not committed (the next owner takes it again), so a parked
    # record never holds a stop (Kubernetes' grace period is 30 s by default).
    drain_timeout_s: float = 15.0

    # Index batching
    index_batch_size: int = 500
    index_max_wait_ms: int = 250
    index_max_retries: int = 8

    # Worker web server (health, metrics, search views)
    web_host: str = "127.0.0.1"
    web_port: int = 6066
    # /search and /similar: on the web server above, or on their own server when search_port
    # is set (>= 0; 0 picks a free port); the web server then keeps /metrics and /health/*.
    search_host: str = ""  # default: web_host
    search_port: int = -1
    # API keys for the search views, stored hashed: "ID:SHA256HEX[,ID:SHA256HEX...]" (several
    # at once for rotation; `inflow web-key` makes one). Off loopback the search views refuse
    # every request without a valid key unless web_allow_anonymous says otherwise.
    web_api_keys: str = ""
    web_allow_anonymous: bool = False
    # /similar runs its query text on the live engine: at most this many at once, so searches
    # cannot starve the stream (more get 429 with Retry-After).
    similar_max_concurrent: int = 2
    # Texts longer than the engine's window: 1 reads the first window only (truncation). N > 1
    # embeds up to N overlapping windows; the document keeps them as nested passage vectors
    # (/similar searches them and names the best one), and label and scores pool them. Engine
    # time grows with each window (`inflow batch-bench --passages`).
    passages_max: int = 1
    engine_poll_s: float = 2.0  # how often the worker looks for a newly activated engine
    health_poll_s: float = 5.0  # how often Elasticsearch and the consumer lag are probed
    # /health/live fails when a partition has lag but its committed offset stood still this long
    stall_after_s: float = 120.0
    log_level: str = "info"
    # Drift watch (streams.ops.drift): the latest this-many predictions per engine version are
    # compared with its evaluation split; the index is shown from drift_min_samples on.
    drift_window: int = 1000
    drift_min_samples: int = 100

    extra: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def load(
        cls, env: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None
    ) -> Settings:
        """Settings from env (default os.environ), `.inflow/dev.env`, then non-None overrides."""
        env = dict(os.environ if env is None else env)
        state_dir = Path(env.get("INFLOW_STATE_DIR", ".inflow"))
        merged = {**read_env_file(state_dir / "dev.env"), **env}
        values: dict[str, Any] = {"state_dir": state_dir}
        if "INFLOW_ENGINE_DIR" not in merged:
            values["engine_dir"] = state_dir / "engines"
        for f in fields(cls):
            key = f"INFLOW_{f.name.upper()}"
            if f.name in ("extra", "state_dir") or key not in merged:
                continue
            values[f.name] = _coerce(f.name, cls.__dataclass_fields__[f.name].default, merged[key])
        for name, value in (overrides or {}).items():
            if value is not None:
                values[name] = _coerce(name, cls.__dataclass_fields__[name].default, value)
        settings = cls(**values)
        settings.validate()
        return settings

    def with_overrides(self, **overrides: Any) -> Settings:
        updated = replace(self, **{k: v for k, v in overrides.items() if v is not None})
        updated.validate()
        return updated

    def validate(self) -> None:
        if self.topic_partitions < 1:
            raise ConfigError("INFLOW_TOPIC_PARTITIONS must be at least 1")
        if not 1 <= self.max_batch_size <= 1024:
            raise ConfigError("INFLOW_MAX_BATCH_SIZE must be between 1 and 1024")
        if self.max_batch_tokens < 1:
            raise ConfigError("INFLOW_MAX_BATCH_TOKENS must be positive")
        if self.max_wait_ms < 0:
            raise ConfigError("INFLOW_MAX_WAIT_MS must be 0 or more")
        if not 0 <= self.latency_target_ms <= 600_000:
            raise ConfigError(
                "INFLOW_LATENCY_TARGET_MS must be between 0 (off: fixed batching) and 600000, "
                f"got {self.latency_target_ms:g}"
            )
        if self.max_in_flight < self.max_batch_size:
            raise ConfigError("INFLOW_MAX_IN_FLIGHT must be at least INFLOW_MAX_BATCH_SIZE")
        if self.max_in_flight_bytes < 1024 * 1024:
            raise ConfigError("INFLOW_MAX_IN_FLIGHT_BYTES must be at least 1048576 (1 MiB)")
        if self.stream_buffer_maxsize < 1:
            raise ConfigError("INFLOW_STREAM_BUFFER_MAXSIZE must be at least 1")
        if self.processing_guarantee not in GUARANTEES:
            raise ConfigError(
                f"INFLOW_PROCESSING_GUARANTEE must be one of {', '.join(GUARANTEES)}, "
                f"got {self.processing_guarantee!r}"
            )
        if not 0 < self.heartbeat_interval_s < self.session_timeout_s:
            raise ConfigError(
                "INFLOW_HEARTBEAT_INTERVAL_S must be positive and below INFLOW_SESSION_TIMEOUT_S"
            )
        if self.rebalance_timeout_s <= 0 or self.permanent_recheck_s <= 0:
            raise ConfigError(
                "INFLOW_REBALANCE_TIMEOUT_S and INFLOW_PERMANENT_RECHECK_S must be positive"
            )
        if self.drain_timeout_s <= 0:
            raise ConfigError("INFLOW_DRAIN_TIMEOUT_S must be positive")
        if self.similar_max_concurrent < 1:
            raise ConfigError("INFLOW_SIMILAR_MAX_CONCURRENT must be at least 1")
        if not 1 <= self.passages_max <= MAX_PASSAGES:
            raise ConfigError(
                f"INFLOW_PASSAGES_MAX must be within 1..{MAX_PASSAGES} (1: the first window only)"
            )
        if self.health_poll_s <= 0 or self.stall_after_s <= 0:
            raise ConfigError("INFLOW_HEALTH_POLL_S and INFLOW_STALL_AFTER_S must be positive")
        if self.drift_window < 1 or not 1 <= self.drift_min_samples <= self.drift_window:
            raise ConfigError(
                "INFLOW_DRIFT_WINDOW must be at least 1 and INFLOW_DRIFT_MIN_SAMPLES within "
                "1..INFLOW_DRIFT_WINDOW"
            )
        if not 0 <= self.web_port <= 65535:
            raise ConfigError("INFLOW_WEB_PORT must be a TCP port (0-65535)")
        if not -1 <= self.search_port <= 65535:
            raise ConfigError("INFLOW_SEARCH_PORT must be a TCP port (0-65535), or -1 for none")
        from streams.ops.auth import ApiKeys  # here: streams.ops.auth imports this module

        ApiKeys.parse(self.web_api_keys)  # raises ConfigError naming the variable
        if bool(self.kafka_ssl_certfile) != bool(self.kafka_ssl_keyfile):
            raise ConfigError(
                "INFLOW_KAFKA_SSL_CERTFILE and INFLOW_KAFKA_SSL_KEYFILE go together: set both"
            )
        if self.kafka_security_protocol not in SECURITY_PROTOCOLS:
            raise ConfigError(
                f"INFLOW_KAFKA_SECURITY_PROTOCOL must be one of {', '.join(SECURITY_PROTOCOLS)}"
            )
        if self.kafka_security_protocol.startswith("SASL"):
            if self.kafka_sasl_mechanism not in SASL_MECHANISMS:
                raise ConfigError(
                    f"INFLOW_KAFKA_SASL_MECHANISM must be one of {', '.join(SASL_MECHANISMS)}"
                )
            if not self.kafka_sasl_username:
                raise ConfigError("INFLOW_KAFKA_SASL_USERNAME (and _PASSWORD) must be set for SASL")
        if self.es_url:
            parsed = urlparse(self.es_url)
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                raise ConfigError(
                    f"INFLOW_ES_URL must look like http://host:9200, got {self.es_url!r}"
                )
        if self.kafka_bootstrap:
            for server in self.kafka_bootstrap.split(","):
                host, _, port = server.strip().rpartition(":")
                if not host or not port.isdigit():
                    raise ConfigError(
                        f"INFLOW_KAFKA_BOOTSTRAP must be host:port[,host:port], "
                        f"got {self.kafka_bootstrap!r}"
                    )

    def require_kafka(self) -> str:
        if not self.kafka_bootstrap:
            raise ConfigError(
                "no Kafka configured: set INFLOW_KAFKA_BOOTSTRAP=host:port or run `inflow dev up`"
            )
        return self.kafka_bootstrap

    def require_es(self) -> str:
        if not self.es_url:
            raise ConfigError(
                "no Elasticsearch configured: set INFLOW_ES_URL=http://host:9200 "
                "or run `inflow dev up`"
            )
        return self.es_url

    @property
    def uses_tls(self) -> bool:
        return self.kafka_security_protocol in ("SSL", "SASL_SSL")


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (as written by `inflow dev up`); missing file = no values."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    values = {}
    for line in lines:
        key, sep, value = line.strip().partition("=")
        if sep and key and not key.startswith("#"):
            values[key.strip()] = value.strip()
    return values


_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number"}


def _coerce(name: str, default: Any, raw: Any) -> Any:
    """Turn a flag or env string into the field's type, with a one-line error naming it."""
    if not isinstance(raw, str):
        return raw
    try:
        if isinstance(default, bool):
            lowered = raw.strip().lower()
            if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(raw)
            return lowered in ("1", "true", "yes", "on")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, Path):
            return Path(raw)
        if isinstance(default, Secret):
            return Secret(raw)
    except ValueError:
        kind = _KIND_NAMES.get(type(default), type(default).__name__)
        raise ConfigError(f"INFLOW_{name.upper()} must be {kind}, got {raw!r}") from None
    return raw
