"""The WALS refresh: snapshot all interactions → WALS warm-started from the live factors → write a new
version beside the live one → flip the pointer.

Events applied by SGD between the snapshot and the flip are refused by the version fence and recomputed
against the new version by their writer, so no event's effect is applied twice; their interactions are
in the store and enter the next refresh's snapshot.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from streammf.factors import DTYPE, Factors, LossParams, init_rows
from streammf.interactions import Interactions
from streammf.objective import objective
from streammf.store import RefreshableStore
from streammf.wals import wals

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Refit:
    users: list[str]
    items: list[str]
    factors: Factors
    objective_before: float
    objective_after: float


def refit(
    snapshot: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
    current_users: tuple[list[str], np.ndarray, np.ndarray],
    current_items: tuple[list[str], np.ndarray, np.ndarray],
    global_mean: float,
    params: LossParams,
    iterations: int,
    init_std: float,
    seed: int,
) -> Refit:
    """Pure: WALS over the snapshot's (user, item, value) chunks, warm-started from the current rows.

    Rows that have interactions but no current factors start from the deterministic init.
    """
    chunks = list(snapshot)
    if chunks:
        user_ids = np.concatenate([c[0] for c in chunks]).astype(str)
        item_ids = np.concatenate([c[1] for c in chunks]).astype(str)
        values = np.concatenate([c[2] for c in chunks]).astype(np.float64)
    else:
        user_ids = item_ids = np.array([], dtype=str)
        values = np.array([], dtype=np.float64)
    users, user_index = np.unique(user_ids, return_inverse=True)
    items, item_index = np.unique(item_ids, return_inverse=True)
    users_list, items_list = users.tolist(), items.tolist()
    k = current_users[1].shape[1] if len(current_users[1]) else current_items[1].shape[1]
    user_rows, user_bias = _warm_rows(users_list, current_users, k, init_std, seed, "user")
    item_rows, item_bias = _warm_rows(items_list, current_items, k, init_std, seed, "item")
    mean = global_mean if params.mode == "explicit" else 0.0
    start = Factors(user_rows, item_rows, user_bias, item_bias, mean)
    data = Interactions.from_coo(user_index, item_index, values, (len(users), len(items)), params)
    before = objective(data, start, params)
    result = wals(data, start, params, iterations)
    result.check_finite()
    return Refit(users_list, items_list, result, before, objective(data, result, params))


def _warm_rows(
    ids: list[str],
    current: tuple[list[str], np.ndarray, np.ndarray],
    k: int,
    std: float,
    seed: int,
    side: str,
) -> tuple[np.ndarray, np.ndarray]:
    position = {ident: row for row, ident in enumerate(current[0])}
    rows = np.zeros((len(ids), k), dtype=DTYPE)
    bias = np.zeros(len(ids), dtype=DTYPE)
    missing = []
    for row, ident in enumerate(ids):
        at = position.get(ident)
        if at is None:
            missing.append(row)
        else:
            rows[row] = current[1][at]
            bias[row] = current[2][at]
    if missing:
        rows[missing] = init_rows([ids[r] for r in missing], k, std, seed, side)
    return rows, bias


@dataclass(frozen=True)
class RefreshReport:
    version: int
    published: bool
    users: int
    items: int
    objective_before: float
    objective_after: float
    seconds: float


def refresh(
    store: RefreshableStore, params: LossParams, iterations: int, init_std: float, seed: int
) -> RefreshReport:
    started = time.perf_counter()
    live = store.current_version()
    fitted = refit(
        store.iter_interactions(),
        store.read_all_rows("users"),
        store.read_all_rows("items"),
        store.global_mean(),
        params,
        iterations,
        init_std,
        seed,
    )
    version = store.begin_version()
    f = fitted.factors
    store.write_rows(version, "users", fitted.users, f.user, f.user_bias)
    store.write_rows(version, "items", fitted.items, f.item, f.item_bias)
    if params.mode == "implicit":
        store.write_gramian(version, "users", f.user.astype(np.float64).T @ f.user.astype(np.float64))
        store.write_gramian(version, "items", f.item.astype(np.float64).T @ f.item.astype(np.float64))
    published = store.publish(version, live)
    if not published:
        store.discard_version(version)  # lost the race to another publisher: leave nothing half-made
    report = RefreshReport(
        version,
        published,
        len(fitted.users),
        len(fitted.items),
        fitted.objective_before,
        fitted.objective_after,
        time.perf_counter() - started,
    )
    log.info("wals refresh %s", report)
    return report


class PeriodicRefresh:
    """Runs `refresh` every `every_s` seconds on a background thread, on the one replica holding the
    refresh lease, and deletes retired versions once readers have had `grace_s` to finish with them."""

    def __init__(
        self,
        store: RefreshableStore,
        params: LossParams,
        iterations: int,
        init_std: float,
        seed: int,
        every_s: float,
        hold_lease: Callable[[float], bool],
        on_outcome: Callable[[str], None],
        grace_s: float = 60.0,
    ) -> None:
        self.store = store
        self.args = (params, iterations, init_std, seed)
        self.every_s = every_s
        self.hold_lease = hold_lease
        self.on_outcome = on_outcome
        self.grace_s = grace_s

    def start(self, stop: threading.Event) -> threading.Thread:
        thread = threading.Thread(target=self._run, args=(stop,), name="wals-refresh", daemon=True)
        thread.start()
        return thread

    def _run(self, stop: threading.Event) -> None:
        refreshed_at_events = 0
        while not stop.wait(self.every_s):
            try:
                if not self.hold_lease(2 * self.every_s):
                    continue
                applied = self.store.events_applied()
                if applied == refreshed_at_events:
                    continue  # nothing new since the last refresh (or nothing yet)
                report = refresh(self.store, *self.args)
                refreshed_at_events = applied
                self.on_outcome("published" if report.published else "lost_race")
                self.store.collect_garbage(self.grace_s)
            except Exception:  # the stream must go on; the next period tries again
                log.exception("wals refresh failed")
                self.on_outcome("failed")
