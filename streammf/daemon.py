"""Composition root of `streammf run`: build the clients from settings, wire the loop, handle signals."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import uuid
from typing import Any

import redis
from prometheus_client import CollectorRegistry

from streammf.config import Settings
from streammf.consumer import ConsumeLoop, LoopSettings
from streammf.kafka_config import client_kwargs
from streammf.learner import Learner, LearnerParams
from streammf.metrics import Heartbeat, Metrics, serve_metrics
from streammf.redis_store import RedisStore
from streammf.refresh import PeriodicRefresh
from streammf.timed_store import TimedStore

log = logging.getLogger(__name__)


def redis_client(settings: Settings) -> redis.Redis:
    password = settings.redis.password.get_secret_value() if settings.redis.password else None
    return redis.Redis.from_url(
        settings.redis.url,
        password=password,
        socket_timeout=settings.redis.socket_timeout_s,
        socket_connect_timeout=settings.redis.socket_timeout_s,
        health_check_interval=30,
    )


def open_store(settings: Settings, client: redis.Redis, params: LearnerParams) -> RedisStore:
    model = settings.model
    hyper = model.model_dump(exclude={"name", "mode", "factors"})
    return RedisStore.open(client, model.name, model.mode, model.factors, hyper)


def run_daemon(settings: Settings, params: LearnerParams, stop: threading.Event | None = None) -> None:
    from kafka import KafkaConsumer, KafkaProducer

    stop = stop or threading.Event()
    _stop_on_signals(stop)
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    heartbeat = Heartbeat(max_silence_s=max(30.0, 5 * settings.kafka.poll_timeout_ms / 1000))
    server = serve_metrics(registry, heartbeat, settings.metrics.host, settings.metrics.port)
    log.info("metrics on http://%s:%d/metrics", *server.server_address[:2])

    replica_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    client = redis_client(settings)
    store = open_store(settings, client, params)
    learner = Learner(TimedStore(store, metrics.redis_latency), params)
    kafka_common: dict[str, Any] = client_kwargs(settings.kafka)
    consumer = KafkaConsumer(
        **kafka_common,
        group_id=settings.kafka.group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=settings.kafka.max_poll_records,
        session_timeout_ms=settings.kafka.session_timeout_ms,
        heartbeat_interval_ms=settings.kafka.session_timeout_ms // 3,
    )
    if not wait_for_topic(consumer, settings.kafka.topic, stop):
        consumer.close(autocommit=False)
        return
    producer = KafkaProducer(**kafka_common, linger_ms=5)
    loop = ConsumeLoop(
        consumer,
        producer,
        learner,
        metrics,
        heartbeat,
        LoopSettings(
            topic=settings.kafka.topic,
            dead_letter_topic=settings.kafka.dead_letter_topic,
            poll_timeout_ms=settings.kafka.poll_timeout_ms,
            max_poll_records=settings.kafka.max_poll_records,
            max_record_bytes=settings.kafka.max_record_bytes,
        ),
    )
    log.info(
        "streammf run: model=%s mode=%s k=%d topic=%s group=%s",
        settings.model.name,
        settings.model.mode,
        settings.model.factors,
        settings.kafka.topic,
        settings.kafka.group_id,
    )
    refresher = PeriodicRefresh(
        store,
        params.loss,
        settings.refresh.iterations,
        params.init_std,
        params.seed,
        settings.refresh.every_s,
        hold_lease=lambda ttl: store.hold_refresh_lease(replica_id, ttl),
        on_outcome=metrics.observe_refresh,
    )
    refresher.start(stop)
    try:
        loop.run(stop)
    finally:
        consumer.close(autocommit=False)
        producer.close(timeout=5)
        server.shutdown()
        log.info("stopped cleanly")


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
