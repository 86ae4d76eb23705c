"""The consume loop's bookkeeping with scripted Kafka client doubles (the real broker is exercised by
tests/integration/test_daemon.py; these pin down orderings a real broker produces only by chance)."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any

from kafka.structs import TopicPartition
from prometheus_client import CollectorRegistry

from streammf.model.factors import LossParams
from streammf.model.sgd import SgdParams
from streammf.store.memory import MemoryStore
from streammf.stream.consumer import ConsumeLoop, LoopSettings
from streammf.stream.learner import Learner, LearnerParams
from streammf.stream.metrics import Heartbeat, Metrics

TOPIC = "events"
TP = TopicPartition(TOPIC, 0)


@dataclass
class Record:
    offset: int
    value: bytes
    topic: str = TOPIC
    partition: int = 0
    key: bytes | None = None
    timestamp: int = 1_700_000_000_000
    headers: list[tuple[str, bytes]] = field(default_factory=list)


def _records(first: int, n: int, poison_at: frozenset[int] = frozenset()) -> list[Record]:
    def value(offset: int) -> bytes:
        if offset in poison_at:
            return b"{broken"
        return json.dumps({"user_id": f"u{offset % 3}", "item_id": f"i{offset}"}).encode()

    return [Record(offset, value(offset)) for offset in range(first, first + n)]


class ScriptedConsumer:
    """Returns scripted poll results; a poll may first run the rebalance listener, like kafka-python."""

    def __init__(self, script: list[tuple[bool, dict[TopicPartition, list[Record]]]], stop: threading.Event):
        self.script = script
        self.stop = stop
        self.listener: Any = None
        self.seeks: list[tuple[TopicPartition, int]] = []
        self.to_beginning: list[TopicPartition] = []

    def subscribe(self, topics: list[str], listener: Any) -> None:
        self.listener = listener

    def poll(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Record]]:
        if not self.script:
            self.stop.set()
            return {}
        assign, records = self.script.pop(0)
        if assign:
            self.listener.on_partitions_assigned([TP])
        return records

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))

    def seek_to_beginning(self, *partitions: TopicPartition) -> None:
        self.to_beginning += partitions

    def commit_async(self, offsets: Any, callback: Any = None) -> None:
        pass

    def committed(self, tp: TopicPartition) -> int | None:
        return None

    def assignment(self) -> set[TopicPartition]:
        return {TP}

    def highwater(self, tp: TopicPartition) -> int | None:
        return None

    def partitions_for_topic(self, topic: str) -> set[int]:
        return {TP.partition}

    def end_offsets(self, partitions: list[TopicPartition], timeout_ms: int) -> dict[TopicPartition, int]:
        return dict.fromkeys(partitions, 0)


class CountingProducer:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]) -> Any:
        self.sent.append(value)

        class Done:
            def get(self, timeout: float) -> None:
                return None

        return Done()

    def flush(self, timeout: float) -> None:
        pass


def _loop(
    consumer: Any, producer: Any, store: Any, settings: dict[str, Any] | None = None, **hooks: Any
) -> ConsumeLoop:
    """A loop learning implicit events into `store`; `settings` override LoopSettings' defaults, `hooks`
    are ConsumeLoop's keyword arguments (sleep, monotonic, store_guard)."""
    return ConsumeLoop(
        consumer,
        producer,
        Learner(store, LearnerParams(SgdParams(LossParams("implicit")))),
        Metrics(CollectorRegistry()),
        Heartbeat(max_silence_s=30),
        LoopSettings(topic=TOPIC, dead_letter_topic=f"{TOPIC}.dlq", **(settings or {})),
        **hooks,
    )


def test_a_redelivered_batch_is_neither_dead_lettered_nor_learned_again() -> None:
    store, producer = MemoryStore("m", "implicit", 4), CountingProducer()
    loop = _loop(ScriptedConsumer([], threading.Event()), producer, store)
    batch = {TP: _records(0, 10, poison_at=frozenset({3}))}
    assert loop.process(batch, threading.Event()) is not None
    assert loop.process(batch, threading.Event()) is None
    overlapping = {TP: _records(5, 10, poison_at=frozenset({3, 12}))}
    assert loop.process(overlapping, threading.Event()) is not None
    assert producer.sent == [b"{broken", b"{broken"]
    assert store.events_applied() == 9 + 4  # offsets 0-9 without 3, then 10-14 without 12


def test_records_polled_with_an_assignment_wait_for_the_seek_to_the_stored_offset() -> None:
    store, producer, stop = MemoryStore("m", "implicit", 4), CountingProducer(), threading.Event()
    earlier_owner = _loop(ScriptedConsumer([], stop), producer, store)
    earlier_owner.process({TP: _records(0, 20, poison_at=frozenset({12}))}, stop)
    # Kafka's committed offset lags the store's: the first poll after assignment starts at 10.
    lagging = _records(10, 10, poison_at=frozenset({12}))
    consumer = ScriptedConsumer([(True, {TP: lagging}), (False, {TP: _records(20, 5)})], stop)
    _loop(consumer, producer, store).run(stop)
    assert consumer.seeks == [(TP, 20)]
    assert store.events_applied() == 19 + 5
    assert producer.sent == [b"{broken"]


def test_a_partition_the_store_has_never_seen_starts_where_kafka_put_it() -> None:
    store, producer, stop = MemoryStore("m", "implicit", 4), CountingProducer(), threading.Event()
    consumer = ScriptedConsumer([(True, {TP: _records(0, 10)}), (False, {TP: _records(10, 5)})], stop)
    _loop(consumer, producer, store).run(stop)
    assert consumer.seeks == []
    assert store.events_applied() == 15


def test_the_store_guard_stops_the_loop_when_redis_turns_unsafe() -> None:
    from streammf.store.contract import StoreUnsafeError

    store, stop = MemoryStore("m", "implicit", 4), threading.Event()
    checks: list[int] = []

    def guard() -> None:
        checks.append(1)
        if len(checks) > 1:  # fine at first, then someone sets maxmemory-policy allkeys-lru
            raise StoreUnsafeError("maxmemory-policy is allkeys-lru")

    consumer = ScriptedConsumer([(True, {TP: _records(0, 5)})] + [(False, {})] * 5, stop)
    loop = _loop(consumer, CountingProducer(), store, {"guard_every_s": 0.0}, store_guard=guard)
    try:
        loop.run(stop)
    except StoreUnsafeError:
        pass
    else:
        raise AssertionError("the loop went on with an unsafe store")
    assert store.events_applied() == 5 and len(checks) == 2


# ------------------------------------------------------------------ failure paths, without sleeping


class FlakyStore:
    """A store whose apply fails `failures` times with StoreUnavailableError (e.g. Redis restarting)."""

    def __init__(self, inner: MemoryStore, failures: int) -> None:
        self.inner, self.failures, self.calls = inner, failures, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def apply(self, update: Any) -> Any:
        from streammf.store.contract import StoreUnavailableError

        self.calls += 1
        if self.calls <= self.failures:
            raise StoreUnavailableError("Redis: ConnectionError: connection refused")
        return self.inner.apply(update)


class SeekingConsumer(ScriptedConsumer):
    def __init__(self, owned: frozenset[TopicPartition] = frozenset({TP})) -> None:
        super().__init__([], threading.Event())
        self.owned = set(owned)

    def assignment(self) -> set[TopicPartition]:
        return set(self.owned)


class FakeClock:
    """Monotonic time that only moves when the loop sleeps: budgets are tested without waiting."""

    def __init__(self, sleeps: list[float]) -> None:
        self.now, self.sleeps = 1000.0, sleeps

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _loop_with(store: Any, producer: Any, sleeps: list[float], budget_s: float = 60.0) -> ConsumeLoop:
    clock = FakeClock(sleeps)
    settings = {"retry_budget_s": budget_s}
    return _loop(SeekingConsumer(), producer, store, settings, sleep=clock.sleep, monotonic=lambda: clock.now)


def test_a_store_outage_abandons_the_write_and_the_loop_resumes_from_the_store_once_it_answers() -> None:
    # A store that comes back may hold less than it acknowledged (killed between AOF fsyncs): so a write
    # that met an outage is not retried blindly; the batch is rewound and positions are learnt again.
    memory, stop = MemoryStore("m", "implicit", 4), threading.Event()
    _loop(ScriptedConsumer([], stop), CountingProducer(), memory).process({TP: _records(0, 5)}, stop)
    consumer = ScriptedConsumer(
        [
            (False, {TP: _records(5, 10)}),  # the apply meets the outage
            # Polled while that batch is in flight, or after its rewind: the loop notices the outage at
            # one of these (the worker's timing), rewinds, resyncs, and learns from the next one.
            (False, {TP: _records(5, 10)}),
            (False, {TP: _records(5, 10)}),
            (False, {TP: _records(5, 10)}),
        ],
        stop,
    )
    sleeps: list[float] = []
    loop = _loop(consumer, CountingProducer(), FlakyStore(memory, failures=1), sleep=sleeps.append)
    loop.run(stop)
    assert consumer.seeks[:2] == [(TP, 5), (TP, 5)], "rewound, then sought to the store's offset"
    assert sleeps == [0.1], "one backoff before the store is asked again"
    assert memory.events_applied() == 15 and memory.applied_offsets() == {0: 15}
    assert loop.metrics.registry.get_sample_value("streammf_retries_total", {"dependency": "redis"}) == 1


def test_a_write_the_store_cannot_take_is_abandoned_unapplied_and_rewound() -> None:
    memory, sleeps = MemoryStore("m", "implicit", 4), []
    loop = _loop_with(FlakyStore(memory, failures=100), CountingProducer(), sleeps, budget_s=1.0)
    consumer = loop.consumer
    assert loop.process({TP: _records(5, 10)}, threading.Event()) is None
    assert memory.events_applied() == 0 and memory.applied_offsets() == {}
    assert consumer.seeks == [(TP, 5)], "the partition is rewound to the batch's first offset"
    assert 0 < sum(sleeps) <= 1.0


def test_a_failing_dead_letter_write_keeps_the_batch_unapplied() -> None:
    from kafka.errors import KafkaTimeoutError

    class DeadTopic(CountingProducer):
        def send(self, topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]) -> Any:
            class Failed:
                def get(self, timeout: float) -> None:
                    raise KafkaTimeoutError("dead-letter topic unreachable")

            return Failed()

    memory, sleeps = MemoryStore("m", "implicit", 4), []
    loop = _loop_with(memory, DeadTopic(), sleeps, budget_s=0.5)
    assert loop.process({TP: _records(0, 10, poison_at=frozenset({4}))}, threading.Event()) is None
    assert memory.events_applied() == 0, "nothing applied while its bad record is not dead-lettered"
    assert loop.consumer.seeks == [(TP, 0)]
    assert loop.metrics.registry.get_sample_value("streammf_retries_total", {"dependency": "kafka"}) >= 1


def test_a_permanently_refused_dead_letter_falls_back_to_metadata_and_the_batch_goes_on() -> None:
    from kafka.errors import MessageSizeTooLargeError

    class Refusing(CountingProducer):
        def send(self, topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]) -> Any:
            self.sent.append(value)

            class Refused:
                def get(self, timeout: float) -> None:
                    if value:  # only a copy without the value fits
                        raise MessageSizeTooLargeError("too large")

            return Refused()

    memory, producer = MemoryStore("m", "implicit", 4), Refusing()
    loop = _loop_with(memory, producer, [])
    assert loop.process({TP: _records(0, 10, poison_at=frozenset({4}))}, threading.Event()) is not None
    assert producer.sent == [b"{broken", b""], "the copy, then metadata only"
    assert memory.events_applied() == 9 and memory.applied_offsets() == {0: 10}


def test_a_dead_letter_retry_after_a_partial_failure_sends_only_what_was_not_acknowledged() -> None:
    """Three bad records; on the first try one is still unacknowledged when the flush gives up, and the
    flush raises, as both real clients do. The retry sends that one alone: no dead letter is written
    twice, none is lost, and each is counted once."""
    from kafka.errors import KafkaTimeoutError

    class OneLateOnce(CountingProducer):
        def __init__(self) -> None:
            super().__init__()
            self.offsets: list[int] = []
            self.late = False  # a sent record is not acknowledged yet

        def send(self, topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]) -> Any:
            offset = int(dict(headers)["streammf.source.offset"])
            late = offset == 5 and 5 not in self.offsets
            self.offsets.append(offset)
            self.late = self.late or late

            class Future:
                def get(self, timeout: float) -> None:
                    if late:
                        raise KafkaTimeoutError(f"not acknowledged within {timeout} s")

            return Future()

        def flush(self, timeout: float) -> None:
            if self.late:
                self.late = False
                raise KafkaTimeoutError("flush timed out")

    memory, producer = MemoryStore("m", "implicit", 4), OneLateOnce()
    loop = _loop(ScriptedConsumer([], threading.Event()), producer, memory, sleep=lambda s: None)
    assert loop.process({TP: _records(0, 10, poison_at=frozenset({3, 5, 7}))}, threading.Event()) is not None
    assert producer.offsets == [3, 5, 7, 5]
    assert memory.events_applied() == 7 and memory.applied_offsets() == {0: 10}
    dead = loop.metrics.registry.get_sample_value("streammf_events_dead_lettered_total")
    assert dead == 3


# ------------------------------------------------------------ pipelining: a batch in flight, the next polled

TP1 = TopicPartition(TOPIC, 1)


def _records_of(tp: TopicPartition, first: int, n: int) -> list[Record]:
    return [
        Record(offset, json.dumps({"user_id": f"u{offset}", "item_id": "i"}).encode(), partition=tp.partition)
        for offset in range(first, first + n)
    ]


class TwoPartitionConsumer(ScriptedConsumer):
    def assignment(self) -> set[TopicPartition]:
        return {TP, TP1}


def test_a_batch_abandoned_in_flight_rewinds_the_batch_polled_after_it_too() -> None:
    # Batch 1 (partition 0) is learnt on the worker while batch 2 (partitions 0 and 1) is polled; batch 1
    # fails past its budget: every partition goes back to the first offset either batch held.
    memory, stop = MemoryStore("m", "implicit", 4), threading.Event()
    consumer = TwoPartitionConsumer(
        [
            (False, {TP: _records_of(TP, 0, 5)}),
            (False, {TP: _records_of(TP, 5, 5), TP1: _records_of(TP1, 7, 3)}),
        ],
        stop,
    )
    loop = _loop(consumer, CountingProducer(), FlakyStore(memory, failures=1), {"retry_budget_s": 0.0})
    loop.run(stop)
    assert sorted(consumer.seeks) == [(TP, 0), (TP1, 7)]
    assert memory.events_applied() == 0


def test_after_an_offset_conflict_in_flight_the_next_batch_waits_for_the_resync() -> None:
    # A zombie applied offsets 0-9. This loop, not yet synced, learns 5-14 (conflict) while it polls 15-19
    # and hands them over behind it: those must not apply before the resync, or 10-14 would be skipped for
    # good.
    store, producer, stop = MemoryStore("m", "implicit", 4), CountingProducer(), threading.Event()
    _loop(ScriptedConsumer([], stop), producer, store).process({TP: _records(0, 10)}, stop)
    consumer = ScriptedConsumer(
        [
            (False, {TP: _records(5, 10)}),
            (False, {TP: _records(15, 5)}),  # handed over behind 5-14, not learnt: rewound
            (False, {TP: _records(15, 5)}),  # fetched again, before the conflict is known: rewound too
            (False, {TP: _records(15, 5)}),  # fetched before the resync's seek: not used
            (False, {TP: _records(10, 10)}),  # after the seek to the store's offset
        ],
        stop,
    )
    _loop(consumer, producer, store).run(stop)
    assert consumer.seeks == [(TP, 15), (TP, 10)]
    assert store.events_applied() == 20 and store.applied_offsets() == {0: 20}


class JournalingLearner:
    """A `Learner` that notes when each batch (by its first offset) is handed over and answered."""

    def __init__(self, learner: Learner, hold_s: float = 0.0, hold_for: int = 2) -> None:
        """`hold_s`: the first batch's answer waits up to this long for `hold_for` batches in all to be
        handed over."""
        self.learner = learner
        self.hold_s = hold_s
        self.hold_for = hold_for
        self.journal: list[tuple[str, int]] = []
        self.enough_handed = threading.Event()

    def submit(self, events: Any, offsets: dict[int, tuple[int, int]], after: Any = None) -> Any:
        first = offsets[0][0]
        self.journal.append(("handed", first))
        if len(self.journal) >= self.hold_for:
            self.enough_handed.set()
        pending = self.learner.submit(events, offsets, after.pending if after is not None else None)
        return _Journaled(self, pending, first)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.learner, name)


@dataclass
class _Journaled:
    owner: JournalingLearner
    pending: Any
    first: int

    def wait(self, on_diverged: Any = None) -> Any:
        if self.owner.journal[0] == ("handed", self.first):
            self.owner.enough_handed.wait(self.owner.hold_s)
        result = self.pending.wait(on_diverged)
        self.owner.journal.append(("answered", self.first))
        return result


def test_the_next_batch_is_handed_over_before_the_one_in_flight_is_answered() -> None:
    store, stop = MemoryStore("m", "implicit", 4), threading.Event()
    consumer = ScriptedConsumer([(False, {TP: _records(0, 5)}), (False, {TP: _records(5, 5)})], stop)
    loop = _loop(consumer, CountingProducer(), store)
    learner = JournalingLearner(loop.learner, hold_s=5.0)  # type: ignore[arg-type]
    loop.learner = learner
    loop.run(stop)
    assert learner.journal.index(("handed", 5)) < learner.journal.index(("answered", 0))
    assert learner.journal.index(("answered", 0)) < learner.journal.index(("answered", 5))
    assert store.events_applied() == 10 and store.applied_offsets() == {0: 10}


def _handed_before_first_answer(max_poll_records: int, hold_s: float) -> list[tuple[str, int]]:
    """Three polls of 5 records; the first batch's answer is held until three are handed over, or for
    `hold_s`."""
    store, stop = MemoryStore("m", "implicit", 4), threading.Event()
    polls = [(False, {TP: _records(first, 5)}) for first in (0, 5, 10)]
    loop = _loop(
        ScriptedConsumer(polls, stop), CountingProducer(), store, {"max_poll_records": max_poll_records}
    )
    learner = JournalingLearner(loop.learner, hold_s=hold_s, hold_for=3)  # type: ignore[arg-type]
    loop.learner = learner
    loop.run(stop)
    assert store.events_applied() == 15 and store.applied_offsets() == {0: 15}
    return learner.journal[: learner.journal.index(("answered", 0))]


def test_with_a_backlog_two_batches_wait_behind_the_one_in_flight_else_one() -> None:
    """Full polls (a backlog): the third batch is handed over while the first is still learnt, so the
    learner's process finds the next one there to compute while Redis applies. Small polls (the loop keeps
    up): only one waits behind the batch in flight, which keeps the update latency low."""
    backlog = _handed_before_first_answer(max_poll_records=5, hold_s=10.0)  # the third comes at once
    assert backlog == [("handed", 0), ("handed", 5), ("handed", 10)]
    # The third never comes while the first is held: the hold runs out (long enough for the second).
    assert _handed_before_first_answer(max_poll_records=100, hold_s=2.0) == [("handed", 0), ("handed", 5)]


def test_a_batch_with_records_to_dead_letter_waits_for_the_batches_in_flight() -> None:
    # Its bad records are dead-lettered before anything of it is learnt, and only once the batch before
    # it is answered: a dead letter never goes out for a batch that might yet be rewound behind another.
    store, producer, stop = MemoryStore("m", "implicit", 4), CountingProducer(), threading.Event()
    polls = [(False, {TP: _records(0, 5)}), (False, {TP: _records(5, 5, poison_at=frozenset({7}))})]
    loop = _loop(ScriptedConsumer(polls, stop), producer, store)
    learner = JournalingLearner(loop.learner)  # type: ignore[arg-type]
    loop.learner = learner
    loop.run(stop)
    assert learner.journal == [("handed", 0), ("answered", 0), ("handed", 5), ("answered", 5)]
    assert len(producer.sent) == 1 and store.events_applied() == 9


class BehindConsumer(ScriptedConsumer):
    """The broker says the log ends at `end`, yet polls bring nothing (a wedged client, or a marker)."""

    def __init__(
        self, script: list[tuple[bool, dict[TopicPartition, list[Record]]]], stop: threading.Event, end: int
    ):
        super().__init__(script, stop)
        self.end = end

    def end_offsets(self, partitions: list[TopicPartition], timeout_ms: int) -> dict[TopicPartition, int]:
        return dict.fromkeys(partitions, self.end)


def test_records_waiting_but_never_fetched_make_the_loop_seek_again() -> None:
    store, producer, stop = MemoryStore("m", "implicit", 4), CountingProducer(), threading.Event()
    _loop(ScriptedConsumer([], stop), producer, store).process({TP: _records(0, 10)}, stop)

    def run(end: int) -> tuple[list[tuple[TopicPartition, int]], float | None]:
        consumer = BehindConsumer([(True, {}), (False, {}), (False, {})], stop, end)
        stop.clear()
        loop = _loop(consumer, producer, store, {"probe_every_s": 0.0, "refetch_after_s": 0.0})
        loop.run(stop)
        return consumer.seeks, loop.metrics.registry.get_sample_value(
            "streammf_retries_total", {"dependency": "kafka"}
        )

    seeks, retries = run(end=50)  # 40 records wait at the broker
    assert seeks[0] == (TP, 10) and seeks.count((TP, 10)) >= 2 and retries and retries >= 1
    seeks, retries = run(end=10)  # caught up: nothing to refetch
    assert seeks == [(TP, 10)] and retries == 0


def test_a_rebalance_does_not_wait_for_the_batch_in_flight() -> None:
    # A revocation callback that blocks holds up the group's join; the batch's fenced apply makes waiting
    # unnecessary. Here the apply is held until the rebalance is over: the callback must not wait for it.
    import time

    release, memory, stop = threading.Event(), MemoryStore("m", "implicit", 4), threading.Event()
    threading.Timer(5.0, release.set).start()  # only if the callback blocked (the test then fails below)

    class HeldStore(FlakyStore):
        def apply(self, update: Any) -> Any:
            release.wait()
            return self.inner.apply(update)

    class RebalancingConsumer(ScriptedConsumer):
        callback_s = 0.0

        def poll(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Record]]:
            if len(self.script) == 1:  # the second poll: a rebalance while batch 1 is in flight
                started = time.monotonic()
                self.listener.on_partitions_revoked([TP])
                self.callback_s = time.monotonic() - started
                release.set()
                self.listener.on_partitions_assigned([TP])
            return super().poll(timeout_ms, max_records)

    consumer = RebalancingConsumer([(True, {TP: _records(0, 5)}), (False, {})], stop)
    loop = _loop(consumer, CountingProducer(), HeldStore(memory, failures=0))
    loop.run(stop)
    assert consumer.callback_s < 1.0
    assert memory.events_applied() == 5 and memory.applied_offsets() == {0: 5}


def test_a_torn_partition_resumes_with_a_batch_that_ends_where_the_furthest_shard_stands() -> None:
    # A sharded store took offsets 5-7 on some shards only: resume from 5, but stop the first batch at 8,
    # so each shard sees that batch whole (applied, or a duplicate) and never half of one.
    from streammf.stream.positions import Positions

    positions, consumer = Positions(), SeekingConsumer()
    positions.assigned([TP])
    positions.sync(consumer, {0: 5}, rebuild=False, ahead={0: 8})
    assert consumer.seeks == [(TP, 5)]
    first = positions.drop_applied({TP: _records(5, 10)})
    assert [r.offset for r in first[TP]] == [5, 6, 7]
    assert positions.take_reseeks() == {TP: 8}, "the records held back are fetched again from the cap"
    assert [r.offset for r in positions.drop_applied({TP: _records(5, 2)})[TP]] == [5, 6], "short poll"
    positions.applied(0, 8)
    assert [r.offset for r in positions.drop_applied({TP: _records(8, 4)})[TP]] == [8, 9, 10, 11]
    assert positions.take_reseeks() == {}


def test_a_torn_partition_is_completed_in_a_batch_of_its_own() -> None:
    # A shard that holds the torn part would see partition 0 applied and partition 1 not in one batch, and
    # refuse it whole: so partition 1 waits (fetched again) until partition 0 is level.
    from streammf.stream.positions import Positions

    positions, consumer = Positions(), SeekingConsumer(frozenset({TP, TP1}))
    positions.assigned([TP, TP1])
    positions.sync(consumer, {0: 5, 1: 7}, rebuild=False, ahead={0: 8})
    fresh = positions.drop_applied({TP: _records_of(TP, 5, 10), TP1: _records_of(TP1, 7, 3)})
    assert list(fresh) == [TP] and [r.offset for r in fresh[TP]] == [5, 6, 7]
    assert positions.take_reseeks() == {TP: 8, TP1: 7}
    positions.applied(0, 8)
    fresh = positions.drop_applied({TP: _records_of(TP, 8, 2), TP1: _records_of(TP1, 7, 3)})
    assert sorted(fresh) == [TP, TP1] and positions.take_reseeks() == {}


def test_a_partition_resynced_with_nothing_applied_is_consumed_again_from_its_beginning() -> None:
    # A batch refused as a conflict (another replica applied part of another partition) moved Kafka's
    # position past this partition's records; with no offset in the store they must be fetched again.
    from streammf.stream.positions import Positions

    positions, consumer = Positions(), SeekingConsumer(frozenset({TP, TP1}))
    positions.assigned([TP, TP1])
    assert positions.sync(consumer, {}, rebuild=False) == set() and consumer.to_beginning == []
    positions.resync([TP, TP1])
    assert positions.sync(consumer, {1: 4}, rebuild=False) == {TP, TP1}
    assert consumer.to_beginning == [TP] and consumer.seeks == [(TP1, 4)]


def test_a_resync_of_a_partition_taken_away_meanwhile_seeks_only_the_ones_still_assigned() -> None:
    # Seen in `streammf bench --replicas 2`: a batch over partitions 0 and 1 was refused as a conflict
    # after a rebalance had left this replica only partition 0; seeking partition 1 raised
    # "Unassigned partition" in kafka-python and the replica died.
    from streammf.stream.positions import Positions

    positions, consumer = Positions(), SeekingConsumer()  # its assignment is {TP}
    positions.assigned([TP])
    positions.sync(consumer, {0: 3}, rebuild=False)
    positions.resync([TP, TP1])
    assert positions.sync(consumer, {0: 5, 1: 9}, rebuild=False) == {TP}
    assert consumer.seeks == [(TP, 3), (TP, 5)] and not positions.needs_sync


def test_a_partition_revoked_by_the_listener_during_a_sync_is_not_sought() -> None:
    # `committed()` is a Kafka call, and kafka-python may run the rebalance listener inside it.
    from streammf.stream.positions import Positions

    class RevokingConsumer(SeekingConsumer):
        def committed(self, tp: TopicPartition) -> int | None:
            positions.revoked([TP1])
            self.owned.discard(TP1)
            return None

    positions, consumer = Positions(), RevokingConsumer(frozenset({TP, TP1}))
    positions.assigned([TP, TP1])
    assert positions.sync(consumer, {1: 4}, rebuild=False) == set()
    assert consumer.seeks == [] and not positions.needs_sync


def test_a_poll_that_raises_while_the_broker_is_gone_is_retried_not_fatal() -> None:
    from kafka.errors import KafkaConnectionError

    stop = threading.Event()
    memory = MemoryStore("m", "explicit", 4)

    class BrokerGoneOnce(ScriptedConsumer):
        failed = False

        def poll(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Record]]:
            if not self.failed:
                self.failed = True
                raise KafkaConnectionError("111 ECONNREFUSED")
            return super().poll(timeout_ms, max_records)

    consumer = BrokerGoneOnce([(True, {TP: _records(0, 5)}), (False, {})], stop)
    loop = _loop(consumer, CountingProducer(), memory)
    loop.run(stop)
    assert consumer.failed
    assert memory.events_applied() == 5 and memory.applied_offsets() == {0: 5}
