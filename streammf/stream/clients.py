"""The configured Kafka client (`STREAMMF_KAFKA__CLIENT`: kafka-python, the default, or confluent-kafka):
the daemon's consumer, its dead-letter producer, and `streammf replay`'s producer.

Both clients' producers put a key on the partition Kafka's Java client and kafka-python choose (murmur2),
and wait for every in-sync replica (acks=all): a user's events share one partition whoever produced them.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from streammf.config import KafkaSettings
from streammf.stream.kafka_config import client_kwargs


def kafka_consumer(kafka: KafkaSettings, group_id: str | None) -> Any:
    """The configured client's consumer (`STREAMMF_KAFKA__CLIENT`) with the daemon's settings: a member of
    `group_id` that never auto-commits and starts a partition without a committed offset at its earliest
    one. Without a group (the bench's raw consume) it only reads what it is assigned."""
    if kafka.client == "confluent":
        confluent = _confluent_client()
        return confluent.ConfluentConsumer(confluent.consumer_config(kafka, group_id))
    from kafka import KafkaConsumer

    group: dict[str, Any] = {}
    if group_id is not None:
        group = {
            "group_id": group_id,
            "auto_offset_reset": "earliest",
            "session_timeout_ms": kafka.session_timeout_ms,
            "heartbeat_interval_ms": kafka.session_timeout_ms // 3,
        }
    return KafkaConsumer(
        **client_kwargs(kafka), enable_auto_commit=False, max_poll_records=kafka.max_poll_records, **group
    )


def kafka_producer(kafka: KafkaSettings) -> Any:
    """The configured client's producer for dead letters. kafka-python's is idempotent by default (it turns
    idempotence off itself on a broker that cannot); confluent-kafka's is not made so: librdkafka makes
    a refused producer id (no IDEMPOTENT_WRITE permission, an old broker) fatal for the producer, and
    every later dead letter would be refused with it."""
    if kafka.client == "confluent":
        confluent = _confluent_client()
        return confluent.ConfluentProducer(confluent.producer_config(kafka))
    from kafka import KafkaProducer

    return KafkaProducer(**client_kwargs(kafka), linger_ms=5)


def replay_producer(kafka: KafkaSettings) -> Any:
    """The configured client's producer for `streammf replay`: idempotent, so a retry neither reorders nor
    doubles a user's events (a refused producer id fails the replay, which says so), with a 10 ms linger
    (batching multiplies throughput)."""
    if kafka.client == "confluent":
        confluent = _confluent_client()
        in_order = {"enable.idempotence": True, "linger.ms": 10}
        return confluent.ConfluentProducer(confluent.producer_config(kafka) | in_order)
    from kafka import KafkaProducer

    return KafkaProducer(**client_kwargs(kafka), linger_ms=10)  # idempotent by default


class KafkaClientMissingError(RuntimeError):
    """The configured Kafka client is not installed."""


def _confluent_client() -> ModuleType:
    try:
        from streammf.stream import confluent_client
    except ModuleNotFoundError as exc:
        if exc.name != "confluent_kafka":
            raise
        raise KafkaClientMissingError(
            "STREAMMF_KAFKA__CLIENT=confluent needs confluent-kafka: pip install 'streammf[confluent]'"
        ) from None
    return confluent_client
