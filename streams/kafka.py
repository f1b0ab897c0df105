"""aiokafka clients built from Settings: the one place for Kafka security options.

`client_options` is the source of truth; Faust's credentials (`faust_credentials`) are derived
from it, so the worker's agents, its lag probe, the topic admin and the producer CLI all
connect the same way. `connection_problem` says in one line why a connection fails (unknown
CA, missing client certificate, wrong mechanism, wrong password, nothing listening), without
ever naming a secret.
"""

from __future__ import annotations

import ssl
from typing import Any

import faust
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.conn import create_conn
from aiokafka.errors import (
    IllegalSaslStateError,
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.transport.drivers.aiokafka import Consumer as FaustAIOKafkaConsumer
from faust.transport.drivers.aiokafka import Transport as FaustAIOKafkaTransport
from faust.types.auth import SASLMechanism

from streams.config import Settings
from streams.errors import ConfigError


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context for SSL and SASL_SSL: the CA file (else the system's CAs) and, when
    set, the client certificate the broker may require."""
    if not settings.uses_tls:
        return None
    try:
        context = ssl.create_default_context(cafile=settings.kafka_ssl_cafile or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"INFLOW_KAFKA_SSL_CAFILE {settings.kafka_ssl_cafile!r} cannot be read as PEM "
            f"certificates: {exc}"
        ) from None
    if settings.kafka_ssl_certfile:
        try:
            context.load_cert_chain(
                settings.kafka_ssl_certfile,
                settings.kafka_ssl_keyfile or None,
                password=str(settings.kafka_ssl_key_password) or None,
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"INFLOW_KAFKA_SSL_CERTFILE/KEYFILE cannot be loaded "
                f"({type(exc).__name__}: {getattr(exc, 'strerror', None) or exc.args[-1]}): "
                "check the files and INFLOW_KAFKA_SSL_KEY_PASSWORD"
            ) from None
    return context


def client_options(settings: Settings) -> dict[str, Any]:
    """aiokafka keyword arguments: bootstrap servers and every security option."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.require_kafka(),
        "security_protocol": settings.kafka_security_protocol,
    }
    context = ssl_context(settings)
    if context is not None:
        options["ssl_context"] = context
    if settings.kafka_security_protocol.startswith("SASL"):
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism
        options["sasl_plain_username"] = settings.kafka_sasl_username
        options["sasl_plain_password"] = str(settings.kafka_sasl_password)
    return options


_FAUST_MECHANISMS = {
    "PLAIN": SASLMechanism.PLAIN,
    "SCRAM-SHA-256": SASLMechanism.SCRAM_SHA_256,
    "SCRAM-SHA-512": SASLMechanism.SCRAM_SHA_512,
}


def faust_credentials(settings: Settings) -> faust.types.auth.CredentialsT | None:
    """The same options as `client_options`, in the form Faust's `broker_credentials` takes
    (Faust turns them back into these aiokafka arguments)."""
    options = client_options(settings)
    context = options.get("ssl_context")
    if "sasl_mechanism" in options:
        return faust.SASLCredentials(
            username=options["sasl_plain_username"],
            password=options["sasl_plain_password"],
            mechanism=_FAUST_MECHANISMS[options["sasl_mechanism"]],
            ssl_context=context,
        )
    if context is not None:
        return faust.SSLCredentials(context)
    return None


def admin_client(settings: Settings) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(**client_options(settings))


def producer(settings: Settings, **extra: Any) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        **client_options(settings), enable_idempotence=True, linger_ms=5, **extra
    )


def describe_connection_error(settings: Settings, exc: BaseException) -> str:
    """One line naming what went wrong on a connection attempt (no secret in it)."""
    protocol = settings.kafka_security_protocol
    mechanism = settings.kafka_sasl_mechanism
    user = settings.kafka_sasl_username
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"TLS: the broker's certificate is not trusted ({exc.verify_message}): "
            "check INFLOW_KAFKA_SSL_CAFILE (unknown CA?)"
        )
    if isinstance(exc, ssl.SSLError):
        hint = (
            "the listener may require a client certificate (INFLOW_KAFKA_SSL_CERTFILE/KEYFILE)"
            if not settings.kafka_ssl_certfile
            else "the broker may not trust the client certificate"
        )
        return f"TLS handshake failed ({exc.reason or exc}): {hint}"
    if isinstance(exc, SaslAuthenticationFailed):
        return (
            f"authentication failed for user {user!r} with {mechanism}: wrong username or "
            "password (INFLOW_KAFKA_SASL_USERNAME/PASSWORD)"
        )
    if isinstance(exc, UnsupportedSaslMechanismError):
        return (
            f"the broker does not accept SASL mechanism {mechanism} on this listener: "
            "set INFLOW_KAFKA_SASL_MECHANISM to one it enables"
        )
    if isinstance(exc, IllegalSaslStateError):
        return f"the listener does not speak {protocol}: check INFLOW_KAFKA_SECURITY_PROTOCOL"
    if isinstance(exc, KafkaConnectionError):
        return (
            f"the broker closed the connection during the handshake: does this listener speak "
            f"{protocol}, and does it require a client certificate (INFLOW_KAFKA_SSL_CERTFILE)?"
        )
    if isinstance(exc, ConnectionRefusedError):
        return (
            "connection refused: nothing listens there: check INFLOW_KAFKA_BOOTSTRAP and the "
            "broker, or run `inflow dev up`"
        )
    if isinstance(exc, TimeoutError):
        return (
            f"no answer in time: is the broker up, and does this listener speak {protocol}? "
            "(INFLOW_KAFKA_SECURITY_PROTOCOL)"
        )
    if isinstance(exc, OSError):
        return f"{exc.strerror or type(exc).__name__} (INFLOW_KAFKA_BOOTSTRAP)"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else 'no detail'}"


async def connection_problem(settings: Settings, timeout_s: float = 10.0) -> str | None:
    """Open one connection to the first bootstrap server the way the clients do (TLS, SASL
    handshake and authentication included); None when it works, else why not (one line).

    aiokafka's own bootstrap reports only "Unable to bootstrap"; this names the cause."""
    options = client_options(settings)
    host, _, port = options["bootstrap_servers"].split(",")[0].strip().rpartition(":")
    try:
        conn = await create_conn(
            host,
            int(port),
            request_timeout_ms=int(timeout_s * 1000),
            ssl_context=options.get("ssl_context"),
            security_protocol=options["security_protocol"],
            sasl_mechanism=options.get("sasl_mechanism"),
            sasl_plain_username=options.get("sasl_plain_username"),
            sasl_plain_password=options.get("sasl_plain_password"),
        )
    except (OSError, KafkaError, TimeoutError, ssl.SSLError) as exc:
        return describe_connection_error(settings, exc)
    conn.close()
    return None


class _ReadCommittedConsumerThread(AIOKafkaConsumerThread):  # type: ignore[misc]
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # Faust reads read_committed only under its own exactly_once, which Inflow does not use
        # (streams.delivery.eos); aiokafka takes the level from this attribute when the consumer
        # starts.
        consumer._isolation_level = "read_committed"
        return consumer


class _ReadCommittedConsumer(FaustAIOKafkaConsumer):  # type: ignore[misc]
    def _new_consumer_thread(self) -> _ReadCommittedConsumerThread:
        return _ReadCommittedConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _ReadCommittedTransport(FaustAIOKafkaTransport):  # type: ignore[misc]
    Consumer = _ReadCommittedConsumer


class InflowApp(faust.App):  # type: ignore[misc]
    """A Faust app whose agents can read `read_committed`: in exactly-once mode the predictions
    come in transactions, and the index agent must not index an aborted one's records."""

    read_committed: bool = False

    def _new_transport(self) -> Any:
        if not self.read_committed:
            return super()._new_transport()
        return _ReadCommittedTransport(self.conf.broker_consumer, self)
