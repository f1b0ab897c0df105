"""Create Inflow's topics with the intended partition count (auto-create may give 1)."""

from __future__ import annotations

import asyncio

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code

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


async def max_message_bytes(settings: Settings, topics: list[str]) -> dict[str, int]:
    """Each topic's `max.message.bytes` as the broker has it (its own or the broker default):
    the largest record batch it takes (`streams.delivery.records.RecordLimits`)."""
    admin: AIOKafkaAdminClient = admin_client(settings)
    await admin.start()
    try:
        responses = await admin.describe_configs(
            [
                ConfigResource(ConfigResourceType.TOPIC, name, {"max.message.bytes": None})
                for name in topics
            ]
        )
    finally:
        await admin.close()
    limits: dict[str, int] = {}
    for response in responses:
        # resources: (error_code, error_message, resource_type, name, config entries), each
        # entry (name, value, read_only, ...) in every version of DescribeConfigsResponse
        for error_code, error_message, _type, name, entries in response.resources:
            if error_code:
                raise for_code(error_code)(f"describe configs of {name}: {error_message}")
            for entry in entries:
                if entry[0] == "max.message.bytes" and entry[1] is not None:
                    limits[name] = int(entry[1])
    return limits
