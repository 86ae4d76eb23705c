"""A hostile producer and an unlucky operator, against the real broker and server: out-of-range and
diverging events, a record near the broker's size limit, Redis restarted empty or flushed, an evicting
Redis, Redis out of memory, the broker killed for 15 s. The model stays finite, nothing is lost or applied
twice, and every refusal is loud."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from streammf.client import StreamMFClient
from streammf.config import ModelSettings, RedisSettings, Settings
from streammf.store.contract import StoreLostStateError, StoreUnsafeError
from streammf.store.layout import (
    ModelKeys,
    delete_model,
    hold_lease,
    model_exists,
    release_lease,
)
from streammf.store.memory import MemoryStore
from streammf.store.redis_store import RedisStore
from streammf.stream.learner import LearnerParams
from streammf.tools.evaluate import evaluate
from streammf.tools.ratings import RatingsLog
from tests.integration.private_services import PrivateKafka, PrivateRedis
from tests.integration.test_daemon import (
    _applied,
    _env,
    _free_port,
    _produce,
    _ratings_payloads,
    _scrape,
    _scrape_settled,
    _settings,
    _stored_rows,
    _wait_for,
)
from tests.integration.test_daemon import (
    _InProcessDaemon as Daemon,
)

MAX_ABS = ModelSettings().max_abs_factor


def _dead_letters(bootstrap: str, topic: str) -> list:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        f"{topic}.dlq", bootstrap_servers=bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=5000
    )
    try:
        return list(consumer)
    finally:
        consumer.close()


def _assert_sound(redis_client: redis.Redis, name: str) -> None:
    for side in ("users", "items"):
        rows = np.array(list(_stored_rows(redis_client, name, side).values()))
        assert np.isfinite(rows).all(), f"{side}: non-finite rows"
        assert np.abs(rows).max() <= MAX_ABS, f"{side}: a coordinate beyond {MAX_ABS}"


def _synthetic_ratings(n: int, seed: int) -> list[tuple[bytes, bytes]]:
    rng = np.random.default_rng(seed)
    return [
        (f"u{u}".encode(), json.dumps({"user_id": f"u{u}", "item_id": f"i{i}", "value": int(v)}).encode())
        for u, i, v in zip(
            rng.integers(200, size=n), rng.integers(300, size=n), rng.integers(1, 6, size=n), strict=True
        )
    ]


def _reference(log: RatingsLog, n: int, model_settings: ModelSettings | None = None) -> MemoryStore:
    model_settings = model_settings or ModelSettings()
    head = RatingsLog(log.users[:n], log.items[:n], log.values[:n], log.timestamps[:n])
    store = MemoryStore("reference", model_settings.mode, model_settings.factors)
    evaluate(head, store, LearnerParams.from_settings(model_settings), batch_size=500)
    return store


def _assert_same_factors(client: redis.Redis, name: str, reference: MemoryStore) -> None:
    for side, expected in (("users", reference.user_rows), ("items", reference.item_rows)):
        stored = _stored_rows(client, name, side)
        assert stored.keys() == expected.keys(), side
        for ident, row in expected.items():
            np.testing.assert_allclose(stored[ident], row, rtol=0, atol=1e-5, err_msg=f"{side} {ident}")


def _poisoned(
    payloads: list[tuple[bytes, bytes]], poison: list[bytes], every: int
) -> list[tuple[bytes, bytes]]:
    mixed: list[tuple[bytes, bytes]] = []
    for n, payload in enumerate(payloads):
        mixed.append(payload)
        if n % every == every // 2 and len(mixed) - n - 1 < len(poison):
            mixed.append((b"414", poison[len(mixed) - n - 2]))
    return mixed


# ---------------------------------------------------------------------------------- hostile events


def test_huge_values_and_weights_are_dead_lettered_and_the_model_stays_finite(
    kafka_bootstrap, redis_url, redis_client, make_topic, topic_name, model, movielens
):
    topic = make_topic(topic_name, 1)
    make_topic(f"{topic}.dlq", 1)
    poison = [
        b'{"user_id": "414", "item_id": "356", "value": 1e4}',  # the example
        b'{"user_id": "414", "item_id": "356", "value": -1e300}',
        b'{"user_id": "414", "item_id": "356", "value": 4, "weight": 1e6}',
        b'{"user_id": "414", "item_id": "356", "value": 1.7976931348623157e308}',
    ]
    valid = _ratings_payloads(movielens, 6000)
    mixed = valid[:1000] + [(b"414", p) for p in poison] + valid[1000:]
    _produce(kafka_bootstrap, topic, mixed)
    port = _free_port()
    with Daemon(_settings(kafka_bootstrap, redis_url, topic, model, port)):
        _wait_for(lambda: _applied(redis_client, model) >= len(valid), 120, "valid events applied")
        metrics = _scrape_settled(port)
    assert _applied(redis_client, model) == len(valid)
    dead = _dead_letters(kafka_bootstrap, topic)
    assert sorted(r.value for r in dead) == sorted(poison)
    assert {dict(r.headers)["streammf.reason"] for r in dead} == {b"out_of_range"}
    assert metrics['streammf_events_invalid_total{reason="out_of_range"}'] == len(poison)
    _assert_sound(redis_client, model)
    assert StreamMFClient(redis_client, model).recommend(valid[0][0].decode(), k=5)  # users are served


def test_an_event_that_would_diverge_is_dead_lettered_and_the_rest_of_its_batch_applies(
    kafka_bootstrap, redis_url, redis_client, make_topic, topic_name, model, movielens
):
    """Bounds opened wide (an operator's choice): the row guard is the last line, and it holds."""
    topic = make_topic(topic_name, 1)
    make_topic(f"{topic}.dlq", 1)
    valid = _ratings_payloads(movielens, 6000)
    bad = b'{"user_id": "414", "item_id": "356", "value": 1e4}'
    _produce(kafka_bootstrap, topic, [*valid[:3000], (b"414", bad), *valid[3000:]])
    settings = _settings(kafka_bootstrap, redis_url, topic, model, _free_port())
    wide = ModelSettings(name=model, value_min=-1e6, value_max=1e6)
    settings = settings.model_copy(update={"model": wide})
    with Daemon(settings):
        _wait_for(lambda: _applied(redis_client, model) >= len(valid), 120, "valid events applied")
    dead = _dead_letters(kafka_bootstrap, topic)
    assert [r.value for r in dead] == [bad]
    assert dict(dead[0].headers)["streammf.reason"] == b"diverged"
    assert _applied(redis_client, model) == len(valid)
    assert RedisStoreOffsets(redis_client, model) == {0: len(valid) + 1}
    _assert_sound(redis_client, model)


def test_a_stream_of_diverging_events_is_dead_lettered_at_the_daemons_pace(
    kafka_bootstrap, redis_url, redis_client, make_topic, topic_name, model
):
    """Default bounds, valid events: one pair rated +10 / -10 alternately with weight 100 pushes its rows to
    the bound within a few steps, and every later step on it diverges. 20,000 such events among 4,000
    ordinary ratings: each was once found by bisecting its batch (this stream then took 113 s); the kernel
    now leaves them out as it goes (about 4 s, printed). The timeout is a guard far above that."""
    topic = make_topic(topic_name, 1)
    make_topic(f"{topic}.dlq", 1)
    valid = _synthetic_ratings(4000, seed=11)
    hot = [
        (
            b"hot",
            json.dumps(
                {"user_id": "hot", "item_id": "hot", "value": (-10, 10)[t % 2], "weight": 100}
            ).encode(),
        )
        for t in range(20_000)
    ]
    stream = [*valid[:2000], *hot, *valid[2000:]]
    _produce(kafka_bootstrap, topic, stream)
    port = _free_port()
    started = time.monotonic()
    with Daemon(_settings(kafka_bootstrap, redis_url, topic, model, port)):
        _wait_for(
            lambda: RedisStoreOffsets(redis_client, model) == {0: len(stream)},
            60,
            "the whole stream consumed",
        )
        elapsed = time.monotonic() - started
        metrics = _scrape_settled(port)
    print(f"{len(stream)} events ({len(hot)} on the diverging pair) consumed in {elapsed:.1f} s")
    dead = _dead_letters(kafka_bootstrap, topic)
    hot_applied = _applied(redis_client, model) - len(valid)
    assert 0 < hot_applied < 50  # the first few steps on the pair are taken, the rest diverge
    assert len(dead) == len(hot) - hot_applied
    assert {dict(r.headers)["streammf.reason"] for r in dead} == {b"diverged"}
    assert {r.value for r in dead} <= {value for _, value in hot}
    assert metrics['streammf_events_invalid_total{reason="diverged"}'] == len(dead)
    _assert_sound(redis_client, model)


def RedisStoreOffsets(client: redis.Redis, name: str) -> dict[int, int]:
    return {int(p): int(o) for p, o in client.hgetall(ModelKeys(name).offsets).items()}


def test_a_record_near_the_broker_size_limit_is_dead_lettered_truncated_and_later_records_apply(
    kafka_bootstrap, redis_url, redis_client, make_topic, topic_name, model, kafka_client
):
    from kafka import KafkaProducer

    topic = make_topic(topic_name, 1)
    make_topic(f"{topic}.dlq", 1)
    huge = b'{"user_id": "u1", "item_id": "i1", "pad": "' + b"x" * 1_000_000 + b'"}'
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, max_request_size=1_048_576)
    producer.send(topic, key=b"u1", value=huge).get(timeout=30)
    producer.send(topic, key=b"u1", value=None).get(timeout=30)  # a null record
    producer.close()
    later = [
        (b"u2", json.dumps({"user_id": "u2", "item_id": f"i{i}", "value": 3}).encode()) for i in range(100)
    ]
    _produce(kafka_bootstrap, topic, later)
    with Daemon(_settings(kafka_bootstrap, redis_url, topic, model, _free_port(), kafka_client)):
        _wait_for(lambda: _applied(redis_client, model) >= len(later), 60, "the records after it applied")
    dead = _dead_letters(kafka_bootstrap, topic)
    assert len(dead) == 2
    assert dead[1].value is None  # stays null, not b""
    assert dict(dead[1].headers)["streammf.reason"] == b"undecodable"
    headers = dict(dead[0].headers)
    assert headers["streammf.reason"] == b"oversized"
    assert headers["streammf.truncated"] == b"1"
    assert headers["streammf.original.size"] == str(len(huge)).encode()
    assert dead[0].value == huge[: Settings().kafka.max_record_bytes]


# ------------------------------------------------------------------------------ a store that forgets


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path / "redis").start()
    yield server
    server.kill()


def _group_committed(bootstrap: str, group: str, topic: str) -> bool:
    """Whether the group committed an offset for partition 0 (read without joining the group)."""
    from kafka import KafkaConsumer
    from kafka.structs import TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return consumer.committed(TopicPartition(topic, 0)) is not None
    finally:
        consumer.close(autocommit=False)


@pytest.mark.parametrize("mishap", ["restarted_empty", "flushall"])
def test_a_store_that_lost_its_state_is_refused_until_an_operator_rebuilds_it(
    mishap, kafka_bootstrap, make_topic, topic_name, model, movielens, private_redis, kafka_client
):
    topic = make_topic(topic_name, 1)
    payloads = _ratings_payloads(movielens, 4000)
    _produce(kafka_bootstrap, topic, payloads[:3000])
    settings = _settings(kafka_bootstrap, private_redis.url, topic, model, _free_port(), kafka_client)
    client = private_redis.client()
    with Daemon(settings) as daemon:
        _wait_for(lambda: _applied(client, model) >= 3000, 120, "first events applied")
        _wait_for(
            lambda: _group_committed(kafka_bootstrap, settings.kafka.group_id, topic), 30, "a kafka commit"
        )
        if mishap == "flushall":
            client.flushall()
        else:
            private_redis.kill()
            private_redis.start()
            client = private_redis.client()
        _produce(kafka_bootstrap, topic, payloads[3000:])
        error = daemon.wait_for_exit(60)
    assert isinstance(error, StoreLostStateError), repr(error)
    assert not model_exists(client, model), "the daemon must not have re-created the model"

    # Restarted as it was: refuses before touching the store.
    with Daemon(settings) as again:
        error = again.wait_for_exit(60)
    assert isinstance(error, StoreLostStateError), repr(error)
    assert not model_exists(client, model)
    # The same as an operator sees it: `streammf run` exits with status 3 and says what to do.
    command = subprocess.run(
        [sys.executable, "-m", "streammf.cli", "run"], env=_env(settings), capture_output=True, timeout=120
    )
    assert command.returncode == 3, command.stderr.decode()[-2000:]
    assert b"streammf run --rebuild" in command.stderr
    assert not model_exists(client, model)

    # The operator's choice: rebuild from the earliest offsets Kafka retains -> the exact model.
    with Daemon(settings, rebuild=True):
        _wait_for(lambda: _applied(client, model) >= len(payloads), 120, "all events applied again")
    assert _applied(client, model) == len(payloads)
    _assert_same_factors(client, model, _reference(movielens, len(payloads)))


def test_a_replica_still_running_when_another_rebuilds_the_model_writes_nothing_into_it(
    kafka_bootstrap, redis_url, redis_client, make_topic, topic_name, model
):
    """An operator runs `streammf run --rebuild` with another replica still up: the rebuild deletes the
    model and creates it again. The old replica's next batch must not land in the new model (its offsets
    from the middle of the partition would make the rebuild skip everything before them): it is refused
    as the store's lost state, and the replica stops."""
    topic = make_topic(topic_name, 1)
    payloads = _synthetic_ratings(4000, seed=5)
    _produce(kafka_bootstrap, topic, payloads[:3000])
    settings = _settings(kafka_bootstrap, redis_url, topic, model, _free_port())
    with Daemon(settings) as daemon:
        _wait_for(lambda: _applied(redis_client, model) >= 3000, 120, "first events applied")
        # What `run --rebuild` does in the other replica before it consumes from the earliest offset.
        delete_model(redis_client, model)
        rebuilt = RedisStore.open(redis_client, model, "explicit", settings.model.factors)
        _produce(kafka_bootstrap, topic, payloads[3000:])
        error = daemon.wait_for_exit(60)
    # Refused by its next write ("created again": the incarnation changed), or before it, when the replica
    # re-reads the store's offsets for its partition (a rebalance, a retried store call) and finds none
    # where the group committed some. Either way it wrote nothing into the new model.
    assert isinstance(error, StoreLostStateError), repr(error)
    assert "created again" in str(error) or "lost the state of that partition" in str(error), repr(error)
    assert rebuilt.events_applied() == 0 and rebuilt.applied_offsets() == {}


def _lose_the_model(kafka_bootstrap, redis_url, redis_client, topic, model, payloads) -> Settings:
    """A model that applied `payloads` (the group committed) and then vanished from Redis."""
    _produce(kafka_bootstrap, topic, payloads)
    settings = _settings(kafka_bootstrap, redis_url, topic, model, _free_port())
    with Daemon(settings):
        _wait_for(lambda: _applied(redis_client, model) >= len(payloads), 120, "events applied")
        _wait_for(
            lambda: _group_committed(kafka_bootstrap, settings.kafka.group_id, topic), 30, "a kafka commit"
        )
    delete_model(redis_client, model)
    return settings


def test_a_replica_started_with_rebuild_waits_for_the_one_rebuilding_and_joins_it(
    kafka_bootstrap, redis_url, redis_client, make_topic, topic_name, model
):
    """Every replica of a deployment started with --rebuild after a loss: only the lease holder deletes and
    creates the model; another one waits for it, then consumes its partitions again from the earliest
    offset into that model, which it does not delete again."""
    topic = make_topic(topic_name, 1)
    payloads = _synthetic_ratings(3000, seed=8)
    settings = _lose_the_model(kafka_bootstrap, redis_url, redis_client, topic, model, payloads)
    holder = "replica-a:1:0"
    assert hold_lease(redis_client, ModelKeys(model).rebuild_lease, holder, 60.0)
    with Daemon(settings, rebuild=True) as waiting:
        time.sleep(4.0)
        assert waiting.thread.is_alive(), "the waiting replica stopped"
        assert not model_exists(redis_client, model), "it created the model while another held the lease"
        # The holder creates the model and lets the lease go, as `streammf run --rebuild` does.
        rebuilt = RedisStore.open(redis_client, model, "explicit", settings.model.factors)
        release_lease(redis_client, ModelKeys(model).rebuild_lease, holder)
        _wait_for(lambda: _applied(redis_client, model) >= len(payloads), 120, "all events applied again")
    assert rebuilt.events_applied() == len(payloads)
    assert rebuilt.applied_offsets() == {0: len(payloads)}
    assert RedisStore.attach(redis_client, model).incarnation == rebuilt.incarnation, "deleted again"
    assert redis_client.get(ModelKeys(model).rebuild_lease) is None


def test_two_replicas_started_with_rebuild_together_rebuild_the_lost_model_once(
    kafka_bootstrap, redis_url, redis_client, make_topic, topic_name, model
):
    topic = make_topic(topic_name, 2)
    payloads = _synthetic_ratings(4000, seed=9)
    settings = _lose_the_model(kafka_bootstrap, redis_url, redis_client, topic, model, payloads)
    metrics = settings.metrics.model_copy(update={"port": _free_port()})
    other = settings.model_copy(update={"metrics": metrics})
    with Daemon(settings, rebuild=True) as first, Daemon(other, rebuild=True) as second:
        _wait_for(lambda: _applied(redis_client, model) >= len(payloads), 120, "all events applied again")
        time.sleep(2.0)  # a second deletion, had there been one, would show now
        assert first.thread.is_alive() and second.thread.is_alive()
    store = RedisStore.attach(redis_client, model)
    assert store.events_applied() == len(payloads), "every event applied once"
    assert sum(store.applied_offsets().values()) == len(payloads)
    _assert_sound(redis_client, model)


def test_a_redis_that_may_evict_our_keys_is_refused_at_start(
    kafka_bootstrap, make_topic, topic_name, model, tmp_path
):
    server = PrivateRedis(
        tmp_path / "lru", "--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"
    ).start()
    try:
        topic = make_topic(topic_name, 1)
        settings = _settings(kafka_bootstrap, server.url, topic, model, _free_port())
        with Daemon(settings) as daemon:
            error = daemon.wait_for_exit(60)
        assert isinstance(error, StoreUnsafeError), repr(error)
        assert "allkeys-lru" in str(error) and "noeviction" in str(error)
        assert not model_exists(server.client(), model)
        # An operator who accepts the risk says so.
        risky = settings.model_copy(
            update={"redis": RedisSettings(url=server.url, socket_timeout_s=2.0, allow_eviction=True)}
        )
        _produce(kafka_bootstrap, topic, [(b"u", b'{"user_id": "u", "item_id": "i"}')])
        with Daemon(risky):
            _wait_for(lambda: _applied(server.client(), model) >= 1, 60, "the event applied")
    finally:
        server.kill()


def test_redis_out_of_memory_is_backed_off_and_nothing_is_lost_or_doubled(
    kafka_bootstrap, make_topic, topic_name, model, movielens, private_redis
):
    topic = make_topic(topic_name, 1)
    payloads = _ratings_payloads(movielens, 30_000)
    port = _free_port()
    client = private_redis.client()
    with Daemon(_settings(kafka_bootstrap, private_redis.url, topic, model, port)) as daemon:
        _produce(kafka_bootstrap, topic, payloads[:5000])
        _wait_for(lambda: _applied(client, model) >= 5000, 120, "first events applied")
        # Redis full (noeviction): a little room left, then writes are refused with OOM errors.
        used = int(client.info("memory")["used_memory"])
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", str(used + 300_000))
        _produce(kafka_bootstrap, topic, payloads[5000:])
        _wait_for(lambda: _retries(port, "redis") > 0, 120, "Redis refusing writes and the daemon retrying")
        stuck_at = _applied(client, model)
        assert stuck_at < len(payloads)
        assert daemon.thread.is_alive() and daemon.error is None
        client.config_set("maxmemory", "0")  # the operator adds memory
        _wait_for(lambda: _applied(client, model) >= len(payloads), 180, "all events applied")
    assert _applied(client, model) == len(payloads)
    _assert_same_factors(client, model, _reference(movielens, len(payloads)))


def test_a_killed_learner_process_is_replaced_and_nothing_is_lost_or_doubled(
    kafka_bootstrap, redis_url, redis_client, make_topic, topic_name, model
):
    """The daemon's learner runs in a child process (streammf.stream.learner_process); the kernel's OOM
    killer, or an operator, may kill it alone, in the middle of a batch."""
    topic = make_topic(topic_name, 1)
    payloads = _synthetic_ratings(40_000, seed=21)
    port = _free_port()
    with Daemon(_settings(kafka_bootstrap, redis_url, topic, model, port)) as daemon:
        _produce(kafka_bootstrap, topic, payloads[:5000])
        _wait_for(lambda: _applied(redis_client, model) >= 5000, 120, "first events applied")
        killed = _learner_process().pid
        producing = threading.Thread(
            target=_produce, args=(kafka_bootstrap, topic, payloads[5000:], 2000, 0.2), daemon=True
        )
        producing.start()
        _wait_for(lambda: _applied(redis_client, model) > 6000, 120, "the stream flowing")
        os.kill(killed, signal.SIGKILL)
        producing.join(timeout=120)
        _wait_for(lambda: _applied(redis_client, model) >= len(payloads), 180, "all events applied")
        assert daemon.error is None
        assert _learner_process().pid != killed
        assert _retries(port, "redis") >= 1  # the batch it was serving was abandoned, then learnt again
    assert not [p for p in multiprocessing.active_children() if p.name == "streammf-learner"]  # stopped too
    assert _applied(redis_client, model) == len(payloads)
    _assert_same_factors(redis_client, model, _reference(_log_of(payloads), len(payloads)))


def _learner_process() -> multiprocessing.process.BaseProcess:
    (process,) = [p for p in multiprocessing.active_children() if p.name == "streammf-learner"]
    return process


def _log_of(payloads: list[tuple[bytes, bytes]]) -> RatingsLog:
    events = [json.loads(value) for _, value in payloads]
    return RatingsLog(
        np.array([e["user_id"] for e in events]),
        np.array([e["item_id"] for e in events]),
        np.array([float(e["value"]) for e in events]),
        np.full(len(events), np.nan),
    )


def _retries(port: int, dependency: str) -> float:
    try:
        return _scrape(port).get(f'streammf_retries_total{{dependency="{dependency}"}}', 0.0)
    except OSError:  # not serving yet
        return 0.0


def _health(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_a_private_broker_formats_with_a_cluster_id_that_starts_with_a_dash(tmp_path) -> None:
    # base64url ids start with '-' one time in 64; `-t ID` then read the id as an option and CI failed.
    broker = PrivateKafka(tmp_path / "kafka", cluster_id="-Rb2lrtaR0i7CKNiz2pf4A")
    meta = (tmp_path / "kafka" / "data" / "meta.properties").read_text()
    assert "cluster.id=-Rb2lrtaR0i7CKNiz2pf4A" in meta.splitlines()
    assert broker.process is None


def test_a_broker_killed_for_15_s_shows_unhealthy_and_the_daemon_resumes_within_10_s(
    redis_client, model, movielens, tmp_path, kafka_client
):
    from kafka import KafkaAdminClient

    broker = PrivateKafka(tmp_path / "kafka").start()
    try:
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
        admin.create_topics(
            {"events": {"num_partitions": 1, "replication_factor": 1}}, wait_for_metadata=True
        )
        admin.close()
        payloads = _ratings_payloads(movielens, 12_000)
        _produce(broker.bootstrap, "events", payloads[:6000])
        port = _free_port()
        settings = _settings(
            broker.bootstrap,
            str(redis_client.connection_pool.connection_kwargs and _url(redis_client)),
            "events",
            model,
            port,
            kafka_client,
        )
        with Daemon(settings) as daemon:
            _wait_for(lambda: _applied(redis_client, model) >= 6000, 120, "first events applied")
            assert _health(port) == 200
            broker.kill()
            killed_at = time.monotonic()
            _wait_for(lambda: _health(port) == 503, 12, "/healthz reporting the broker unreachable")
            time.sleep(max(0.0, 15 - (time.monotonic() - killed_at)))
            broker.start()  # returns once the broker answers a metadata request
            answered_at = time.monotonic()
            _produce(broker.bootstrap, "events", payloads[6000:])
            _wait_for(
                lambda: _applied(redis_client, model) > 6000, 10, "the daemon resuming after the broker"
            )
            resumed_s = time.monotonic() - answered_at
            _wait_for(lambda: _applied(redis_client, model) >= len(payloads), 60, "all events applied")
            _wait_for(lambda: _health(port) == 200, 10, "/healthz healthy again")
            metrics = _scrape(port)
            assert daemon.error is None
        print(f"resumed {resumed_s:.1f} s after the broker answered")
        assert metrics['streammf_retries_total{dependency="kafka"}'] > 0
        assert _applied(redis_client, model) == len(payloads)
        _assert_same_factors(redis_client, model, _reference(movielens, len(payloads)))
    finally:
        broker.kill()


def _url(client: redis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    return f"redis://{kwargs.get('host', '127.0.0.1')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"


# ------------------------------------------------------------------------------------ a hostile mix


def _hostile_mix(log: RatingsLog, n: int, seed: int) -> tuple[list[tuple[bytes, bytes | None]], int]:
    """n records: mostly ratings, a tenth hostile (seeded). Returns them and how many are forget events."""
    rng = np.random.default_rng(seed)
    good = _ratings_payloads(log, n)
    hostile: list[bytes | None] = [
        None,
        b"",
        b"\xff" * 9,
        '{"user_id": "u", "item_id": "i"}'.encode("utf-16"),
        b'{"user_id": "u", "item_id": "i", "value": "4"}',
        b'{"user_id": "u", "item_id": "i", "value": true}',
        b'{"user_id": "u", "item_id": "i", "user_id": "v"}',
        b'{"user_id": "u", "item_id": "i", "value": 1e308}',
        b'{"user_id": "u", "item_id": "i", "value": -1e4, "weight": 1e9}',
        b'{"user_id": "u", "item_id": "i", "value": 4, "weight": -1}',
        b'{"user_id": "u", "item_id": "i", "value": Infinity}',
        b"[" * 5000,
        b'{"user_id": "' + b"u" * 200 + b'", "item_id": "i"}',
        b'{"user_id": 1.5, "item_id": "i"}',
    ]
    records: list[tuple[bytes, bytes | None]] = []
    forgets = 0
    for key, value in good:
        records.append((key, value))
        if rng.random() < 0.1:
            if rng.random() < 0.1:
                forgets += 1
                records.append(
                    (key, json.dumps({"user_id": key.decode(), "event_type": "forget_user"}).encode())
                )
            else:
                records.append((key, hostile[int(rng.integers(len(hostile)))]))
    return records, forgets


def test_a_seeded_hostile_mix_is_applied_or_dead_lettered_exactly_once(
    kafka_bootstrap, redis_url, redis_client, make_topic, topic_name, model, movielens, kafka_client
):
    topic = make_topic(topic_name, 3)
    make_topic(f"{topic}.dlq", 1)
    records, forgets = _hostile_mix(movielens, 5000, seed=13)
    _produce(kafka_bootstrap, topic, records)  # type: ignore[arg-type]
    keys = ModelKeys(model)

    def consumed() -> int:
        return sum(int(v) for v in redis_client.hgetall(keys.offsets).values())

    port = _free_port()
    with Daemon(_settings(kafka_bootstrap, redis_url, topic, model, port, kafka_client)):
        _wait_for(lambda: consumed() >= len(records), 120, "every record consumed")
        metrics = _scrape_settled(port)
    dead = _dead_letters(kafka_bootstrap, topic)
    assert consumed() == len(records)
    assert _applied(redis_client, model) + len(dead) + forgets == len(records)
    assert metrics["streammf_users_forgotten_total"] == forgets
    _assert_sound(redis_client, model)
