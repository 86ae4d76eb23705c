"""The daemon against the real broker and server: same results as `evaluate`, exactly-once under
crashes and outages, dead letters, sharing work, metrics."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import redis

from streammf.config import (
    KafkaSettings,
    MetricsSettings,
    ModelSettings,
    RedisSettings,
    RefreshSettings,
    Settings,
)
from streammf.store.contract import StoreLostStateError, StoreUnavailableError
from streammf.store.layout import ModelKeys
from streammf.store.memory import MemoryStore
from streammf.store.redis_store import RedisStore
from streammf.stream.daemon import run_daemon
from streammf.stream.learner import LearnerParams
from streammf.tools.evaluate import evaluate
from streammf.tools.generate import SyntheticStream, item_id
from streammf.tools.ratings import RatingsLog


@pytest.fixture(scope="module")
def evaluated(movielens: RatingsLog) -> MemoryStore:
    """The uninterrupted reference: `streammf evaluate`'s code path on an in-memory store."""
    model = ModelSettings()
    store = MemoryStore("reference", model.mode, model.factors)
    evaluate(movielens, store, LearnerParams.from_settings(model), batch_size=500)
    return store


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _settings(
    kafka_bootstrap: str,
    redis_url: str,
    topic: str,
    model: str,
    port: int,
    client: Literal["kafka-python", "confluent"] = "kafka-python",
) -> Settings:
    return Settings(
        kafka=KafkaSettings(
            client=client,
            bootstrap_servers=kafka_bootstrap,
            topic=topic,
            group_id=f"g-{model}",
            session_timeout_ms=6000,
        ),
        redis=RedisSettings(url=redis_url, socket_timeout_s=2.0),
        model=ModelSettings(name=model),
        metrics=MetricsSettings(host="127.0.0.1", port=port),
    )


def _env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        STREAMMF_KAFKA__CLIENT=settings.kafka.client,
        STREAMMF_KAFKA__BOOTSTRAP_SERVERS=settings.kafka.bootstrap_servers,
        STREAMMF_KAFKA__TOPIC=settings.kafka.topic,
        STREAMMF_KAFKA__GROUP_ID=settings.kafka.group_id,
        STREAMMF_KAFKA__SESSION_TIMEOUT_MS=str(settings.kafka.session_timeout_ms),
        STREAMMF_KAFKA__MAX_POLL_RECORDS=str(settings.kafka.max_poll_records),
        STREAMMF_REDIS__URL=settings.redis.url,
        STREAMMF_MODEL__NAME=settings.model.name,
        STREAMMF_METRICS__HOST="127.0.0.1",
        STREAMMF_METRICS__PORT=str(_free_port()),
    )
    return env


def _produce(
    bootstrap: str,
    topic: str,
    payloads: list[tuple[bytes, bytes]],
    pause_every: int = 0,
    pause_s: float = 0.0,
) -> None:
    """Sends `payloads` in order; with `pause_every`, flushes and sleeps `pause_s` after every that many, so
    the stream lasts a known minimum time however fast this machine is."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=256 * 1024)
    for sent, (key, value) in enumerate(payloads, start=1):
        producer.send(topic, key=key, value=value)
        if pause_every and sent % pause_every == 0:
            producer.flush(timeout=120)
            time.sleep(pause_s)
    producer.flush(timeout=120)
    producer.close()


def _ratings_payloads(log: RatingsLog, limit: int | None = None) -> list[tuple[bytes, bytes]]:
    n = len(log) if limit is None else limit
    return [
        (
            str(log.users[t]).encode(),
            json.dumps(
                {
                    "user_id": str(log.users[t]),
                    "item_id": str(log.items[t]),
                    "value": float(log.values[t]),
                    "timestamp": float(log.timestamps[t]),
                }
            ).encode(),
        )
        for t in range(n)
    ]


def _wait_for(condition: Callable[[], bool], timeout_s: float, what: str, every_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


# Series that move only when the loop accounts for a batch (or a record it dead-letters or forgets).
_BATCH_SERIES = (
    "streammf_events_",
    "streammf_batches_total",
    "streammf_prequential_",
    "streammf_freshness_seconds_count",
    "streammf_users_forgotten_total",
)


def _scrape_settled(port: int, timeout_s: float = 30.0) -> dict[str, float]:
    """The daemon's metrics once its batch series stop moving. The worker applies a batch to Redis and
    the loop counts it in the metrics at its next turn (after its next poll, up to poll_timeout_ms later),
    so a scrape made as soon as Redis holds every event can miss the last batch."""

    def batch_series(samples: dict[str, float]) -> dict[str, float]:
        return {name: value for name, value in samples.items() if name.startswith(_BATCH_SERIES)}

    last = _scrape(port)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = _scrape(port)
        if batch_series(now) == batch_series(last):
            return now
        last = now
    return last


def _serving(port: int) -> bool:
    try:
        return "streammf_events_consumed_total" in _scrape(port)
    except OSError:  # not listening yet
        return False


class _InProcessDaemon:
    """`run_daemon` on a thread. What it raised is raised again on exit, unless `wait_for_exit` took it."""

    def __init__(self, settings: Settings, rebuild: bool = False) -> None:
        self.settings = settings
        self.rebuild = rebuild
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            run_daemon(
                self.settings,
                LearnerParams.from_settings(self.settings.model),
                self.stop,
                rebuild=self.rebuild,
            )
        except BaseException as exc:  # surfaced by the test
            self.error = exc

    def __enter__(self) -> _InProcessDaemon:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "daemon did not stop within 30 s of the stop request"
        if self.error is not None:
            raise self.error

    def wait_for_exit(self, timeout_s: float) -> BaseException | None:
        """Waits for the daemon to stop by itself; returns what it raised (no longer raised on exit)."""
        self.thread.join(timeout=timeout_s)
        assert not self.thread.is_alive(), f"daemon still running after {timeout_s:.0f} s"
        error, self.error = self.error, None
        return error


def _store(redis_client: redis.Redis, name: str) -> RedisStore:
    return RedisStore.attach(redis_client, name)


def _stored_rows(redis_client: redis.Redis, name: str, side: str) -> dict[str, np.ndarray]:
    """Rows read through the documented layout (what a Go or Java reader would do)."""
    keys = ModelKeys(name)
    version = int(redis_client.get(keys.current))
    raw = redis_client.hgetall(keys.rows(version, side))  # type: ignore[arg-type]
    return {k.decode(): np.frombuffer(v, dtype="<f4") for k, v in raw.items()}


def _assert_same_factors(redis_client: redis.Redis, name: str, reference: MemoryStore) -> None:
    users = _stored_rows(redis_client, name, "users")
    items = _stored_rows(redis_client, name, "items")
    assert users.keys() == reference.user_rows.keys()
    assert items.keys() == reference.item_rows.keys()
    for ident, row in reference.user_rows.items():
        np.testing.assert_allclose(users[ident], row, rtol=0, atol=1e-5, err_msg=f"user {ident}")
    for ident, row in reference.item_rows.items():
        np.testing.assert_allclose(items[ident], row, rtol=0, atol=1e-5, err_msg=f"item {ident}")


def test_replay_through_kafka_matches_evaluate(
    kafka_bootstrap,
    redis_url,
    redis_client,
    make_topic,
    topic_name,
    model,
    movielens,
    evaluated,
    kafka_client,
):
    topic = make_topic(topic_name, 1)
    _produce(kafka_bootstrap, topic, _ratings_payloads(movielens))
    port = _free_port()
    settings = _settings(kafka_bootstrap, redis_url, topic, model, port, kafka_client)
    with _InProcessDaemon(settings):
        _wait_for(lambda: _applied(redis_client, model) >= len(movielens), 300, "all events applied")
        metrics = _scrape_settled(port)
    _assert_same_factors(redis_client, model, evaluated)
    daemon_rmse = np.sqrt(
        metrics["streammf_prequential_squared_error_total"]
        / metrics["streammf_prequential_predictions_total"]
    )
    reference = LearnerParams.from_settings(ModelSettings())
    store = MemoryStore("again", "explicit", ModelSettings().factors)
    report = evaluate(movielens, store, reference, batch_size=500)
    assert report.rmse is not None
    assert daemon_rmse == pytest.approx(report.rmse, abs=1e-6)
    assert metrics["streammf_prequential_predictions_total"] == len(movielens)


def _applied(redis_client: redis.Redis, name: str) -> int:
    """Events applied to the model; 0 before it exists or while Redis does not answer (tests pause and
    kill it). Any other error surfaces (it once read 0 here for a model that had applied everything, and
    a catch-all hid why)."""
    try:
        return _store(redis_client, name).events_applied()
    except (StoreLostStateError, StoreUnavailableError, redis.ConnectionError, redis.TimeoutError):
        return 0


def test_metrics_expose_every_series(
    kafka_bootstrap, redis_url, redis_client, make_topic, topic_name, model, kafka_client
):
    topic = make_topic(topic_name, 2)
    good = [
        (b"u1", json.dumps({"user_id": "u1", "item_id": f"i{i}", "value": 4}).encode()) for i in range(50)
    ]
    _produce(kafka_bootstrap, topic, [*good, (b"u2", b"{not json")])
    port = _free_port()
    with _InProcessDaemon(_settings(kafka_bootstrap, redis_url, topic, model, port, kafka_client)):
        _wait_for(lambda: _applied(redis_client, model) >= 50, 60, "events applied")
        _wait_for(
            lambda: any(name.startswith("streammf_consumer_lag_records") for name in _scrape(port)),
            10,
            "the lag gauge (set after the batch)",
        )
        metrics = _scrape(port)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            assert response.status == 200
    names = {name.split("{")[0] for name in metrics}
    for series in [
        "streammf_events_consumed_total",
        "streammf_events_applied_total",
        "streammf_events_invalid_total",
        "streammf_events_dead_lettered_total",
        "streammf_batch_size_events_bucket",
        "streammf_update_latency_seconds_bucket",
        "streammf_freshness_seconds_bucket",
        "streammf_prequential_loss_ema",
        "streammf_prequential_squared_error_total",
        "streammf_prequential_predictions_total",
        "streammf_consumer_lag_records",
        "streammf_redis_call_seconds_bucket",
        "streammf_model_version",
        "streammf_refresh_seconds_bucket",
        "streammf_refresh_pause_seconds_bucket",
        "streammf_refresh_caught_up_rows_total",
        "python_gc_collections_total",
    ]:
        assert series in names, f"{series} missing from /metrics"
    assert metrics['streammf_events_invalid_total{reason="undecodable"}'] == 1
    assert metrics["streammf_events_applied_total"] == 50
    assert not any("u1" in name or "i1" in name for name in metrics), "ids must never be labels"


def test_a_daemon_started_before_its_topic_exists_consumes_it_once_created(
    kafka_bootstrap, redis_url, redis_client, make_topic, topic_name, model, kafka_client
):
    settings = _settings(kafka_bootstrap, redis_url, topic_name, model, _free_port(), kafka_client)
    with _InProcessDaemon(settings) as daemon:
        time.sleep(3)  # the daemon is waiting for the topic
        assert daemon.thread.is_alive()
        topic = make_topic(topic_name, 3)
        events = [
            (f"u{i % 7}".encode(), json.dumps({"user_id": f"u{i % 7}", "item_id": f"i{i}"}).encode())
            for i in range(300)
        ]
        _produce(kafka_bootstrap, topic, events)
        _wait_for(lambda: _applied(redis_client, model) >= len(events), 60, "events applied")
    assert _applied(redis_client, model) == len(events)


def test_poison_records_go_to_the_dead_letter_topic(
    kafka_bootstrap, redis_url, redis_client, make_topic, topic_name, model, movielens, kafka_client
):
    from kafka import KafkaConsumer

    topic = make_topic(topic_name, 1)
    make_topic(f"{topic}.dlq", 1)
    valid = _ratings_payloads(movielens, 10_000)
    poison = [
        b"\xff\xfe not utf8",
        b"{truncated",
        b'{"user_id": "u", "item_id": "i", "value": NaN}',
        b'{"user_id": "u", "item_id": "i", "value": 1e999}',
        b'{"item_id": "i"}',
        b'{"user_id": "' + b"x" * 5000 + b'", "item_id": "i"}',
    ]
    rng = random.Random(7)
    mixed: list[tuple[bytes, bytes]] = []
    expected_poison = 0
    for key, value in valid:
        mixed.append((key, value))
        if rng.random() < 0.01:
            mixed.append((key, poison[expected_poison % len(poison)]))
            expected_poison += 1
    _produce(kafka_bootstrap, topic, mixed)
    with _InProcessDaemon(_settings(kafka_bootstrap, redis_url, topic, model, _free_port(), kafka_client)):
        _wait_for(lambda: _applied(redis_client, model) >= len(valid), 120, "valid events applied")
    assert _applied(redis_client, model) == len(valid)
    consumer = KafkaConsumer(
        f"{topic}.dlq",
        bootstrap_servers=kafka_bootstrap,
        auto_offset_reset="earliest",
        consumer_timeout_ms=5000,
    )
    dead = list(consumer)
    consumer.close()
    assert len(dead) == expected_poison
    reasons = {dict(r.headers)["streammf.reason"].decode() for r in dead}
    assert reasons == {"undecodable", "non_finite", "schema", "oversized"}
    limit = Settings().kafka.max_record_bytes
    for record in dead:
        headers = dict(record.headers)
        if "streammf.truncated" in headers:  # the oversized one: cut to the record limit, size recorded
            original = next(p for p in poison if len(p) == int(headers["streammf.original.size"]))
            assert record.value == original[:limit]
        else:
            assert record.value in poison
    assert all(int(dict(r.headers)["streammf.source.offset"]) >= 0 for r in dead)


def test_periodic_refreshes_during_the_stream_lose_nothing(
    kafka_bootstrap, redis_url, redis_client, make_topic, topic_name, model, movielens
):
    topic = make_topic(topic_name, 1)
    port = _free_port()
    settings = _settings(kafka_bootstrap, redis_url, topic, model, port)
    settings = settings.model_copy(update={"refresh": RefreshSettings(every_s=1.0, iterations=2)})

    def refreshes() -> dict[str, float]:
        return {k: v for k, v in _scrape(port).items() if k.startswith("streammf_refresh")}

    def published() -> float:
        return refreshes().get('streammf_refreshes_total{outcome="published"}', 0.0)

    with _InProcessDaemon(settings):
        # Paced so the stream lasts at least 5 s on any machine: several 1 s refreshes must overlap it.
        _produce(kafka_bootstrap, topic, _ratings_payloads(movielens), pause_every=2000, pause_s=0.1)
        _wait_for(lambda: _applied(redis_client, model) >= len(movielens), 300, "all events applied")
        try:
            _wait_for(lambda: published() >= 2, 60, "two published refreshes")
        except AssertionError as timed_out:
            raise AssertionError(f"{timed_out}; refresh metrics: {refreshes()}") from None
        metrics = refreshes()
    assert _applied(redis_client, model) == len(movielens)
    assert metrics.get('streammf_refreshes_total{outcome="failed"}', 0) == 0, metrics
    assert metrics["streammf_refresh_caught_up_rows_total"] > 0, f"no refresh overlapped: {metrics}"
    users = _stored_rows(redis_client, model, "users")
    assert users.keys() == set(movielens.users.tolist()), "a user learned during a refresh was dropped"


def test_redis_outage_recovers_without_loss_or_duplicates(
    kafka_bootstrap,
    redis_url,
    redis_client,
    make_topic,
    topic_name,
    model,
    movielens,
    evaluated,
    kafka_client,
):
    topic = make_topic(topic_name, 1)
    payloads = _ratings_payloads(movielens)
    port = _free_port()
    with _InProcessDaemon(_settings(kafka_bootstrap, redis_url, topic, model, port, kafka_client)):
        producer = threading.Thread(target=_produce, args=(kafka_bootstrap, topic, payloads))
        producer.start()
        _wait_for(lambda: _applied(redis_client, model) >= 20_000, 120, "some events applied")
        redis_client.execute_command("CLIENT", "PAUSE", "10000", "ALL")  # Redis unavailable for 10 s
        producer.join()
        _wait_for(lambda: _applied(redis_client, model) >= len(movielens), 300, "all events applied")
        retries = _scrape(port).get('streammf_retries_total{dependency="redis"}', 0)
    assert retries > 0, "the outage must have been seen and retried, not slept through"
    assert _applied(redis_client, model) == len(movielens)
    _assert_same_factors(redis_client, model, evaluated)


def _spawn(settings: Settings, log_path: Path) -> subprocess.Popen[bytes]:
    handle = log_path.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "streammf.cli", "run"], env=_env(settings), stdout=handle, stderr=handle
    )


def test_sigkill_restarts_apply_every_event_exactly_once(
    kafka_bootstrap,
    redis_url,
    redis_client,
    make_topic,
    topic_name,
    model,
    movielens,
    evaluated,
    tmp_path,
    kafka_client,
):
    topic = make_topic(topic_name, 1)
    _produce(kafka_bootstrap, topic, _ratings_payloads(movielens))
    settings = _settings(kafka_bootstrap, redis_url, topic, model, 0, kafka_client)
    # Batches of 1,000, not 10,000: progress moves in finer steps, so the kills land inside the stream.
    finer = settings.kafka.model_copy(update={"max_poll_records": 1000})
    settings = settings.model_copy(update={"kafka": finer})
    rng = random.Random(11)
    log_path = tmp_path / "daemon.log"
    for kill in range(5):
        process = _spawn(settings, log_path)
        before = _applied(redis_client, model)
        # Kill somewhere inside the stream, at a random point up to 8,000 events past the last restart's
        # position (a time-based point stopped landing mid-stream once the daemon passed ~20,000 events/s),
        # looked for every 10 ms: at ~100,000 events/s the 0.2 s of other waits here would overshoot by
        # 20,000 events a kill, and five kills could then see the whole stream applied.
        target = before + rng.randint(1, 8000)

        def reached(target: int = target) -> bool:
            return _applied(redis_client, model) >= target

        _wait_for(reached, 120, f"progress before kill {kill}", every_s=0.01)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    assert _applied(redis_client, model) < len(movielens), "the kills should land mid-stream"
    process = _spawn(settings, log_path)
    try:
        _wait_for(lambda: _applied(redis_client, model) >= len(movielens), 300, "all events applied")
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log_path.read_text()[-3000:]
    assert _applied(redis_client, model) == len(movielens)
    store = _store(redis_client, model)
    pairs = sum(len(chunk[0]) for chunk in store.iter_interactions())
    assert pairs == len(movielens)
    _assert_same_factors(redis_client, model, evaluated)


def _two_daemons_apply(
    kafka_bootstrap: str,
    topic: str,
    payloads: list[tuple[bytes, bytes]],
    envs: list[dict[str, str]],
    tmp_path: Path,
    applied: Callable[[], int],
    pause_every: int = 2000,
) -> list[dict[str, float]]:
    """Two `streammf run` subprocesses (one per env) consume `payloads` while they are produced; returns
    each one's metrics once `applied()` counts every event; both must then stop cleanly on SIGTERM."""
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "streammf.cli", "run"],
            env=env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        for env, log in zip(envs, logs, strict=True)
    ]
    try:
        # Paced over 4 s or more, so neither daemon can drain the topic before the other has joined.
        _produce(kafka_bootstrap, topic, payloads, pause_every=pause_every, pause_s=0.1)
        try:
            _wait_for(lambda: applied() >= len(payloads), 300, "all events applied")
        except AssertionError as stalled:  # say where each daemon stands, so a stall can be diagnosed
            tails = "\n".join(f"--- {log.name}\n{log.read_text()[-4000:]}" for log in logs)
            raise AssertionError(f"{stalled}: {applied()} of {len(payloads)} applied\n{tails}") from None
        return [_scrape_settled(int(env["STREAMMF_METRICS__PORT"])) for env in envs]
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process, log in zip(processes, logs, strict=True):
            assert process.wait(timeout=30) == 0, log.read_text()[-3000:]


def test_two_daemons_share_partitions_and_lose_no_updates(
    kafka_bootstrap, redis_url, redis_client, make_topic, topic_name, model, movielens, tmp_path, kafka_client
):
    topic = make_topic(topic_name, 4)
    settings = _settings(kafka_bootstrap, redis_url, topic, model, 0, kafka_client)
    envs = [_env(settings), _env(settings)]
    payloads = _ratings_payloads(movielens)
    scraped = _two_daemons_apply(
        kafka_bootstrap, topic, payloads, envs, tmp_path, lambda: _applied(redis_client, model)
    )
    shares = [m["streammf_events_applied_total"] for m in scraped]
    assert all(share > 0 for share in shares), f"both daemons should work: {shares}"
    assert sum(shares) == len(movielens)
    store = _store(redis_client, model)
    assert store.events_applied() == len(movielens)
    keys = ModelKeys(model)
    item_counts = {k.decode(): int(v) for k, v in redis_client.hgetall(keys.item_counts).items()}
    expected = {}
    for item in movielens.items:
        expected[str(item)] = expected.get(str(item), 0) + 1
    assert item_counts == expected  # every item update of both writers counted
    assert sorted(store.applied_offsets()) == [0, 1, 2, 3]


def test_two_daemons_in_implicit_mode_keep_the_item_gramian_the_gramian_of_the_item_rows(
    kafka_bootstrap, redis_url, redis_client, make_topic, topic_name, model, tmp_path
):
    """Events are keyed by user, so every item crosses partitions: two replicas keep applying item rows
    the other changed since their read. The item Gramian must stay the Gramian of the stored rows. It once
    drifted with every such race, until the proximal step's system was no longer positive definite and
    valid events were dead-lettered as 'diverged' (found by `streammf bench --replicas 2`)."""
    topic = make_topic(topic_name, 4)
    n_items = 40  # few items, so the replicas meet on them in nearly every batch
    payloads = list(SyntheticStream(mode="implicit", n_users=500, n_items=n_items, seed=3).records(20_000))
    settings = _settings(kafka_bootstrap, redis_url, topic, model, 0)
    envs = [{**_env(settings), "STREAMMF_MODEL__MODE": "implicit"} for _ in range(2)]
    scraped = _two_daemons_apply(
        kafka_bootstrap, topic, payloads, envs, tmp_path, lambda: _applied(redis_client, model), 500
    )
    assert sum(m["streammf_events_applied_total"] for m in scraped) == len(payloads)
    assert all(m["streammf_events_applied_total"] > 0 for m in scraped), "both daemons should work"
    assert [m.get('streammf_events_invalid_total{reason="diverged"}', 0.0) for m in scraped] == [0.0, 0.0]
    state = _store(redis_client, model).read_batch_state([], [item_id(j) for j in range(n_items)], [])
    rows = state.item_rows[state.item_present].astype(np.float64)
    assert state.item_gramian is not None and len(rows) > n_items // 2
    np.testing.assert_allclose(state.item_gramian, rows.T @ rows, rtol=1e-7, atol=1e-9)


def test_freshness_measures_the_pipeline_not_the_age_of_the_data(
    kafka_bootstrap, redis_url, redis_client, make_topic, topic_name, model, movielens
):
    """MovieLens events carry 1997-98 timestamps: their age is decades, yet the model is fresh."""
    topic = make_topic(topic_name, 1)
    payloads = _ratings_payloads(movielens, 3000)
    port = _free_port()
    with _InProcessDaemon(_settings(kafka_bootstrap, redis_url, topic, model, port)):
        _wait_for(lambda: _serving(port), 60, "the daemon serving its metrics")
        started = time.time()
        _produce(kafka_bootstrap, topic, payloads, pause_every=300, pause_s=0.1)  # paced, about 1 s
        _wait_for(lambda: _applied(redis_client, model) >= len(payloads), 60, "all events applied")
        elapsed = time.time() - started
        metrics = _scrape_settled(port)
    count = metrics["streammf_freshness_seconds_count"]
    assert count == len(payloads)
    bound = min(float(le) for le in _buckets(metrics, "streammf_freshness_seconds") if float(le) >= elapsed)
    assert metrics[f'streammf_freshness_seconds_bucket{{le="{bound}"}}'] == count, (
        f"every observation within the {elapsed:.1f} s between the first produce and the last apply"
    )
    assert metrics["streammf_freshness_seconds_sum"] <= count * elapsed
    # The age of the data is reported apart, and it is decades.
    assert metrics["streammf_event_age_seconds_count"] == len(payloads)
    assert metrics['streammf_event_age_seconds_bucket{le="3.1536e+07"}'] == 0


def _buckets(metrics: dict[str, float], histogram: str) -> list[str]:
    prefix = f'{histogram}_bucket{{le="'
    return [name[len(prefix) : -2] for name in metrics if name.startswith(prefix) and "+Inf" not in name]
