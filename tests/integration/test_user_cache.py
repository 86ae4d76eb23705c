"""A writer's copy of its users (streammf.store.user_cache) on a real Redis: a model written by writers
that keep one is byte for byte the model written by writers that read everything, whatever else writes
in between (another writer, a forgotten user, a refresh), and the copy is really used. Models of one shard
and of three (each shard's users copied under a stamp of its own) alike."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import redis

from streammf.model.factors import LossParams
from streammf.model.sgd import SgdParams
from streammf.store import scripts
from streammf.store.contract import ApplyOutcome, BatchUpdate
from streammf.store.layout import KEY_ROOT, delete_model, value_texts
from streammf.store.redis_store import RedisStore
from streammf.store.user_cache import UserCache
from streammf.stream.events import Event, EventColumns
from streammf.stream.learner import Learner, LearnerParams
from streammf.stream.refresh import refresh

K = 6
# Fields a run sets differently however the model was written: the creation's id, the writer stamps,
# clock times and names.
_RUN_FIELDS = {b"incarnation", b"writer", b"name", b"shard_tags"}


@pytest.fixture
def plain_name(redis_client: redis.Redis, model_name: str) -> Iterator[str]:
    """A second model, written by writers without a copy, to compare with."""
    name = model_name + "-plain"
    yield name
    delete_model(redis_client, name)


def model_contents(client: redis.Redis, name: str) -> dict[str, object]:
    """Every key of the model (its name cut out, a shard's tag cut to its number) with its content;
    stats without the run's own fields."""
    root = f"{KEY_ROOT}:{{{name}"
    out: dict[str, object] = {}
    for key in client.scan_iter(match=root + "[}/]*"):
        kind = client.type(key)
        if kind == b"hash":
            hash_ = client.hgetall(key).items()
            value: object = {f: v for f, v in hash_ if f not in _RUN_FIELDS and not f.endswith(b"_at")}
        elif kind == b"zset":  # `retired` scores versions by the time they were
            value = client.zrange(key, 0, -1, withscores=not key.endswith(b":retired"))
        elif kind == b"set":
            value = client.smembers(key)
        else:
            value = client.get(key)
        out[re.sub(r"^/(\d+)\.\d+", r"/\1", key.decode()[len(root) :])] = value
    return out


def batches(mode: str, seed: int) -> list[list[Event]]:
    """Batches over few users and items: users come back, pairs repeat (implicit strengths add up)."""
    rng = np.random.default_rng(seed)
    value = (lambda: float(rng.integers(1, 6))) if mode == "explicit" else (lambda: float(rng.integers(1, 4)))
    return [
        [
            Event(user_id=f"u{rng.integers(25)}", item_id=f"i{rng.integers(15)}", value=value())
            for _ in range(40)
        ]
        for _ in range(12)
    ]


def params(mode: str) -> LearnerParams:
    return LearnerParams(SgdParams(LossParams(mode), 0.05, 0.02), seed=3, max_abs_factor=100.0)


def run(
    client: redis.Redis,
    name: str,
    mode: str,
    shards: int,
    cache: bool,
    script: list[tuple[Any, ...]],
    ahead: list[bool] | None = None,
) -> list[int]:
    """Carry out `script` on model `name` with two writers (each its own store, as two replicas), a
    forgetting tool and a refresher; returns how many users writer 0 held in its copy before each step.

    With `ahead`, writer 0 computes its next batch while each of its applies runs (`Learner.learn_ahead`,
    as the learner's process does when the loop has handed it over), whatever the others do before that
    batch's turn; `ahead` gets, per batch of writer 0 after the first, whether it came computed."""
    RedisStore.open(client, name, mode, K, shards=shards)
    stores = [RedisStore.attach(client, name) for _ in range(2)]
    for store in stores:
        store.cache_users(10_000 if cache else 0)
    learners = [Learner(store, params(mode)) for store in stores]
    mine = [step[2] for step in script if step[0] == "learn" and step[1] == 0]
    offsets = list(itertools.accumulate((len(events) for events in mine), initial=0))
    next_offset = [0, 0]
    held = []
    computed = None
    for step in script:
        held.append(stores[0].users_held())
        if step[0] == "learn":
            writer, events = step[1], step[2]
            first = next_offset[writer]
            next_offset[writer] = first + len(events)
            if writer == 0 and ahead is not None:
                t = offsets.index(first)
                following = None
                if t + 1 < len(mine):
                    following = (EventColumns.of(mine[t + 1]), {0: (offsets[t + 1], offsets[t + 2])})
                if t > 0:
                    ahead.append(computed is not None)
                result, computed = learners[0].learn_ahead(
                    EventColumns.of(events),
                    {0: (first, first + len(events))},
                    None,
                    lambda following=following: following,  # type: ignore[misc]
                    computed,
                )
            else:
                result = learners[writer].learn(events, {writer: (first, first + len(events))})
            assert result.outcome is ApplyOutcome.APPLIED
        elif step[0] == "forget":
            assert RedisStore.attach(client, name).forget_user(step[1]) is ApplyOutcome.APPLIED
        elif step[0] == "refresh":
            assert refresh(RedisStore.attach(client, name), params(mode), 2).published
    return held


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("mode", ["explicit", "implicit"])
def test_one_writer_with_a_copy_writes_what_a_writer_without_one_writes(
    redis_client: redis.Redis, model_name: str, plain_name: str, mode: str, shards: int
) -> None:
    script = [("learn", 0, batch) for batch in batches(mode, seed=1)]
    held = run(redis_client, model_name, mode, shards, True, script)
    run(redis_client, plain_name, mode, shards, False, script)
    assert max(held) > 0, "the writer never held a user: the copy was not exercised"
    assert held == sorted(held), "one writer alone should never lose its copy"
    assert model_contents(redis_client, model_name) == model_contents(redis_client, plain_name)


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("mode", ["explicit", "implicit"])
def test_other_writes_in_between_leave_no_stale_copy(
    redis_client: redis.Redis, model_name: str, plain_name: str, mode: str, shards: int
) -> None:
    """Another writer touching the same users (events keyed wrongly), a forgotten user and a refresh
    between writer 0's batches: its copy is dropped each time, and the model is the same as without it."""
    b = batches(mode, seed=2)
    forgotten = b[1][0].user_id
    script: list[tuple[Any, ...]] = [
        ("learn", 0, b[0]),
        ("learn", 0, b[1]),
        ("learn", 1, b[2]),  # the same users, another writer
        ("learn", 0, b[3]),
        ("learn", 0, b[4]),
        ("forget", forgotten),
        ("learn", 0, b[5] + [Event(user_id=forgotten, item_id="i1", value=2.0)]),
        ("learn", 0, b[6]),
        ("refresh",),
        ("learn", 0, b[7]),
        ("learn", 0, b[8]),
        ("learn", 1, b[9]),
        ("learn", 0, b[10]),
        # An event left out (it would throw its rows out of bounds) as the first of its item: the batch is
        # recomputed from the others, its items in another order than read.
        ("learn", 0, [Event(user_id="u1", item_id="i99", value=5.0, weight=1e30), *b[11], *b[11][:3]]),
        ("learn", 0, [*b[11][3:], Event(user_id="u2", item_id="i99", value=1.0)]),
        *[("learn", 0, batch) for batch in batches(mode, seed=3)[:8]],  # writer 0 alone again
    ]
    held = run(redis_client, model_name, mode, shards, True, script)
    run(redis_client, plain_name, mode, shards, False, script)
    # The copy is used until another writer writes; it is dropped at the next read and left unused for a
    # while (2, 4, ... batches), and used again once writer 0 is alone.
    assert held[3] > 0 and held[4] == 0
    assert held[-1] > 0
    assert model_contents(redis_client, model_name) == model_contents(redis_client, plain_name)


@pytest.mark.parametrize("whole_limit", [500, 4])
@pytest.mark.parametrize("mode", ["explicit", "implicit"])
def test_a_batch_computed_while_the_one_before_applies_writes_what_it_would_have_written_after_it(
    redis_client: redis.Redis, model_name: str, plain_name: str, mode: str, whole_limit: int
) -> None:
    """Writer 0 computes each batch while its previous one's apply runs, from the state that apply leaves
    (`RedisStore.begin_apply`), through everything the copy test above throws at it: another writer, a
    forgotten user, a refresh, an event left out. The model is byte for byte the one written batch by
    batch. A `whole_limit` of 4 leaves users with more interactions out of the copy (read pair by pair):
    a batch then comes computed only when none of them was in the batch before."""
    b = batches(mode, seed=2)
    forgotten = b[1][0].user_id
    script: list[tuple[Any, ...]] = [
        *[("learn", 0, batch) for batch in b[:4]],
        ("learn", 1, b[4]),  # the same users, another writer: the batch computed ahead is refused
        ("learn", 0, b[5]),
        ("learn", 0, b[6]),
        ("forget", forgotten),
        ("learn", 0, b[7] + [Event(user_id=forgotten, item_id="i1", value=2.0)]),
        ("learn", 0, b[8]),
        ("refresh",),
        ("learn", 0, b[9]),
        ("learn", 0, [Event(user_id="u1", item_id="i99", value=5.0, weight=1e30), *b[10], *b[10][:3]]),
        ("learn", 0, [*b[11][3:], Event(user_id="u2", item_id="i99", value=1.0)]),
        *[("learn", 0, batch) for batch in batches(mode, seed=3)],  # writer 0 alone again
    ]
    ahead: list[bool] = []
    original = UserCache.__init__

    def limited(self: UserCache, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.whole_limit = whole_limit

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(UserCache, "__init__", limited)
        run(redis_client, model_name, mode, 1, True, script, ahead)
        run(redis_client, plain_name, mode, 1, False, script)
    assert model_contents(redis_client, model_name) == model_contents(redis_client, plain_name)
    # Writer 0 alone, the batches come computed; with the low limit its users soon have more
    # interactions than the copy keeps, and none does (each batch then waits for the apply before it).
    if whole_limit == 500:
        assert all(ahead[-8:]), ahead
    else:
        assert any(ahead) and not any(ahead[-8:]), ahead


def test_an_apply_sent_ahead_that_is_refused_leaves_the_copy_trusted(
    redis_client: redis.Redis, model_name: str
) -> None:
    """A batch computed ahead whose own apply is refused for its offsets (a conflict writes nothing): the
    copy recorded ahead is dropped, but the writer stamp stays the one the model bears, so the next
    batches keep using a copy (no 'another writer' distrust)."""
    RedisStore.open(redis_client, model_name, "explicit", K)
    store = RedisStore.attach(redis_client, model_name)
    learner = Learner(store, params("explicit"))
    b = [EventColumns.of(events) for events in batches("explicit", seed=4)]
    learner.learn(b[0], {0: (0, 40)})
    learner.learn(b[1], {0: (40, 80)})
    # b[2] is learnt with b[3] computed ahead; b[3] then claims offsets overlapping b[2]'s: a conflict.
    _, computed = learner.learn_ahead(b[2], {0: (80, 120)}, None, lambda: (b[3], {0: (100, 140)}))
    assert computed is not None
    result, _ = learner.learn_ahead(b[3], {0: (100, 140)}, None, lambda: (b[4], {0: (140, 180)}), computed)
    assert result.outcome is ApplyOutcome.CONFLICT
    assert store.users_held() == 0  # dropped with the refused apply
    learner.learn(b[4], {0: (120, 160)})
    learner.learn(b[5], {0: (160, 200)})
    assert store.users_held() > 0, "the copy was distrusted as if another writer had written"


@pytest.mark.parametrize("mode", ["explicit", "implicit"])
def test_a_lone_writer_sends_its_item_rows_without_what_they_were_made_from(
    redis_client: redis.Redis, model_name: str, mode: str
) -> None:
    """One shard, users from the copy under the writer's own stamp: the script takes the item rows as sent
    (no rows read, deltas or base rows cross the wire); a batch read without the copy sends them all. The
    model's bytes are the same either way (`test_one_writer_with_a_copy_writes_what_...`)."""
    RedisStore.open(redis_client, model_name, mode, K)
    store = RedisStore.attach(redis_client, model_name)
    store.cache_users(10_000)
    sent: list[list[Any]] = []
    real_script = store._apply_script

    def recorded(keys: list[str], args: list[Any]) -> Any:
        sent.append(args)
        return real_script(keys=keys, args=args)

    store._apply_script = recorded  # type: ignore[assignment]
    learner = Learner(store, params(mode))
    for n, batch in enumerate(batches(mode, seed=5)[:4]):
        assert learner.learn(batch, {0: (40 * n, 40 * (n + 1))}).outcome is ApplyOutcome.APPLIED
    position = {name: p for p, name in enumerate(scripts.APPLY.args)}
    as_sent = [int(args[position["items_as_sent"]]) for args in sent]
    assert as_sent == [0, 1, 1, 1]
    for args, lean in zip(sent, as_sent, strict=True):
        dropped = [args[position[name]] for name in ("item_deltas", "item_base", "item_expected_rows")]
        assert all(arg == b"" for arg in dropped) == bool(lean)
        assert len(args[position["item_new_rows"]]) > 0


class _Interloped:
    """A store whose next apply is preceded by another writer's batch (between the read and the apply)."""

    def __init__(self, store: RedisStore, interloper: Any) -> None:
        self._store = store
        self._interloper = interloper

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def apply(self, update: BatchUpdate) -> ApplyOutcome:
        if self._interloper is not None:
            interloper, self._interloper = self._interloper, None
            interloper()
        return self._store.apply(update)


@pytest.mark.parametrize("shards", [1, 3])
def test_a_write_between_a_cached_read_and_its_apply_makes_the_batch_recompute(
    redis_client: redis.Redis, model_name: str, plain_name: str, shards: int
) -> None:
    mode = "explicit"
    b = batches(mode, seed=4)
    RedisStore.open(redis_client, model_name, mode, K, shards=shards)
    mine, other = RedisStore.attach(redis_client, model_name), RedisStore.attach(redis_client, model_name)
    assert Learner(mine, params(mode)).learn(b[0], {0: (0, 40)}).outcome is ApplyOutcome.APPLIED
    assert all(len(cache) > 0 for cache in mine.user_caches)
    applies: list[ApplyOutcome] = []
    real_apply = mine.apply

    def counted_apply(update: BatchUpdate) -> ApplyOutcome:
        applies.append(real_apply(update))
        return applies[-1]

    mine.apply = counted_apply  # type: ignore[method-assign]
    interloper = lambda: Learner(other, params(mode)).learn(b[0][:20], {1: (0, 20)})  # noqa: E731
    learner = Learner(_Interloped(mine, interloper), params(mode))  # type: ignore[arg-type]
    assert learner.learn(b[1] + b[0][:5], {0: (40, 85)}).outcome is ApplyOutcome.APPLIED
    assert applies == [ApplyOutcome.STALE_VERSION, ApplyOutcome.APPLIED]

    # The same three batches in the order they took effect, without copies.
    RedisStore.open(redis_client, plain_name, mode, K, shards=shards)
    plain = RedisStore.attach(redis_client, plain_name)
    plain.cache_users(0)
    plain_learner = Learner(plain, params(mode))
    plain_learner.learn(b[0], {0: (0, 40)})
    plain_learner.learn(b[0][:20], {1: (0, 20)})
    plain_learner.learn(b[1] + b[0][:5], {0: (40, 85)})
    mine_contents = model_contents(redis_client, model_name)
    plain_contents = model_contents(redis_client, plain_name)
    if shards == 1:
        assert mine_contents == plain_contents
    else:
        # Several shards: the refused user part came after the batch's item parts, which stay (as after
        # a crash between parts), so rows may differ from a batch computed after the interloper; what
        # each event stores, and the counts, do not.
        def exact(contents: dict[str, object]) -> dict[str, object]:
            return {key: v for key, v in contents.items() if re.search(r":(inter:|item_counts$)", key)}

        assert exact(mine_contents) == exact(plain_contents)
        assert any(key.endswith("item_counts") for key in exact(plain_contents))


def test_values_formatted_by_the_writer_are_the_texts_the_script_would_write(
    redis_client: redis.Redis,
) -> None:
    """apply.lua stores what the writer formatted when it can (ratings; strengths once settled) and
    formats them itself otherwise: both must give the same text, or a model's bytes would depend on it."""
    rng = np.random.default_rng(1)
    values = np.concatenate(
        [
            rng.normal(size=3000) * 10.0 ** rng.integers(-30, 30, 3000),
            rng.integers(1, 6, 100).astype(float),
            [0.0, -0.0, 4.5, 1e16, 2.5e-308, 5e-324, 1.7976931348623157e308, 0.1, 1 / 3],
        ]
    )
    lua = (
        "local out = {} for i = 1, #ARGV[1] / 8 do "
        "out[i] = string.format('%.17g', struct.unpack('<d', ARGV[1], 8 * i - 7)) end "
        "return table.concat(out, ',')"
    )
    by_lua = redis_client.eval(lua, 0, values.astype("<f8").tobytes()).decode().split(",")
    assert by_lua == value_texts(values.tolist())
