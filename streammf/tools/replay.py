"""Replaying records into Kafka: a rating log, a JSON-lines file or the synthetic stream, at a steady rate.

Records are keyed by user id, so the partitioner (murmur2, whichever client: `streammf.stream.clients`)
puts all of a user's events on one partition and they are consumed in the order they were sent (the
idempotent producer keeps that order across retries). Memory stays bounded: no future is kept; each
carries callbacks that only count, and the client's own buffer (kafka-python's `buffer_memory`,
librdkafka's queue) makes `send` wait when the broker falls behind.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kafka.errors import KafkaError, MessageSizeTooLargeError, TopicAlreadyExistsError
from tqdm import tqdm

from streammf.config import KafkaSettings
from streammf.stream.events import Event, encode
from streammf.stream.kafka_config import client_kwargs
from streammf.tools.ratings import RatingsLog

Record = tuple[bytes | None, bytes]

# Rows of a rating log turned into Python objects at a time: bounds the temporary lists, not the log.
_LOG_CHUNK = 10_000


class Producer(Protocol):
    """The part of `kafka.KafkaProducer` that replay uses (a test may pass a fake)."""

    def send(self, topic: str, value: bytes | None = None, key: bytes | None = None) -> Any: ...

    def flush(self, timeout: float | None = None) -> None: ...


@dataclass(frozen=True)
class ReplayReport:
    topic: str
    sent: int  # acknowledged by the broker
    failed: int  # rejected by the producer or the broker
    seconds: float
    first_error: str | None = None

    @property
    def events_per_s(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0

    def lines(self) -> list[str]:
        lines = [
            f"sent {self.sent} records to {self.topic} in {self.seconds:.2f} s "
            f"({self.events_per_s:,.0f} events/s), {self.failed} failed"
        ]
        if self.first_error is not None:
            lines.append(f"first error: {self.first_error}")
        return lines


class TokenBucket:
    """Paces calls to `rate` per second: `take()` blocks until a token is available. The bucket holds at
    most `burst` tokens (default: 10 ms worth, at least 1) and starts with one, so a replay never begins
    with a burst and a pause of the caller cannot be made up by more than `burst` events at once."""

    # Shortest sleep: sleeping per event at high rates would cost more than the events themselves.
    MIN_SLEEP_S = 0.001

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate * 0.01)
        self._clock, self._sleep = clock, sleep
        self._tokens = 1.0
        self._last = clock()

    def take(self) -> None:
        self._refill()
        while self._tokens < 1.0:
            self._sleep(max((1.0 - self._tokens) / self.rate, self.MIN_SLEEP_S))
            self._refill()
        self._tokens -= 1.0

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now


class _DeliveryTally:
    """Counts delivery outcomes. The callbacks run on kafka-python's I/O thread (confluent-kafka's in the
    caller's, inside the producer's poll), hence the lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.delivered = 0
        self.failed = 0
        self.first_error: str | None = None

    def on_success(self, _metadata: object) -> None:
        with self._lock:
            self.delivered += 1

    def on_error(self, error: BaseException) -> None:
        with self._lock:
            self.failed += 1
            if self.first_error is None:
                self.first_error = f"{type(error).__name__}: {error}"[:300]


def replay(
    records: Iterable[Record],
    producer: Producer,
    topic: str,
    rate: float | None = None,
    progress: bool = False,
    *,
    total: int | None = None,
) -> ReplayReport:
    """Send every (key, value) to `topic`, at most `rate` records per second (None: as fast as the producer
    takes them), then flush. `total` only sizes the progress bar. A record the producer rejects outright
    (larger than its `max_request_size`) counts as failed and the replay goes on; errors that concern the
    whole connection (e.g. metadata timeouts) propagate."""
    tally = _DeliveryTally()
    bucket = TokenBucket(rate) if rate is not None else None
    started = time.monotonic()
    with tqdm(
        total=total, disable=not progress, unit="ev", desc=f"replay -> {topic}", mininterval=0.5
    ) as bar:
        for key, value in records:
            if bucket is not None:
                bucket.take()
            try:
                future = producer.send(topic, value=value, key=key)
            except MessageSizeTooLargeError as exc:
                tally.on_error(exc)
            else:
                future.add_callback(tally.on_success)
                future.add_errback(tally.on_error)
            bar.update(1)
        # Until every batch is acknowledged or failed (the client's delivery timeout bounds the wait).
        producer.flush()
    seconds = time.monotonic() - started
    return ReplayReport(topic, tally.delivered, tally.failed, seconds, tally.first_error)


def ratings_records(log: RatingsLog, event_type: str = "rating") -> Iterator[tuple[bytes, bytes]]:
    """A rating log (already in time order) as keyed event records, rating time included."""
    for start in range(0, len(log), _LOG_CHUNK):
        stop = start + _LOG_CHUNK
        columns = (
            log.users[start:stop].tolist(),
            log.items[start:stop].tolist(),
            log.values[start:stop].tolist(),
            log.timestamps[start:stop].tolist(),
        )
        for user, item, value, timestamp in zip(*columns, strict=True):
            event = Event(user_id=user, item_id=item, value=value, timestamp=timestamp, event_type=event_type)
            yield event.user_id.encode(), encode(event)


def jsonl_records(path: str | Path) -> Iterator[tuple[bytes, bytes]]:
    """Lines of a JSON-lines file (e.g. from `streammf generate`) as records, sent unchanged, valid or not:
    the key is the line's user_id when it has one, else empty (bad lines still need some key)."""
    with Path(path).open("rb") as handle:
        for line in handle:
            payload = line.rstrip(b"\r\n")
            if payload.strip():
                yield _user_key(payload), payload


def _user_key(payload: bytes) -> bytes:
    try:
        user = json.loads(payload).get("user_id")
    except (ValueError, RecursionError, AttributeError):
        return b""
    return str(user).encode() if isinstance(user, str | int) and not isinstance(user, bool) else b""


def ensure_topic(kafka: KafkaSettings, topic: str, partitions: int) -> int:
    """Create `topic` with `partitions` partitions (broker-default replication) unless it exists; returns
    the number of partitions the topic has (an existing topic keeps its own)."""
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(**client_kwargs(kafka))
    try:
        try:
            admin.create_topics(
                {topic: {"num_partitions": partitions, "replication_factor": -1}}, wait_for_metadata=True
            )
            return partitions
        except TopicAlreadyExistsError:
            (described,) = admin.describe_topics([topic])
            if described["error_code"] != 0:
                raise KafkaError(f"topic {topic} exists but cannot be described: {described}") from None
            return len(described["partitions"])
    finally:
        admin.close()
