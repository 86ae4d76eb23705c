"""The store contract (streammf.store.contract), run against the in-memory twin and the Redis store alike.

The in-memory half runs with the unit tests; the Redis half is marked `integration` (a real Redis)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest
import redis

from streammf.model.factors import Mode
from streammf.store.contract import ApplyOutcome, BatchState, BatchUpdate, RefreshableStore
from streammf.store.memory import MemoryStore
from streammf.store.redis_store import RedisStore

K = 3
MakeStore = Callable[[Mode], RefreshableStore]


@pytest.fixture(
    params=[
        "memory",
        pytest.param("redis", marks=pytest.mark.integration),
        # Three shards in one Redis, and in the local stack's three-primary Redis Cluster.
        pytest.param("redis-3-shards", marks=pytest.mark.integration),
        pytest.param("cluster-3-shards", marks=pytest.mark.integration),
    ]
)
def make_store(request: pytest.FixtureRequest) -> MakeStore:
    if request.param == "memory":
        return lambda mode: MemoryStore("contract", mode, K, {"reg": 0.05})
    if request.param == "cluster-3-shards":
        cluster: redis.Redis = request.getfixturevalue("redis_cluster_client")
        cluster_name: str = request.getfixturevalue("cluster_model_name")
        return lambda mode: RedisStore.open(cluster, cluster_name, mode, K, {"reg": 0.05}, shards=3)
    client: redis.Redis = request.getfixturevalue("redis_client")
    name: str = request.getfixturevalue("model_name")
    shards = 3 if request.param == "redis-3-shards" else 1
    return lambda mode: RedisStore.open(client, name, mode, K, {"reg": 0.05}, shards=shards)


def make_update(
    *,
    version: int = 1,
    offsets: dict[int, tuple[int, int]] | None = None,
    users: dict[str, list[float]] | None = None,
    items: dict[str, tuple[list[float], list[float], int]] | None = None,
    pairs: list[tuple[str, str, float]] | None = None,
    value_sum: float = 0.0,
    value_count: int = 0,
    gramian_deltas: tuple[np.ndarray, np.ndarray] | None = None,
) -> BatchUpdate:
    """users: id -> k factors + bias; items: id -> (base k factors, delta k factors + bias, count delta)."""
    users = users or {}
    items = items or {}
    pairs = pairs or []
    user_rows = np.array(list(users.values()), dtype=np.float32).reshape(len(users), K + 1)
    item_base = np.array([base for base, _, _ in items.values()], dtype=np.float32).reshape(len(items), K)
    item_delta = np.array([delta for _, delta, _ in items.values()], dtype=np.float64).reshape(
        len(items), K + 1
    )
    return BatchUpdate(
        version=version,
        offsets=offsets if offsets is not None else {0: (0, 1)},
        users=list(users),
        user_rows=user_rows[:, :K],
        user_bias=user_rows[:, K],
        items=list(items),
        item_base=item_base,
        item_delta=item_delta[:, :K],
        item_bias_delta=item_delta[:, K],
        item_count_delta=np.array([count for _, _, count in items.values()], dtype=np.int64),
        pair_users=[u for u, _, _ in pairs],
        pair_items=[i for _, i, _ in pairs],
        pair_values=np.array([v for _, _, v in pairs], dtype=np.float64),
        value_sum_delta=value_sum,
        value_count_delta=value_count,
        events_applied=len(pairs),
        item_gramian_delta=None if gramian_deltas is None else gramian_deltas[0],
        user_gramian_delta=None if gramian_deltas is None else gramian_deltas[1],
    )


def read_all(store: RefreshableStore) -> BatchState:
    users, items = ["alice", "bob", "carol"], ["x", "y", "z"]
    return store.read_batch_state(users, items, [(u, i) for u in users for i in items])


def assert_same_state(a: BatchState, b: BatchState) -> None:
    for name in a.__dataclass_fields__:
        left, right = getattr(a, name), getattr(b, name)
        if isinstance(left, np.ndarray):
            assert left.dtype == right.dtype, name
            np.testing.assert_array_equal(left, right, err_msg=name)
        else:
            assert left == right, name


def test_apply_then_read_back(make_store: MakeStore) -> None:
    store = make_store("explicit")
    update = make_update(
        offsets={0: (0, 2), 3: (10, 11)},
        users={"alice": [0.1, 0.2, 0.3, 0.5]},
        items={"x": ([1.0, 2.0, 3.0], [0.1, 0.2, 0.3, 0.25], 2)},
        pairs=[("alice", "x", 4.0), ("bob", "x", 3.5)],
        value_sum=7.5,
        value_count=2,
    )
    assert store.apply(update) is ApplyOutcome.APPLIED

    state = store.read_batch_state(["alice", "bob"], ["x", "y"], [("alice", "x"), ("bob", "x"), ("bob", "y")])
    assert state.version == 1
    np.testing.assert_array_equal(state.user_rows[0], np.float32([0.1, 0.2, 0.3]))
    assert state.user_bias[0] == np.float32(0.5)
    assert state.user_present.tolist() == [True, False]
    np.testing.assert_array_equal(state.user_rows[1], np.zeros(K, dtype=np.float32))
    assert state.user_counts.tolist() == [1, 1]  # one observed entry each
    expected_x = np.add([1.0, 2.0, 3.0], [0.1, 0.2, 0.3]).astype(np.float32)
    np.testing.assert_array_equal(state.item_rows[0], expected_x)
    assert state.item_bias[0] == np.float32(0.25)
    assert state.item_present.tolist() == [True, False]
    assert state.item_counts.tolist() == [2, 0]
    np.testing.assert_array_equal(state.pair_values, [4.0, 3.5, np.nan])
    assert (state.value_sum, state.value_count) == (7.5, 2)
    assert state.item_gramian is None and state.user_gramian is None
    assert store.applied_offsets() == {0: 2, 3: 11}
    assert store.events_applied() == 2
    assert store.meta().version == 1 and store.meta().k == K and store.meta().mode == "explicit"


def test_offset_fencing(make_store: MakeStore) -> None:
    store = make_store("explicit")

    def at(offsets: dict[int, tuple[int, int]], rating: float) -> BatchUpdate:
        return make_update(offsets=offsets, pairs=[("alice", "x", rating)], value_sum=rating, value_count=1)

    assert store.apply(at({0: (0, 10), 1: (0, 5)}, 1.0)) is ApplyOutcome.APPLIED
    before = read_all(store)
    assert store.apply(at({0: (0, 10), 1: (0, 5)}, 2.0)) is ApplyOutcome.DUPLICATE
    assert store.apply(at({0: (3, 10)}, 2.0)) is ApplyOutcome.DUPLICATE  # a sub-range of applied offsets
    assert store.apply(at({0: (5, 15)}, 2.0)) is ApplyOutcome.CONFLICT  # partly applied
    assert store.apply(at({0: (0, 10), 1: (5, 6)}, 2.0)) is ApplyOutcome.CONFLICT  # one behind, one ahead
    assert store.apply(at({1: (2, 9)}, 2.0)) is ApplyOutcome.CONFLICT
    assert_same_state(before, read_all(store))
    assert store.applied_offsets() == {0: 10, 1: 5}
    assert store.events_applied() == 1

    assert store.apply(at({0: (20, 30), 2: (7, 8)}, 3.0)) is ApplyOutcome.APPLIED  # gap and new partition
    assert store.applied_offsets() == {0: 30, 1: 5, 2: 8}
    assert read_all(store).pair_values[0] == 3.0


def test_stale_version_after_publish(make_store: MakeStore) -> None:
    store = make_store("implicit")
    assert store.apply(make_update(users={"alice": [1, 1, 1, 0]})) is ApplyOutcome.APPLIED

    version = store.begin_version()
    assert version > 1
    store.write_rows(version, "users", ["bob"], np.float32([[2, 2, 2]]))
    store.write_rows(version, "items", ["x"], np.float32([[3, 3, 3]]))
    store.write_gramian(version, "items", ["x", "z"], np.float32([[3, 3, 3], [1, 2, 4]]))
    gramian = np.float64([[3, 3, 3], [1, 2, 4]]).T @ np.float64([[3, 3, 3], [1, 2, 4]])
    assert store.meta().version == 1  # a version being built is invisible
    assert store.publish(version, expected_current=1)
    assert store.meta().version == version

    late = make_update(offsets={0: (1, 2)}, users={"alice": [5, 5, 5, 0]}, pairs=[("alice", "y", 1.0)])
    before = read_all(store)
    assert store.apply(late) is ApplyOutcome.STALE_VERSION
    assert_same_state(before, read_all(store))
    assert store.applied_offsets() == {0: 1}

    state = store.read_batch_state(["alice", "bob"], ["x"], [])
    assert state.version == version
    assert state.user_present.tolist() == [False, True]  # the new version holds only what was written
    np.testing.assert_array_equal(state.user_rows[1], [2, 2, 2])
    np.testing.assert_array_equal(state.item_rows[0], [3, 3, 3])
    np.testing.assert_array_equal(state.item_gramian, gramian)
    np.testing.assert_array_equal(state.user_gramian, np.zeros((K, K)))

    late.version = version
    assert store.apply(late) is ApplyOutcome.APPLIED


def test_publish_is_a_compare_and_set(make_store: MakeStore) -> None:
    store = make_store("explicit")
    first, second = store.begin_version(), store.begin_version()
    assert second > first > 1
    assert not store.publish(second, expected_current=7)  # current is 1, not 7
    assert store.publish(second, expected_current=1)
    assert not store.publish(first, expected_current=second)  # older than current
    assert not store.publish(second, expected_current=second)  # not newer than itself
    assert not store.publish(999, expected_current=second)  # never begun
    assert store.begin_version() > second  # numbers are never reused
    assert store.meta().version == second


def test_changes_are_tracked_only_once_asked_and_taken_once(make_store: MakeStore) -> None:
    store = make_store("implicit")
    untracked = make_update(users={"alice": [1, 1, 1, 0]}, items={"x": ([0] * K, [0.1] * (K + 1), 1)})
    assert store.apply(untracked) is ApplyOutcome.APPLIED
    assert not store.track_changes(7), "only the current version can be tracked"
    assert store.track_changes(1)
    assert store.take_changes(1) == ([], []), "updates before tracking are not recorded"
    tracked = make_update(
        offsets={0: (1, 3)},
        users={"bob": [1, 1, 1, 0], "carol": [2, 2, 2, 0]},
        items={"y": ([0] * K, [0.1] * (K + 1), 1)},
        pairs=[("bob", "y", 1.0), ("carol", "y", 2.0)],
    )
    assert store.apply(tracked) is ApplyOutcome.APPLIED
    assert store.take_changes(1) == (["bob", "carol"], ["y"])
    assert store.take_changes(1) == ([], []), "taking forgets"
    users, items, values = store.read_interactions(["carol", "nobody"])
    assert (users.tolist(), items.tolist(), values.tolist()) == (["carol"], ["y"], [2.0])


def test_paused_version_refuses_writes_until_resumed(make_store: MakeStore) -> None:
    store = make_store("explicit")
    assert not store.pause_writes(7, 10.0), "only the current version can be paused"
    assert store.pause_writes(1, 10.0)
    update = make_update(users={"alice": [1, 1, 1, 0]}, pairs=[("alice", "x", 4.0)], value_count=1)
    before = read_all(store)
    assert store.apply(update) is ApplyOutcome.PAUSED
    assert_same_state(before, read_all(store))
    assert store.applied_offsets() == {}
    store.resume_writes(1)
    assert store.apply(update) is ApplyOutcome.APPLIED


def test_a_pause_ends_by_itself_and_publish_refuses_after_it(make_store: MakeStore) -> None:
    store = make_store("explicit")
    version = store.begin_version()
    assert store.pause_writes(1, 0.05)
    time.sleep(0.1)
    assert store.apply(make_update(users={"alice": [1, 1, 1, 0]})) is ApplyOutcome.APPLIED
    assert not store.publish(version, expected_current=1), "writes may have slipped in after the pause"
    assert store.pause_writes(1, 10.0)
    assert store.publish(version, expected_current=1)
    assert store.apply(make_update(offsets={0: (1, 2)})) is ApplyOutcome.STALE_VERSION


def test_absent_item_starts_from_item_base(make_store: MakeStore) -> None:
    store = make_store("explicit")
    base, delta = [0.5, -0.25, 1.0], [0.125, 0.125, 0.125, 1.5]
    store.apply(make_update(items={"x": (base, delta, 1)}))
    np.testing.assert_array_equal(read_all(store).item_rows[0], [0.625, -0.125, 1.125])
    assert read_all(store).item_bias[0] == 1.5

    # Present now: the base of the next update is ignored, the delta adds to the stored row.
    store.apply(make_update(offsets={0: (1, 2)}, items={"x": ([9.0, 9.0, 9.0], delta, 1)}))
    state = read_all(store)
    np.testing.assert_array_equal(state.item_rows[0], [0.75, 0.0, 1.25])
    assert state.item_bias[0] == 3.0
    assert state.item_counts[0] == 2


def test_item_deltas_round_to_float32_after_each_add(make_store: MakeStore) -> None:
    store = make_store("explicit")
    tiny = 2.0**-30  # below float32 resolution at 1.0: lost on every add, as in the twin
    for offset in range(3):
        items = {"x": ([1.0, 1.0, 1.0], [tiny, 0.1, -0.1, 1e-3], 0)}
        store.apply(make_update(offsets={0: (offset, offset + 1)}, items=items))
    expected = np.float32([1.0, 1.0, 1.0, 0.0])
    for _ in range(3):
        expected = np.add(expected.astype(np.float64), [tiny, 0.1, -0.1, 1e-3]).astype(np.float32)
    state = read_all(store)
    np.testing.assert_array_equal(np.append(state.item_rows[0], state.item_bias[0]), expected)


@pytest.mark.parametrize(("mode", "first", "expected"), [("implicit", 3.0, 5.5), ("explicit", 2.0, 2.5)])
def test_interactions_add_in_implicit_and_set_in_explicit(
    make_store: MakeStore, mode: Mode, first: float, expected: float
) -> None:
    store = make_store(mode)
    store.apply(make_update(pairs=[("alice", "x", 1.0), ("alice", "x", 2.0)]))  # repeated in one update
    state = store.read_batch_state(["alice"], [], [("alice", "x")])
    assert state.pair_values.tolist() == [first]  # explicit: the last rating; implicit: both strengths
    store.apply(make_update(offsets={0: (1, 2)}, pairs=[("alice", "x", 2.5)]))
    state = store.read_batch_state(["alice"], [], [("alice", "x")])
    assert state.pair_values.tolist() == [expected]
    assert state.user_counts.tolist() == [1]


def test_implicit_gramians_follow_the_rows(make_store: MakeStore) -> None:
    """Each update carries the Gramian deltas of its rows (Σ after·afterᵀ − before·beforeᵀ, as the learner
    computes them) and the rows before; however a store keeps the Gramians (one sum, or a partial sum per
    shard), they read back as the Gramians of the rows."""
    store = make_store("implicit")
    rng = np.random.default_rng(7)
    users, items = ["alice", "bob", "carol", "dan"], ["x", "y", "z", "w", "v"]
    user_rows = {u: np.zeros(K, dtype=np.float32) for u in users}
    item_rows = {i: np.zeros(K, dtype=np.float32) for i in items}
    for offset in range(3):
        batch_users, batch_items = users[offset : offset + 2], items[offset : offset + 3]
        before_u = np.array([user_rows[u] for u in batch_users])
        before_i = np.array([item_rows[i] for i in batch_items])
        after_u = rng.normal(size=before_u.shape).astype(np.float32)
        delta_i = rng.normal(size=(len(batch_items), K))
        after_i = (before_i.astype(np.float64) + delta_i).astype(np.float32)
        wide = {name: rows.astype(np.float64) for name, rows in (("bu", before_u), ("au", after_u))}
        user_delta = wide["au"].T @ wide["au"] - wide["bu"].T @ wide["bu"]
        item_delta = after_i.astype(np.float64).T @ after_i - before_i.astype(np.float64).T @ before_i
        update = make_update(
            offsets={0: (offset, offset + 1)},
            users={u: [*row, 0.0] for u, row in zip(batch_users, after_u, strict=True)},
            items={
                i: (list(b), [*(a.astype(np.float64) - b), 0.0], 1)
                for i, b, a in zip(batch_items, before_i, after_i, strict=True)
            },
            gramian_deltas=(item_delta, user_delta),
        )
        store.apply(replace(update, user_rows_before=before_u, item_rows_before=before_i))
        user_rows.update(zip(batch_users, after_u, strict=True))
        item_rows.update(zip(batch_items, after_i, strict=True))
    state = read_all(store)
    all_users = np.array(list(user_rows.values()), dtype=np.float64)
    all_items = np.array(list(item_rows.values()), dtype=np.float64)
    np.testing.assert_allclose(state.item_gramian, all_items.T @ all_items, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(state.user_gramian, all_users.T @ all_users, rtol=1e-9, atol=1e-9)


def test_read_all_rows_and_global_mean(make_store: MakeStore) -> None:
    store = make_store("explicit")
    assert store.global_mean() == 0.0
    assert store.read_all_rows("items")[0] == []
    store.apply(
        make_update(
            users={"alice": [1, 2, 3, 0.5], "bob": [4, 5, 6, -0.5]},
            items={"x": ([1, 1, 1], [0, 0, 0, 0.25], 1)},
            value_sum=9.0,
            value_count=4,
        )
    )
    ids, factors, biases = store.read_all_rows("users")
    by_id = {ident: (factors[i].tolist(), float(biases[i])) for i, ident in enumerate(ids)}
    assert by_id == {"alice": ([1, 2, 3], 0.5), "bob": ([4, 5, 6], -0.5)}
    assert factors.dtype == biases.dtype == np.float32
    assert store.read_all_rows("items")[0] == ["x"]
    assert store.global_mean() == 2.25

    version = store.begin_version("wals")
    store.write_rows(version, "items", ["y", "z"], np.float32([[1, 2, 3], [4, 5, 6]]), np.float32([7, 8]))
    assert store.read_all_rows("items")[0] == ["x"]  # still the live version
    assert store.publish(version, expected_current=store.current_version())
    ids, factors, biases = store.read_all_rows("items")
    assert sorted(ids) == ["y", "z"]
    assert biases[ids.index("z")] == 8


def test_iter_interactions_yields_every_pair(make_store: MakeStore) -> None:
    store = make_store("implicit")
    pairs = [(f"u{u}", f"i{i}", float(u * 10 + i)) for u in range(25) for i in range(u % 4)]
    store.apply(make_update(pairs=pairs))
    seen = set()
    for users, items, values in store.iter_interactions(batch=4):
        assert len(users) == len(items) == len(values)
        seen |= set(zip(users.tolist(), items.tolist(), values.tolist(), strict=True))
    assert seen == set(pairs)


@pytest.mark.integration
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mode", ["explicit", "implicit"])
def test_redis_equals_memory_bit_for_bit(
    redis_client: redis.Redis, model_name: str, mode: Mode, seed: int
) -> None:
    """Random update streams (repeated items and pairs included) leave both stores in identical states."""
    rng = np.random.default_rng(seed)
    stores: list[RefreshableStore] = [
        MemoryStore(model_name, mode, K),
        RedisStore.open(redis_client, model_name, mode, K),
    ]
    for step in range(30):
        users = {f"u{u}": rng.normal(size=K + 1).tolist() for u in rng.integers(0, 8, 3)}
        items = {
            f"i{i}": (
                rng.normal(size=K).tolist(),
                (rng.normal(size=K + 1) * 0.01).tolist(),
                int(rng.integers(0, 3)),
            )
            for i in rng.integers(0, 10, 4)
        }
        pairs = [(f"u{u}", f"i{i}", float(rng.exponential())) for u, i in rng.integers(0, 8, (6, 2))]
        update = make_update(
            offsets={step % 2: (step, step + 1)},
            users=users,
            items=items,
            pairs=pairs,
            value_sum=float(rng.normal()),
            value_count=len(pairs),
            gramian_deltas=(rng.normal(size=(K, K)), rng.normal(size=(K, K))),
        )
        assert [s.apply(update) for s in stores] == [ApplyOutcome.APPLIED] * 2
    users, items = [f"u{u}" for u in range(9)], [f"i{i}" for i in range(11)]
    pairs = [(u, i) for u in users for i in items]
    memory, stored = (s.read_batch_state(users, items, pairs) for s in stores)
    for name in memory.__dataclass_fields__:
        left, right = getattr(memory, name), getattr(stored, name)
        if isinstance(left, np.ndarray):
            np.testing.assert_array_equal(left, right, err_msg=name)
        else:
            assert left == right, name
    assert stores[0].applied_offsets() == stores[1].applied_offsets()
    assert stores[0].events_applied() == stores[1].events_applied()


def _second_writer(store: RefreshableStore) -> RefreshableStore:
    """Another writer of the same model: a second Redis handle (as another replica has), or the twin."""
    if isinstance(store, RedisStore):
        return RedisStore.attach(store._client, store.keys.name)
    return store


def test_a_write_between_read_and_apply_is_added_to_not_overwritten(make_store: MakeStore) -> None:
    # The Redis store sends apply the item sums it computed from its last read; an item another writer
    # changed since must still get the stored row + delta, and an untouched one the same bytes as the twin.
    store = make_store("implicit")
    twin = MemoryStore("twin", "implicit", K, {"reg": 0.05})
    rng = np.random.default_rng(5)

    def gramians() -> tuple[np.ndarray, np.ndarray]:
        return rng.normal(size=(K, K)) / 7, rng.normal(size=(K, K)) / 7

    def items(*names: str) -> dict[str, tuple[list[float], list[float], int]]:
        return {n: (rng.normal(size=K).tolist(), (rng.normal(size=K + 1) / 3).tolist(), 1) for n in names}

    first = make_update(
        offsets={0: (0, 1)}, items=items("x", "y"), pairs=[("alice", "x", 1.0)], gramian_deltas=gramians()
    )
    other = make_update(
        offsets={1: (0, 1)}, items=items("x"), pairs=[("bob", "x", 2.0)], gramian_deltas=gramians()
    )
    late = make_update(
        offsets={0: (1, 2)},
        items=items("x", "y", "z"),
        pairs=[("alice", "x", 0.5), ("alice", "y", 1.5)],
        gramian_deltas=gramians(),
    )
    for update in (first, other, late):
        assert twin.apply(update) is ApplyOutcome.APPLIED

    assert store.apply(first) is ApplyOutcome.APPLIED
    store.read_batch_state(["alice"], ["x", "y", "z"], [("alice", "x"), ("alice", "y")])
    assert _second_writer(store).apply(other) is ApplyOutcome.APPLIED  # x and both Gramians move
    assert store.apply(late) is ApplyOutcome.APPLIED

    assert_same_state(read_all(store), read_all(twin))


def test_writers_racing_on_items_keep_the_item_gramian_the_gramian_of_the_rows(make_store: MakeStore) -> None:
    """Two replicas share items: one reads x and y, the other changes x (and adds z), then the first
    applies what it computed from its read. The store writes x as stored + delta, not the row the first
    writer's Gramian change counts, so it adds the difference: the item Gramian stays Σ v·vᵀ over the
    stored rows (without it, it drifts with every race until it is no longer positive definite). Redis,
    sharded or not, gives the twin's bits."""
    store = make_store("implicit")
    twin = MemoryStore("twin", "implicit", K, {"reg": 0.05})
    rng = np.random.default_rng(11)

    def learnt(offsets: dict[int, tuple[int, int]], read: dict[str, np.ndarray | None]) -> BatchUpdate:
        """What a learner computes from the rows it read (None: absent, entering from a new base)."""
        base = np.array(
            [row if row is not None else rng.normal(size=K) for row in read.values()], dtype=np.float32
        )
        before = np.array(
            [row if row is not None else np.zeros(K) for row in read.values()], dtype=np.float32
        )
        after = (base + rng.normal(size=base.shape) / 3).astype(np.float32)
        delta = after.astype(np.float64) - base.astype(np.float64)
        item_delta = after.astype(np.float64).T @ after - before.astype(np.float64).T @ before
        update = make_update(
            offsets=offsets,
            items={name: (list(b), [*d, 0.0], 1) for name, b, d in zip(read, base, delta, strict=True)},
            gramian_deltas=(item_delta, np.zeros((K, K))),
        )
        return replace(update, item_rows_before=before)

    def rows(state: BatchState, names: list[str]) -> dict[str, np.ndarray | None]:
        at = {name: r for r, name in enumerate(["x", "y", "z"])}
        return {n: state.item_rows[at[n]] if state.item_present[at[n]] else None for n in names}

    first = learnt({0: (0, 1)}, {"x": None, "y": None})
    for target in (store, twin):
        assert target.apply(first) is ApplyOutcome.APPLIED
    other = learnt({1: (0, 1)}, {**rows(read_all(twin), ["x"]), "z": None})  # the other replica's read
    late = learnt({0: (1, 2)}, rows(read_all(store), ["x", "y"]))  # the first writer reads x and y ...
    assert _second_writer(store).apply(other) is ApplyOutcome.APPLIED  # ... while x moves under it
    assert store.apply(late) is ApplyOutcome.APPLIED
    for update in (other, late):
        assert twin.apply(update) is ApplyOutcome.APPLIED

    state = read_all(store)
    stored = state.item_rows[state.item_present].astype(np.float64)
    np.testing.assert_allclose(state.item_gramian, stored.T @ stored, rtol=1e-9, atol=1e-12)
    assert_same_state(state, read_all(twin))


@pytest.mark.parametrize("half_life", [3.0, 0.5, float("inf")])  # 0.5: the weights pass 2^60, a rescale
def test_decayed_popularity_matches_the_per_event_definition(make_store: MakeStore, half_life: float) -> None:
    from streammf.model.popularity import add_events, batch_item_weights, decayed_counts

    store = make_store("implicit")
    rng = np.random.default_rng(8)
    catalogue = [f"i{j}" for j in range(12)]
    log = [catalogue[j] for j in rng.zipf(1.6, 90) % len(catalogue)]
    for first in range(0, len(log), 30):
        batch = log[first : first + 30]
        items = list(dict.fromkeys(batch))
        update = make_update(
            offsets={0: (first, first + len(batch))},
            items={item: ([0.0] * K, [0.0] * (K + 1), 1) for item in items},
            pairs=[(f"u{first + t}", item, 1.0) for t, item in enumerate(batch)],
        )
        weights = batch_item_weights(np.array([items.index(i) for i in batch]), len(items), half_life)
        update = replace(update, item_popularity=weights, popularity_half_life=half_life)
        assert store.apply(update) is ApplyOutcome.APPLIED

    scores = np.zeros(len(catalogue))
    origin = add_events(
        scores, np.array([catalogue.index(i) for i in log]), np.arange(len(log)), 0.0, half_life
    )
    expected = decayed_counts(scores, len(log), origin, half_life)
    got = store.popular_items(5, exclude=["i0"])
    # Ties (plain counts) in Redis' ZREVRANGE order: higher id first.
    candidates = [j for j in range(len(catalogue)) if catalogue[j] != "i0"]
    order = sorted(candidates, key=lambda j: (expected[j], catalogue[j].encode()), reverse=True)
    assert [item for item, _ in got] == [catalogue[j] for j in order[:5]]
    np.testing.assert_allclose([count for _, count in got], expected[order[:5]], rtol=1e-9)
    assert store.popular_items(0) == []
