"""Issue #11's acceptance: the daemon keeps one model spread over the local stack's three-primary Redis
Cluster (S = 3 shards, one per primary). The same guarantees as on one Redis (tests/integration/
test_daemon.py): the same factors as `evaluate`, exactly-once under SIGKILL restarts, two replicas sharing
partitions, refreshes during the stream; and the cluster's own: a primary killed mid-stream and started
again, the daemon resuming by itself with nothing lost or applied twice, also when the primary comes back
without writes it had acknowledged.

Everything is read back through the store's API (`RedisStore.attach`), which knows the shards."""

from __future__ import annotations

import logging
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import cast
from urllib.parse import urlparse

import numpy as np
import pytest
import redis
from redis.cluster import RedisCluster

from streammf.config import ModelSettings, RefreshSettings, Settings
from streammf.store.contract import Side
from streammf.store.layout import ModelKeys, scan_keys
from streammf.store.memory import MemoryStore
from streammf.store.redis_store import RedisStore
from streammf.store.shards import shard_of
from streammf.stream.learner import LearnerParams
from streammf.tools.evaluate import evaluate
from streammf.tools.ratings import RatingsLog
from tests.integration.test_daemon import (
    _env,
    _free_port,
    _InProcessDaemon,
    _produce,
    _ratings_payloads,
    _scrape,
    _scrape_settled,
    _settings,
    _two_daemons_apply,
    _wait_for,
)
from tests.integration.test_redis_cluster import _stack

log = logging.getLogger(__name__)

SHARDS = 3
KILLED_NODE = 2  # the stack's node number: it owns the middle third of the slots, so shard 1
Store = MemoryStore | RedisStore


@pytest.fixture(scope="module")
def evaluated(movielens: RatingsLog) -> MemoryStore:
    """The uninterrupted reference: `streammf evaluate`'s code path on an in-memory store."""
    model = ModelSettings()
    store = MemoryStore("reference", model.mode, model.factors)
    evaluate(movielens, store, LearnerParams.from_settings(model), batch_size=500)
    return store


# ------------------------------------------------------------------------------------------ helpers


def _cluster_settings(kafka_bootstrap: str, cluster_url: str, topic: str, model: str, port: int) -> Settings:
    """test_daemon's settings with the cluster's URL and S = 3."""
    settings = _settings(kafka_bootstrap, cluster_url, topic, model, port)
    return settings.model_copy(update={"redis": settings.redis.model_copy(update={"shards": SHARDS})})


def _cluster_env(settings: Settings) -> dict[str, str]:
    return {**_env(settings), "STREAMMF_REDIS__SHARDS": str(settings.redis.shards)}


def _on_new_port(settings: Settings) -> Settings:
    """The same daemon settings, serving metrics on another free port (a stopped daemon's may linger)."""
    return settings.model_copy(update={"metrics": settings.metrics.model_copy(update={"port": _free_port()})})


def _spawn(settings: Settings, log_path: Path) -> subprocess.Popen[bytes]:
    handle = log_path.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "streammf.cli", "run"],
        env=_cluster_env(settings),
        stdout=handle,
        stderr=handle,
    )


def _as_redis(client: RedisCluster) -> redis.Redis:
    """The store takes a cluster client typed as `redis.Redis` (see streammf.store.connect)."""
    return cast(redis.Redis, client)


def _store(client: RedisCluster, name: str) -> RedisStore:
    store = RedisStore.attach(_as_redis(client), name)
    assert len(store.shards) == SHARDS, f"model {name} has {len(store.shards)} shard(s), expected {SHARDS}"
    return store


def _applied(client: RedisCluster, name: str) -> int:
    """Events every shard counts as applied (the smallest count: a shard's batch parts may lag the others'
    while a torn batch is completed); 0 while the model does not exist or a primary cannot answer."""
    try:
        store = RedisStore.attach(_as_redis(client), name)
        return min(int(cast(bytes, client.hget(shard.stats, "events_applied"))) for shard in store.shards)
    except Exception:
        return 0


def _assert_spread_over_every_primary(client: RedisCluster, store: RedisStore) -> None:
    owners = {client.get_node_from_key(shard.current).name for shard in store.shards}
    primaries = {node.name for node in client.get_primaries()}
    assert owners == primaries, f"shards on {owners}, primaries {primaries}"


def _rows(store: Store, side: Side) -> dict[str, np.ndarray]:
    """id -> factors then bias (k + 1 floats), as the in-memory store keeps them."""
    ids, factors, biases = store.read_all_rows(side)
    assert len(set(ids)) == len(ids), f"{side}: a row listed twice"
    return {ident: np.append(factors[r], biases[r]) for r, ident in enumerate(ids)}


def _assert_same_factors(store: RedisStore, reference: MemoryStore) -> None:
    users, items = _rows(store, "users"), _rows(store, "items")
    assert users.keys() == reference.user_rows.keys()
    assert items.keys() == reference.item_rows.keys()
    for ident, row in reference.user_rows.items():
        np.testing.assert_allclose(users[ident], row, rtol=0, atol=1e-5, err_msg=f"user {ident}")
    for ident, row in reference.item_rows.items():
        np.testing.assert_allclose(items[ident], row, rtol=0, atol=1e-5, err_msg=f"item {ident}")


def _training_rmse(store: Store, ratings: RatingsLog) -> float:
    """RMSE of μ + b_u + b_i + u·v over every rating of the log, from the store's rows and μ."""
    users, items = _rows(store, "users"), _rows(store, "items")
    user_rows = np.array([users[str(u)] for u in ratings.users], dtype=np.float64)
    item_rows = np.array([items[str(i)] for i in ratings.items], dtype=np.float64)
    predicted = (
        store.global_mean()
        + user_rows[:, -1]
        + item_rows[:, -1]
        + np.einsum("ek,ek->e", user_rows[:, :-1], item_rows[:, :-1])
    )
    return float(np.sqrt(np.mean((np.asarray(ratings.values, dtype=np.float64) - predicted) ** 2)))


def _stored_interactions(store: RedisStore) -> Counter[tuple[str, str]]:
    """(user, item) -> how many times the store holds the pair (over every shard)."""
    found: Counter[tuple[str, str]] = Counter()
    for users, items, _ in store.iter_interactions():
        found.update(zip(users.tolist(), items.tolist(), strict=True))
    return found


def _assert_every_event_exactly_once(client: RedisCluster, store: RedisStore, ratings: RatingsLog) -> None:
    """Nothing lost, nothing applied twice: the event count and the stats copy of every shard, each rating
    as one interaction, each item's count = its distinct users in the data."""
    n = len(ratings)
    pairs = list(zip((str(u) for u in ratings.users), (str(i) for i in ratings.items), strict=True))
    assert len(set(pairs)) == n, "MovieLens 100k rates each (user, item) pair once"
    values = np.asarray(ratings.values, dtype=np.float64)
    for s, shard in enumerate(store.shards):  # every shard keeps a full copy of the stats
        stats = cast(list[bytes], client.hmget(shard.stats, ["events_applied", "value_count", "value_sum"]))
        applied, count, total = stats
        assert (int(applied), int(count)) == (n, n), (
            f"shard {s} ({shard.prefix}): events_applied, value_count"
        )
        assert float(total) == pytest.approx(float(values.sum()), rel=1e-12), f"shard {s}: value_sum"
    assert store.events_applied() == n

    stored = _stored_interactions(store)
    doubled = {pair: times for pair, times in stored.items() if times > 1}
    lost = set(pairs) - stored.keys()
    foreign = stored.keys() - set(pairs)
    assert not doubled and not lost and not foreign, (
        f"{len(lost)} pairs lost, e.g. {sorted(lost)[:3]}; {len(doubled)} held twice; {len(foreign)} unknown"
    )
    assert sum(stored.values()) == n

    distinct_users: dict[str, set[str]] = {}
    for user, item in pairs:
        distinct_users.setdefault(item, set()).add(user)
    expected = {item: len(users) for item, users in distinct_users.items()}
    items = sorted(expected)
    counts = dict(zip(items, store.read_batch_state([], items, []).item_counts.tolist(), strict=True))
    wrong = {
        item: {"stored": counts[item], "expected": expected[item], "shard": shard_of(item, SHARDS)}
        for item in items
        if counts[item] != expected[item]
    }
    by_shard = Counter(fault["shard"] for fault in wrong.values())
    missing = sum(fault["expected"] - fault["stored"] for fault in wrong.values())
    assert not wrong, (
        f"{len(wrong)} item counts wrong (by shard: {dict(by_shard)}; {missing} increments missing in all), "
        f"e.g. {dict(list(wrong.items())[:5])}"
    )


def _assert_rows_finite_and_complete(store: RedisStore, ratings: RatingsLog) -> None:
    sides: tuple[tuple[Side, np.ndarray], ...] = (("users", ratings.users), ("items", ratings.items))
    for side, ids in sides:
        rows = _rows(store, side)
        assert rows.keys() == {str(i) for i in ids}, f"{side}: rows missing or extra"
        assert np.isfinite(np.array(list(rows.values()))).all(), f"{side}: a row is not finite"


# ------------------------------------------------------------------------------------------- tests


def test_replay_through_kafka_matches_evaluate_on_three_shards(
    kafka_bootstrap: str,
    redis_cluster_url: str,
    redis_cluster_client: RedisCluster,
    make_topic: Callable[[str, int], str],
    topic_name: str,
    cluster_model_name: str,
    movielens: RatingsLog,
    evaluated: MemoryStore,
) -> None:
    model = cluster_model_name
    topic = make_topic(topic_name, 1)
    _produce(kafka_bootstrap, topic, _ratings_payloads(movielens))
    port = _free_port()
    settings = _cluster_settings(kafka_bootstrap, redis_cluster_url, topic, model, port)
    with _InProcessDaemon(settings):
        _wait_for(lambda: _applied(redis_cluster_client, model) >= len(movielens), 300, "all events applied")
        metrics = _scrape_settled(port)
    store = _store(redis_cluster_client, model)
    _assert_spread_over_every_primary(redis_cluster_client, store)
    assert store.events_applied() == len(movielens)
    # Explicit mode on three shards does the arithmetic of one: the same factors as the reference.
    _assert_same_factors(store, evaluated)
    daemon_rmse = np.sqrt(
        metrics["streammf_prequential_squared_error_total"]
        / metrics["streammf_prequential_predictions_total"]
    )
    report = evaluate(
        movielens,
        MemoryStore("again", "explicit", ModelSettings().factors),
        LearnerParams.from_settings(ModelSettings()),
        batch_size=500,
    )
    assert report.rmse is not None
    assert daemon_rmse == pytest.approx(report.rmse, abs=1e-6)
    assert metrics["streammf_prequential_predictions_total"] == len(movielens)


def test_sigkill_restarts_on_three_shards_apply_every_event_exactly_once(
    kafka_bootstrap: str,
    redis_cluster_url: str,
    redis_cluster_client: RedisCluster,
    make_topic: Callable[[str, int], str],
    topic_name: str,
    cluster_model_name: str,
    movielens: RatingsLog,
    evaluated: MemoryStore,
    tmp_path: Path,
) -> None:
    model, client = cluster_model_name, redis_cluster_client
    topic = make_topic(topic_name, 1)
    _produce(kafka_bootstrap, topic, _ratings_payloads(movielens))
    settings = _cluster_settings(kafka_bootstrap, redis_cluster_url, topic, model, 0)
    # Batches of 2,000 (not the default 10,000): five kills must land mid-stream, and between the shard
    # writes of a batch now and then, however fast the daemon has become.
    kafka = settings.kafka.model_copy(update={"max_poll_records": 2000})
    settings = settings.model_copy(update={"kafka": kafka})
    rng = random.Random(11)
    log_path = tmp_path / "daemon.log"
    torn: list[tuple[int, dict[int, int], dict[int, int]]] = []  # kills that fell between shard writes
    for kill in range(5):
        process = _spawn(settings, log_path)
        before = _applied(client, model)

        def progressed(before: int = before) -> bool:
            return _applied(client, model) > before

        # Looked for every 10 ms, then up to 0.1 s more: at ~90,000 events/s (this machine, three shards)
        # up to 0.5 s more let five kills see the whole stream applied.
        _wait_for(progressed, 120, f"progress before kill {kill}", every_s=0.01)
        time.sleep(rng.uniform(0.0, 0.1))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        store = _store(client, model)
        if ahead := store.offsets_ahead():
            torn.append((kill, store.applied_offsets(), ahead))
    assert _applied(client, model) < len(movielens), "the kills should land mid-stream"
    process = _spawn(settings, log_path)
    try:
        _wait_for(lambda: _applied(client, model) >= len(movielens), 300, "all events applied")
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log_path.read_text()[-3000:]
    store = _store(client, model)
    assert store.offsets_ahead() == {}, "every shard ends where the others do"
    _assert_every_event_exactly_once(client, store, movielens)
    _assert_rows_finite_and_complete(store, movielens)
    if not torn:  # every restart replayed whole batches: the factors of an uncrashed run
        _assert_same_factors(store, evaluated)
    # A torn batch, completed by the replay, is learnt in another valid order: the model is as good.
    reference, stored = _training_rmse(evaluated, movielens), _training_rmse(store, movielens)
    log.warning(
        "kills between the shard writes of a batch (kill, resumed from, first batch ended at): %s; "
        "training RMSE %.6f, reference %.6f",
        torn,
        stored,
        reference,
    )
    assert abs(stored - reference) <= 0.02 * reference, (
        f"training RMSE {stored:.4f}, reference {reference:.4f}"
    )


def test_two_daemons_share_partitions_of_a_three_shard_model_and_lose_no_updates(
    kafka_bootstrap: str,
    redis_cluster_url: str,
    redis_cluster_client: RedisCluster,
    make_topic: Callable[[str, int], str],
    topic_name: str,
    cluster_model_name: str,
    movielens: RatingsLog,
    tmp_path: Path,
) -> None:
    model, client = cluster_model_name, redis_cluster_client
    topic = make_topic(topic_name, 4)
    settings = _cluster_settings(kafka_bootstrap, redis_cluster_url, topic, model, 0)
    envs = [_cluster_env(settings), _cluster_env(settings)]
    scraped = _two_daemons_apply(
        kafka_bootstrap, topic, _ratings_payloads(movielens), envs, tmp_path, lambda: _applied(client, model)
    )
    shares = [m["streammf_events_applied_total"] for m in scraped]
    assert all(share > 0 for share in shares), f"both daemons should work: {shares}"
    assert sum(shares) == len(movielens)
    store = _store(client, model)
    _assert_every_event_exactly_once(client, store, movielens)  # every update of both writers counted
    assert sorted(store.applied_offsets()) == [0, 1, 2, 3]
    assert store.offsets_ahead() == {}


def test_periodic_refreshes_of_a_three_shard_model_during_the_stream_lose_nothing(
    kafka_bootstrap: str,
    redis_cluster_url: str,
    redis_cluster_client: RedisCluster,
    make_topic: Callable[[str, int], str],
    topic_name: str,
    cluster_model_name: str,
    movielens: RatingsLog,
) -> None:
    model, client = cluster_model_name, redis_cluster_client
    topic = make_topic(topic_name, 1)
    port = _free_port()
    settings = _cluster_settings(kafka_bootstrap, redis_cluster_url, topic, model, port)
    settings = settings.model_copy(update={"refresh": RefreshSettings(every_s=1.0, iterations=2)})

    def refreshes() -> dict[str, float]:
        return {k: v for k, v in _scrape(port).items() if k.startswith("streammf_refresh")}

    def published() -> float:
        return refreshes().get('streammf_refreshes_total{outcome="published"}', 0.0)

    with _InProcessDaemon(settings):
        # Paced so the stream lasts at least 5 s on any machine: several 1 s refreshes must overlap it.
        _produce(kafka_bootstrap, topic, _ratings_payloads(movielens), pause_every=2000, pause_s=0.1)
        _wait_for(lambda: _applied(client, model) >= len(movielens), 300, "all events applied")
        try:
            _wait_for(lambda: published() >= 2, 60, "two published refreshes")
        except AssertionError as timed_out:
            raise AssertionError(f"{timed_out}; refresh metrics: {refreshes()}") from None
        metrics = refreshes()
    assert metrics.get('streammf_refreshes_total{outcome="failed"}', 0) == 0, metrics
    assert metrics["streammf_refresh_caught_up_rows_total"] > 0, f"no refresh overlapped: {metrics}"
    store = _store(client, model)
    assert store.current_version() > 1
    shard_versions = [int(cast(bytes, client.get(shard.current))) for shard in store.shards]
    assert shard_versions == [store.current_version()] * SHARDS, "every shard publishes the same version"
    _assert_every_event_exactly_once(client, store, movielens)
    # A user or item learnt while a refresh ran is in the published version, on its shard.
    _assert_rows_finite_and_complete(store, movielens)


def _offsets_held(client: RedisCluster, shard: ModelKeys) -> tuple[dict[int, int], dict[int, int]]:
    """A shard's (item part, user part) offsets hashes: partition -> next offset."""
    return cast(
        tuple[dict[int, int], dict[int, int]],
        tuple(
            {int(p): int(o) for p, o in cast(dict[bytes, bytes], client.hgetall(key)).items()}
            for key in (shard.item_offsets, shard.offsets)
        ),
    )


def _wait_for_cluster_ok(client: RedisCluster, timeout_s: float = 60.0) -> None:
    def ok() -> bool:
        try:
            infos = client.execute_command("CLUSTER INFO", target_nodes=RedisCluster.PRIMARIES)
        except redis.RedisError:
            return False
        return len(infos) == SHARDS and all(info["cluster_state"] == "ok" for info in infos.values())

    _wait_for(ok, timeout_s, "cluster_state:ok on every primary")


def test_a_primary_killed_mid_stream_and_restarted_loses_nothing_and_applies_nothing_twice(
    kafka_bootstrap: str,
    redis_cluster_url: str,
    redis_cluster_client: RedisCluster,
    make_topic: Callable[[str, int], str],
    topic_name: str,
    cluster_model_name: str,
    movielens: RatingsLog,
) -> None:
    model, client = cluster_model_name, redis_cluster_client
    topic = make_topic(topic_name, 2)
    port = _free_port()
    settings = _cluster_settings(kafka_bootstrap, redis_cluster_url, topic, model, port)
    # The stack's node N listens on the seed's port (node 1's) + N - 1.
    killed_port = (urlparse(redis_cluster_url).port or 0) + KILLED_NODE - 1
    # Not paced: the daemon works through a backlog, so the kill lands while its writes flow (mid-batch,
    # between the shard writes of one, or with the primary's AOF write lagging behind its replies).
    producer = threading.Thread(target=_produce, args=(kafka_bootstrap, topic, _ratings_payloads(movielens)))
    with _InProcessDaemon(settings) as daemon:
        producer.start()
        _wait_for(lambda: _applied(client, model) >= 20_000, 120, "some events applied")
        store = _store(client, model)
        killed_shards = [
            s
            for s, shard in enumerate(store.shards)
            if client.get_node_from_key(shard.current).port == killed_port
        ]
        killed = store.shards[1]
        try:
            before_kill = _offsets_held(client, killed)
            stopped = _stack("cluster-node-stop", str(KILLED_NODE), "--kill")
            assert stopped.returncode == 0, f"could not kill cluster node {KILLED_NODE}: {stopped.stderr}"
            applied_at_kill = _applied(client, model)
            time.sleep(10)  # under the cluster's node timeout (15 s): only that primary's slots refuse
        finally:
            started = _stack("cluster-node-start", str(KILLED_NODE))
            assert started.returncode == 0, f"could not restart cluster node {KILLED_NODE}: {started.stderr}"
            _wait_for_cluster_ok(client)
        # Offsets only grow: one below what the shard acknowledged before the kill is a write it lost.
        after_restart = _offsets_held(client, killed)
        lost_writes = any(
            after.get(partition, -1) < offset
            for after, before in zip(after_restart, before_kill, strict=True)
            for partition, offset in before.items()
        )
        log.warning(
            "shard 1's offsets (item part, user part) acknowledged before the kill: %s, after the restart: "
            "%s (%s)",
            before_kill,
            after_restart,
            "it came back WITHOUT writes it had acknowledged" if lost_writes else "no write lost seen",
        )
        producer.join()
        _wait_for(lambda: _applied(client, model) >= len(movielens), 300, "all events applied")
        assert daemon.thread.is_alive(), "the daemon resumed by itself, without a restart"
        retries = _scrape(port).get('streammf_retries_total{dependency="redis"}', 0)
    assert killed_shards == [1], f"node {KILLED_NODE} held shards {killed_shards}"
    assert applied_at_kill < len(movielens), "the primary should be killed mid-stream"
    assert retries > 0, "the outage must have been seen and retried, not slept through"
    store = _store(client, model)
    assert store.offsets_ahead() == {}, "every shard ends where the others do"
    _assert_every_event_exactly_once(client, store, movielens)
    _assert_rows_finite_and_complete(store, movielens)


def _dump_shard(client: RedisCluster, shard: ModelKeys) -> dict[bytes, bytes]:
    """Every key of one shard, serialised (DUMP): the shard's state at this moment."""
    return {key: cast(bytes, client.dump(key)) for key in scan_keys(_as_redis(client), shard.prefix)}


def _restore_shard(client: RedisCluster, shard: ModelKeys, snapshot: dict[bytes, bytes]) -> None:
    """Puts one shard back to `snapshot`: keys made since go, the others get their old value."""
    newer = [key for key in scan_keys(_as_redis(client), shard.prefix) if key not in snapshot]
    if newer:
        client.delete(*newer)
    for key, value in snapshot.items():
        client.restore(key, 0, value, replace=True)


def test_a_primary_back_without_its_last_acknowledged_writes_is_completed_exactly_once(
    kafka_bootstrap: str,
    redis_cluster_url: str,
    redis_cluster_client: RedisCluster,
    make_topic: Callable[[str, int], str],
    topic_name: str,
    cluster_model_name: str,
    movielens: RatingsLog,
) -> None:
    """What a primary SIGKILLed while its AOF write lags may do (appendfsync everysec: come back without
    the last writes it acknowledged, see deploy/local/stack cluster-node-stop), made certain rather than
    left to the disk's timing: the shard of node 2 goes back to its state 10,000 events (5 batches) ago,
    the other shards keep everything. The daemon, started again, must re-apply those events to that shard,
    and only there: exactly once overall."""
    model, client = cluster_model_name, redis_cluster_client
    topic = make_topic(topic_name, 1)
    payloads = _ratings_payloads(movielens)
    cut = len(payloads) - 10_000
    settings = _cluster_settings(kafka_bootstrap, redis_cluster_url, topic, model, _free_port())
    _produce(kafka_bootstrap, topic, payloads[:cut])
    with _InProcessDaemon(settings):
        _wait_for(lambda: _applied(client, model) >= cut, 300, "the first part applied")
    store = _store(client, model)
    shard = store.shards[1]
    snapshot = _dump_shard(client, shard)
    _produce(kafka_bootstrap, topic, payloads[cut:])
    with _InProcessDaemon(_on_new_port(settings)):
        _wait_for(lambda: _applied(client, model) >= len(payloads), 300, "all events applied")

    _restore_shard(client, shard, snapshot)  # the primary restarted from an AOF missing its last writes
    assert store.applied_offsets() == {0: cut}, "resume where the shard that lost writes stands"
    assert store.offsets_ahead() == {0: len(payloads)}

    with _InProcessDaemon(_on_new_port(settings)):
        _wait_for(lambda: _applied(client, model) >= len(payloads), 120, "the shard caught up")
    assert store.offsets_ahead() == {}
    _assert_every_event_exactly_once(client, store, movielens)
    _assert_rows_finite_and_complete(store, movielens)
