"""Smoke tests: the real Kafka broker and Redis server work the way the pipeline uses them."""

from __future__ import annotations

import json
import time
import uuid
from collections import defaultdict

import numpy as np
from kafka import KafkaConsumer, KafkaProducer

N_EVENTS = 10_000
N_USERS = 500
PARTITIONS = 3


def test_kafka_keyed_roundtrip(kafka_bootstrap, make_topic, topic_name):
    topic = make_topic(topic_name, PARTITIONS)
    sent = []
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=5)
    try:
        for seq in range(N_EVENTS):
            user = seq % N_USERS
            event = {"seq": seq, "user": user, "item": (seq * 7919) % 2_000, "rating": 1.0 + seq % 5}
            payload = json.dumps(event, sort_keys=True).encode()
            sent.append(payload)
            producer.send(topic, key=f"user-{user}".encode(), value=payload)
        producer.flush(timeout=60)
    finally:
        producer.close()

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=f"smoke-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    received = []
    partitions_of_key: dict[bytes, set[int]] = defaultdict(set)
    deadline = time.monotonic() + 60
    try:
        while len(received) < N_EVENTS and time.monotonic() < deadline:
            for tp, records in consumer.poll(timeout_ms=1_000).items():
                for record in records:
                    received.append(record.value)
                    partitions_of_key[record.key].add(tp.partition)
    finally:
        consumer.close()

    assert len(received) == N_EVENTS
    assert {json.dumps(json.loads(v), sort_keys=True).encode() for v in received} == set(sent)
    assert len(partitions_of_key) == N_USERS
    assert all(len(parts) == 1 for parts in partitions_of_key.values()), "a key spans partitions"
    assert set().union(*partitions_of_key.values()) == set(range(PARTITIONS))


def test_redis_float32_vector_roundtrip(redis_client, redis_prefix):
    k = 64
    vector = np.random.default_rng(7).standard_normal(k).astype("<f4")
    key = f"{redis_prefix}user:42"
    redis_client.set(key, vector.tobytes())

    raw = redis_client.get(key)
    assert raw is not None and len(raw) == 4 * k
    np.testing.assert_array_equal(np.frombuffer(raw, dtype="<f4"), vector)
