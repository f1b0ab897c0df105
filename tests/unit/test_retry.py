"""Which of aiokafka's real errors the retry policy retries, parks, or hands to one record."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.errors import (
    AuthenticationFailedError,
    BrokerNotAvailableError,
    ClusterAuthorizationFailedError,
    ConcurrentTransactions,
    CoordinatorNotAvailableError,
    GroupAuthorizationFailedError,
    IllegalStateError,
    InvalidTopicError,
    KafkaConfigurationError,
    KafkaConnectionError,
    KafkaTimeoutError,
    KafkaUnavailableError,
    LeaderNotAvailableError,
    MessageSizeTooLargeError,
    NodeNotReadyError,
    NotEnoughReplicasError,
    NotLeaderForPartitionError,
    ProducerClosed,
    ProducerFenced,
    QuotaViolationError,
    RecordListTooLargeError,
    RecordTooLargeError,
    ReplicaNotAvailableError,
    RequestTimedOutError,
    SaslAuthenticationFailed,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
    UnsupportedVersionError,
    for_code,
)

from streams.delivery.retry import RetryPolicy, is_record_too_large, is_retriable

TRANSIENT = [
    KafkaTimeoutError(),  # aiokafka flags it permanent: the case this module overrides
    KafkaConnectionError("connection refused"),
    NodeNotReadyError(1),
    RequestTimedOutError(),
    NotLeaderForPartitionError(),
    LeaderNotAvailableError(),
    BrokerNotAvailableError(),
    ReplicaNotAvailableError(),
    KafkaUnavailableError(),
    QuotaViolationError(),
    ConcurrentTransactions(),
    CoordinatorNotAvailableError(),
    NotEnoughReplicasError(),
]
PERMANENT = [
    TopicAuthorizationFailedError("inflow.predictions"),
    ClusterAuthorizationFailedError(),
    GroupAuthorizationFailedError(),
    TransactionalIdAuthorizationFailed(),
    SaslAuthenticationFailed(),
    AuthenticationFailedError(),
    MessageSizeTooLargeError("The message is 2000000 bytes when serialized"),
    RecordListTooLargeError(),
    RecordTooLargeError(),
    InvalidTopicError(),
    UnsupportedVersionError(),
    KafkaConfigurationError("bad option"),
    ProducerFenced(),
    ProducerClosed(),
    IllegalStateError(),
]


@pytest.mark.parametrize("exc", TRANSIENT, ids=lambda e: type(e).__name__)
def test_timeouts_and_unavailable_brokers_are_retried(exc: Exception) -> None:
    assert is_retriable(exc)


@pytest.mark.parametrize("exc", PERMANENT, ids=lambda e: type(e).__name__)
def test_authorization_size_topic_and_version_errors_stay_permanent(exc: Exception) -> None:
    assert not is_retriable(exc)


def test_broker_error_codes_map_to_the_same_answers() -> None:
    # What a produce response carries is an error code; aiokafka turns it into these classes.
    assert is_retriable(for_code(7)())  # REQUEST_TIMED_OUT
    assert is_retriable(for_code(8)())  # BROKER_NOT_AVAILABLE
    assert is_retriable(for_code(9)())  # REPLICA_NOT_AVAILABLE
    assert not is_retriable(for_code(10)())  # MESSAGE_TOO_LARGE
    assert not is_retriable(for_code(29)())  # TOPIC_AUTHORIZATION_FAILED


@pytest.mark.parametrize(
    "exc",
    [
        MessageSizeTooLargeError("over max_request_size"),  # the producer's own check
        for_code(10)(),  # the broker's MESSAGE_TOO_LARGE (Java: RecordTooLargeException)
        for_code(18)(),  # the broker's RECORD_LIST_TOO_LARGE (Java: RecordBatchTooLarge)
        RecordTooLargeError("over the fetch size"),
    ],
    ids=["client-check", "broker-10", "broker-18", "fetch"],
)
def test_record_too_large_is_recognised(exc: Exception) -> None:
    assert is_record_too_large(exc)
    assert not is_retriable(exc), "the same bytes never fit: not retried"


@pytest.mark.parametrize(
    "exc",
    [
        KafkaTimeoutError(),
        TopicAuthorizationFailedError(),
        InvalidTopicError(),
        ValueError("The message is too large"),  # a message is not a class
    ],
    ids=lambda e: type(e).__name__,
)
def test_other_errors_are_not_record_too_large(exc: Exception) -> None:
    assert not is_record_too_large(exc)


async def test_a_kafka_timeout_is_retried_not_parked() -> None:
    # Parked, the call would wait `recheck_s` (an hour here) before its second attempt.
    policy = RetryPolicy(base_s=0.001, cap_s=0.002, recheck_s=3600)
    calls = 0

    async def publish() -> str:
        nonlocal calls
        calls += 1
        if calls <= 3:
            raise KafkaTimeoutError()
        return "acked"

    result = policy.call(publish, what="publish", condition=None)
    assert await asyncio.wait_for(result, timeout=5) == "acked"
    assert calls == 4


async def test_a_too_large_record_reaches_its_caller_as_per_record() -> None:
    policy = RetryPolicy(base_s=0.001, cap_s=0.002, recheck_s=3600)

    async def publish() -> None:
        raise MessageSizeTooLargeError("The message is 2000000 bytes when serialized")

    with pytest.raises(MessageSizeTooLargeError):
        await asyncio.wait_for(
            policy.call(publish, what="publish", condition=None, per_record=is_record_too_large),
            timeout=5,
        )
