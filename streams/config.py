"""The one settings object: built from INFLOW_* environment variables, `.inflow/dev.env`, and flags.

Precedence: command-line flag > environment variable > `<INFLOW_STATE_DIR or .inflow>/dev.env`
(written by `inflow dev up`) > default. Built once by the CLI and passed down; nothing reads the
environment elsewhere.

Each setting is declared once, below: its type, default, bounds and description (pydantic).
`Settings(...)` reads nothing but its arguments; `Settings.load` adds the environment and the
dev.env file through pydantic-settings' sources, and `effective_settings` says where each value
came from (`inflow settings`). A bad value is one `ConfigError` line naming the variable, what
it allows and what it got.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin
from urllib.parse import urlparse

from pydantic import (
    BeforeValidator,
    Field,
    GetCoreSchemaHandler,
    ModelWrapValidatorHandler,
    ValidationError,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import CoreSchema, ErrorDetails, core_schema
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from schemas.models import MAX_PASSAGES  # the Prediction contract's bound
from streams.errors import ConfigError
from streams.ops.auth import ApiKeys

ENV_PREFIX = "INFLOW_"
DEFAULT_STATE_DIR = Path(".inflow")
DEV_ENV = "dev.env"  # in the state dir, written by `inflow dev up`


class Secret(str):
    """A string that does not print itself (passwords, API keys); still a str for the clients."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "Secret('***')" if self else "Secret('')"

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.no_info_after_validator_function(_secret, core_schema.str_schema())


def _secret(value: str) -> Secret:
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("control character")  # a pasted newline: the server would refuse it
    return Secret(value)


NO_SECRET = Secret("")

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _flag(value: Any) -> Any:
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered not in _TRUE + _FALSE:
            raise ValueError(value)
        return lowered in _TRUE
    return value


def _path(value: Any) -> Any:
    if isinstance(value, str) and (not value.strip() or "\0" in value):
        raise ValueError(value)  # "" would silently mean the current folder
    return value


Flag = Annotated[bool, BeforeValidator(_flag)]  # 1/0, true/false, yes/no, on/off
Folder = Annotated[Path, BeforeValidator(_path)]
SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
Guarantee = Literal["at_least_once", "exactly_once"]
# Any case, as logging itself takes it (INFO, info).
LogLevel = Annotated[
    Literal["debug", "info", "warning", "error", "critical"],
    BeforeValidator(lambda value: value.strip().lower() if isinstance(value, str) else value),
]
SECURITY_PROTOCOLS: tuple[str, ...] = get_args(SecurityProtocol)
SASL_MECHANISMS: tuple[str, ...] = get_args(SaslMechanism)
GUARANTEES: tuple[str, ...] = get_args(Guarantee)

# Kafka's legal topic (and group) names; Elasticsearch's index and alias names, simplified.
TOPIC_PATTERN = r"^[A-Za-z0-9._-]{1,249}$"
ALIAS_PATTERN = r"^[a-z0-9][a-z0-9._+-]{0,254}$"
_PATTERN_WORDS = {
    TOPIC_PATTERN: "a Kafka name: 1-249 letters, digits, '.', '_' or '-'",
    ALIAS_PATTERN: "an index name: lower-case letters, digits, '.', '_', '+' or '-', "
    "starting with a letter or digit",
}


class Settings(BaseSettings):
    # Plain construction reads its arguments only (see settings_customise_sources); `load`
    # brings in the environment and dev.env.
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, frozen=True, extra="forbid", allow_inf_nan=False
    )

    # Where things are
    state_dir: Folder = Field(
        DEFAULT_STATE_DIR,
        description="Faust's data folder; `inflow dev up` keeps its services and dev.env here",
    )
    kafka_bootstrap: str = Field(
        "", description="Kafka brokers, host:port[,host:port] (empty: `inflow dev up`'s)"
    )
    es_url: str = Field("", description="Elasticsearch, http(s)://host:9200")
    engine_dir: Folder = Field(
        DEFAULT_STATE_DIR / "engines",
        description="the engine registry (default: <state dir>/engines)",
    )
    engine_version: str = Field(
        "", description="pin an engine version; empty follows the registry's active version"
    )

    # Kafka security (PLAINTEXT in dev; SASL/SSL for real clusters)
    kafka_security_protocol: SecurityProtocol = Field(
        "PLAINTEXT", description="PLAINTEXT in dev; SSL or SASL_* for real clusters"
    )
    kafka_sasl_mechanism: SaslMechanism = Field("PLAIN", description="used with SASL_*")
    kafka_sasl_username: str = Field("", description="required with SASL_*")
    kafka_sasl_password: Secret = Field(NO_SECRET, description="the SASL password")
    kafka_ssl_cafile: str = Field(
        "", description="CA bundle the brokers' certificates are checked with (empty: system's)"
    )
    kafka_ssl_certfile: str = Field(
        "",
        description="a client certificate, for listeners that require one "
        "(ssl.client.auth=required); set with the key file",
    )
    kafka_ssl_keyfile: str = Field("", description="the client certificate's key")
    kafka_ssl_key_password: Secret = Field(NO_SECRET, description="the key file's password")

    # Elasticsearch auth
    es_api_key: Secret = Field(NO_SECRET, description="an Elasticsearch API key")
    es_username: str = Field("", description="basic auth, with the password")
    es_password: Secret = Field(NO_SECRET, description="basic auth password")
    es_ca_certs: str = Field("", description="CA bundle for Elasticsearch (empty: system's)")
    es_verify_certs: Flag = Field(True, description="check Elasticsearch's certificate")
    es_alias: str = Field(
        "inflow-predictions",
        pattern=ALIAS_PATTERN,
        description="the alias searches read and the worker writes through",
    )

    # Topics and the consumer group
    app_id: str = Field(
        "inflow", pattern=TOPIC_PATTERN, description="Faust app id and Kafka consumer group"
    )
    texts_topic: str = Field("inflow.texts", pattern=TOPIC_PATTERN, description="the input")
    predictions_topic: str = Field(
        "inflow.predictions", pattern=TOPIC_PATTERN, description="the output"
    )
    texts_dlq_topic: str = Field(
        "inflow.texts.dlq", pattern=TOPIC_PATTERN, description="dead letters of the input"
    )
    predictions_dlq_topic: str = Field(
        "inflow.predictions.dlq",
        pattern=TOPIC_PATTERN,
        description="predictions the index refused",
    )
    topic_partitions: int = Field(
        4, ge=1, description="partitions `inflow topics` creates: the most workers that share"
    )
    topic_replication: int = Field(1, ge=1, description="replicas `inflow topics` creates")

    # Inference micro-batching on the CPU, measured with `inflow bench pipeline` (README): with
    # one batch per core on one thread each, batches of at most 8 drained as fast as 16
    # (451-512 against 498-523 events/s) and cut the p99 at half of capacity from 130-155 ms
    # to 38-74 (a batch of 16 holds its core ~50 ms). The 2048-token budget keeps long texts
    # from padding a batch. A GPU wants bigger batches: the TensorRT worker sets 64.
    max_batch_size: int = Field(
        8,
        ge=1,
        le=1024,
        description="texts per engine call; 8 on a CPU (p99 38-74 ms at half of capacity "
        "against 130-155 for 16, same drain), 64 on a GPU",
    )
    max_batch_tokens: int = Field(
        2048, ge=1, description="token budget of a batch: long texts do not pad a whole batch"
    )
    max_wait_ms: int = Field(10, ge=0, description="how long a batch waits to fill")
    latency_target_ms: float = Field(
        0.0,
        ge=0,
        le=600_000,
        json_schema_extra={"allowed": "a number between 0 (off: fixed batching) and 600000"},
        description="p99 target (ms) from record taken to prediction acknowledged: 0 keeps the "
        "three knobs above fixed; > 0 makes them bounds, inside which each batch's size and "
        "wait follow the measured batch times, queue and p99 (streams.delivery.latency)",
    )
    max_in_flight: int = Field(
        256,
        ge=1,
        description="events decoded but not yet answered: bounds memory, gives backpressure "
        "(at least INFLOW_MAX_BATCH_SIZE)",
    )
    max_in_flight_bytes: int = Field(
        32 * 1024 * 1024,
        ge=1024 * 1024,
        json_schema_extra={"allowed": "an integer of at least 1048576 (1 MiB)"},
        description="bytes taken and not acked, both agents (streams.delivery.flow): reached, "
        "consumption pauses, so an index outage costs lag, not memory",
    )
    stream_buffer_maxsize: int = Field(
        512,
        ge=1,
        description="Faust's per-partition prefetch (records): with the ceiling, the bound",
    )

    # Delivery and group membership
    processing_guarantee: Guarantee = Field(
        "at_least_once",
        description="exactly_once: consume -> predict -> produce in Kafka transactions with the "
        "input offsets (read_committed consumers see each prediction once)",
    )
    session_timeout_s: float = Field(
        6.0,
        gt=0,
        description="a dead worker's partitions move after this (the broker's "
        "group.min.session.timeout.ms, 6 s by default, is the floor)",
    )
    heartbeat_interval_s: float = Field(1.0, gt=0, description="below INFLOW_SESSION_TIMEOUT_S")
    rebalance_timeout_s: float = Field(20.0, gt=0, description="how long a rebalance may take")
    permanent_recheck_s: float = Field(
        60.0,
        gt=0,
        description="a permanent error of the system (credentials, permissions) parks delivery, "
        "not ready; checked again this often (streams.delivery.retry)",
    )
    drain_timeout_s: float = Field(
        15.0,
        gt=0,
        description="on SIGTERM, how long to wait for taken records to be answered; the rest is "
        "not committed (the next owner takes it again), so a parked record never holds a stop "
        "(Kubernetes' grace period is 30 s by default)",
    )

    # Index batching
    index_batch_size: int = Field(500, ge=1, description="documents per bulk request")
    index_max_wait_ms: int = Field(250, ge=0, description="how long a bulk request waits to fill")
    index_max_retries: int = Field(8, ge=0, description="retries of a failed bulk request")

    # Worker web server (health, metrics, search views)
    web_host: str = Field("127.0.0.1", description="health, metrics and (by default) search")
    web_port: int = Field(
        6066,
        ge=0,
        le=65535,
        json_schema_extra={"allowed": "a TCP port (0-65535)"},
        description="the web server's port (0 picks a free one)",
    )
    search_host: str = Field("", description="the search server's host (default: web_host)")
    search_port: int = Field(
        -1,
        ge=-1,
        le=65535,
        json_schema_extra={"allowed": "a TCP port (0-65535), or -1 for none"},
        description="/search and /similar on their own server (0 picks a free port); the web "
        "server then keeps /metrics and /health/*; -1: on the web server",
    )
    web_api_keys: str = Field(
        "",
        description="API keys of the search views, stored hashed: ID:sha256:HEX[,...] (several "
        "for rotation; `inflow web-key` makes one). Off loopback the views refuse a request "
        "without a valid key unless INFLOW_WEB_ALLOW_ANONYMOUS",
    )
    web_allow_anonymous: Flag = Field(False, description="search views open off loopback")
    similar_max_concurrent: int = Field(
        2,
        ge=1,
        description="/similar queries run on the live engine at once, so searches cannot starve "
        "the stream (more get 429 with Retry-After)",
    )
    passages_max: int = Field(
        1,
        ge=1,
        le=MAX_PASSAGES,
        json_schema_extra={
            "allowed": f"an integer within 1..{MAX_PASSAGES} (1: the first window only)"
        },
        description="texts longer than the engine's window: 1 truncates; N embeds up to N "
        "overlapping windows as nested passage vectors (/similar names the best one; label and "
        "scores pool them); engine time grows with each (`inflow bench passages`)",
    )
    engine_poll_s: float = Field(
        2.0, gt=0, description="how often the worker looks for a newly activated engine"
    )
    health_poll_s: float = Field(
        5.0, gt=0, description="how often Elasticsearch and the consumer lag are probed"
    )
    stall_after_s: float = Field(
        120.0,
        gt=0,
        description="/health/live fails when a partition has lag but its committed offset "
        "stood still this long",
    )
    log_level: LogLevel = Field("info", description="the worker's log level (`--loglevel` wins)")
    drift_window: int = Field(
        1000,
        ge=1,
        description="drift watch (streams.ops.drift): the latest this-many predictions per "
        "engine version are compared with its evaluation split",
    )
    drift_min_samples: int = Field(
        100, ge=1, description="the drift index is shown from this many on (<= the window)"
    )

    extra: Mapping[str, str] = Field(
        default_factory=dict, description="set in code only: never read from the environment"
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)  # the environment and dev.env: only through `load`

    @classmethod
    def load(
        cls, env: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None
    ) -> Settings:
        """Settings from env (default os.environ), `<state dir>/dev.env` and non-None overrides."""
        return _gather(cls, env, overrides)[0]

    def with_overrides(self, **overrides: Any) -> Settings:
        """A validated copy with the non-None overrides."""
        values = {name: getattr(self, name) for name in type(self).model_fields}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return type(self)(**values)

    @model_validator(mode="wrap")
    @classmethod
    def _one_line(cls, data: Any, handler: ModelWrapValidatorHandler[Settings]) -> Settings:
        try:
            settings = handler(data)
        except ValidationError as exc:
            raise _config_error(cls, exc) from None
        settings._check_together()
        return settings

    def _check_together(self) -> None:
        """What one field's declaration cannot say: checks across fields, and shapes."""
        if self.max_in_flight < self.max_batch_size:
            raise ConfigError(
                f"INFLOW_MAX_IN_FLIGHT must be at least INFLOW_MAX_BATCH_SIZE "
                f"({self.max_batch_size}), got {self.max_in_flight}"
            )
        if not self.heartbeat_interval_s < self.session_timeout_s:
            raise ConfigError(
                f"INFLOW_HEARTBEAT_INTERVAL_S must be positive and below INFLOW_SESSION_TIMEOUT_S "
                f"({self.session_timeout_s:g}), got {self.heartbeat_interval_s:g}"
            )
        if self.drift_min_samples > self.drift_window:
            raise ConfigError(
                f"INFLOW_DRIFT_MIN_SAMPLES must be within 1..INFLOW_DRIFT_WINDOW "
                f"({self.drift_window}), got {self.drift_min_samples}"
            )
        ApiKeys.parse(self.web_api_keys)  # raises ConfigError naming the variable
        if bool(self.kafka_ssl_certfile) != bool(self.kafka_ssl_keyfile):
            raise ConfigError(
                "INFLOW_KAFKA_SSL_CERTFILE and INFLOW_KAFKA_SSL_KEYFILE go together: set both"
            )
        if self.kafka_security_protocol.startswith("SASL") and not self.kafka_sasl_username:
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


def env_name(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


# --------------------------------------------------------------------------- loading

CODE_ONLY = frozenset({"extra"})  # never read from the environment or dev.env
NOT_IN_DEV_ENV = CODE_ONLY | {"state_dir"}  # dev.env lives in the state dir


def _without(names: frozenset[str], variables: Mapping[str, str | None]) -> dict[str, str | None]:
    dropped = {env_name(n).lower() for n in names}
    return {k: v for k, v in variables.items() if k.lower() not in dropped}


class _EnvSource(EnvSettingsSource):
    """pydantic-settings' environment source, over a given mapping instead of os.environ."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ  # before super().__init__, which loads the variables
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        folded = {k if self.case_sensitive else k.lower(): v for k, v in self._environ.items()}
        return _without(CODE_ONLY, folded)


class _DevEnvSource(DotEnvSettingsSource):
    """pydantic-settings' dotenv source for `<state dir>/dev.env` (missing file: no values)."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return _without(NOT_IN_DEV_ENV, super()._load_env_vars())


def _gather(
    cls: type[Settings], env: Mapping[str, str] | None, overrides: Mapping[str, Any] | None
) -> tuple[Settings, dict[str, str]]:
    """The settings and, per field, where its value came from: flag, env, the dev.env path, or
    default. The one place the precedence lives."""
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    from_env = _EnvSource(cls, os.environ if env is None else env)()
    state_dir = Path(flags.get("state_dir", from_env.get("state_dir", DEFAULT_STATE_DIR)))
    dev_env = state_dir / DEV_ENV
    from_file = _DevEnvSource(cls, env_file=dev_env)()
    values: dict[str, Any] = {k: v for k, v in flags.items() if k not in cls.model_fields}
    sources: dict[str, str] = {}
    for name in cls.model_fields:
        for source, found in (("flag", flags), ("env", from_env), (str(dev_env), from_file)):
            if name in found:
                values[name], sources[name] = found[name], source
                break
        else:
            sources[name] = "default"
    values.setdefault("state_dir", state_dir)
    values.setdefault("engine_dir", state_dir / "engines")
    return cls(**values), sources


@dataclass(frozen=True, slots=True)
class Effective:
    """One setting as `inflow settings` shows it: secrets as *** (empty when unset)."""

    name: str  # INFLOW_...
    value: str | int | float | bool
    source: str  # flag, env, the dev.env path, or default
    description: str


def effective_settings(
    env: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None
) -> list[Effective]:
    """Every setting read from the environment, with its effective value and where it came from."""
    settings, sources = _gather(Settings, env, overrides)
    rows = []
    for name, field in Settings.model_fields.items():
        if name in CODE_ONLY:
            continue
        value = getattr(settings, name)
        if isinstance(value, Secret):
            value = "***" if value else ""
        elif isinstance(value, Path):
            value = str(value)
        rows.append(Effective(env_name(name), value, sources[name], field.description or ""))
    return rows


# --------------------------------------------------------------------------- one-line errors

# Errors that say the value is not of the type at all: the message names the type only.
_TYPE_ERRORS = frozenset(
    {
        "int_parsing",
        "int_type",
        "int_from_float",
        "float_parsing",
        "float_type",
        "bool_parsing",
        "bool_type",
        "string_type",
        "path_type",
    }
)


def _config_error(cls: type[Settings], exc: ValidationError) -> ConfigError:
    errors = exc.errors()
    first = _describe(cls, errors[0])
    others = [
        env_name(str(e["loc"][0])) if e["loc"] else e["msg"] for e in errors[1:]
    ]  # one line, however many are wrong
    return ConfigError(f"{first} (also wrong: {', '.join(others)})" if others else first)


def _describe(cls: type[Settings], error: ErrorDetails) -> str:
    name = str(error["loc"][0]) if error["loc"] else ""
    field = cls.model_fields.get(name)
    if field is None:
        if error["type"] == "extra_forbidden":
            return f"{name!r} is not a setting (there is no {env_name(name)})"
        return str(error["msg"])
    if field.annotation is Secret:
        given = "got a value that is not shown"
    else:
        given = f"got {error['input']!r}"
    wanted = _kind(field) if error["type"] in _TYPE_ERRORS else _allowed(field)
    return f"{env_name(name)} must be {wanted}, {given}"


def _kind(field: FieldInfo) -> str:
    annotation = field.annotation
    if get_origin(annotation) is Literal:
        return f"one of {', '.join(map(str, get_args(annotation)))}"
    kinds: dict[Any, str] = {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        Path: "a non-empty path",
        Secret: "text without line breaks or control characters",
        str: "text",
    }
    return kinds.get(annotation, "a mapping of names to text")


def _allowed(field: FieldInfo) -> str:
    """What the field takes, in words: its declared phrase, else its type with its bounds."""
    extra = field.json_schema_extra
    if isinstance(extra, dict) and isinstance(extra.get("allowed"), str):
        return str(extra["allowed"])
    bounds: dict[str, Any] = {}
    for item in field.metadata:
        pattern = getattr(item, "pattern", None)
        if isinstance(pattern, str):
            return _PATTERN_WORDS.get(pattern, f"text matching {pattern}")
        for key in ("ge", "gt", "le"):
            if getattr(item, key, None) is not None:
                bounds[key] = _number(getattr(item, key))
    low = f"at least {bounds['ge']}" if "ge" in bounds else None
    low = f"above {bounds['gt']}" if "gt" in bounds else low
    if "ge" in bounds and "le" in bounds:
        words = f"between {bounds['ge']} and {bounds['le']}"
    elif low and "le" in bounds:
        words = f"{low} and at most {bounds['le']}"
    elif low:
        words = f"of {low}" if "ge" in bounds else low
    elif "le" in bounds:
        words = f"of at most {bounds['le']}"
    else:
        return _kind(field)
    return f"{_kind(field)} {words}"


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
