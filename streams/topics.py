"""Create Inflow's topics with the intended partition count (auto-create may give 1)."""

from __future__ import annotations

import asyncio

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from streams.config import Settings
from streams.errors import KafkaUnavailable
from streams.kafka import admin_client, connection_problem, describe_connection_error


def topic_names(settings: Settings) -> list[str]:
    return [
        settings.texts_topic,
        settings.predictions_topic,
        settings.texts_dlq_topic,
        settings.predictions_dlq_topic,
    ]


async def ensure_topics(settings: Settings) -> list[str]:
    """Create missing topics; report each topic's partition count."""
    admin: AIOKafkaAdminClient = admin_client(settings)
    await admin.start()
    lines = []
    try:
        existing = set(await admin.list_topics())
        for name in topic_names(settings):
            if name in existing:
                continue
            try:
                await admin.create_topics(
                    [
                        NewTopic(
                            name,
                            num_partitions=settings.topic_partitions,
                            replication_factor=settings.topic_replication,
                        )
                    ]
                )
                lines.append(f"created {name} ({settings.topic_partitions} partitions)")
            except TopicAlreadyExistsError:
                pass  # another worker created it first
        described = await admin.describe_topics(topic_names(settings))
        for topic in described:
            if topic["topic"] in existing:
                lines.append(f"exists  {topic['topic']} ({len(topic['partitions'])} partitions)")
    finally:
        await admin.close()
    return lines


def ensure_topics_sync(settings: Settings) -> list[str]:
    try:
        return asyncio.run(asyncio.wait_for(ensure_topics(settings), timeout=60))
    except (KafkaError, TimeoutError, OSError) as exc:
        raise kafka_unavailable(settings, exc) from None


def kafka_unavailable(settings: Settings, exc: BaseException) -> KafkaUnavailable:
    """A one-line error naming why Kafka cannot be used: a fresh connection attempt names the
    cause (TLS, SASL, listener) that the client's own error does not."""
    try:
        problem = asyncio.run(connection_problem(settings))
    except RuntimeError:  # called inside a running loop
        problem = None
    if problem is None:
        problem = describe_connection_error(settings, exc)
    return KafkaUnavailable(
        f"cannot reach Kafka at {settings.kafka_bootstrap} "
        f"({settings.kafka_security_protocol}): {problem}"
    )
