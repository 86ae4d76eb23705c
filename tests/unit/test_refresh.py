"""The WALS refresh on the in-memory store: a new version that lowers the objective, published by
compare-and-set, caught up with what the stream changed meanwhile, and the periodic runner that only
refreshes while it holds the lease."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from streammf.model.factors import LossParams
from streammf.model.interactions import Interactions
from streammf.model.objective import objective
from streammf.model.sgd import SgdParams
from streammf.model.wals import solve_items
from streammf.store.contract import ApplyOutcome
from streammf.store.memory import MemoryStore
from streammf.stream.events import Event
from streammf.stream.learner import Learner, LearnerParams, VersionChurnError
from streammf.stream.refresh import PeriodicRefresh, Snapshot, catch_up, refit, refresh


def _trained_store(mode: str = "explicit", events: int = 2000) -> tuple[MemoryStore, LearnerParams]:
    rng = np.random.default_rng(3)
    params = LearnerParams(SgdParams(LossParams(mode)), init_std=0.1, seed=1)
    store = MemoryStore("m", mode, 4)  # type: ignore[arg-type]
    users, items = rng.integers(0, 60, events), rng.integers(0, 40, events)
    values = np.clip(np.round(3 + np.sin(users) * np.cos(items) * 2), 1, 5)
    batch = [
        Event(user_id=str(u), item_id=str(i), value=float(v))
        for u, i, v in zip(users, items, values, strict=True)
    ]
    Learner(store, params).learn(batch, {0: (0, events)})
    return store, params


def test_refresh_publishes_a_new_version_with_a_lower_objective() -> None:
    for mode in ("explicit", "implicit"):
        store, params = _trained_store(mode)
        before = store.current_version()
        report = refresh(store, params, 5)
        assert report.published
        assert store.current_version() == report.version > before
        assert report.objective_after < report.objective_before
        assert report.users == len(store.user_rows) and report.items == len(store.item_rows)


def test_refresh_that_loses_the_race_discards_its_version() -> None:
    store, params = _trained_store()

    live = store.current_version()
    original_publish = store.publish

    def publish_after_someone_else(version: int, expected: int) -> bool:
        rival = store.begin_version()
        assert original_publish(rival, expected)
        return original_publish(version, expected)

    store.publish = publish_after_someone_else  # type: ignore[method-assign]
    report = refresh(store, params, 2)
    assert not report.published
    assert store.current_version() > live
    assert not store.discard_version(report.version), "the losing version must already be discarded"


def test_periodic_refresh_runs_only_while_holding_the_lease_and_only_on_news() -> None:
    store, params = _trained_store()
    outcomes: list[str] = []
    lease = {"held": False}
    stop = threading.Event()
    runner = PeriodicRefresh(
        store, params, 1, every_s=0.05,
        hold_lease=lambda _ttl: lease["held"], on_outcome=lambda outcome, _report: outcomes.append(outcome),
    )  # fmt: skip
    thread = runner.start(stop)
    stop.wait(0.3)
    assert outcomes == [] and store.current_version() == 1, "no lease, no refresh"
    lease["held"] = True
    _wait_until(lambda: len(outcomes) >= 1)
    stop.wait(0.3)
    assert outcomes == ["published"], "nothing new since the last refresh: no second one"
    more = [Event(user_id="new-user", item_id=str(i), value=4.0) for i in range(5)]
    Learner(store, params).learn(more, {0: (10_000, 10_005)})
    _wait_until(lambda: len(outcomes) >= 2)
    stop.set()
    thread.join(timeout=10)
    assert outcomes == ["published", "published"]
    assert store.current_version() == 3


def _wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def _snapshot(store: MemoryStore) -> Snapshot:
    return Snapshot.of(store.iter_interactions())


def _data(snapshot: Snapshot, users: list[str], items: list[str], params: LossParams) -> Interactions:
    user_at = {u: r for r, u in enumerate(users)}
    item_at = {i: r for r, i in enumerate(items)}
    return Interactions.from_coo(
        np.array([user_at[snapshot.user_ids[c]] for c in snapshot.users]),
        np.array([item_at[snapshot.item_ids[c]] for c in snapshot.items]),
        snapshot.values,
        (len(users), len(items)),
        params,
    )


@pytest.mark.parametrize("mode", ["explicit", "implicit"])
def test_catch_up_folds_in_exactly_the_touched_rows(mode: str) -> None:
    store, params = _trained_store(mode)
    before = _snapshot(store)
    fitted = refit(
        before, store.read_all_rows("users"), store.read_all_rows("items"), store.global_mean(),
        params.loss, 3, params.init_std, params.seed,
    )  # fmt: skip
    # The stream goes on: user "3" rates more, a new user arrives, with a new item.
    later = [Event(user_id="3", item_id=str(i), value=5.0) for i in range(10)]
    later += [Event(user_id="late", item_id="brand-new", value=4.0), Event(user_id="late", item_id="7")]
    Learner(store, params).learn(later, {0: (10_000, 10_012)})
    touched_users, touched_items = ["3", "late"], sorted({e.item_id for e in later})
    after = before.with_users_replaced(touched_users, store.read_interactions(touched_users))

    caught = catch_up(fitted, after, touched_users, touched_items, params.loss, params.init_std, 1)
    new = caught.refit
    assert "late" in new.users and "brand-new" in new.items
    assert sorted(new.users[r] for r in caught.user_rows) == touched_users
    assert sorted(new.items[r] for r in caught.item_rows) == touched_items
    old_user = {u: r for r, u in enumerate(fitted.users)}
    for r, user in enumerate(new.users):
        if user not in touched_users:  # untouched rows are the refit's
            np.testing.assert_array_equal(new.factors.user[r], fitted.factors.user[old_user[user]])
    # The touched items are exact minimisers given the users (what a WALS item half-step gives).
    data = _data(after, new.users, new.items, params.loss)
    exact = solve_items(data, new.factors, params.loss, solver="cholesky")
    np.testing.assert_allclose(
        new.factors.item[caught.item_rows], exact.item[caught.item_rows], rtol=1e-3, atol=1e-5
    )
    # And the objective over the current data beats carrying the refit over unchanged.
    carried = catch_up(fitted, after, [], [], params.loss, params.init_std, 1).refit
    assert objective(data, new.factors, params.loss) < objective(data, carried.factors, params.loss)


@pytest.mark.parametrize("mode", ["explicit", "implicit"])
def test_refresh_catches_up_with_updates_applied_while_it_ran(mode: str) -> None:
    store, params = _trained_store(mode)
    learner = Learner(store, params)
    original_read = store.read_all_rows
    late = [Event(user_id="late", item_id=str(i), value=5.0) for i in range(8)]

    def read_then_stream_goes_on(side: str):  # type: ignore[no-untyped-def]
        rows = original_read(side)  # type: ignore[arg-type]
        if side == "items":  # after the snapshot, while WALS would be running
            assert learner.learn(late, {0: (10_000, 10_008)}).outcome is ApplyOutcome.APPLIED
        return rows

    store.read_all_rows = read_then_stream_goes_on  # type: ignore[method-assign]
    report = refresh(store, params, 3)
    assert report.published and report.caught_up_rows >= 1 + len(late)
    assert "late" in store.user_rows, "an update applied during the refresh must survive the flip"
    assert np.any(store.user_rows["late"][:-1] != 0)
    if mode == "implicit":  # the published Gramians hold the caught-up rows too
        items = np.stack(list(store.item_rows.values()))[:, :-1].astype(np.float64)
        np.testing.assert_allclose(store.item_gramian, items.T @ items, rtol=1e-6)


def test_writers_wait_out_a_pause_and_give_up_after_max_pause() -> None:
    store, params = _trained_store()
    live = store.current_version()
    event = [Event(user_id="u", item_id="i", value=3.0)]
    naps: list[float] = []

    def nap_then_resume(seconds: float) -> None:
        naps.append(seconds)
        if len(naps) == 3:
            store.resume_writes(live)

    assert store.pause_writes(live, 60.0)
    result = Learner(store, params, sleep=nap_then_resume).learn(event, {0: (10_000, 10_001)})
    assert result.outcome is ApplyOutcome.APPLIED and len(naps) == 3

    assert store.pause_writes(live, 60.0)
    stuck = Learner(store, params, max_pause_s=0.1, sleep=lambda _s: None)
    try:
        stuck.learn(event, {0: (10_001, 10_002)})
    except VersionChurnError:
        pass
    else:
        raise AssertionError("a writer must give up on a pause that does not end")


def test_a_published_refresh_moves_the_model_version_gauge_at_once() -> None:
    from prometheus_client import CollectorRegistry

    from streammf.stream.metrics import Metrics

    store, params = _trained_store()
    metrics = Metrics(CollectorRegistry())
    metrics.model_version.set(store.current_version())
    now = [0.0]
    runner = PeriodicRefresh(
        store, params, 1, every_s=3600, hold_lease=lambda _ttl: True, on_outcome=metrics.observe_refresh,
        clock=lambda: now[0],
    )  # fmt: skip
    now[0] = 3600.0
    assert runner.tick() == "published"
    assert metrics.registry.get_sample_value("streammf_model_version") == store.current_version() == 2
    now[0] = 7200.0
    assert runner.tick() is None, "no news since: nothing to do"


def test_a_refresh_is_due_after_every_events_or_every_s_whichever_comes_first() -> None:
    store, params = _trained_store()  # 2,000 events applied
    now, outcomes = [0.0], []
    runner = PeriodicRefresh(
        store, params, 1, every_s=3600, hold_lease=lambda _ttl: True,
        on_outcome=lambda outcome, _report: outcomes.append(outcome), every_events=100, clock=lambda: now[0],
    )  # fmt: skip
    assert runner.tick() == "published", "2,000 events since the start: over every_events"
    learner = Learner(store, params)
    learner.learn([Event(user_id="a", item_id=str(i), value=3.0) for i in range(60)], {0: (5000, 5060)})
    now[0] = 10.0
    assert runner.tick() is None, "60 events, 10 s: not due yet"
    learner.learn([Event(user_id="b", item_id=str(i), value=3.0) for i in range(40)], {0: (5060, 5100)})
    assert runner.tick() == "published", "100 events since the last refresh"
    learner.learn([Event(user_id="c", item_id="1", value=3.0)], {0: (5100, 5101)})
    assert runner.tick() is None
    now[0] = 10.0 + 3600.0
    assert runner.tick() == "published", "one event, but every_s has passed"
    assert outcomes == ["published"] * 3
