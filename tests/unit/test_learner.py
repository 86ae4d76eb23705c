"""`Learner` on the in-memory store: fencing, interactions, counts, deterministic init, global-mean stats,
batch-size invariance (the "daemon == evaluate" guarantee) and the version-retry loop."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from streammf.model.factors import LossParams, init_rows
from streammf.model.sgd import SgdParams
from streammf.store.contract import ApplyOutcome, BatchState, fence
from streammf.store.memory import MemoryStore
from streammf.stream.events import Event, EventColumns
from streammf.stream.learner import Learner, LearnerParams, VersionChurnError, _BatchPlan

K = 4


def _params(mode: str, learning_rate: float = 0.02, seed: int = 42, init_std: float = 0.1) -> LearnerParams:
    loss = LossParams(mode, reg=0.05, reg_bias=0.02, alpha=2.0, w0=0.05)
    return LearnerParams(SgdParams(loss, learning_rate=learning_rate), init_std=init_std, seed=seed)


def _snapshot(store: MemoryStore) -> dict:
    return {
        "meta": store.meta(),
        "user_rows": copy.deepcopy(store.user_rows),
        "item_rows": copy.deepcopy(store.item_rows),
        "item_counts": dict(store.item_counts),
        "interactions": copy.deepcopy(store.interactions),
        "value_sum": store.value_sum,
        "value_count": store.value_count,
        "events_applied": store.events_applied(),
        "offsets": store.applied_offsets(),
        "item_gramian": None if store.item_gramian is None else store.item_gramian.copy(),
        "user_gramian": None if store.user_gramian is None else store.user_gramian.copy(),
    }


def _assert_same(a: dict, b: dict, skip: tuple[str, ...] = (), gramian_rtol: float = 0.0) -> None:
    for key in a:
        if key in skip:
            continue
        left, right = a[key], b[key]
        if key in ("user_rows", "item_rows"):
            assert left.keys() == right.keys(), key
            for ident in left:
                np.testing.assert_array_equal(left[ident], right[ident], err_msg=f"{key}[{ident}]")
                assert left[ident].dtype == right[ident].dtype
        elif gramian_rtol and key.endswith("gramian") and left is not None:
            # Gramians travel as float64 deltas (G_old + (G_new − G_old)): equal up to float64 rounding.
            np.testing.assert_allclose(left, right, rtol=gramian_rtol, atol=gramian_rtol, err_msg=key)
        elif isinstance(left, np.ndarray) or isinstance(right, np.ndarray):
            np.testing.assert_array_equal(left, right, err_msg=key)
        else:
            assert left == right, key


def _stream(rng: np.random.Generator, n: int, n_users: int, n_items: int, mode: str) -> list[Event]:
    events = []
    for _ in range(n):
        user = f"u{rng.integers(n_users)}"
        item = int(rng.integers(n_items))  # int ids are stored as strings
        if mode == "explicit":
            events.append(Event(user_id=user, item_id=item, value=float(rng.integers(1, 6))))
        else:
            events.append(
                Event(user_id=user, item_id=item, value=1.0, weight=float(rng.choice([0.5, 1.0, 2.0])))
            )
    return events


def _learn_in_batches(store: MemoryStore, params: LearnerParams, events: list[Event], size: int) -> list:
    learner = Learner(store, params)
    results = []
    for start in range(0, len(events), size):
        end = min(start + size, len(events))
        result = learner.learn(events[start:end], {0: (start, end)})
        assert result.outcome is ApplyOutcome.APPLIED
        results.append(result)
    return results


# -------------------------------------------------------------------------------------------- fencing


@pytest.mark.parametrize("mode", ["explicit", "implicit"])
def test_relearning_same_offsets_is_duplicate_and_changes_nothing(mode: str) -> None:
    rng = np.random.default_rng(1)
    events = _stream(rng, 60, 5, 7, mode)
    store = MemoryStore("m", mode, K)
    learner = Learner(store, _params(mode))
    assert learner.learn(events[:30], {0: (0, 30), 3: (100, 130)}).outcome is ApplyOutcome.APPLIED
    assert learner.learn(events[30:], {0: (30, 60)}).outcome is ApplyOutcome.APPLIED
    before = _snapshot(store)
    assert before["offsets"] == {0: 60, 3: 130}

    # The same batches again (a replay after a crash), and other events claiming already-applied offsets.
    assert learner.learn(events[:30], {0: (0, 30), 3: (100, 130)}).outcome is ApplyOutcome.DUPLICATE
    assert learner.learn(events[30:], {0: (30, 60)}).outcome is ApplyOutcome.DUPLICATE
    assert learner.learn(events[5:9], {3: (110, 125)}).outcome is ApplyOutcome.DUPLICATE
    _assert_same(before, _snapshot(store))

    # Partly applied ranges conflict; also nothing changes.
    assert learner.learn(events[:10], {0: (55, 65)}).outcome is ApplyOutcome.CONFLICT
    assert learner.learn(events[:10], {0: (60, 70), 3: (120, 140)}).outcome is ApplyOutcome.CONFLICT
    _assert_same(before, _snapshot(store))

    # The next range applies.
    assert learner.learn(events[:10], {0: (60, 70)}).outcome is ApplyOutcome.APPLIED
    assert store.applied_offsets() == {0: 70, 3: 130}
    assert store.events_applied() == 70


@pytest.mark.parametrize(
    ("stored", "offsets", "expected"),
    [
        ({}, {0: (5, 10)}, None),
        ({0: 5}, {0: (5, 10)}, None),
        ({0: 3}, {0: (5, 10)}, None),  # a gap is fine
        ({0: 10}, {0: (5, 10)}, ApplyOutcome.DUPLICATE),
        ({0: 12}, {0: (5, 10)}, ApplyOutcome.DUPLICATE),
        ({0: 7}, {0: (5, 10)}, ApplyOutcome.CONFLICT),
        ({0: 10, 1: 0}, {0: (5, 10), 1: (0, 4)}, ApplyOutcome.CONFLICT),  # one behind, one ahead
        ({}, {}, None),
    ],
)
def test_fence_rule(stored, offsets, expected) -> None:
    assert fence(stored, offsets) is expected


# ------------------------------------------------------------------------------ interactions and counts


def test_implicit_strengths_accumulate_within_and_across_batches() -> None:
    store = MemoryStore("m", "implicit", K)
    learner = Learner(store, _params("implicit"))
    learner.learn(
        [
            Event(user_id="a", item_id="x", value=2.0, weight=1.5),
            Event(user_id="a", item_id="x", value=1.0),
            Event(user_id="a", item_id="y", value=0.5, weight=2.0),
            Event(user_id="b", item_id="x"),
        ],
        {0: (0, 4)},
    )
    assert store.interactions == {"a": {"x": 4.0, "y": 1.0}, "b": {"x": 1.0}}
    learner.learn([Event(user_id="a", item_id="x", value=0.25), Event(user_id="b", item_id="z")], {0: (4, 6)})
    assert store.interactions == {"a": {"x": 4.25, "y": 1.0}, "b": {"x": 1.0, "z": 1.0}}
    assert store.item_counts == {"x": 2, "y": 1, "z": 1}


def test_explicit_keeps_latest_rating_within_and_across_batches() -> None:
    store = MemoryStore("m", "explicit", K)
    learner = Learner(store, _params("explicit"))
    learner.learn(
        [
            Event(user_id="a", item_id="x", value=3.0),
            Event(user_id="a", item_id="y", value=1.0),
            Event(user_id="a", item_id="x", value=5.0),
        ],
        {0: (0, 3)},
    )
    assert store.interactions == {"a": {"x": 5.0, "y": 1.0}}
    learner.learn(
        [Event(user_id="a", item_id="x", value=2.0), Event(user_id="b", item_id="y", value=4.0)], {0: (3, 5)}
    )
    assert store.interactions == {"a": {"x": 2.0, "y": 1.0}, "b": {"y": 4.0}}
    assert store.item_counts == {"x": 1, "y": 2}


@pytest.mark.parametrize("mode", ["explicit", "implicit"])
def test_counts_match_distinct_pairs(mode: str) -> None:
    rng = np.random.default_rng(2)
    events = _stream(rng, 250, 9, 11, mode)
    store = MemoryStore("m", mode, K)
    _learn_in_batches(store, _params(mode, learning_rate=0.01), events, 40)
    pairs = {(e.user_id, e.item_id) for e in events}
    users = sorted({u for u, _ in pairs})
    items = sorted({i for _, i in pairs})
    expected_n = {u: sum(1 for a, _ in pairs if a == u) for u in users}
    expected_m = {i: sum(1 for _, b in pairs if b == i) for i in items}
    assert {u: len(row) for u, row in store.interactions.items()} == expected_n
    assert store.item_counts == expected_m
    state = store.read_batch_state(users, items, [])
    np.testing.assert_array_equal(state.user_counts, [expected_n[u] for u in users])
    np.testing.assert_array_equal(state.item_counts, [expected_m[i] for i in items])
    assert len(pairs) < len(events)  # the stream repeats pairs, so counts != events


def test_value_stats_and_global_mean_in_predictions() -> None:
    rng = np.random.default_rng(3)
    events = _stream(rng, 90, 6, 6, "explicit")
    store = MemoryStore("m", "explicit", K)
    params = _params("explicit")
    _learn_in_batches(store, params, events, 25)
    values = [e.value for e in events]
    assert store.value_count == len(events) == store.events_applied()
    assert store.value_sum == pytest.approx(sum(values), abs=1e-9)

    # A brand-new user and item: p = μ + 0 + 0 + ⟨init_u, init_v⟩, μ the mean of everything before.
    result = Learner(store, params).learn([Event(user_id="new-u", item_id="new-i", value=4.0)], {0: (90, 91)})
    u = init_rows(["new-u"], K, params.init_std, params.seed, "user")[0].astype(np.float64)
    v = init_rows(["new-i"], K, params.init_std, params.seed, "item")[0].astype(np.float64)
    assert result.predictions[0] == pytest.approx(np.mean(values) + u @ v, rel=1e-12, abs=1e-12)
    assert result.errors[0] == pytest.approx(4.0 - result.predictions[0], abs=1e-12)


def test_implicit_errors_are_one_minus_prediction() -> None:
    rng = np.random.default_rng(4)
    events = _stream(rng, 40, 4, 5, "implicit")
    store = MemoryStore("m", "implicit", K)
    results = _learn_in_batches(store, _params("implicit"), events, 40)
    np.testing.assert_array_equal(results[0].errors, 1.0 - results[0].predictions)
    assert store.value_count == 40
    assert store.value_sum == pytest.approx(40.0)


# ------------------------------------------------------------------------------- deterministic init


@pytest.mark.parametrize("mode", ["explicit", "implicit"])
def test_new_rows_are_the_deterministic_init_rows(mode: str) -> None:
    """With a zero learning rate the stored rows are exactly the init rows, whatever the batching."""
    rng = np.random.default_rng(5)
    events = _stream(rng, 80, 7, 9, mode)
    params = _params(mode, learning_rate=0.0, seed=11, init_std=0.3)
    forward = MemoryStore("m", mode, K)
    _learn_in_batches(forward, params, events, 13)
    backward = MemoryStore("m", mode, K)
    _learn_in_batches(backward, params, events[::-1], 80)
    for store in (forward, backward):
        users = sorted(store.user_rows)
        items = sorted(store.item_rows)
        expected_u = init_rows(users, K, 0.3, 11, "user")
        expected_i = init_rows(items, K, 0.3, 11, "item")
        np.testing.assert_array_equal(np.stack([store.user_rows[u][:K] for u in users]), expected_u)
        np.testing.assert_array_equal(np.stack([store.item_rows[i][:K] for i in items]), expected_i)
    assert np.std(expected_u) > 0.1  # really random rows, not zeros
    assert not np.array_equal(init_rows(["x"], K, 0.3, 11, "user"), init_rows(["x"], K, 0.3, 11, "item"))
    assert not np.array_equal(init_rows(["x"], K, 0.3, 11, "user"), init_rows(["x"], K, 0.3, 12, "user"))


def test_init_rows_do_not_depend_on_order_or_process() -> None:
    ids = ["alice", "bob", "42", "ü"]
    here = init_rows(ids, 6, 0.1, 7, "user")
    np.testing.assert_array_equal(init_rows(ids[::-1], 6, 0.1, 7, "user")[::-1], here)
    np.testing.assert_array_equal(init_rows(ids[2:3], 6, 0.1, 7, "user")[0], here[2])
    code = (
        "import sys, numpy as np; from streammf.model.factors import init_rows; "
        "sys.stdout.write(init_rows(['alice', 'bob', '42', 'ü'], 6, 0.1, 7, 'user').tobytes().hex())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONIOENCODING": "utf-8"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout
    np.testing.assert_array_equal(
        np.frombuffer(bytes.fromhex(out), dtype=here.dtype).reshape(here.shape), here
    )


# ----------------------------------------------------------- batch-size invariance (daemon == evaluate)


def _assert_batch_size_invariant(
    mode: str, events: list[Event], store_factory, params: LearnerParams | None = None
) -> None:
    params = params or _params(mode, learning_rate=0.03)
    reference = store_factory()
    results = _learn_in_batches(reference, params, events, len(events))
    predictions = results[0].predictions
    assert np.all(np.isfinite(predictions))
    for size in (1, 7, 50):
        store = store_factory()
        split = _learn_in_batches(store, params, events, size)
        np.testing.assert_array_equal(np.concatenate([r.predictions for r in split]), predictions)
        left_out = [size * batch + t for batch, result in enumerate(split) for t in result.diverged]
        assert tuple(left_out) == results[0].diverged
        _assert_same(_snapshot(reference), _snapshot(store), gramian_rtol=1e-12)
        assert store.applied_offsets()[0] == len(events)


def _warm_store(mode: str, users: list[str], items: list[str]):
    """A store in which every user and item of the stream is already present."""

    def make() -> MemoryStore:
        store = MemoryStore("m", mode, K)
        learner = Learner(store, _params(mode, learning_rate=0.03))
        warm = [Event(user_id=u, item_id=items[n % len(items)]) for n, u in enumerate(users)]
        warm += [Event(user_id=users[0], item_id=i) for i in items]
        assert learner.learn(warm, {1: (0, len(warm))}).outcome is ApplyOutcome.APPLIED
        return store

    return make


def test_explicit_batch_size_does_not_change_store() -> None:
    rng = np.random.default_rng(6)
    events = _stream(rng, 300, 12, 15, "explicit")
    _assert_batch_size_invariant("explicit", events, lambda: MemoryStore("m", "explicit", K))


def test_implicit_batch_size_does_not_change_store_when_rows_exist() -> None:
    rng = np.random.default_rng(6)
    events = _stream(rng, 300, 12, 15, "implicit")
    users = sorted({e.user_id for e in events})
    items = sorted({e.item_id for e in events})
    _assert_batch_size_invariant("implicit", events, _warm_store("implicit", users, items))


def test_implicit_batch_size_does_not_change_store_with_new_rows() -> None:
    rng = np.random.default_rng(6)
    events = _stream(rng, 300, 12, 15, "implicit")
    _assert_batch_size_invariant("implicit", events, lambda: MemoryStore("m", "implicit", K))


@pytest.mark.parametrize(
    ("mode", "learning_rate", "bound"), [("explicit", 0.03, 1.0), ("implicit", 0.5, 0.8)]
)
def test_batch_size_does_not_change_which_events_are_left_out_or_the_store(
    mode: str, learning_rate: float, bound: float
) -> None:
    """A tight bound leaves out a third of the steps (dead-lettered as diverged by the daemon). Each passes
    its pair's newness, and its new rows' entry into the Gramians, on to the next event that names them, so
    how the stream is cut into batches still changes nothing."""
    rng = np.random.default_rng(8)
    events = _stream(rng, 300, 12, 15, mode)
    params = replace(_params(mode, learning_rate=learning_rate), max_abs_factor=bound)
    left_out = Learner(MemoryStore("m", mode, K), params).learn(events, {0: (0, 300)}).diverged
    assert 50 <= len(left_out) <= 150
    _assert_batch_size_invariant(mode, events, lambda: MemoryStore("m", mode, K), params)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------- version retries


class _ChurningStore(MemoryStore):
    """Publishes a 'new version' (a bare version bump) between the read and the apply, `bumps` times."""

    def __init__(self, *args, bumps: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.bumps = bumps
        self.reads = 0

    def read_batch_state(self, users, items, pairs) -> BatchState:
        state = super().read_batch_state(users, items, pairs)
        self.reads += 1
        if self.bumps > 0:
            self.bumps -= 1
            self._meta = replace(self._meta, version=self._meta.version + 1)
        return state


@pytest.mark.parametrize("mode", ["explicit", "implicit"])
def test_stale_version_is_retried_until_applied(mode: str) -> None:
    rng = np.random.default_rng(8)
    first, second = _stream(rng, 30, 5, 6, mode), _stream(rng, 30, 5, 6, mode)
    params = _params(mode)
    churning = _ChurningStore("m", mode, K, bumps=0)
    plain = MemoryStore("m", mode, K)
    Learner(churning, params).learn(first, {0: (0, 30)})
    Learner(plain, params).learn(first, {0: (0, 30)})

    churning.bumps = 3
    churning.reads = 0
    result = Learner(churning, params, max_version_retries=5).learn(second, {0: (30, 60)})
    assert result.outcome is ApplyOutcome.APPLIED
    assert churning.reads == 4
    assert result.version == churning.meta().version == 4
    expected = Learner(plain, params).learn(second, {0: (30, 60)})
    np.testing.assert_array_equal(result.predictions, expected.predictions)
    _assert_same(_snapshot(plain), _snapshot(churning), skip=("meta",))


def test_version_churn_error_after_max_retries() -> None:
    rng = np.random.default_rng(9)
    store = _ChurningStore("m", "explicit", K, bumps=10**6)
    before = _snapshot(store)
    with pytest.raises(VersionChurnError):
        Learner(store, _params("explicit"), max_version_retries=3).learn(
            _stream(rng, 10, 3, 3, "explicit"), {0: (0, 10)}
        )
    assert store.reads == 3
    _assert_same(before, _snapshot(store), skip=("meta",))


@pytest.mark.parametrize("size", [1, 7, 60])
def test_the_learner_keeps_the_decayed_popularity_of_the_events_it_applies(size: int) -> None:
    from dataclasses import replace

    from streammf.model.popularity import add_events, decayed_counts

    events = _stream(np.random.default_rng(4), 120, 9, 6, "implicit")
    store = MemoryStore("m", "implicit", K)
    _learn_in_batches(store, replace(_params("implicit"), popularity_half_life=10.0), events, size)
    catalogue = sorted({e.item_id for e in events})
    scores = np.zeros(len(catalogue))
    clocks = np.arange(len(events), dtype=float)
    origin = add_events(scores, np.array([catalogue.index(e.item_id) for e in events]), clocks, 0.0, 10.0)
    expected = dict(zip(catalogue, decayed_counts(scores, len(events), origin, 10.0), strict=True))
    got = dict(store.popular_items(len(catalogue)))
    assert got.keys() == expected.keys()
    for item, count in got.items():
        assert count == pytest.approx(expected[item], rel=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_a_batch_plan_indexes_ids_in_first_seen_order_and_marks_each_pairs_last_event(seed: int) -> None:
    """The plan's arrays, checked against their definitions event by event (repeats of users, items and
    pairs within one batch, including the empty batch)."""
    rng = np.random.default_rng(seed)
    events = [
        Event(user_id=f"u{rng.integers(6)}", item_id=str(rng.integers(8)), value=float(v), weight=1.0 + v)
        for v in rng.random(int(rng.integers(0, 80)))
    ]
    plan = _BatchPlan.of(EventColumns.of(events))
    users = list(dict.fromkeys(e.user_id for e in events))
    items = list(dict.fromkeys(e.item_id for e in events))
    pairs = list(dict.fromkeys((e.user_id, e.item_id) for e in events))
    assert (plan.users, plan.items, plan.pairs) == (users, items, pairs)
    for t, e in enumerate(events):
        assert plan.users[plan.event_user[t]] == e.user_id and plan.items[plan.event_item[t]] == e.item_id
        assert plan.pairs[plan.event_pair[t]] == (e.user_id, e.item_id)
    last = [max(t for t, e in enumerate(events) if (e.user_id, e.item_id) == pair) for pair in pairs]
    assert plan.last_event_of_pair.tolist() == last and plan.last_event_of_pair.dtype == np.int64
    assert plan.values.tolist() == [e.value for e in events]
    assert plan.weights.tolist() == [e.weight for e in events]
