"""aiokafka clients built from Settings (security options in one place)."""

from __future__ import annotations

import ssl
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from streams.config import Settings


def client_options(settings: Settings) -> dict[str, Any]:
    options: dict[str, Any] = {
        "bootstrap_servers": settings.require_kafka(),
        "security_protocol": settings.kafka_security_protocol,
    }
    if settings.uses_tls:
        options["ssl_context"] = ssl.create_default_context(
            cafile=settings.kafka_ssl_cafile or None
        )
    if settings.kafka_security_protocol.startswith("SASL"):
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism
        options["sasl_plain_username"] = settings.kafka_sasl_username
        options["sasl_plain_password"] = str(settings.kafka_sasl_password)
    return options


def admin_client(settings: Settings) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(**client_options(settings))


def producer(settings: Settings, **extra: Any) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        **client_options(settings), enable_idempotence=True, linger_ms=5, **extra
    )
