"""A model split in shards (STREAMMF_REDIS__SHARDS), on one Redis and on the local stack's three-primary
Redis Cluster: what holds when a crash falls between the shard writes of a batch or of a publish, that S=1
and S=3 stores fed the same events answer the same, and that the shards spread over the primaries."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import redis
from click.testing import CliRunner

from streammf.cli import cli
from streammf.client import StreamMFClient, VersionUnavailableError
from streammf.model.factors import LossParams, Mode
from streammf.model.sgd import SgdParams
from streammf.store.contract import ApplyOutcome, RefreshableStore, StoreError
from streammf.store.layout import ModelKeys, delete_model, read_model_meta
from streammf.store.memory import MemoryStore
from streammf.store.redis_store import ModelMismatchError, RedisStore, open_shard
from streammf.store.shards import shard_of, shard_tags
from streammf.stream.events import Event, EventColumns
from streammf.stream.learner import Learner, LearnerParams, _BatchPlan
from streammf.stream.refresh import refresh

K = 4
Where = tuple[redis.Redis, str]  # a client and a model name


class _Crash(Exception):
    """Stands for the process dying at that point."""


@pytest.fixture(params=["redis", "cluster"])
def where(request: pytest.FixtureRequest) -> Where:
    if request.param == "cluster":
        return request.getfixturevalue("redis_cluster_client"), request.getfixturevalue("cluster_model_name")
    return request.getfixturevalue("redis_client"), request.getfixturevalue("model_name")


def _params(mode: Mode) -> LearnerParams:
    return LearnerParams(SgdParams(LossParams(mode, w0=0.1)), init_std=0.1, seed=3)


def _events(n: int, seed: int = 1) -> list[Event]:
    rng = np.random.default_rng(seed)
    return [
        Event(user_id=f"u{rng.integers(40)}", item_id=f"i{rng.integers(60)}", value=float(rng.integers(1, 6)))
        for _ in range(n)
    ]


def _interactions(store: RefreshableStore) -> dict[tuple[str, str], float]:
    found: dict[tuple[str, str], float] = {}
    for users, items, values in store.iter_interactions():
        found.update(((u, i), v) for u, i, v in zip(users, items, values, strict=True))
    return found


def _crash_after_shards(store: RedisStore, n: int) -> Callable[[], None]:
    """From now on the store's process 'dies' after `n` shard writes of a batch; returns the undo."""
    real = store._apply_shard
    done = [0]

    def apply_shard(s: int, update: Any, part: str, counts: Any, **options: Any) -> ApplyOutcome:
        if done[0] >= n:
            raise _Crash
        done[0] += 1
        return real(s, update, part, counts, **options)

    store._apply_shard = apply_shard  # type: ignore[method-assign]
    return lambda: setattr(store, "_apply_shard", real)


def _shard_incarnations(client: redis.Redis, name: str) -> list[bytes | None]:
    keys = ModelKeys(name)
    return [client.hget(keys.shard(tag).stats, "incarnation") for tag in shard_tags(name, 3)]


def _learns_on_every_shard(store: RedisStore) -> None:
    """A batch touching every shard is accepted: the store writes as the creation each shard holds."""
    events = _events(200, seed=5)
    Learner(store, _params("explicit")).learn(events, {0: (0, len(events))})
    assert _interactions(store) == {(e.user_id, e.item_id): e.value for e in events}


def _open_one_shard(client: redis.Redis, name: str, s: int, incarnation: str) -> None:
    open_shard(client, ModelKeys(name).shard(shard_tags(name, 3)[s]), b"", incarnation)


def test_a_creator_that_finds_a_shard_opened_by_another_creator_joins_that_creation(where: Where) -> None:
    """Another creator has opened shard 0 and not yet the others: this one adopts shard 0's incarnation
    for every shard, so neither creator's writes are refused later as those of an older creation."""
    client, name = where
    _open_one_shard(client, name, 0, "the-other-creator")
    store = RedisStore.open(client, name, "explicit", K, shards=3)
    assert store.incarnation == "the-other-creator"
    assert _shard_incarnations(client, name) == [b"the-other-creator"] * 3
    late = RedisStore.open(client, name, "explicit", K, shards=3)  # the other creator finishing
    assert late.incarnation == "the-other-creator"
    _learns_on_every_shard(store)
    _learns_on_every_shard(late)


def test_creating_over_a_shard_left_by_another_creation_says_so_and_creates_nothing(where: Where) -> None:
    client, name = where
    _open_one_shard(client, name, 1, "an-older-creation")
    with pytest.raises(StoreError, match="shard 1 holds keys of another creation"):
        RedisStore.open(client, name, "explicit", K, shards=3)
    assert not client.exists(ModelKeys(name).meta)


def test_two_creators_of_a_sharded_model_at_the_same_moment_both_write_to_it(where: Where) -> None:
    client, name = where
    for round_ in range(10):
        model = f"{name}-{round_}"
        start = threading.Barrier(2)

        def create(model: str = model, start: threading.Barrier = start) -> RedisStore:
            start.wait()
            return RedisStore.open(client, model, "explicit", K, shards=3)

        try:
            with ThreadPoolExecutor(2) as pool:
                stores = list(pool.map(lambda _: create(), range(2)))
            held = _shard_incarnations(client, model)
            assert len(set(held)) == 1 and held[0]
            assert {s.incarnation.encode() for s in stores} == {held[0]}
            for store in stores:
                _learns_on_every_shard(store)
        finally:
            delete_model(client, model)


def test_shard_tags_fall_in_equal_slot_ranges_and_ids_hash_by_crc32() -> None:
    from redis.crc import key_slot

    tags = shard_tags("default", 3)
    assert [key_slot(f"streammf:{{{tag}}}:current".encode()) * 3 // 16384 for tag in tags] == [0, 1, 2]
    assert shard_tags("default", 1) == ["default"]
    # The README's worked example.
    assert (shard_of("user-42", 3), shard_of("item-8", 3), shard_of("alice", 3)) == (1, 0, 2)


# A batch on three shards is six scripts: the item part on shards 0-2, then the user part on shards 0-2.
@pytest.mark.parametrize(
    ("mode", "crash_after"), [("explicit", 1), ("implicit", 2), ("explicit", 4), ("implicit", 5)]
)
def test_a_crash_between_the_shard_writes_of_a_batch_is_completed_by_the_replay(
    where: Where, mode: Mode, crash_after: int
) -> None:
    client, name = where
    store = RedisStore.open(client, name, mode, K, shards=3)
    twin = MemoryStore("twin", mode, K)
    events = _events(600)
    Learner(store, _params(mode)).learn(events[:300], {0: (0, 300)})
    Learner(twin, _params(mode)).learn(events, {0: (0, 600)})

    undo = _crash_after_shards(store, crash_after)
    with pytest.raises(_Crash):
        Learner(store, _params(mode)).learn(events[300:], {0: (300, 600)})
    undo()

    restarted = RedisStore.attach(client, name)  # a new process: it knows only what the store holds
    assert restarted.applied_offsets() == {0: 300}, "resume from the shard furthest behind"
    assert restarted.offsets_ahead() == {0: 600}, "and end the first batch where the furthest one stands"
    replay = Learner(restarted, _params(mode)).learn(events[300:], {0: (300, 600)})
    assert replay.outcome is ApplyOutcome.APPLIED
    assert restarted.applied_offsets() == {0: 600} and restarted.offsets_ahead() == {}
    again = Learner(restarted, _params(mode)).learn(events[300:], {0: (300, 600)})
    assert again.outcome is ApplyOutcome.DUPLICATE

    # Every event once on every shard: interactions, counts, the stats copies, the clock.
    assert _interactions(restarted) == pytest.approx(_interactions(twin))
    items = sorted({e.item_id for e in events})
    state, twin_state = (s.read_batch_state([], items, []) for s in (restarted, twin))
    assert state.item_counts.tolist() == twin_state.item_counts.tolist()
    assert (state.value_sum, state.value_count) == pytest.approx(
        (twin_state.value_sum, twin_state.value_count)
    )
    for shard in restarted.shards:
        assert int(client.hget(shard.stats, "events_applied")) == 600
    # Factors: every row there and finite; their values are those of a valid SGD order (the replayed part
    # was computed from the rows the first shard had already updated), not bit-equal to an uncrashed run.
    users = sorted({e.user_id for e in events})
    full = restarted.read_batch_state(users, items, [])
    assert full.user_present.all() and full.item_present.all()
    assert np.isfinite(full.user_rows).all() and np.isfinite(full.item_rows).all()
    if mode == "implicit":  # each shard's partial Gramian is still the Gramian of its own rows
        for side, rows in (("users", full.user_rows), ("items", full.item_rows)):
            gramian = getattr(full, f"{side[:-1]}_gramian")
            wide = rows.astype(np.float64)
            np.testing.assert_allclose(gramian, wide.T @ wide, rtol=1e-6, atol=1e-6)


def test_a_crash_between_the_control_switch_and_a_shard_is_rolled_forward_by_the_next_writer(
    where: Where,
) -> None:
    client, name = where
    params = _params("implicit")
    store = RedisStore.open(client, name, "implicit", K, shards=3)
    events = _events(900)
    Learner(store, params).learn(events[:300], {0: (0, 300)})
    real = store._publish_shard

    def publish_shard(s: int, version: int, expected: int, mode: str) -> bool:
        if mode == "force" and s == 2:
            raise _Crash
        return real(s, version, expected, mode)

    store._publish_shard = publish_shard  # type: ignore[method-assign]
    with pytest.raises(_Crash):
        refresh(store, params, 2)
    store._publish_shard = real  # type: ignore[method-assign]
    assert store.current_version() == 2
    assert [int(client.get(shard.current)) for shard in store.shards] == [2, 2, 1]

    reader = StreamMFClient(client, name, max_attempts=2)
    with pytest.raises(VersionUnavailableError):  # never shard 0 at v2 and shard 2 at v1 in one answer
        reader.recommend("u1")
    stale = RedisStore.attach(client, name)
    assert Learner(stale, params).learn(events[300:600], {0: (300, 600)}).outcome is ApplyOutcome.APPLIED
    assert [int(client.get(shard.current)) for shard in store.shards] == [2, 2, 2]
    assert reader.recommend("u1"), "readers see version 2 on every shard"
    assert store.events_applied() == 600


def test_a_refresh_publishes_on_every_shard_refuses_stale_writers_everywhere_and_collects_everywhere(
    where: Where,
) -> None:
    client, name = where
    params = _params("implicit")
    store = RedisStore.open(client, name, "implicit", K, shards=3)
    events = _events(900)
    learner = Learner(store, params)
    learner.learn(events[:300], {0: (0, 300)})
    plan = _BatchPlan.of(EventColumns.of(events[300:310]))
    state = store.read_batch_state(plan.users, plan.items, plan.pairs)  # a writer reads version 1
    report = refresh(store, params, 2)
    assert report.published and report.version == 2
    assert [int(client.get(shard.current)) for shard in store.shards] == [2, 2, 2]
    # Its update, computed against version 1, is refused on every shard (the first one it reaches
    # refuses it, and nothing of it lands anywhere).
    stale_update, _ = Learner(store, params).compute(plan, state, {0: (300, 310)})
    assert state.version == 1
    assert store.apply(stale_update) is ApplyOutcome.STALE_VERSION
    assert store.applied_offsets() == {0: 300}
    assert learner.learn(events[300:], {0: (300, 900)}).outcome is ApplyOutcome.APPLIED
    # Gramians stay exact: the partial sums add up to the Gramian of all rows.
    users, items = sorted({e.user_id for e in events}), sorted({e.item_id for e in events})
    full = store.read_batch_state(users, items, [])
    for gramian, rows in ((full.user_gramian, full.user_rows), (full.item_gramian, full.item_rows)):
        wide = rows.astype(np.float64)
        np.testing.assert_allclose(gramian, wide.T @ wide, rtol=1e-5, atol=1e-5)
    assert store.collect_garbage(grace_s=0.0) == [1]
    for shard in store.shards:
        assert not client.exists(*shard.version_keys(1))
        assert client.exists(shard.rows(2, "users"))


def _fed(client: redis.Redis, name: str, mode: Mode, shards: int, events: list[Event]) -> StreamMFClient:
    store = RedisStore.open(client, name, mode, K, shards=shards)
    learner = Learner(store, _params(mode))
    for first in range(0, len(events), 250):
        learner.learn(events[first : first + 250], {0: (first, first + 250)})
    assert refresh(store, _params(mode), 2).published
    learner.learn(_events(200, seed=9), {0: (len(events), len(events) + 200)})
    return StreamMFClient(client, name)


@pytest.mark.parametrize("mode", ["explicit", "implicit"])
def test_one_shard_and_three_shards_fed_the_same_events_answer_the_same(
    where: Where, redis_client: redis.Redis, model_name: str, mode: Mode
) -> None:
    client, name = where
    events = _events(1000)
    one = _fed(redis_client, model_name + "-one", mode, 1, events)
    three = _fed(client, name, mode, 3, events)
    try:
        assert read_model_meta(client, ModelKeys(name)).shards == 3
        for user in ["u0", "u7", "u13", "nobody"]:
            a, b = one.recommend(user, k=10), three.recommend(user, k=10)
            _same_answer(a, b, exact=mode == "explicit")
        for item in ["i0", "i5", "i42"]:
            _same_answer(one.similar_items(item, k=10), three.similar_items(item, k=10), mode == "explicit")
        vectors = one.item_vectors(["i1", "i2", "zzz"]), three.item_vectors(["i1", "i2", "zzz"])
        assert vectors[0].keys() == vectors[1].keys() == {"i1", "i2"}
        for item in vectors[0]:
            np.testing.assert_allclose(vectors[0][item], vectors[1][item], rtol=1e-4, atol=1e-6)
    finally:
        delete_model(redis_client, model_name + "-one")


def _same_answer(a: list[tuple[str, float]], b: list[tuple[str, float]], exact: bool) -> None:
    """Explicit models are bit-equal across S (same arithmetic); implicit ones sum their Gramians from
    partial sums, so scores agree to float rounding and ids may swap only where scores tie that closely."""
    if exact:
        assert a == b
        return
    assert len(a) == len(b)
    np.testing.assert_allclose([s for _, s in a], [s for _, s in b], rtol=1e-4, atol=1e-6)
    for (item_a, score_a), (item_b, _) in zip(a, b, strict=True):
        if item_a != item_b:
            assert any(abs(score_a - s) < 1e-4 for i, s in a if i == item_b), (a, b)


def test_the_cli_reads_a_sharded_model_on_the_cluster(
    redis_cluster_url: str,
    redis_cluster_client: redis.Redis,
    cluster_model_name: str,
    redis_client: redis.Redis,
    model_name: str,
) -> None:
    events = _events(800)
    one = _fed(redis_client, model_name, "explicit", 1, events)
    _fed(redis_cluster_client, cluster_model_name, "explicit", 3, events)
    env = {"STREAMMF_REDIS__URL": redis_cluster_url, "STREAMMF_MODEL__NAME": cluster_model_name}
    for command, ident, expected in (
        ("recommend", "u3", one.recommend("u3", k=5)),
        ("similar", "i7", one.similar_items("i7", k=5)),
    ):
        result = CliRunner().invoke(cli, [command, ident, "-k", "5"], env=env)
        assert result.exit_code == 0, result.output
        assert result.output == "".join(f"{item}\t{score:.4f}\n" for item, score in expected)


@pytest.mark.parametrize("mode", ["explicit", "implicit"])
def test_forgetting_a_user_on_three_shards_matches_the_twin_and_survives_a_crash_between_shards(
    where: Where, mode: Mode
) -> None:
    client, name = where
    store = RedisStore.open(client, name, mode, K, shards=3)
    twin = MemoryStore("twin", mode, K)
    events = _events(500)
    for target in (store, twin):
        Learner(target, _params(mode)).learn(events, {0: (0, 500)})
    old = store.current_version()
    assert refresh(store, _params(mode), 1).published and refresh(twin, _params(mode), 1).published
    user = "u3"
    home = store.shards[shard_of(user, 3)]
    assert client.hexists(home.rows(old, "users"), user)

    # The other shards' part done, then the process dies before the user's own shard.
    real = store._forget_home

    def die(*args: Any) -> ApplyOutcome:
        raise _Crash

    store._forget_home = die  # type: ignore[method-assign]
    with pytest.raises(_Crash):
        store.forget_user(user, {0: (500, 501)})
    store._forget_home = real  # type: ignore[method-assign]
    assert store.applied_offsets() == {0: 500} and store.offsets_ahead() == {0: 501}
    assert store.forget_user(user, {0: (500, 501)}) is ApplyOutcome.APPLIED  # the replay completes it
    assert twin.forget_user(user, {0: (500, 501)}) is ApplyOutcome.APPLIED
    assert store.forget_user(user, {0: (500, 501)}) is ApplyOutcome.DUPLICATE
    assert store.applied_offsets() == {0: 501} and store.offsets_ahead() == {}

    live = store.current_version()
    for version in (old, live):
        assert not client.hexists(home.rows(version, "users"), user), version
    assert not client.exists(home.inter(user))
    users, items = sorted({e.user_id for e in events}), sorted({e.item_id for e in events})
    state, expected = store.read_batch_state(users, items, []), twin.read_batch_state(users, items, [])
    assert state.user_present.tolist() == expected.user_present.tolist()
    assert state.item_counts.tolist() == expected.item_counts.tolist()
    assert (state.value_count, state.value_sum) == (expected.value_count, pytest.approx(expected.value_sum))
    for shard in store.shards:  # every copy of the stats
        assert int(client.hget(shard.stats, "value_count")) == expected.value_count
    if mode == "implicit":
        np.testing.assert_allclose(state.user_gramian, expected.user_gramian, atol=1e-5)


def test_the_configured_url_may_name_a_cluster_and_every_primary_is_checked_for_eviction(
    redis_cluster_url: str, redis_cluster_client: redis.Redis, cluster_model_name: str
) -> None:
    from redis.cluster import RedisCluster

    from streammf.config import RedisSettings, Settings
    from streammf.store.connect import redis_client
    from streammf.store.contract import StoreUnsafeError

    settings = Settings(redis=RedisSettings(url=redis_cluster_url, shards=3))
    client = redis_client(settings)
    try:
        assert isinstance(client, RedisCluster)
        store = RedisStore.open(client, cluster_model_name, "explicit", K, shards=3)
        assert store.check_eviction_policy(allow_eviction=False) == "noeviction"
        last = client.get_primaries()[-1]  # type: ignore[attr-defined]
        client.config_set("maxmemory-policy", "allkeys-lru", target_nodes=last)  # type: ignore[call-arg]
        try:
            with pytest.raises(StoreUnsafeError, match="allkeys-lru"):
                store.check_eviction_policy(allow_eviction=False)
        finally:
            client.config_set("maxmemory-policy", "noeviction", target_nodes=last)  # type: ignore[call-arg]
        with pytest.raises(ModelMismatchError, match=r"3 shard\(s\), asked for 1"):
            RedisStore.open(client, cluster_model_name, "explicit", K, shards=1)
    finally:
        client.close()


def test_a_refresh_pause_lets_a_half_applied_batch_finish_and_waits_for_it(where: Where) -> None:
    # The item part of a batch is in on every shard when the refresh pauses writers: its user part must
    # still land in the live version before the refresh takes the changes, or the new version would miss
    # it (and new items of it would have no interactions yet).
    import threading

    client, name = where
    params = _params("implicit")
    store = RedisStore.open(client, name, "implicit", K, shards=3)
    events = _events(600)
    Learner(store, params).learn(events[:300], {0: (0, 300)})
    undo = _crash_after_shards(store, 3)  # the item part on the three shards, no user part
    with pytest.raises(_Crash):
        Learner(store, params).learn(events[300:], {0: (300, 600)})
    undo()
    assert store.track_changes(1)
    store.take_changes(1)
    paused: list[bool] = []
    pausing = threading.Thread(target=lambda: paused.append(store.pause_writes(1, ttl_s=30.0)))
    pausing.start()
    pausing.join(0.5)
    assert pausing.is_alive(), "the pause waits for the half-applied batch"
    replay = Learner(RedisStore.attach(client, name), params).learn(events[300:], {0: (300, 600)})
    assert replay.outcome is ApplyOutcome.APPLIED, "its user part goes through the pause"
    pausing.join(10)
    assert paused == [True]
    users, _ = store.take_changes(1)
    assert set(users) == {e.user_id for e in events[300:]}
    late = Learner(RedisStore.attach(client, name), params)
    store.resume_writes(1)
    assert late.learn(_events(10, seed=4), {0: (600, 610)}).outcome is ApplyOutcome.APPLIED


@pytest.mark.parametrize("lost_shard", [0, 1, 2])
def test_a_shard_that_comes_back_without_its_last_batch_is_completed_exactly_by_the_replay(
    where: Where, lost_shard: int
) -> None:
    # A primary killed between AOF fsyncs (or a failover to a lagging replica) loses writes it had
    # acknowledged: its shard is back at an earlier batch while the others kept the later one. Every
    # count, interaction and stat must come out as in an uninterrupted run: each shard counts the new
    # pairs of its own users, so losing a batch loses its newness and its counts together.
    from collections import Counter

    from streammf.store.layout import scan_keys

    client, name = where
    params = _params("explicit")
    rng = np.random.default_rng(1)
    seen: set[tuple[str, str]] = set()
    events: list[Event] = []
    while len(events) < 600:  # distinct pairs: item counts are then the number of events per item
        e = Event(
            user_id=f"u{rng.integers(40)}", item_id=f"i{rng.integers(60)}", value=float(rng.integers(1, 6))
        )
        if (e.user_id, e.item_id) not in seen:
            seen.add((e.user_id, e.item_id))
            events.append(e)
    store = RedisStore.open(client, name, "explicit", K, shards=3)
    Learner(store, params).learn(events[:300], {0: (0, 300)})
    shard = store.shards[lost_shard]
    saved = {key: client.dump(key) for key in scan_keys(client, shard.prefix)}
    Learner(store, params).learn(events[300:], {0: (300, 600)})
    for key in list(scan_keys(client, shard.prefix)):  # the shard comes back as it was after batch 1
        client.delete(key)
    for key, blob in saved.items():
        client.restore(key, 0, blob, replace=True)

    restarted = RedisStore.attach(client, name)
    assert restarted.applied_offsets() == {0: 300} and restarted.offsets_ahead() == {0: 600}
    assert Learner(restarted, params).learn(events[300:], {0: (300, 600)}).outcome is ApplyOutcome.APPLIED
    expected = Counter(e.item_id for e in events)
    items = sorted(expected)
    assert restarted.read_batch_state([], items, []).item_counts.tolist() == [expected[i] for i in items]
    assert sum(len(chunk[0]) for chunk in restarted.iter_interactions()) == len(events)
    for part in restarted.shards:
        stats = client.hgetall(part.stats)
        assert (int(stats[b"events_applied"]), int(stats[b"value_count"])) == (600, 600)


def test_a_partition_whose_first_batch_is_torn_resumes_from_its_beginning(where: Where) -> None:
    # Some parts have the partition, others none of it (a crash, or its previous owner still applying):
    # the store knows the partition (not lost), and the parts without it need it from the start.
    client, name = where
    store = RedisStore.open(client, name, "explicit", K, shards=3)
    events = _events(300)
    undo = _crash_after_shards(store, 2)
    with pytest.raises(_Crash):
        Learner(store, _params("explicit")).learn(events, {0: (0, 300)})
    undo()
    assert store.applied_offsets() == {0: 0} and store.offsets_ahead() == {0: 300}
    assert Learner(store, _params("explicit")).learn(events, {0: (0, 300)}).outcome is ApplyOutcome.APPLIED
    assert store.applied_offsets() == {0: 300} and store.offsets_ahead() == {}
    assert store.events_applied() == 300 and sum(len(c[0]) for c in store.iter_interactions()) > 0


def test_a_pause_that_cannot_hand_over_resumes_the_writers_at_once(where: Where) -> None:
    # A half-applied batch whose writer died: the refresh does not hand over, and must not leave the
    # shards paused until the pause runs out (every writer would stall that long).
    client, name = where
    store = RedisStore.open(client, name, "explicit", K, shards=3)
    undo = _crash_after_shards(store, 2)
    with pytest.raises(_Crash):
        Learner(store, _params("explicit")).learn(_events(100), {0: (0, 100)})
    undo()
    assert store.pause_writes(1, ttl_s=1.0) is False
    assert not any(client.hexists(shard.version_meta(1), "paused_until") for shard in store.shards)
    other = Learner(store, _params("explicit")).learn(_events(50, seed=5), {1: (0, 50)})
    assert other.outcome is ApplyOutcome.APPLIED, "another partition's writer goes on"
