"""The WALS refresh: snapshot all interactions → WALS warm-started from the live factors → write a new
version beside the live one → catch up with what the stream changed meanwhile → flip the pointer.

Catch-up: the live version keeps taking SGD updates while WALS runs, and the snapshot misses them. The
store records which users and items those updates touched; the refresh re-reads the touched users'
interactions and folds the touched rows into the refit exactly (one ALS half-step for those rows: users
against the refit's items, then items against the updated users). A few rounds run while the stream
goes on; the last one runs with writers paused, so nothing slips between it and the flip. Writers that
were paused, or that computed against the old version, recompute against the new one (version fence),
so no event is lost or applied twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import redis

from streammf.model.factors import DTYPE, Factors, LossParams, init_rows
from streammf.model.interactions import Interactions
from streammf.model.objective import objective
from streammf.model.wals import fold_in_items, fold_in_users, wals
from streammf.store.contract import RefreshableStore
from streammf.store.redis_store import RedisStore
from streammf.stream.learner import LearnerParams

log = logging.getLogger(__name__)

# Catch-up rounds while writers keep going; the paused round after them should then be short.
OPEN_CATCH_UP_ROUNDS = 3
# Stop the open rounds early once one touched fewer rows than this: the paused round will be quick.
SMALL_CATCH_UP_ROWS = 5000
# Writers to the old version wait at most this long; a refresh that overruns does not publish.
PAUSE_LIMIT_S = 30.0

Chunk = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Snapshot:
    """Interactions with ids coded as row positions: entry e is (user_ids[users[e]], item_ids[items[e]],
    values[e]). Ids keep their positions in every snapshot derived from this one (newcomers are appended),
    so factor rows fitted on one line up with the next, and a catch-up costs array passes, not re-coding.
    """

    user_ids: list[str]
    item_ids: list[str]
    user_at: dict[str, int]  # id -> position, the inverse of user_ids
    item_at: dict[str, int]
    users: np.ndarray  # int64 positions
    items: np.ndarray
    values: np.ndarray  # float64

    @classmethod
    def of(cls, chunks: Iterable[Chunk]) -> Snapshot:
        """From (user ids, item ids, values) chunks, e.g. `iter_interactions()`; ids are coded sorted."""
        parts = list(chunks)
        users, items, values = (
            (np.concatenate([c[n] for c in parts]) for n in range(3))
            if parts
            else (np.array([], dtype=str), np.array([], dtype=str), np.array([]))
        )
        finite = np.isfinite(values.astype(np.float64))
        if not finite.all():  # a damaged stored interaction is left out rather than poisoning the fit
            log.warning("refresh: %d interactions with a non-finite value left out", (~finite).sum())
            users, items, values = users[finite], items[finite], values[finite]
        user_ids, user_codes = np.unique(users.astype(str), return_inverse=True)
        item_ids, item_codes = np.unique(items.astype(str), return_inverse=True)
        user_list, item_list = user_ids.tolist(), item_ids.tolist()
        return cls(
            user_list,
            item_list,
            {u: r for r, u in enumerate(user_list)},
            {i: r for r, i in enumerate(item_list)},
            user_codes.astype(np.int64),
            item_codes.astype(np.int64),
            values.astype(np.float64),
        )

    def with_users_replaced(self, users: Sequence[str], fresh: Chunk) -> Snapshot:
        """These users' entries replaced by `fresh` (their interactions as they are now)."""
        user_ids, user_at, fresh_users = _code(self.user_ids, self.user_at, fresh[0])
        item_ids, item_at, fresh_items = _code(self.item_ids, self.item_at, fresh[1])
        replaced = np.zeros(len(self.user_ids), dtype=bool)
        replaced[_positions(self.user_at, users)] = True
        keep = ~replaced[self.users]
        return Snapshot(
            user_ids,
            item_ids,
            user_at,
            item_at,
            np.concatenate([self.users[keep], fresh_users]),
            np.concatenate([self.items[keep], fresh_items]),
            np.concatenate([self.values[keep], np.asarray(fresh[2], dtype=np.float64)]),
        )

    def data(self, params: LossParams) -> Interactions:
        return Interactions.from_coo(
            self.users, self.items, self.values, (len(self.user_ids), len(self.item_ids)), params
        )


def _code(
    ids: list[str], at: dict[str, int], wanted: np.ndarray
) -> tuple[list[str], dict[str, int], np.ndarray]:
    """Positions of `wanted` ids; ids not yet known are appended (to copies: snapshots are values)."""
    wanted_list = np.asarray(wanted).astype(str).tolist()
    newcomers = [i for i in dict.fromkeys(wanted_list) if i not in at]
    if newcomers:
        ids, at = ids + newcomers, at | {i: len(ids) + n for n, i in enumerate(newcomers)}
    return ids, at, np.array([at[i] for i in wanted_list], dtype=np.int64)


@dataclass(frozen=True)
class Refit:
    users: list[str]  # row r of factors.user belongs to users[r]; the snapshot's user_ids
    items: list[str]
    factors: Factors
    objective_before: float
    objective_after: float


@dataclass(frozen=True)
class CaughtUp:
    refit: Refit
    user_rows: np.ndarray  # positions (in refit.users) of the rows the catch-up changed or added
    item_rows: np.ndarray


def refit(
    snapshot: Snapshot,
    current_users: tuple[list[str], np.ndarray, np.ndarray],
    current_items: tuple[list[str], np.ndarray, np.ndarray],
    global_mean: float,
    params: LossParams,
    iterations: int,
    init_std: float,
    seed: int,
    max_abs_factor: float = float("inf"),
) -> Refit:
    """Pure: WALS over the snapshot, warm-started from the current rows.

    Rows that have interactions but no current factors start from the deterministic init, and so do
    damaged rows (a coordinate not finite or beyond `max_abs_factor`): a refresh repairs a damaged model
    from its interactions. A non-finite global mean is recomputed from the snapshot.
    """
    k = current_users[1].shape[1] if len(current_users[1]) else current_items[1].shape[1]
    current_users = _without_damaged(current_users, max_abs_factor)
    current_items = _without_damaged(current_items, max_abs_factor)
    user_rows, user_bias = _warm_rows(snapshot.user_ids, current_users, k, init_std, seed, "user")
    item_rows, item_bias = _warm_rows(snapshot.item_ids, current_items, k, init_std, seed, "item")
    if not np.isfinite(global_mean):
        global_mean = float(snapshot.values.mean()) if len(snapshot.values) else 0.0
    mean = global_mean if params.mode == "explicit" else 0.0
    start = Factors(user_rows, item_rows, user_bias, item_bias, mean)
    data = snapshot.data(params)
    before = objective(data, start, params)
    result = wals(data, start, params, iterations)
    result.check_finite()
    return Refit(snapshot.user_ids, snapshot.item_ids, result, before, objective(data, result, params))


def catch_up(
    fitted: Refit,
    snapshot: Snapshot,
    users: Sequence[str],
    items: Sequence[str],
    params: LossParams,
    init_std: float,
    seed: int,
) -> CaughtUp:
    """Pure: fold the given users, then the given items, into `fitted` exactly, over `snapshot` (derived
    from the one `fitted` was fitted on, and already holding those users' current interactions). Users
    and items the refit has not seen are added (deterministic init, then folded in). μ stays the refit's.
    Other rows are left as they are. Costs passes over the entry arrays plus the folded rows' work."""
    f = fitted.factors
    if snapshot.user_ids[: len(fitted.users)] != fitted.users:  # cheap next to the solves below
        raise ValueError("snapshot is not derived from the one the refit was fitted on")
    user, user_bias, new_users = _extended(f.user, f.user_bias, snapshot.user_ids, init_std, seed, "user")
    item, item_bias, new_items = _extended(f.item, f.item_bias, snapshot.item_ids, init_std, seed, "item")
    factors = Factors(user, item, user_bias, item_bias, f.global_mean)
    shape = (len(snapshot.user_ids), len(snapshot.item_ids))

    fold_users = np.union1d(new_users, _positions(snapshot.user_at, users))
    rows = _entries_of(fold_users, snapshot.users, snapshot.items, snapshot.values, shape, params)
    solved = fold_in_users(rows, factors, params)
    factors.user[fold_users], factors.user_bias[fold_users] = solved.factors, solved.bias

    fold_items = np.union1d(new_items, _positions(snapshot.item_at, items))
    columns = _entries_of(
        fold_items, snapshot.items, snapshot.users, snapshot.values, (shape[1], shape[0]), params
    )
    solved = fold_in_items(columns, factors, params)
    factors.item[fold_items], factors.item_bias[fold_items] = solved.factors, solved.bias

    factors.check_finite()
    caught = Refit(
        snapshot.user_ids, snapshot.item_ids, factors, fitted.objective_before, fitted.objective_after
    )
    return CaughtUp(caught, fold_users, fold_items)


def _positions(at: dict[str, int], wanted: Sequence[str]) -> np.ndarray:
    """Positions of the `wanted` ids that `at` knows."""
    return np.array([at[i] for i in wanted if i in at], dtype=np.int64)


def _extended(
    rows: np.ndarray, bias: np.ndarray, ids: list[str], std: float, seed: int, side: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Copies of `rows` and `bias` with init rows (zero bias) appended for ids[len(rows):]; and those
    new positions."""
    new = np.arange(len(rows), len(ids), dtype=np.int64)
    added = init_rows([ids[r] for r in new], rows.shape[1], std, seed, side)
    return np.vstack([rows, added]), np.concatenate([bias, np.zeros(len(new), dtype=bias.dtype)]), new


def _entries_of(
    wanted: np.ndarray,
    owners: np.ndarray,
    others: np.ndarray,
    values: np.ndarray,
    shape: tuple[int, int],
    params: LossParams,
) -> Interactions:
    """The entries whose owner is in `wanted`, as a len(wanted) × shape[1] matrix (row r: wanted[r])."""
    local = np.full(shape[0], -1, dtype=np.int64)
    local[wanted] = np.arange(len(wanted))
    at = local[owners]
    picked = at >= 0
    return Interactions.from_coo(at[picked], others[picked], values[picked], (len(wanted), shape[1]), params)


def _without_damaged(
    current: tuple[list[str], np.ndarray, np.ndarray], bound: float
) -> tuple[list[str], np.ndarray, np.ndarray]:
    ids, rows, bias = current
    sound = (np.abs(rows) <= bound).all(axis=1) & (np.abs(bias) <= bound)  # NaN compares False
    if sound.all():
        return current
    log.warning("refresh: %d damaged rows (not finite or out of bounds) restart from init", (~sound).sum())
    return [i for i, ok in zip(ids, sound, strict=True) if ok], rows[sound], bias[sound]


def _warm_rows(
    ids: list[str],
    current: tuple[list[str], np.ndarray, np.ndarray],
    k: int,
    std: float,
    seed: int,
    side: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Rows and biases for `ids` taken from `current`, deterministic init where missing."""
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
    version: int | None  # None: nothing was built (the live version changed before the refresh began)
    published: bool
    users: int
    items: int
    objective_before: float
    objective_after: float
    caught_up_rows: int  # rows folded in because the stream touched them during the refresh
    paused_seconds: float  # how long writers waited for the hand-over
    seconds: float


def refresh(
    store: RefreshableStore, learner: LearnerParams, iterations: int, pause_limit_s: float = PAUSE_LIMIT_S
) -> RefreshReport:
    """Tracking the live version, building the new one and pausing writers are each scoped: whatever
    happens (published, lost a race, overran the pause, raised), the live version stops tracking and
    writers resume, and an unpublished version goes to garbage collection."""
    started = time.perf_counter()
    params, init_std, seed = learner.loss, learner.init_std, learner.seed
    live = store.current_version()
    with _tracking(store, live) as tracked:
        if not tracked:
            log.info("wals refresh skipped: version %d was replaced before it began", live)
            return RefreshReport(None, False, 0, 0, float("nan"), float("nan"), 0, 0.0, 0.0)
        snapshot = Snapshot.of(store.iter_interactions())
        fitted = refit(
            snapshot,
            store.read_all_rows("users"),
            store.read_all_rows("items"),
            store.global_mean(),
            params,
            iterations,
            init_std,
            seed,
            learner.max_abs_factor,
        )
        caught_up_rows = 0
        for _ in range(OPEN_CATCH_UP_ROUNDS):
            caught = _catch_up_with_store(store, live, fitted, snapshot, params, init_std, seed)
            fitted, snapshot, rows = caught
            caught_up_rows += rows
            if rows < SMALL_CATCH_UP_ROWS:
                break
        with _building(store) as build:
            _write(store, build.version, params, fitted, snapshot)
            paused_at = time.perf_counter()
            with _paused(store, live, pause_limit_s) as paused:
                if paused:  # else the live version was replaced meanwhile: nothing to publish over
                    fitted, snapshot, rows = _catch_up_with_store(
                        store, live, fitted, snapshot, params, init_std, seed, write_to=build.version
                    )
                    caught_up_rows += rows
                    build.published = store.publish(build.version, live)
            paused_seconds = time.perf_counter() - paused_at
    report = RefreshReport(
        build.version,
        build.published,
        len(fitted.users),
        len(fitted.items),
        fitted.objective_before,
        fitted.objective_after,
        caught_up_rows,
        paused_seconds,
        time.perf_counter() - started,
    )
    log.info("wals refresh %s", report)
    return report


@contextmanager
def _tracking(store: RefreshableStore, live: int) -> Iterator[bool]:
    """Updates to `live` record what they change while the refresh runs; never left on afterwards."""
    tracked = store.track_changes(live)
    try:
        yield tracked
    finally:
        if tracked:
            store.stop_tracking(live)


@dataclass
class _Build:
    version: int
    published: bool = False


@contextmanager
def _building(store: RefreshableStore) -> Iterator[_Build]:
    """A new version; handed to garbage collection unless published (lost a race, overran, raised)."""
    build = _Build(store.begin_version())
    try:
        yield build
    finally:
        if not build.published:
            store.discard_version(build.version)


@contextmanager
def _paused(store: RefreshableStore, live: int, ttl_s: float) -> Iterator[bool]:
    paused = store.pause_writes(live, ttl_s)
    try:
        yield paused
    finally:
        if paused:
            store.resume_writes(live)


def _catch_up_with_store(
    store: RefreshableStore,
    live: int,
    fitted: Refit,
    snapshot: Snapshot,
    params: LossParams,
    init_std: float,
    seed: int,
    write_to: int | None = None,
) -> tuple[Refit, Snapshot, int]:
    """One catch-up round against what the store says changed; with `write_to`, writes the changed rows
    (and the Gramians, which depend on every row) into that version."""
    users, items = store.take_changes(live)
    if users or items:
        snapshot = snapshot.with_users_replaced(users, store.read_interactions(users))
        caught = catch_up(fitted, snapshot, users, items, params, init_std, seed)
        fitted, user_rows, item_rows = caught.refit, caught.user_rows, caught.item_rows
    else:
        user_rows = item_rows = np.array([], dtype=np.int64)
    if write_to is not None:
        _write(store, write_to, params, fitted, snapshot, user_rows, item_rows)
    return fitted, snapshot, len(user_rows) + len(item_rows)


def _write(
    store: RefreshableStore,
    version: int,
    params: LossParams,
    fitted: Refit,
    snapshot: Snapshot,
    user_rows: np.ndarray | None = None,
    item_rows: np.ndarray | None = None,
) -> None:
    """Rows (all, or the given positions) and, in implicit mode, both Gramians. A user without
    interactions in `snapshot` (forgotten while the refresh ran) gets no row, and none in the Gramian."""
    f = fitted.factors
    has_entries = np.bincount(snapshot.users, minlength=len(fitted.users)) > 0
    picked_users = np.arange(len(fitted.users)) if user_rows is None else user_rows
    store.delete_rows(version, "users", [fitted.users[r] for r in picked_users if not has_entries[r]])
    picked_users = picked_users[has_entries[picked_users]]
    picked_items = np.arange(len(fitted.items)) if item_rows is None else item_rows
    for side, ids, rows, bias, at in (
        ("users", fitted.users, f.user, f.user_bias, picked_users),
        ("items", fitted.items, f.item, f.item_bias, picked_items),
    ):
        store.write_rows(version, side, [ids[r] for r in at], rows[at], bias[at])  # type: ignore[arg-type]
    if params.mode == "implicit":
        kept_users = [user for user, kept in zip(fitted.users, has_entries, strict=True) if kept]
        store.write_gramian(version, "users", kept_users, f.user[has_entries])
        store.write_gramian(version, "items", fitted.items, f.item)


class RefreshLeaseHeldError(RuntimeError):
    """Another process holds the refresh lease (a daemon's periodic refresh, or another `refresh`)."""

    def __init__(self, holder: str | None) -> None:
        self.holder = holder
        super().__init__(f"the refresh lease is held by {holder}")


def refresh_with_lease(
    store: RedisStore, learner: LearnerParams, iterations: int, owner: str, lease_s: float
) -> RefreshReport:
    """One refresh under the refresh lease (taken, then given back whatever happens). Two refreshes
    tracking one version would each take part of what the stream changed, and the winner would miss the
    loser's part: so a refresh outside the daemons must hold the lease too."""
    if not store.hold_refresh_lease(owner, lease_s):
        raise RefreshLeaseHeldError(store.refresh_lease_holder())
    try:
        return refresh(store, learner, iterations)
    finally:
        try:
            store.release_refresh_lease(owner)
        except redis.RedisError as exc:  # the refresh's own outcome matters more; the lease expires
            log.warning("refresh lease not released (expires within %.0f s): %s", lease_s, exc)


class PeriodicRefresh:
    """Every `every_s` seconds on a background thread (`start`), or when a test says so (`tick`): a
    refresh on the one replica holding the refresh lease, when there is news, then garbage collection of
    versions retired more than `grace_s` ago (readers had time to finish with them)."""

    def __init__(
        self,
        store: RefreshableStore,
        learner: LearnerParams,
        iterations: int,
        every_s: float,
        hold_lease: Callable[[float], bool],
        on_outcome: Callable[[str, RefreshReport | None], None],
        grace_s: float = 60.0,
        every_events: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.learner = learner
        self.iterations = iterations
        self.every_s = every_s
        self.every_events = every_events
        self.hold_lease = hold_lease
        self.on_outcome = on_outcome
        self.grace_s = grace_s
        self.clock = clock
        self._refreshed_at_events = 0
        self._attempted_at = clock()
        # With an event trigger, look at the count often; the clock trigger alone needs one look a period.
        self._check_every_s = min(every_s, 1.0) if every_events else every_s

    def start(self, stop: threading.Event) -> threading.Thread:
        thread = threading.Thread(target=self._run, args=(stop,), name="wals-refresh", daemon=True)
        thread.start()
        return thread

    def _run(self, stop: threading.Event) -> None:
        while not stop.wait(self._check_every_s):
            self.tick()

    def tick(self) -> str | None:
        """One look: refresh if this replica holds the lease and a refresh is due (`every_s` since the last
        attempt, or `every_events` applied since the last published refresh) and there is news. Returns
        the outcome (published, not_published, failed), or None when there was nothing to do."""
        try:
            if not self.hold_lease(2 * max(self.every_s, self._check_every_s)):
                return None
            applied = self.store.events_applied()
            news = applied - self._refreshed_at_events
            # Half a look of slack: a thread woken after `every_s` may read a hair less on the clock.
            by_clock = self.clock() - self._attempted_at >= self.every_s - self._check_every_s / 2
            by_count = self.every_events is not None and news >= self.every_events
            if news == 0 or not (by_clock or by_count):
                return None
            self._attempted_at = self.clock()
            report = refresh(self.store, self.learner, self.iterations)
            if report.published:
                self._refreshed_at_events = applied
            outcome = "published" if report.published else "not_published"
            self.on_outcome(outcome, report)
            self.store.collect_garbage(self.grace_s)
            return outcome
        except Exception:  # the stream must go on; the next period tries again
            log.exception("wals refresh failed")
            self.on_outcome("failed", None)
            return "failed"
