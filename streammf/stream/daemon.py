"""Composition root of `streammf run`: build the clients from settings, wire the loop, handle signals."""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import sys
import threading
import uuid
from typing import Any

import redis
from prometheus_client import CollectorRegistry, GCCollector

from streammf.config import Settings
from streammf.store.connect import redis_client
from streammf.store.contract import StoreLostStateError
from streammf.store.layout import (
    ModelKeys,
    aof_rewrite_warning,
    delete_model,
    hold_lease,
    model_exists,
    release_lease,
    require_no_eviction,
    text,
)
from streammf.store.redis_store import RedisStore
from streammf.stream.clients import kafka_consumer, kafka_producer
from streammf.stream.consumer import ConsumeLoop, LoopSettings
from streammf.stream.learner import LearnerParams
from streammf.stream.learner_process import LearnerProcess
from streammf.stream.metrics import Heartbeat, Metrics, serve_metrics
from streammf.stream.refresh import PeriodicRefresh

log = logging.getLogger(__name__)

# How long a replica may hold the lease on deleting and creating a lost model again before another one
# may take over (it lets go as soon as the model exists; a replica that died holding it delays the others).
REBUILD_LEASE_S = 300.0
# Young objects the collector lets accumulate before it scans them (CPython's default: 700).
GC_YOUNG_THRESHOLD = 50_000
# How long a thread may hold the interpreter lock while another waits for it (CPython's default: 5 ms).
GIL_SWITCH_INTERVAL_S = 0.0005


def tune_interpreter() -> None:
    """Tune CPython for the daemon's process (call once, after start-up).

    The cycle collector: every record makes short-lived objects while a batch of them stays alive, so
    with the default thresholds the collector ran ~2,000 times in a 17 s backlog run and took 2.3 s of
    the process's 10.1 s of CPU, mostly re-scanning the long-lived objects of start-up (modules, numba,
    pydantic) in full collections. Freezing those moves them out of the collector's sight; a larger young
    generation makes scans rare (measured: 0.01 s, one collection). Cycles are still collected, only later.

    The lock's switch interval: the loop's worker thread waits on the learner (measured when the learner
    ran in this process and waited on Redis) while the loop parses Kafka records in pure Python; when the
    answer came, the waiting thread waited up to 5 ms more for the lock, on the path every batch takes.
    The learner's process calls this too. At 0.5 ms, `streammf bench` back to back (twice each): update
    latency p50 / p99 18.4 / 90.6 and 17.5 / 84.8 ms -> 15.1 / 65.5 and 14.7 / 70.4 (explicit), the
    same throughput within the machine's spread."""
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    log.info("garbage collector: %d start-up objects frozen", gc.get_freeze_count())


def open_store(settings: Settings, client: redis.Redis) -> RedisStore:
    """The configured model, created if absent (the daemon: a first run starts an empty model)."""
    model = settings.model
    hyper = model.model_dump(exclude={"name", "mode", "factors"})
    shards = settings.redis.shards
    store = RedisStore.open(client, model.name, model.mode, model.factors, hyper, shards=shards)
    store.cache_users(settings.redis.user_cache_pairs)
    return store


def attach_store(settings: Settings, client: redis.Redis) -> RedisStore:
    """The configured model, which must exist (tools that read or refresh it never create one)."""
    model = settings.model
    return RedisStore.attach(client, model.name, (model.mode, model.factors), shards=settings.redis.shards)


def run_daemon(
    settings: Settings, params: LearnerParams, stop: threading.Event | None = None, rebuild: bool = False
) -> None:
    """Run until `stop` (or SIGTERM/SIGINT). Raises `StoreLostStateError` when the store lost state it had
    (unless `rebuild`: then the model is rebuilt from the earliest offsets Kafka retains) and
    `StoreUnsafeError` when Redis may evict our keys."""
    stop = stop or threading.Event()
    _stop_on_signals(stop)
    registry = CollectorRegistry()
    GCCollector(registry=registry)  # python_gc_*: how often, and how much, the collector runs
    metrics = Metrics(registry)
    heartbeat = Heartbeat(max_silence_s=max(30.0, 5 * settings.kafka.poll_timeout_ms / 1000))
    server = serve_metrics(registry, heartbeat, settings.metrics.host, settings.metrics.port)
    log.info("metrics on http://%s:%d/metrics", *server.server_address[:2])
    consumer = kafka_consumer(settings.kafka, group_id=settings.kafka.group_id)
    producer = None
    try:
        if not wait_for_topic(consumer, settings.kafka.topic, stop):
            return
        client = redis_client(settings)
        require_no_eviction(client, settings.redis.allow_eviction)
        if advice := aof_rewrite_warning(client):
            log.warning(advice)
        if not _model_kept_or_rebuilt(client, consumer, settings, rebuild, stop):
            return
        producer = kafka_producer(settings.kafka)
        _run_loop(settings, params, stop, rebuild, client, consumer, producer, metrics, heartbeat)
    except StoreLostStateError as exc:
        metrics.store_lost_state.set(1)
        log.error(
            "the store lost state it had: %s. Refusing to go on (the model would silently cover only part "
            "of the events). To rebuild it from the earliest offsets Kafka still retains, stop every replica "
            "and start one with `streammf run --rebuild`.",
            exc,
        )
        raise
    finally:
        consumer.close(autocommit=False)
        if producer is not None:
            producer.close(timeout=5)
        server.shutdown()
        server.server_close()
    log.info("stopped cleanly")


def _model_kept_or_rebuilt(
    client: redis.Redis, consumer: Any, settings: Settings, rebuild: bool, stop: threading.Event
) -> bool:
    """Whether the loop may start: the store kept the model (`_check_store_kept_state`), or it lost it and
    `rebuild` lets this replica delete what is left and create it empty. Several replicas started with
    --rebuild after a loss: one takes the rebuild lease, the others wait until the model exists and join
    it (their partitions are consumed again from the earliest offset), so none deletes a model another
    is already rebuilding. False: stopped while waiting."""
    name, owner = settings.model.name, f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    waiting = False
    while True:
        try:
            _check_store_kept_state(client, consumer, settings)
            return True
        except StoreLostStateError as exc:
            if not rebuild:
                raise
            if hold_lease(client, ModelKeys(name).rebuild_lease, owner, REBUILD_LEASE_S):
                try:
                    _check_store_kept_state(client, consumer, settings)  # rebuilt by another meanwhile?
                except StoreLostStateError:
                    log.warning("rebuilding model %s: %s", name, exc)
                    deleted = delete_model(client, name)
                    log.warning("deleted %d remaining keys of model %s", deleted, name)
                    open_store(settings, client)  # before the lease goes: a replica waiting joins this one
                finally:
                    release_lease(client, ModelKeys(name).rebuild_lease, owner)
                return True
            if not waiting:
                holder = client.get(ModelKeys(name).rebuild_lease)
                log.warning(
                    "another replica (%s) is rebuilding model %s: waiting for it to create the model",
                    text(holder or b"?"),
                    name,
                )
                waiting = True
            if stop.wait(1.0):
                return False


def _check_store_kept_state(client: redis.Redis, consumer: Any, settings: Settings) -> None:
    """Kafka's group offsets for the topic say which events were applied (they are committed after the
    store has them); a model that is gone while they exist was lost, not never created."""
    if model_exists(client, settings.model.name):
        return
    committed = committed_offsets(consumer, settings.kafka.topic)
    if committed:
        raise StoreLostStateError(
            f"model {settings.model.name!r} is not in Redis, but consumer group {settings.kafka.group_id!r} "
            f"has committed offsets on {settings.kafka.topic} ({_describe(committed)}): Redis lost the model "
            "(restarted without its data, FLUSHALL, eviction), or this group was used for another model "
            "(then give this model its own STREAMMF_KAFKA__GROUP_ID)"
        )


def committed_offsets(consumer: Any, topic: str) -> dict[int, int]:
    """partition -> offset the group committed, for the partitions that have one."""
    from kafka.structs import TopicPartition

    found = {}
    for partition in sorted(consumer.partitions_for_topic(topic) or ()):
        offset = consumer.committed(TopicPartition(topic, partition))
        if offset is not None:
            found[partition] = int(offset)
    return found


def _describe(offsets: dict[int, int]) -> str:
    return ", ".join(f"partition {p} at {o}" for p, o in sorted(offsets.items()))


def _run_loop(
    settings: Settings,
    params: LearnerParams,
    stop: threading.Event,
    rebuild: bool,
    client: redis.Redis,
    consumer: Any,
    producer: Any,
    metrics: Metrics,
    heartbeat: Heartbeat,
) -> None:
    replica_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    store = open_store(settings, client)
    learner = LearnerProcess(settings, params, metrics.redis_latency)  # its own store and copy of users
    try:
        loop = ConsumeLoop(
            consumer,
            producer,
            learner,
            metrics,
            heartbeat,
            LoopSettings.from_settings(settings, rebuild),
            store_guard=lambda: store.check_eviction_policy(settings.redis.allow_eviction),
        )
        heartbeat.ready_when(lambda: _partitions_not_ready(consumer, loop))
        heartbeat.ready_when(lambda: _redis_not_ready(client))
        log.info(
            "streammf run: model=%s mode=%s k=%d topic=%s group=%s client=%s",
            settings.model.name,
            settings.model.mode,
            settings.model.factors,
            settings.kafka.topic,
            settings.kafka.group_id,
            settings.kafka.client,
        )
        refresher = PeriodicRefresh(
            store,
            params,
            settings.refresh.iterations,
            settings.refresh.every_s,
            hold_lease=lambda ttl: store.hold_refresh_lease(replica_id, ttl),
            on_outcome=metrics.observe_refresh,
            every_events=settings.refresh.every_events,
        )
        refresher.start(stop)
        loop.run(stop)
    finally:
        learner.close()


def _partitions_not_ready(consumer: Any, loop: ConsumeLoop) -> str | None:
    """Readiness: this replica owns partitions and has moved them to the store's offsets."""
    # Safe off-thread with either client: kafka-python locks it, ConfluentConsumer keeps a frozenset.
    if not consumer.assignment():
        return "no partitions assigned (more replicas than partitions, or the group is rebalancing)"
    if loop.positions.needs_sync:
        return "assigned partitions not yet moved to the store's offsets"
    return None


def _redis_not_ready(client: redis.Redis) -> str | None:
    """Readiness: Redis answers a PING now (bounded by the client's socket timeout)."""
    try:
        client.ping()
    except redis.RedisError as exc:
        return f"redis does not answer: {exc}"
    return None


def wait_for_topic(consumer: Any, topic: str, stop: threading.Event) -> bool:
    """Wait until the group consumer's own metadata lists the topic's partitions, before it subscribes.

    A group leader assigns from its client's metadata at that moment. Had the topic's metadata not
    arrived yet, kafka-python assigns nothing ("No partition metadata for topic") and may never notice
    the metadata that arrives later (dpkp/kafka-python#2377): the daemon would idle forever on a full
    topic. Asking before subscribing costs one all-topics metadata request and cannot trigger a
    rebalance, because there is no subscription yet."""
    while not consumer.partitions_for_topic(topic):
        log.warning("topic %s has no partitions yet (not created?): waiting", topic)
        if stop.wait(2.0):
            return False
    return True


def _stop_on_signals(stop: threading.Event) -> None:
    if threading.current_thread() is not threading.main_thread():
        return

    def handle(signum: int, _frame: object) -> None:
        log.info("signal %s: finishing the current batch, then stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
