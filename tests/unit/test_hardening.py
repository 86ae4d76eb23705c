"""One extreme event, or a model already damaged, must never leave a non-finite or exploding row behind:
the learner leaves out (and reports) the events that would, repairs damaged rows it reads, and a refresh
rebuilds a damaged model from its interactions. On the in-memory store; tests/integration/test_hardening.py
runs the same cases through Kafka and Redis."""

from __future__ import annotations

import numpy as np
import pytest

from streammf.config import ModelSettings
from streammf.model.factors import LossParams
from streammf.model.sgd import SgdParams
from streammf.store.contract import ApplyOutcome
from streammf.store.memory import MemoryStore
from streammf.stream.events import Event
from streammf.stream.learner import DamagedGramianError, Learner, LearnerParams
from streammf.stream.refresh import refresh

K = 4
BOUND = 20.0


def _params(mode: str = "explicit", max_gradient: float = float("inf")) -> LearnerParams:
    loss = LossParams(mode, reg=0.05, reg_bias=0.02, alpha=2.0, w0=0.05)
    sgd = SgdParams(loss, learning_rate=0.05, max_gradient=max_gradient)
    return LearnerParams(sgd, init_std=0.1, seed=3, max_abs_factor=BOUND)


def _ratings(n: int, seed: int = 0) -> list[Event]:
    rng = np.random.default_rng(seed)
    return [
        Event(user_id=f"u{rng.integers(30)}", item_id=f"i{rng.integers(20)}", value=float(rng.integers(1, 6)))
        for _ in range(n)
    ]


def _all_rows(store: MemoryStore) -> np.ndarray:
    return np.array([*store.user_rows.values(), *store.item_rows.values()])


def test_an_event_that_would_explode_a_row_is_left_out_and_the_rest_applies() -> None:
    store = MemoryStore("m", "explicit", K)
    learner = Learner(store, _params())
    learner.learn(_ratings(300), {0: (0, 300)})
    batch = _ratings(200, seed=1)
    batch.insert(77, Event(user_id="u3", item_id="i4", value=1e6, weight=50.0))
    heard: list[list[int]] = []
    result = learner.learn(batch, {0: (300, 501)}, on_diverged=heard.append)
    assert result.outcome is ApplyOutcome.APPLIED
    assert result.diverged == (77,)
    assert heard == [[77]]
    assert result.applied == 200 and np.isfinite(result.predictions).all()
    assert store.events_applied() == 500
    rows = _all_rows(store)
    assert np.isfinite(rows).all() and np.abs(rows).max() <= BOUND
    assert store.applied_offsets() == {0: 501}  # the left-out event is consumed, not polled again


def test_without_the_guard_the_same_event_destroys_the_model() -> None:
    """The guard is what keeps the model: the same batch with no bound leaves rows huge or NaN."""
    store = MemoryStore("m", "explicit", K)
    params = _params()
    unguarded = LearnerParams(params.sgd, params.init_std, params.seed)
    learner = Learner(store, unguarded)
    learner.learn(_ratings(300), {0: (0, 300)})
    batch = _ratings(200, seed=1)
    batch.insert(77, Event(user_id="u3", item_id="i4", value=1e6, weight=50.0))
    learner.learn(batch, {0: (300, 501)})
    rows = _all_rows(store)
    assert not (np.isfinite(rows).all() and np.abs(rows).max() <= BOUND)


class _CountingLearner(Learner):
    computes = 0

    def compute(self, plan, state, offsets):  # type: ignore[no-untyped-def]
        self.computes += 1
        return super().compute(plan, state, offsets)


def test_a_batch_full_of_diverging_events_costs_two_computes_not_a_search_per_event() -> None:
    """Valid events within the default bounds (one pair, value +10 / -10 alternating, weight 100) whose steps
    soon push the pair's rows past the default MAX_ABS_FACTOR: all but the first few are left out. Each
    used to be found by bisecting the batch (log2 n computes per event: 10.8 s for this batch, ~200
    events/s for a daemon fed such a stream); the kernel now leaves them out as it goes, and the update is
    computed once more from the events kept."""
    params = LearnerParams.from_settings(ModelSettings(name="m"))
    store = MemoryStore("m", "explicit", K)
    learner = _CountingLearner(store, params)
    events = [Event(user_id="u", item_id="i", value=(-10.0, 10.0)[t % 2], weight=100.0) for t in range(2000)]
    heard: list[list[int]] = []
    result = learner.learn(events, {0: (0, 2000)}, on_diverged=heard.append)
    assert learner.computes == 2
    assert len(result.diverged) > 1900 and heard == [list(result.diverged)]
    assert result.applied == 2000 - len(result.diverged) and np.isfinite(result.predictions).all()
    assert store.events_applied() == result.applied and store.applied_offsets() == {0: 2000}
    rows = _all_rows(store)
    assert np.isfinite(rows).all() and np.abs(rows).max() <= params.max_abs_factor


class _RefusingLearner(Learner):
    """Finds the whole update out of bounds whenever it writes user "evil", though no step leaves a row
    out of bounds: the case the kernel's per-step check cannot see, handled by bisection."""

    def _in_bounds(self, state, update, predictions):  # type: ignore[no-untyped-def]
        return "evil" not in update.users and super()._in_bounds(state, update, predictions)


def test_an_update_out_of_bounds_that_no_single_step_shows_is_bisected(caplog) -> None:  # type: ignore[no-untyped-def]
    store = MemoryStore("m", "explicit", K)
    learner = _RefusingLearner(store, _params())
    batch = _ratings(20, seed=4)
    batch[3] = Event(user_id="evil", item_id="i1", value=3.0)
    batch[11] = Event(user_id="evil", item_id="i2", value=4.0)
    result = learner.learn(batch, {0: (0, 20)})
    assert result.diverged == (3, 11) and result.applied == 18
    assert "evil" not in store.user_rows and store.events_applied() == 18
    assert "bisecting it" in caplog.text


def test_a_clipped_gradient_keeps_one_extreme_rating_from_moving_rows_far() -> None:
    store = MemoryStore("m", "explicit", K)
    learner = Learner(store, _params(max_gradient=20.0))
    learner.learn(_ratings(300), {0: (0, 300)})
    result = learner.learn([Event(user_id="u3", item_id="i4", value=1e6)], {0: (300, 301)})
    assert result.diverged == ()  # clipped: one step of at most 20·lr per unit of the other row
    assert np.abs(_all_rows(store)).max() <= BOUND


@pytest.mark.parametrize("mode", ["explicit", "implicit"])
def test_damaged_rows_read_by_a_batch_start_again_from_their_initial_row(mode: str) -> None:
    store = MemoryStore("m", mode, K)  # type: ignore[arg-type]
    learner = Learner(store, _params(mode))
    learner.learn(_ratings(300), {0: (0, 300)})
    store.user_rows["u3"][:] = np.nan
    store.item_rows["i4"][0] = np.inf
    store.item_rows["i5"][1] = 1e30  # finite but far out of bounds
    result = learner.learn(
        [Event(user_id="u3", item_id="i4", value=4.0), Event(user_id="u9", item_id="i5", value=2.0)],
        {0: (300, 302)},
    )
    assert result.diverged == () and result.applied == 2
    for row in (store.user_rows["u3"], store.item_rows["i4"], store.item_rows["i5"]):
        assert np.isfinite(row).all() and np.abs(row).max() <= BOUND


def test_a_damaged_gramian_stops_implicit_updates_until_a_refresh_rebuilds_it() -> None:
    store = MemoryStore("m", "implicit", K)
    params = _params("implicit")
    learner = Learner(store, params)
    learner.learn(_ratings(300), {0: (0, 300)})
    assert store.item_gramian is not None
    store.item_gramian[0, 0] = np.nan
    with pytest.raises(DamagedGramianError):
        learner.learn(_ratings(5, seed=2), {0: (300, 305)})
    assert store.events_applied() == 300  # nothing of the refused batch was applied
    report = refresh(store, params, 2)
    assert report.published
    assert learner.learn(_ratings(5, seed=2), {0: (300, 305)}).outcome is ApplyOutcome.APPLIED


@pytest.mark.parametrize("mode", ["explicit", "implicit"])
def test_refresh_repairs_a_model_with_non_finite_rows_and_mean(mode: str) -> None:
    store = MemoryStore("m", mode, K)  # type: ignore[arg-type]
    params = _params(mode)
    Learner(store, params).learn(_ratings(500), {0: (0, 500)})
    for ident in list(store.user_rows)[:10]:
        store.user_rows[ident][:] = np.nan
    for ident in list(store.item_rows)[:5]:
        store.item_rows[ident][:] = np.inf
    store.value_sum = float("nan")
    report = refresh(store, params, 3)
    assert report.published
    rows = _all_rows(store)
    assert np.isfinite(rows).all()
    assert report.users == 30 and report.items == 20


def test_mode_default_bounds_suit_ratings_and_strengths() -> None:
    assert ModelSettings(mode="explicit").bounds == (-10.0, 10.0, 100.0)
    assert ModelSettings(mode="implicit").bounds[0] == 0.0
    assert ModelSettings(mode="explicit", value_max=100).bounds == (-10.0, 100.0, 100.0)
    with pytest.raises(ValueError, match="value_min"):
        ModelSettings(value_min=5, value_max=1)
    with pytest.raises(ValueError, match="implicit"):
        ModelSettings(mode="implicit", value_min=-1)
