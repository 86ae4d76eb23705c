"""The writer's copy of its users (streammf.store.user_cache) alone: what it keeps, and what it refuses
to keep. Its use by the Redis store is tested against a real Redis (tests/integration/test_user_cache.py)."""

from __future__ import annotations

import numpy as np

from streammf.store.user_cache import NO_WHOLE_USERS, UserCache, WholeUsers

K = 3


def rows(n: int, value: float) -> np.ndarray:
    return np.full((n, K + 1), value, dtype=np.float32)


def record(
    cache: UserCache,
    users: list[str],
    pairs: list[tuple[str, str]],
    values: list[float],
    whole: WholeUsers = NO_WHOLE_USERS,
    additive: bool = False,
    row_value: float = 0.5,
) -> None:
    cache.record(
        1,
        f"stamp-{len(cache)}",
        None,
        users,
        rows(len(users), row_value),
        whole,
        [user for user, _ in pairs],
        [item for _, item in pairs],
        np.array(values),
        additive,
    )


def held(cache: UserCache, users: list[str]) -> list[bool]:
    return cache.held(cache.ids_of(users, [])).tolist()


def test_a_user_is_kept_only_when_every_interaction_is_known() -> None:
    cache = UserCache(max_pairs=100, row_width=K + 1)
    cache.follow(1)
    whole = WholeUsers({"new": 0, "known": 1}, {("known", "a"): 4.0})
    record(
        cache, ["new", "known", "partial"], [("new", "x"), ("known", "x"), ("partial", "x")], [1, 2, 3], whole
    )
    assert held(cache, ["new", "known", "partial"]) == [True, True, False]

    ids = cache.ids_of(["known", "new"], [("known", "a"), ("known", "x"), ("known", "y"), ("new", "x")])
    row_values, counts = cache.rows_of(ids.user_ids)
    np.testing.assert_array_equal(row_values, rows(2, 0.5))
    assert counts.tolist() == [2, 1]
    np.testing.assert_array_equal(cache.values_of(ids.pair_keys), [4.0, 2.0, np.nan, 1.0])


def test_strengths_add_up_and_ratings_replace_as_the_apply_script_does() -> None:
    for additive, expected in ((True, [1.5 + 2.25 + 4.0]), (False, [4.0])):
        cache = UserCache(max_pairs=100, row_width=K + 1)
        cache.follow(1)
        record(cache, ["u"], [("u", "i")], [1.5], WholeUsers({"u": 0}, {}), additive)
        # One pair twice in an update (the contract allows it): one step after the other.
        record(cache, ["u"], [("u", "i"), ("u", "i")], [2.25, 4.0], additive=additive, row_value=0.25)
        ids = cache.ids_of(["u"], [("u", "i")])
        assert cache.values_of(ids.pair_keys).tolist() == expected
        row_values, counts = cache.rows_of(ids.user_ids)
        assert counts.tolist() == [1]
        np.testing.assert_array_equal(row_values, rows(1, 0.25))


def test_past_its_bound_the_copy_is_emptied() -> None:
    cache = UserCache(max_pairs=3, row_width=K + 1)
    cache.follow(1)
    record(cache, ["u"], [("u", "a"), ("u", "b")], [1, 1], WholeUsers({"u": 0}, {}))
    assert held(cache, ["u"]) == [True]
    record(cache, ["u"], [("u", "c"), ("u", "d")], [1, 1])
    assert held(cache, ["u"]) == [False]


def test_a_copy_found_stale_is_not_used_for_longer_each_time_then_is() -> None:
    cache = UserCache(max_pairs=100, row_width=K + 1)
    cache.follow(1)
    record(cache, ["u"], [("u", "a")], [1], WholeUsers({"u": 0}, {}))
    cache.found_stale(1)
    assert held(cache, ["u"]) == [False]  # dropped
    assert [cache.trusting() for _ in range(3)] == [False, False, True]
    cache.found_stale(1)
    assert [cache.trusting() for _ in range(5)] == [False] * 4 + [True]
    cache.found_valid()
    cache.found_stale(1)
    assert [cache.trusting() for _ in range(3)] == [False, False, True]
    record(cache, ["u"], [("u", "a")], [1], WholeUsers({"u": 0}, {}))
    assert held(cache, ["u"]) == [True]
    cache.follow(2)  # another version: nothing held
    assert held(cache, ["u"]) == [False]


def test_stamps_are_this_writers_own() -> None:
    one, other = UserCache(10, K + 1), UserCache(10, K + 1)
    stamps = {one.next_stamp(), one.next_stamp(), other.next_stamp()}
    assert len(stamps) == 3
