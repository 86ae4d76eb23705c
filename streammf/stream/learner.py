"""One batch of events through the model: read state → SGD step → atomic apply (retry on a version flip
or a refresh's pause).

Used by the daemon (Redis store) and by `streammf evaluate` (in-memory store): the same code path, so the
two produce the same factors.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from streammf.config import ModelSettings
from streammf.model.factors import DEFAULTS, DTYPE, LossParams, init_rows
from streammf.model.popularity import batch_item_weights
from streammf.model.sgd import SgdBatch, SgdParams, sgd_step
from streammf.store.contract import ApplyOutcome, BatchState, BatchUpdate, FactorStore
from streammf.stream.events import Event, EventColumns

log = logging.getLogger(__name__)

_PAUSE_POLL_S = 0.02  # how often a paused writer looks again (a refresh's hand-over is short)


@dataclass(frozen=True)
class LearnerParams:
    """Everything the learner and the refresh need; `from_settings` is the one conversion from the
    settings model. (Defaults are the settings' except the bound, which the settings always pass.)"""

    sgd: SgdParams
    init_std: float = DEFAULTS.init_std
    seed: int = DEFAULTS.seed
    # A row whose coordinates (factors, bias) leave [-max_abs_factor, max_abs_factor] or are not finite is
    # damaged: never written by a batch, and replaced by its initial row when read.
    max_abs_factor: float = float("inf")
    # Decayed item popularity kept beside the model for cold start (streammf.model.popularity).
    popularity_half_life: float = DEFAULTS.popularity_half_life_events

    @property
    def loss(self) -> LossParams:
        return self.sgd.loss

    @classmethod
    def from_settings(cls, model: ModelSettings) -> LearnerParams:
        loss = LossParams(
            model.mode,
            reg=model.reg,
            reg_bias=model.reg_bias,
            reg_prior=model.reg_prior,
            alpha=model.alpha,
            w0=model.w0,
        )
        value_min, value_max, _ = model.bounds
        # An error can be at most the width of the value range for a prediction inside it: the clip only
        # binds for predictions far outside, which is where a step would otherwise throw a row away.
        sgd = SgdParams(
            loss,
            model.factor_learning_rate,
            model.bias_learning_rate,
            max_gradient=value_max - value_min,
        )
        return cls(
            sgd,
            init_std=model.init_std,
            seed=model.seed,
            max_abs_factor=model.max_abs_factor,
            popularity_half_life=model.popularity_half_life_events,
        )


@dataclass(frozen=True)
class StepResult:
    outcome: ApplyOutcome
    predictions: np.ndarray  # p before each event's step (prequential)
    errors: np.ndarray  # explicit: value − p; implicit: 1 − p
    version: int
    # Positions (in the events given) of events left out because they drove a row out of bounds; they are
    # not applied (their offsets are, so they are not polled again). `predictions` skips them.
    diverged: tuple[int, ...] = ()

    @property
    def applied(self) -> int:
        return len(self.predictions)


class VersionChurnError(RuntimeError):
    """The model version kept changing under a batch; the caller backs off and retries."""


class DamagedGramianError(RuntimeError):
    """The live version's Gramian is not finite: no implicit update can be computed until a refresh
    rebuilds it from the factors. The caller backs off and retries (the daemon's periodic refresh, or
    `streammf refresh`, repairs it)."""


class PendingApply(Protocol):
    """An apply sent without waiting for its answer: a store's `begin_apply(update, users, items, pairs)`
    (`streammf.store.redis_store.RedisStore`), which returns None where it cannot."""

    next_state: BatchState | None  # the next batch's state as the apply leaves it, if known

    def outcome(self) -> ApplyOutcome: ...


Ahead = tuple[EventColumns, dict[int, tuple[int, int]]]  # the next batch's events and offsets


@dataclass(frozen=True)
class Computed:
    """A batch read and computed, ready to apply (`Learner.learn_ahead`)."""

    plan: _BatchPlan
    state: BatchState
    kept: list[int]  # positions of the events applied
    update: BatchUpdate
    predictions: np.ndarray
    diverged: tuple[int, ...]  # positions of the events left out


class BatchSkipped(RuntimeError):
    """A batch handed over behind another (`BatchLearner.submit`'s `after`) that was not applied: given up
    without touching the store, so that no batch lands behind a gap in its partition's offsets."""


class PendingBatch(Protocol):
    """A batch handed to a learner; `wait` gives its result or raises what learning it raised."""

    def wait(self, on_diverged: Callable[[list[int]], None] | None = None) -> StepResult: ...


class BatchLearner(Protocol):
    """What the daemon's loop calls: a `Learner`, or one in a process of its own (`LearnerProcess`).

    `submit` hands a batch over and returns at once; batches are learnt in the order submitted, and their
    `wait`s must be called in that order. A batch submitted `after` another is learnt only if that one
    was applied (or found applied before): otherwise its `wait` raises `BatchSkipped`. So the loop may
    hand over the next batch while the learner is still busy with one, and a failure never lets a later
    batch's offsets jump over the failed one's."""

    def submit(
        self, events: EventColumns, offsets: dict[int, tuple[int, int]], after: PendingBatch | None = None
    ) -> PendingBatch: ...

    def learn(
        self,
        events: EventColumns,
        offsets: dict[int, tuple[int, int]],
        on_diverged: Callable[[list[int]], None] | None = None,
    ) -> StepResult: ...

    def applied_offsets(self) -> dict[int, int]: ...

    def offsets_ahead(self) -> dict[int, int]: ...

    def forget_user(self, user: str, offsets: dict[int, tuple[int, int]] | None = None) -> ApplyOutcome: ...


class Learner:
    def __init__(
        self,
        store: FactorStore,
        params: LearnerParams,
        max_version_retries: int = 5,
        max_pause_s: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.store = store
        self.params = params
        self.k = store.meta().k
        self.max_version_retries = max_version_retries
        self.max_pause_s = max_pause_s
        self.sleep = sleep

    def learn(
        self,
        events: EventColumns | Sequence[Event],
        offsets: dict[int, tuple[int, int]],
        on_diverged: Callable[[list[int]], None] | None = None,
    ) -> StepResult:
        """Apply `events` (already validated, in partition order) covering `offsets` exactly once.

        Events that would drive a row out of bounds are left out; `on_diverged(positions)` hears of them
        before anything is applied (the daemon dead-letters them there; if it raises, nothing is applied).
        A version flip means recomputing against the new version. A paused version (a refresh handing
        over, normally well under a second) means waiting; if the refresh then publishes, recomputing."""
        return self.learn_ahead(events, offsets, on_diverged)[0]

    def learn_ahead(
        self,
        events: EventColumns | Sequence[Event],
        offsets: dict[int, tuple[int, int]],
        on_diverged: Callable[[list[int]], None] | None = None,
        ahead: Callable[[], Ahead | None] | None = None,
        computed: Computed | None = None,
    ) -> tuple[StepResult, Computed | None]:
        """`learn`, and with `ahead` (asked as the apply goes out: the next batch's events and offsets, if
        it is known by then) that batch computed while this one's apply runs in Redis, from the state
        the apply leaves, where the store can tell it (its `begin_apply`). It is returned only if this
        batch applied (it holds only then), for the next call to take as `computed` instead of reading
        and computing the batch itself."""
        if not isinstance(events, EventColumns):
            events = EventColumns.of(events)
        plan = computed.plan if computed is not None else _BatchPlan.of(events)
        reported: set[int] = set()
        for _ in range(self.max_version_retries):
            if computed is None:
                state = self.store.read_batch_state(plan.users, plan.items, plan.pairs)
                computed = self._computed(events, plan, state, offsets)
            diverged = computed.diverged
            if on_diverged is not None and set(diverged) - reported:
                on_diverged([t for t in diverged if t not in reported])
                reported.update(diverged)
            outcome, following = self._apply(computed.update, ahead)
            if outcome is not ApplyOutcome.STALE_VERSION:
                values = plan.values[computed.kept]
                predictions = computed.predictions
                targets = values if self.params.loss.mode == "explicit" else np.ones(len(predictions))
                version = computed.state.version
                return StepResult(outcome, predictions, targets - predictions, version, diverged), following
            computed = None
        raise VersionChurnError(f"model version changed {self.max_version_retries} times during one batch")

    def _computed(
        self,
        events: EventColumns,
        plan: _BatchPlan,
        state: BatchState,
        offsets: dict[int, tuple[int, int]],
    ) -> Computed:
        kept, update, predictions = self._compute_in_bounds(events, plan, state, offsets)
        diverged = () if len(kept) == len(events) else tuple(sorted(set(range(len(events))) - set(kept)))
        return Computed(plan, state, kept, update, predictions, diverged)

    def _apply(
        self, update: BatchUpdate, ahead: Callable[[], Ahead | None] | None
    ) -> tuple[ApplyOutcome, Computed | None]:
        """Apply `update`, computing the `ahead` batch meanwhile when there is one and the store can say
        what the apply leaves (else None)."""
        begin = getattr(self.store, "begin_apply", None)
        following = None if ahead is None or begin is None else ahead()
        if following is None or begin is None:
            return self._apply_after_any_pause(update), None
        next_events, next_offsets = following
        next_plan = _BatchPlan.of(next_events)
        pending: PendingApply | None = begin(update, next_plan.users, next_plan.items, next_plan.pairs)
        if pending is None:
            return self._apply_after_any_pause(update), None
        done = None
        try:
            if pending.next_state is not None:
                done = self._computed(next_events, next_plan, pending.next_state, next_offsets)
        except Exception as exc:  # computed again from a fresh read when its turn comes (raised then)
            log.debug("computing the next batch ahead failed: %s", exc)
        finally:
            outcome = pending.outcome()
        if outcome is ApplyOutcome.PAUSED:  # nothing written: the same update again; the next one is read
            return self._apply_after_any_pause(update), None
        return outcome, done if outcome is ApplyOutcome.APPLIED else None

    def submit(
        self, events: EventColumns, offsets: dict[int, tuple[int, int]], after: PendingBatch | None = None
    ) -> PendingBatch:
        """Learnt when waited for (in this process nothing runs beside the caller)."""
        return _Deferred(self, events, offsets, after)

    def _compute_in_bounds(
        self,
        events: EventColumns,
        plan: _BatchPlan,
        state: BatchState,
        offsets: dict[int, tuple[int, int]],
    ) -> tuple[list[int], BatchUpdate, np.ndarray]:
        """The batch's update without the events that drive a row out of bounds: (positions of the events
        kept, update, predictions).

        The kernel checks every step as it takes it and leaves out those that would leave a row out of
        bounds (O(n) however many there are); the update is then recomputed from the events it kept, so
        no trace of the others remains (a row only they named, a Gramian entry). The whole update is
        checked once more. With every row written within bounds that check cannot fail (float32 rows
        cannot overflow a float64 Gramian); should it fail anyway, the events that cause it are found by
        bisection, log2(n) computes each, so the batch still makes progress (and a warning says so)."""
        gramians = [g for g in (state.item_gramian, state.user_gramian) if g is not None]
        if not all(np.isfinite(g).all() for g in gramians):
            raise DamagedGramianError(f"v{state.version}: a Gramian is not finite; a refresh rebuilds it")
        update, predictions = self.compute(plan, state, offsets)
        applied = np.isfinite(predictions)
        kept = np.flatnonzero(applied).tolist()
        if applied.all():
            if self._in_bounds(state, update, predictions):
                return kept, update, predictions
        else:
            ok, update, predictions = self._subset_in_bounds(events, plan, state, offsets, kept)
            if ok:
                return kept, update, predictions
        log.warning(
            "v%d: a batch's update is out of bounds although each step was in bounds; bisecting it",
            state.version,
            extra={"events": len(events), "kept": len(kept)},
        )
        while True:
            good, bad = 0, len(kept)  # invariant: prefix `good` is in bounds, prefix `bad` is not
            while bad - good > 1:
                middle = (good + bad) // 2
                if self._subset_in_bounds(events, plan, state, offsets, kept[:middle])[0]:
                    good = middle
                else:
                    bad = middle
            del kept[bad - 1]
            ok, update, predictions = self._subset_in_bounds(events, plan, state, offsets, kept)
            if ok:
                return kept, update, predictions

    def _subset_in_bounds(
        self,
        events: EventColumns,
        plan: _BatchPlan,
        state: BatchState,
        offsets: dict[int, tuple[int, int]],
        positions: list[int],
    ) -> tuple[bool, BatchUpdate, np.ndarray]:
        sub = _BatchPlan.of(events.take(positions))
        sub_state = _restricted(state, plan, sub)
        update, predictions = self.compute(sub, sub_state, offsets)
        return self._in_bounds(sub_state, update, predictions), update, predictions

    def _in_bounds(self, state: BatchState, update: BatchUpdate, predictions: np.ndarray) -> bool:
        """Every row the update writes is finite and within ±max_abs_factor; predictions are finite."""
        bound = self.params.max_abs_factor
        item_ok = state.item_present & _sound(state.item_rows, state.item_bias, bound)
        item_rows = update.item_base.astype(np.float64) + update.item_delta
        item_bias = np.where(item_ok, state.item_bias, 0).astype(np.float64) + update.item_bias_delta
        written = [update.user_rows, update.user_bias, item_rows, item_bias]
        if not all(np.isfinite(a).all() and (np.abs(a) <= bound).all() for a in written):
            return False
        extras = [predictions, update.item_gramian_delta, update.user_gramian_delta]
        return all(a is None or np.isfinite(a).all() for a in extras)

    def applied_offsets(self) -> dict[int, int]:
        """partition -> next offset the store holds (where a newly assigned partition resumes)."""
        return self.store.applied_offsets()

    def offsets_ahead(self) -> dict[int, int]:
        """partition -> where the first batch resumed from `applied_offsets` must end (see the store's)."""
        return self.store.offsets_ahead()

    def forget_user(self, user: str, offsets: dict[int, tuple[int, int]] | None = None) -> ApplyOutcome:
        """Delete the user from the model (see `FactorStore.forget_user`), waiting out a refresh's pause."""
        return self._waiting_out_pauses(lambda: self.store.forget_user(user, offsets))

    def _apply_after_any_pause(self, update: BatchUpdate) -> ApplyOutcome:
        """Apply, waiting out a refresh's pause by retrying the same update: no writer changes a paused
        version, so the update stays valid unless the version flips (then STALE_VERSION: recompute)."""
        return self._waiting_out_pauses(lambda: self.store.apply(update))

    def _waiting_out_pauses(self, write: Callable[[], ApplyOutcome]) -> ApplyOutcome:
        """`write()` again while it answers PAUSED (a refresh handing the live version over), at most
        `max_pause_s` in all."""
        waited_s = 0.0
        while (outcome := write()) is ApplyOutcome.PAUSED:
            if waited_s >= self.max_pause_s:
                raise VersionChurnError(f"the live version stayed paused for over {waited_s:.0f}s")
            self.sleep(_PAUSE_POLL_S)
            waited_s += _PAUSE_POLL_S
        return outcome

    def compute(
        self, plan: _BatchPlan, state: BatchState, offsets: dict[int, tuple[int, int]]
    ) -> tuple[BatchUpdate, np.ndarray]:
        """Pure: the update one batch produces from `state` (no store calls)."""
        implicit = self.params.loss.mode == "implicit"
        bound = self.params.max_abs_factor
        user_ok = state.user_present & _sound(state.user_rows, state.user_bias, bound)
        item_ok = state.item_present & _sound(state.item_rows, state.item_bias, bound)
        user_rows = _with_initial_rows(state.user_rows, user_ok, plan.users, self.params, "user")
        item_base = _with_initial_rows(state.item_rows, item_ok, plan.items, self.params, "item")
        item_rows = item_base.copy()
        # What the Gramians hold of these rows before the batch (absent or damaged rows: nothing).
        user_rows_before = np.where(user_ok[:, None], user_rows, 0).astype(DTYPE) if implicit else None
        item_rows_before = np.where(item_ok[:, None], item_base, 0).astype(DTYPE) if implicit else None
        # A damaged row restarts from its initial row with a zero bias, as if it had never been written
        # (the store treats a damaged stored item row as absent too, so the item delta applies to the base).
        user_bias = np.where(user_ok, state.user_bias, 0).astype(DTYPE)
        item_bias = np.where(item_ok, state.item_bias, 0).astype(DTYPE)
        item_bias_before = item_bias.copy()
        user_counts = state.user_counts.copy()
        item_counts = state.item_counts.copy()
        k = self.k
        item_gram = np.zeros((k, k)) if state.item_gramian is None else state.item_gramian.copy()
        user_gram = np.zeros((k, k)) if state.user_gramian is None else state.user_gramian.copy()

        stored_new = np.isnan(state.pair_values)  # no value stored for the pair before the batch
        batch = SgdBatch(
            user_rows=user_rows,
            user_bias=user_bias,
            user_counts=user_counts,
            item_rows=item_rows,
            item_bias=item_bias,
            item_counts=item_counts,
            event_user=plan.event_user,
            event_item=plan.event_item,
            event_pair=plan.event_pair,
            event_value=plan.values,
            event_weight=plan.weights,
            pair_new=stored_new.copy(),  # the kernel clears a pair's flag when one of its events applies
            # A row absent from the store enters the Gramians at its first applied event, not earlier: so
            # batch boundaries don't matter.
            user_entered=user_ok.copy(),
            item_entered=item_ok.copy(),
            value_sum=state.value_sum,
            value_count=state.value_count,
            item_gramian=item_gram,
            user_gramian=user_gram,
        )
        predictions, value_sum, value_count = sgd_step(batch, self.params.sgd, bound)

        if implicit:
            pair_values = np.bincount(plan.event_pair, plan.values * plan.weights, minlength=len(plan.pairs))
        else:
            pair_values = plan.values[plan.last_event_of_pair]
        update = BatchUpdate(
            version=state.version,
            offsets=dict(offsets),
            users=plan.users,
            user_rows=user_rows,
            user_bias=user_bias,
            items=plan.items,
            item_base=item_base,
            item_delta=item_rows.astype(np.float64) - item_base.astype(np.float64),
            item_bias_delta=item_bias.astype(np.float64) - item_bias_before.astype(np.float64),
            item_count_delta=item_counts - state.item_counts,
            pair_users=[user for user, _ in plan.pairs],
            pair_items=[item for _, item in plan.pairs],
            pair_values=pair_values.astype(np.float64),
            value_sum_delta=value_sum - state.value_sum,
            value_count_delta=value_count - state.value_count,
            events_applied=len(plan.values),
            item_gramian_delta=item_gram - _or_zero(state.item_gramian, k) if implicit else None,
            user_gramian_delta=user_gram - _or_zero(state.user_gramian, k) if implicit else None,
            max_abs_factor=bound,
            item_popularity=batch_item_weights(
                plan.event_item, len(plan.items), self.params.popularity_half_life
            ),
            popularity_half_life=self.params.popularity_half_life,
            user_rows_before=user_rows_before,
            item_rows_before=item_rows_before,
            pair_new=stored_new,
        )
        return update, predictions


@dataclass
class _Deferred:
    """A `Learner.submit`ted batch: learnt by its `wait`, if the batch it follows was applied."""

    learner: Learner
    events: EventColumns
    offsets: dict[int, tuple[int, int]]
    after: PendingBatch | None
    took_effect: bool = False  # applied, or found applied before

    def wait(self, on_diverged: Callable[[list[int]], None] | None = None) -> StepResult:
        if self.after is not None and not (isinstance(self.after, _Deferred) and self.after.took_effect):
            raise BatchSkipped("the batch before this one was not applied")
        result = self.learner.learn(self.events, self.offsets, on_diverged)
        self.took_effect = result.outcome in (ApplyOutcome.APPLIED, ApplyOutcome.DUPLICATE)
        return result


def _or_zero(gram: np.ndarray | None, k: int) -> np.ndarray:
    return np.zeros((k, k)) if gram is None else gram


def _sound(rows: np.ndarray, bias: np.ndarray, bound: float) -> np.ndarray:
    """Per row: all coordinates finite and within ±bound (NaN fails both comparisons)."""
    return (np.abs(rows) <= bound).all(axis=1) & (np.abs(bias) <= bound)


def _restricted(state: BatchState, plan: _BatchPlan, sub: _BatchPlan) -> BatchState:
    """`state` (read for `plan`) cut down to the users, items and pairs of `sub`, a subset of its events."""
    users = _positions(plan.users, sub.users)
    items = _positions(plan.items, sub.items)
    pairs = _positions(plan.pairs, sub.pairs)
    return replace(
        state,
        user_rows=state.user_rows[users],
        user_bias=state.user_bias[users],
        user_present=state.user_present[users],
        user_counts=state.user_counts[users],
        item_rows=state.item_rows[items],
        item_bias=state.item_bias[items],
        item_present=state.item_present[items],
        item_counts=state.item_counts[items],
        pair_values=state.pair_values[pairs],
    )


def _positions(everything: Sequence[Hashable], some: Sequence[Hashable]) -> np.ndarray:
    """Where each of `some` stands in `everything`."""
    at = {key: position for position, key in enumerate(everything)}
    return np.array([at[key] for key in some], dtype=np.int64)


def _with_initial_rows(
    rows: np.ndarray, present: np.ndarray, ids: list[str], params: LearnerParams, side: str
) -> np.ndarray:
    out = rows.astype(DTYPE, copy=True)
    absent = np.flatnonzero(~present)
    if len(absent):
        out[absent] = init_rows([ids[i] for i in absent], out.shape[1], params.init_std, params.seed, side)
    return out


@dataclass(frozen=True)
class _BatchPlan:
    """A batch's events as local indices: unique users, items and (user, item) pairs in first-seen order."""

    users: list[str]
    items: list[str]
    pairs: list[tuple[str, str]]
    event_user: np.ndarray
    event_item: np.ndarray
    event_pair: np.ndarray
    last_event_of_pair: np.ndarray  # (n_pairs,) index of each pair's last event
    values: np.ndarray
    weights: np.ndarray

    @classmethod
    def of(cls, events: EventColumns) -> _BatchPlan:
        # Local indices by dict look-ups in comprehensions, the rest in numpy: no per-event numpy stores.
        user_index: dict[str, int] = {}
        item_index: dict[str, int] = {}
        pair_index: dict[tuple[str, str], int] = {}
        users, items = events.user_ids, events.item_ids
        ev_user = np.array([user_index.setdefault(u, len(user_index)) for u in users], dtype=np.int64)
        ev_item = np.array([item_index.setdefault(i, len(item_index)) for i in items], dtype=np.int64)
        ev_pair = np.array(
            [pair_index.setdefault(key, len(pair_index)) for key in zip(users, items, strict=True)],
            dtype=np.int64,
        )
        n = len(events)
        return cls(
            users=list(user_index),
            items=list(item_index),
            pairs=list(pair_index),
            event_user=ev_user,
            event_item=ev_item,
            event_pair=ev_pair,
            # Each pair's last event: its first occurrence in the reversed sequence.
            last_event_of_pair=(n - 1 - np.unique(ev_pair[::-1], return_index=True)[1]).astype(np.int64),
            values=events.values,
            weights=events.weights,
        )
