"""The configured Kafka client (`STREAMMF_KAFKA__CLIENT`: kafka-python, the default, or confluent-kafka):
the daemon's consumer, its dead-letter producer, and `streammf replay`'s producer.

Light on imports (no model, no store), so `streammf replay` starts without the learner's dependencies.
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


def kafka_producer(kafka: KafkaSettings, linger_ms: int = 5) -> Any:
    """The configured client's producer: idempotent with acks from every in-sync replica on both clients,
    so a record is neither lost in a failover nor reordered or doubled by a retry (the daemon's dead
    letters; `streammf replay`, which lingers 10 ms to batch more)."""
    if kafka.client == "confluent":
        confluent = _confluent_client()
        return confluent.ConfluentProducer(confluent.producer_config(kafka) | {"linger.ms": linger_ms})
    from kafka import KafkaProducer

    return KafkaProducer(**client_kwargs(kafka), linger_ms=linger_ms)  # idempotent, acks=all by default


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
