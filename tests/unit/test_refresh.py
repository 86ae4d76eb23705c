"""The WALS refresh on the in-memory store: a new version that lowers the objective, published by
compare-and-set, and the periodic runner that only refreshes while it holds the lease."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np

from streammf.events import Event
from streammf.factors import LossParams
from streammf.learner import Learner, LearnerParams
from streammf.refresh import PeriodicRefresh, refresh
from streammf.sgd import SgdParams
from streammf.store import MemoryStore


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
        report = refresh(store, params.loss, 5, params.init_std, params.seed)
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
    report = refresh(store, params.loss, 2, params.init_std, params.seed)
    assert not report.published
    assert store.current_version() > live
    assert not store.discard_version(report.version), "the losing version must already be discarded"


def test_periodic_refresh_runs_only_while_holding_the_lease_and_only_on_news() -> None:
    store, params = _trained_store()
    outcomes: list[str] = []
    lease = {"held": False}
    stop = threading.Event()
    runner = PeriodicRefresh(
        store, params.loss, 1, params.init_std, params.seed, every_s=0.05,
        hold_lease=lambda _ttl: lease["held"], on_outcome=outcomes.append,
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
