"""Redis store behaviour beyond the shared contract: idempotence, concurrency, bad data, garbage
collection."""

from __future__ import annotations

import multiprocessing
import re
import time
from collections.abc import Callable

import numpy as np
import pytest
import redis

from streammf.store.contract import ApplyOutcome, BatchUpdate, StoreError, StoreLostStateError
from streammf.store.layout import ModelKeys, aof_rewrite_warning, delete_model
from streammf.store.redis_store import ModelMismatchError, RedisStore

K = 4


def dump_model(client: redis.Redis, name: str) -> dict[bytes, object]:
    """Every key of the model with its full content, read according to its type."""
    readers: dict[bytes, Callable[[bytes], object]] = {
        b"string": client.get,
        b"hash": client.hgetall,
        b"zset": lambda key: client.zrange(key, 0, -1, withscores=True),
        b"set": client.smembers,
    }
    return {
        key: readers[client.type(key)](key) for key in client.scan_iter(match=ModelKeys(name).prefix + "*")
    }


def update_at(
    offsets: dict[int, tuple[int, int]],
    items: list[str],
    deltas: np.ndarray,
    *,
    version: int = 1,
    item_base: np.ndarray | None = None,
    users: tuple[str, ...] = ("alice",),
    pairs: tuple[tuple[str, str], ...] = (("alice", "x"),),
    k: int = K,
) -> BatchUpdate:
    """An update adding `deltas` ((n_items, k+1): factors then bias) to `items`."""
    n = len(items)
    return BatchUpdate(
        version=version,
        offsets=offsets,
        users=list(users),
        user_rows=np.full((len(users), k), 0.5, dtype=np.float32),
        user_bias=np.full(len(users), 0.25, dtype=np.float32),
        items=items,
        item_base=np.zeros((n, k), dtype=np.float32) if item_base is None else item_base,
        item_delta=deltas[:, :k],
        item_bias_delta=deltas[:, k],
        item_count_delta=np.ones(n, dtype=np.int64),
        pair_users=[u for u, _ in pairs],
        pair_items=[i for _, i in pairs],
        pair_values=np.ones(len(pairs)),
        value_sum_delta=float(len(pairs)),
        value_count_delta=len(pairs),
        events_applied=len(pairs),
        item_gramian_delta=np.eye(k),
        user_gramian_delta=np.eye(k),
    )


def test_reapplying_an_update_changes_nothing(redis_client: redis.Redis, model_name: str) -> None:
    store = RedisStore.open(redis_client, model_name, "implicit", K)
    rng = np.random.default_rng(3)
    first = update_at({0: (0, 5), 1: (0, 2)}, ["x", "y"], rng.normal(size=(2, K + 1)))
    second = update_at({0: (5, 9)}, ["y", "z"], rng.normal(size=(2, K + 1)), pairs=(("bob", "y"),))
    assert store.apply(first) is ApplyOutcome.APPLIED
    assert store.apply(second) is ApplyOutcome.APPLIED
    applied_once = dump_model(redis_client, model_name)
    assert len(applied_once) >= 10

    assert store.apply(first) is ApplyOutcome.DUPLICATE
    assert store.apply(second) is ApplyOutcome.DUPLICATE
    assert store.apply(update_at({0: (7, 12)}, ["x"], np.ones((1, K + 1)))) is ApplyOutcome.CONFLICT
    assert dump_model(redis_client, model_name) == applied_once


# ------------------------------------------------------------------------------------------ concurrency

N_ITEMS = 50
UPDATES_PER_WRITER = 10_000
ITEMS_PER_UPDATE = 5


def planned_updates(seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(item indices, deltas) per update. Deltas are multiples of 2^-8 and the sums stay far below 2^15,
    so float32 holds every partial sum exactly: a lost or doubled update cannot hide in rounding."""
    rng = np.random.default_rng(seed)
    return [
        (
            rng.choice(N_ITEMS, size=ITEMS_PER_UPDATE, replace=False),
            rng.integers(-8, 9, size=(ITEMS_PER_UPDATE, K + 1)) / 256.0,
        )
        for _ in range(UPDATES_PER_WRITER)
    ]


def item_base_rows(indices: np.ndarray) -> np.ndarray:
    return np.repeat(indices[:, None].astype(np.float32), K, axis=1)


def apply_planned_updates(redis_url: str, name: str, partition: int) -> None:
    """One writer process: its own partition, offsets increasing, deltas to items shared with the other."""
    client = redis.Redis.from_url(redis_url)
    store = RedisStore.open(client, name, "explicit", K)
    for offset, (indices, deltas) in enumerate(planned_updates(seed=partition)):
        items = [f"item{i}" for i in indices]
        update = update_at(
            {partition: (offset, offset + 1)},
            items,
            deltas,
            item_base=item_base_rows(indices),
            users=(),
            pairs=(),
        )
        outcome = store.apply(update)
        if outcome is not ApplyOutcome.APPLIED:
            raise AssertionError(f"partition {partition} offset {offset}: {outcome}")
    client.close()


def test_concurrent_writers_lose_no_item_delta(
    redis_client: redis.Redis, redis_url: str, model_name: str
) -> None:
    store = RedisStore.open(redis_client, model_name, "explicit", K)
    context = multiprocessing.get_context("spawn")
    writers = [
        context.Process(target=apply_planned_updates, args=(redis_url, model_name, partition))
        for partition in (0, 1)
    ]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=300)
    assert [writer.exitcode for writer in writers] == [0, 0]

    expected = np.zeros((N_ITEMS, K + 1))
    expected[:, :K] = np.arange(N_ITEMS)[:, None]  # every item starts from its base row
    counts = np.zeros(N_ITEMS, dtype=np.int64)
    for partition in (0, 1):
        for indices, deltas in planned_updates(seed=partition):
            expected[indices] += deltas
            counts[indices] += 1
    items = [f"item{i}" for i in range(N_ITEMS)]
    state = store.read_batch_state([], items, [])
    np.testing.assert_array_equal(state.item_rows, expected[:, :K].astype(np.float32))
    np.testing.assert_array_equal(state.item_bias, expected[:, K].astype(np.float32))
    np.testing.assert_array_equal(state.item_counts, counts)
    assert store.applied_offsets() == {0: UPDATES_PER_WRITER, 1: UPDATES_PER_WRITER}


# ------------------------------------------------------------------------------------------- bad data

Corrupt = Callable[[redis.Redis, ModelKeys], str]  # damages the model, returns the key it damaged


def _set_hash_field(key_of: Callable[[ModelKeys], str], field: str, value: bytes) -> Corrupt:
    def corrupt(client: redis.Redis, keys: ModelKeys) -> str:
        client.hset(key_of(keys), field, value)
        return key_of(keys)

    return corrupt


def _set_string(key_of: Callable[[ModelKeys], str], value: bytes) -> Corrupt:
    def corrupt(client: redis.Redis, keys: ModelKeys) -> str:
        client.set(key_of(keys), value)
        return key_of(keys)

    return corrupt


def _delete_version_meta(client: redis.Redis, keys: ModelKeys) -> str:
    client.delete(keys.version_meta(1))
    return keys.version_meta(1)


# name -> (corruption, does read_batch_state notice, does apply notice)
CORRUPTIONS: dict[str, tuple[Corrupt, bool, bool]] = {
    "item row of 3 bytes": (_set_hash_field(lambda k: k.rows(1, "items"), "x", b"abc"), True, True),
    "user row of 8 bytes": (_set_hash_field(lambda k: k.rows(1, "users"), "alice", b"12345678"), True, False),
    "item count not a number": (_set_hash_field(lambda k: k.item_counts, "x", b"many"), True, True),
    "interaction not a number": (_set_hash_field(lambda k: k.inter("alice"), "x", b"lots"), True, True),
    "value_sum not a number": (_set_hash_field(lambda k: k.stats, "value_sum", b"1,5"), True, True),
    "value_count not an integer": (_set_hash_field(lambda k: k.stats, "value_count", b"2.5"), True, True),
    "offset not a number": (_set_hash_field(lambda k: k.offsets, "0", b"zero"), False, True),
    "Gramian of 5 bytes": (_set_string(lambda k: k.gramian(1, "items"), b"short"), True, True),
    "version without meta": (_delete_version_meta, True, True),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_bad_data_raises_store_error_naming_the_key(
    redis_client: redis.Redis, model_name: str, case: str
) -> None:
    store = RedisStore.open(redis_client, model_name, "implicit", K)
    corrupt, read_notices, apply_notices = CORRUPTIONS[case]
    key = corrupt(redis_client, store.keys)
    if read_notices:
        with pytest.raises(StoreError, match=re.escape(key)):
            store.read_batch_state(["alice"], ["x"], [("alice", "x")])
    if apply_notices:
        before = dump_model(redis_client, model_name)
        with pytest.raises(StoreError, match=re.escape(key)):
            store.apply(update_at({0: (0, 1)}, ["x"], np.ones((1, K + 1)), users=("bob",)))
        assert dump_model(redis_client, model_name) == before  # all or nothing


def test_scanning_a_bad_row_names_the_key(redis_client: redis.Redis, model_name: str) -> None:
    store = RedisStore.open(redis_client, model_name, "explicit", K)
    redis_client.hset(store.keys.rows(1, "items"), "x", b"abc")
    with pytest.raises(StoreError, match=re.escape(store.keys.rows(1, "items")) + " field x: 3 bytes"):
        store.read_all_rows("items")


def test_bad_model_meta_raises_store_error_naming_the_key(redis_client: redis.Redis, model_name: str) -> None:
    keys = ModelKeys(model_name)
    with pytest.raises(StoreError, match=re.escape(keys.meta) + " is missing"):
        RedisStore.attach(redis_client, model_name)
    RedisStore.open(redis_client, model_name, "explicit", K)
    redis_client.hset(keys.meta, "k", "four")
    with pytest.raises(StoreError, match=re.escape(keys.meta) + " field 'k'"):
        RedisStore.attach(redis_client, model_name)
    redis_client.hset(keys.meta, mapping={"k": K, "layout_version": 2})
    with pytest.raises(StoreError, match="layout_version"):
        RedisStore.attach(redis_client, model_name)


def test_current_pointer_must_name_a_version(redis_client: redis.Redis, model_name: str) -> None:
    store = RedisStore.open(redis_client, model_name, "explicit", K)
    redis_client.set(store.keys.current, "seven")
    with pytest.raises(StoreError, match=re.escape(store.keys.current)):
        store.read_batch_state(["alice"], [], [])


def test_open_refuses_a_different_mode_or_k(redis_client: redis.Redis, model_name: str) -> None:
    RedisStore.open(redis_client, model_name, "explicit", K, {"reg": 0.1})
    with pytest.raises(ModelMismatchError, match="mode=explicit k=4"):
        RedisStore.open(redis_client, model_name, "implicit", K)
    with pytest.raises(ModelMismatchError):
        RedisStore.open(redis_client, model_name, "explicit", K + 1)
    reopened = RedisStore.open(redis_client, model_name, "explicit", K, {"reg": 0.2})
    assert reopened.meta().hyper == {"reg": 0.1}  # the creator's hyperparameters stay


def test_refuses_a_client_that_decodes_replies(redis_url: str, model_name: str) -> None:
    with redis.Redis.from_url(redis_url, decode_responses=True) as client, pytest.raises(ValueError):
        RedisStore.open(client, model_name, "explicit", K)


def test_large_k_fits_the_script(redis_client: redis.Redis, model_name: str) -> None:
    k = 300  # 301 floats unpacked per row, a 300×300 Gramian per update
    store = RedisStore.open(redis_client, model_name, "implicit", k)
    deltas = np.full((1, k + 1), 0.5)
    update = update_at({0: (0, 1)}, ["x"], deltas, users=(), pairs=(), k=k)
    assert store.apply(update) is ApplyOutcome.APPLIED
    state = store.read_batch_state([], ["x"], [])
    np.testing.assert_array_equal(state.item_rows[0], np.full(k, 0.5, dtype=np.float32))
    np.testing.assert_array_equal(state.item_gramian, np.eye(k))


# ----------------------------------------------------------------------------------- garbage collection


def version_key_count(client: redis.Redis, keys: ModelKeys, version: int) -> int:
    return int(client.exists(*keys.version_keys(version)))


def test_garbage_collection_deletes_only_retired_versions_past_grace(
    redis_client: redis.Redis, model_name: str
) -> None:
    store = RedisStore.open(redis_client, model_name, "implicit", K)
    keys = store.keys
    store.apply(update_at({0: (0, 1)}, ["x"], np.ones((1, K + 1))))
    assert version_key_count(redis_client, keys, 1) == 5  # meta, users, items, two Gramians

    two = store.begin_version()
    store.write_rows(two, "items", ["x"], np.ones((1, K), dtype=np.float32))
    assert store.publish(two, expected_current=1)
    building = store.begin_version()
    assert store.collect_garbage(grace_s=0.5) == []  # version 1 retired just now: readers may hold it
    assert version_key_count(redis_client, keys, 1) == 5
    # Garbage collection goes by the server's clock: wait until it is past the grace period.
    retired_at = float(redis_client.zscore(keys.retired, 1))
    _wait_for_server_time(redis_client, retired_at + 0.5)
    assert store.collect_garbage(grace_s=0.5) == [1]
    assert version_key_count(redis_client, keys, 1) == 0
    assert version_key_count(redis_client, keys, two) == 4  # no users written to it
    assert redis_client.hget(keys.version_meta(building), "state") == b"building"

    # A publish retires the old version and abandoned builds below the new one, not builds above it.
    abandoned, five, above = store.begin_version(), store.begin_version(), store.begin_version()
    assert store.publish(five, expected_current=two)
    assert store.collect_garbage(grace_s=0) == [two, building, abandoned]
    assert redis_client.hget(keys.version_meta(above), "state") == b"building"
    with pytest.raises(StoreError, match="not being built"):
        store.write_rows(abandoned, "users", ["late"], np.ones((1, K), dtype=np.float32))
    assert version_key_count(redis_client, keys, abandoned) == 0  # the late write resurrected nothing

    assert store.discard_version(above)
    assert not store.publish(above, expected_current=five)
    assert store.collect_garbage(grace_s=0) == [above]
    assert store.current_version() == five
    assert store.collect_garbage(grace_s=0) == []
    remaining = {
        key.decode().removeprefix(keys.prefix) for key in redis_client.scan_iter(match=keys.prefix + "*")
    }
    assert {key for key in remaining if key.startswith("v")} == {
        f"v{five}:meta",
        f"v{five}:gram:items",
        f"v{five}:gram:users",
    }


def _wait_for_server_time(client: redis.Redis, at: float, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        seconds, micros = client.time()
        if seconds + micros / 1e6 > at:
            return
        time.sleep(0.05)
    raise AssertionError(f"the Redis server's clock did not pass {at} within {timeout_s} s")


@pytest.mark.parametrize("where", ["redis", "redis-3-shards", "cluster-3-shards"])
def test_a_writer_of_a_model_deleted_and_created_again_is_refused(
    request: pytest.FixtureRequest, where: str
) -> None:
    """A replica still running while another one rebuilds the model (`streammf run --rebuild` deletes it
    and starts again from the earliest offsets): its next batch must not land in the new model, where
    its offsets would pass for the new model's own (the new model would then skip every event before
    them). Each creation of a model gets an incarnation; every write script checks it."""
    cluster = where == "cluster-3-shards"
    client: redis.Redis = request.getfixturevalue("redis_cluster_client" if cluster else "redis_client")
    name: str = request.getfixturevalue("cluster_model_name" if cluster else "model_name")
    shards = 1 if where == "redis" else 3
    old = RedisStore.open(client, name, "explicit", K, shards=shards)
    assert (
        old.apply(update_at({0: (0, 1)}, ["x"], np.ones((1, K + 1)), users=("alice",)))
        is ApplyOutcome.APPLIED
    )
    delete_model(client, name)
    new = RedisStore.open(client, name, "explicit", K, shards=shards)
    assert new.incarnation and new.incarnation != old.incarnation
    before = dump_model(client, name) if not cluster else None
    with pytest.raises(StoreLostStateError, match="created again"):
        old.apply(update_at({0: (1, 2)}, ["x"], np.ones((1, K + 1)), users=("bob",)))
    with pytest.raises(StoreLostStateError, match="created again"):
        old.forget_user("alice", {0: (2, 3)})
    if before is not None:
        assert dump_model(client, name) == before  # nothing written
    assert new.applied_offsets() == {}
    assert (
        new.apply(update_at({0: (0, 1)}, ["x"], np.ones((1, K + 1)), users=("alice",)))
        is ApplyOutcome.APPLIED
    )
    assert RedisStore.attach(client, name).incarnation == new.incarnation  # a reader sees the new one


def test_an_aof_rewritten_from_a_small_size_is_reported_to_the_operator(redis_client: redis.Redis) -> None:
    """Redis' default auto-aof-rewrite-min-size (64mb) rewrites the AOF every few seconds under a steady
    stream; the daemon warns at start (`aof_rewrite_warning`). Not when automatic rewrites are off or the
    size is large, nor without an AOF (the local stack's Redis keeps one)."""
    if redis_client.info("persistence").get("aof_enabled") != 1:
        raise AssertionError("this test needs a Redis with appendonly yes (the local stack's)")
    before = redis_client.config_get("auto-aof-rewrite-*")
    try:
        redis_client.config_set("auto-aof-rewrite-min-size", "64mb")
        warning = aof_rewrite_warning(redis_client)
        assert warning is not None and "auto-aof-rewrite-min-size 67108864 bytes" in warning, warning
        redis_client.config_set("auto-aof-rewrite-percentage", "0")  # no automatic rewrite at all
        assert aof_rewrite_warning(redis_client) is None
        redis_client.config_set("auto-aof-rewrite-percentage", "100")
        redis_client.config_set("auto-aof-rewrite-min-size", "1gb")
        assert aof_rewrite_warning(redis_client) is None
    finally:
        for name, value in before.items():
            redis_client.config_set(name, value)
