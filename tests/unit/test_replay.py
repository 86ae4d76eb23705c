"""Replay without a broker: token-bucket pacing on a fake clock, delivery counting with a fake producer,
and the record sources (rating log, JSON lines)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from kafka.errors import KafkaTimeoutError, MessageSizeTooLargeError
from kafka.future import Future

from streammf.stream.events import Event, decode
from streammf.tools.ratings import RatingsLog
from streammf.tools.replay import TokenBucket, jsonl_records, ratings_records, replay


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_token_bucket_paces_to_the_rate_without_an_initial_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000.0, clock=clock, sleep=clock.sleep)
    for _ in range(2001):
        bucket.take()
    # The first token is free; 2000 more at 1000/s need 2 s of (fake) time.
    assert clock.now - 100.0 == pytest.approx(2.0, rel=1e-6)
    assert min(clock.sleeps) >= TokenBucket.MIN_SLEEP_S


def test_token_bucket_burst_after_idle_is_capped() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000.0, burst=5, clock=clock, sleep=clock.sleep)
    clock.now += 60.0  # a long pause must not turn into 60,000 instant tokens
    for _ in range(5):
        bucket.take()
    assert clock.sleeps == []
    bucket.take()
    assert clock.sleeps


class FakeProducer:
    """Resolves each send at once: fails the records whose value is in `fail`, rejects `too_large`."""

    def __init__(self, fail: set[bytes] = frozenset(), too_large: set[bytes] = frozenset()) -> None:
        self.fail, self.too_large = fail, too_large
        self.sent: list[tuple[str, bytes | None, bytes]] = []
        self.flushed = False

    def send(self, topic: str, value: bytes | None = None, key: bytes | None = None) -> Future:
        if value in self.too_large:
            raise MessageSizeTooLargeError("too large")
        self.sent.append((topic, key, value))
        future = Future()
        return future.failure(KafkaTimeoutError("expired")) if value in self.fail else future.success(None)

    def flush(self, timeout: float | None = None) -> None:
        self.flushed = True


def test_replay_counts_delivered_and_failed_records() -> None:
    records = [(b"u1", b"a"), (b"u2", b"b"), (b"u1", b"c"), (b"u3", b"d")]
    producer = FakeProducer(fail={b"b"}, too_large={b"d"})
    report = replay(records, producer, "events")
    assert (report.sent, report.failed) == (2, 2)
    assert report.first_error is not None and "expired" in report.first_error
    assert producer.sent == [("events", b"u1", b"a"), ("events", b"u2", b"b"), ("events", b"u1", b"c")]
    assert producer.flushed
    assert "2 failed" in report.lines()[0]


def test_ratings_records_keep_user_keys_times_and_values() -> None:
    log = RatingsLog(
        users=np.array(["196", "22"]),
        items=np.array(["242", "377"]),
        values=np.array([3.0, 1.0]),
        timestamps=np.array([881250949.0, 881250950.0]),
    )
    records = list(ratings_records(log))
    assert [key for key, _ in records] == [b"196", b"22"]
    events = [decode(value, 4096) for _, value in records]
    assert events == [
        Event(user_id="196", item_id="242", value=3.0, timestamp=881250949.0, event_type="rating"),
        Event(user_id="22", item_id="377", value=1.0, timestamp=881250950.0, event_type="rating"),
    ]


def test_jsonl_records_send_lines_unchanged_keyed_by_user_when_possible(tmp_path: Path) -> None:
    good = json.dumps({"user_id": "u1", "item_id": 4}).encode()
    numeric_user = json.dumps({"user_id": 17, "item_id": 4}).encode()
    lines = [
        good,
        b"",
        numeric_user,
        b"\x80\x81 not utf-8",
        b"[1, 2]",
        json.dumps({"user_id": True}).encode(),
    ]
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    assert list(jsonl_records(path)) == [
        (b"u1", good),
        (b"17", numeric_user),
        (b"", b"\x80\x81 not utf-8"),
        (b"", b"[1, 2]"),
        (b"", b'{"user_id": true}'),
    ]
