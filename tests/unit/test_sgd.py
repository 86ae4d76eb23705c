"""The SGD kernel (`streammf.model.sgd.sgd_step`) against its own specification, without any store.

- one event's step is x − η·½∇ℓ, with ∇ℓ the finite-difference gradient of `event_loss_reference`;
- the Gramians it keeps are exactly VᵀV and UᵀU of the rows it updated;
- batch boundaries do not matter (events run strictly in order);
- a step that would leave a row out of bounds is left out without a trace: the batch equals the batch
  without that event (its pair's newness and its rows' Gramian entry pass on to the next event);
- it actually learns: exact recovery of a small rank-2 matrix, low-rank recovery of a random one;
- shapes, finiteness and the empty batch, for random inputs (hypothesis).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streammf.model.factors import DTYPE, LossParams
from streammf.model.sgd import SgdBatch, SgdParams, _prox_row, event_loss_reference, sgd_step

# ------------------------------------------------------------------------------------------- helpers


def _spd(rng: np.random.Generator, k: int, scale: float) -> np.ndarray:
    a = rng.normal(0.0, scale, size=(k + 2, k))
    return a.T @ a + 0.1 * scale * np.eye(k)


@dataclass
class _State:
    """Everything the kernel mutates or carries across batches."""

    user_rows: np.ndarray
    user_bias: np.ndarray
    user_counts: np.ndarray
    item_rows: np.ndarray
    item_bias: np.ndarray
    item_counts: np.ndarray
    value_sum: float
    value_count: int
    item_gramian: np.ndarray
    user_gramian: np.ndarray

    def copy(self) -> _State:
        return _State(
            self.user_rows.copy(),
            self.user_bias.copy(),
            self.user_counts.copy(),
            self.item_rows.copy(),
            self.item_bias.copy(),
            self.item_counts.copy(),
            self.value_sum,
            self.value_count,
            self.item_gramian.copy(),
            self.user_gramian.copy(),
        )

    def batch(self, ev_user, ev_item, ev_value, ev_weight, ev_new) -> SgdBatch:
        return SgdBatch(
            user_rows=self.user_rows,
            user_bias=self.user_bias,
            user_counts=self.user_counts,
            item_rows=self.item_rows,
            item_bias=self.item_bias,
            item_counts=self.item_counts,
            event_user=np.asarray(ev_user, dtype=np.int64),
            event_item=np.asarray(ev_item, dtype=np.int64),
            # Each event its own pair, new or not as the test says; every row already in the model.
            event_pair=np.arange(len(ev_new), dtype=np.int64),
            event_value=np.asarray(ev_value, dtype=np.float64),
            event_weight=np.asarray(ev_weight, dtype=np.float64),
            pair_new=np.array(ev_new, dtype=bool),
            user_entered=np.ones(len(self.user_rows), dtype=bool),
            item_entered=np.ones(len(self.item_rows), dtype=bool),
            value_sum=self.value_sum,
            value_count=self.value_count,
            item_gramian=self.item_gramian,
            user_gramian=self.user_gramian,
        )


def _random_state(
    rng: np.random.Generator, n_users: int, n_items: int, k: int, std: float = 0.3, counts: bool = True
) -> _State:
    return _State(
        user_rows=rng.normal(0.0, std, size=(n_users, k)).astype(DTYPE),
        user_bias=rng.normal(0.0, 0.3, size=n_users).astype(DTYPE),
        user_counts=rng.integers(1, 20, size=n_users).astype(np.int64)
        if counts
        else np.zeros(n_users, np.int64),
        item_rows=rng.normal(0.0, std, size=(n_items, k)).astype(DTYPE),
        item_bias=rng.normal(0.0, 0.3, size=n_items).astype(DTYPE),
        item_counts=rng.integers(1, 20, size=n_items).astype(np.int64)
        if counts
        else np.zeros(n_items, np.int64),
        value_sum=37.0,
        value_count=11,
        item_gramian=_spd(rng, k, 0.5),
        user_gramian=_spd(rng, k, 0.5),
    )


def _run(state: _State, params: SgdParams, ev_user, ev_item, ev_value, ev_weight, ev_new) -> np.ndarray:
    """Run one batch on `state` in place (carrying μ sums); returns the predictions."""
    predictions, value_sum, value_count = sgd_step(
        state.batch(ev_user, ev_item, ev_value, ev_weight, ev_new), params
    )
    state.value_sum, state.value_count = value_sum, value_count
    return predictions


def _central_gradient(f, x: np.ndarray, h: float = 1e-5) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    grad = np.empty_like(x)
    for i in range(len(x)):
        up, down = x.copy(), x.copy()
        up[i] += h
        down[i] -= h
        grad[i] = (f(up) - f(down)) / (2 * h)
    return grad


def _argmin_by_gradient(half_loss_of, x: np.ndarray, lr: float) -> np.ndarray:
    """argmin_y ½ℓ(y) + ‖y − x‖²/2η for a quadratic ℓ, from finite differences only: the objective's
    gradient is affine, so its Hessian and gradient at x (by central differences) give the minimiser."""

    def objective(y: np.ndarray) -> float:
        return 0.5 * half_loss_of(y) + float((y - x) @ (y - x)) / (2 * lr)

    n = len(x)
    g0 = _central_gradient(objective, x)
    hessian = np.column_stack([(_central_gradient(objective, x + np.eye(n)[i]) - g0) for i in range(n)])
    return x - np.linalg.solve(0.5 * (hessian + hessian.T), g0)


# ------------------------------------------------------------------------- one step = −η·½∇ℓ (FD check)

_K = 5
_USER, _ITEM = 2, 1  # the event's local rows; the others must stay untouched


def _one_event_check(
    mode: str, new_pair: bool, fit_biases: bool = True, seed: int = 0, counts: bool = True
) -> None:
    rng = np.random.default_rng(seed)
    loss = LossParams(mode, reg=0.07, reg_bias=0.03, alpha=3.0, w0=0.2)
    params = SgdParams(loss, learning_rate=0.1, bias_learning_rate=0.05, fit_biases=fit_biases)
    state = _random_state(rng, n_users=3, n_items=4, k=_K, counts=counts)
    before = state.copy()
    value, weight = (4.0, 1.7) if mode == "explicit" else (2.0, 0.6)

    predictions = _run(state, params, [_USER], [_ITEM], [value], [weight], [new_pair])

    u = before.user_rows[_USER].astype(np.float64)
    v = before.item_rows[_ITEM].astype(np.float64)
    bu = float(before.user_bias[_USER])
    bv = float(before.item_bias[_ITEM])
    n_u = int(before.user_counts[_USER]) + int(new_pair)  # counts including this event's pair
    m_i = int(before.item_counts[_ITEM]) + int(new_pair)
    explicit = mode == "explicit"
    mu = before.value_sum / before.value_count if explicit and fit_biases else 0.0

    def loss_of(x: np.ndarray) -> float:
        return event_loss_reference(
            x[:_K], x[_K : 2 * _K], x[2 * _K], x[2 * _K + 1], value, weight, new_pair, mu, n_u, m_i,
            before.item_gramian, before.user_gramian, loss,
        )  # fmt: skip

    x0 = np.concatenate([u, v, [bu, bv]])
    grad = _central_gradient(loss_of, x0)

    expected_p = (mu + bu + bv if explicit else 0.0) + float(u @ v)
    np.testing.assert_allclose(predictions, [expected_p], rtol=1e-6, atol=1e-6)

    lr = params.learning_rate
    if explicit:
        expected_u = u - lr * 0.5 * grad[:_K]
        expected_v = v - lr * 0.5 * grad[_K : 2 * _K]
    else:
        # The proximal step: the exact minimiser of ½ℓ(x') + ‖x' − x‖²/2η, row by row, the other row fixed.
        # Check it by its optimality condition, with ∇ℓ by finite differences at the new point.
        expected_u = _argmin_by_gradient(lambda x: loss_of(np.concatenate([x, v, [bu, bv]])), u, lr)
        expected_v = _argmin_by_gradient(lambda x: loss_of(np.concatenate([u, x, [bu, bv]])), v, lr)
    np.testing.assert_allclose(state.user_rows[_USER], expected_u, rtol=1e-4, atol=2e-7)
    np.testing.assert_allclose(state.item_rows[_ITEM], expected_v, rtol=1e-4, atol=2e-7)
    if explicit and fit_biases:
        step_u = params.bias_learning_rate + 1.0 / max(n_u + loss.reg_bias, 1.0)
        step_i = params.bias_learning_rate + 1.0 / max(m_i + loss.reg_bias, 1.0)
        assert state.user_bias[_USER] - bu == pytest.approx(-step_u * 0.5 * grad[2 * _K], rel=1e-4, abs=2e-7)
        assert state.item_bias[_ITEM] - bv == pytest.approx(
            -step_i * 0.5 * grad[2 * _K + 1], rel=1e-4, abs=2e-7
        )
    else:  # implicit, or explicit without biases: biases are held
        np.testing.assert_array_equal(state.user_bias, before.user_bias)
        np.testing.assert_array_equal(state.item_bias, before.item_bias)

    # Guard against a vacuous check: the step really moved the rows.
    assert np.max(np.abs(state.user_rows[_USER] - u)) > 1e-3
    assert np.max(np.abs(state.item_rows[_ITEM] - v)) > 1e-3

    # Nothing else moved; counts grew by one on a new pair only; μ sums advanced by the value.
    others_u = [r for r in range(3) if r != _USER]
    others_i = [r for r in range(4) if r != _ITEM]
    np.testing.assert_array_equal(state.user_rows[others_u], before.user_rows[others_u])
    np.testing.assert_array_equal(state.item_rows[others_i], before.item_rows[others_i])
    np.testing.assert_array_equal(state.user_bias[others_u], before.user_bias[others_u])
    np.testing.assert_array_equal(state.item_bias[others_i], before.item_bias[others_i])
    expected_uc = before.user_counts.copy()
    expected_ic = before.item_counts.copy()
    expected_uc[_USER] += int(new_pair)
    expected_ic[_ITEM] += int(new_pair)
    np.testing.assert_array_equal(state.user_counts, expected_uc)
    np.testing.assert_array_equal(state.item_counts, expected_ic)
    assert state.value_sum == before.value_sum + value
    assert state.value_count == before.value_count + 1


@pytest.mark.parametrize("new_pair", [True, False], ids=["new_pair", "old_pair"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_explicit_step_is_half_gradient_of_event_loss(new_pair: bool, seed: int) -> None:
    _one_event_check("explicit", new_pair, fit_biases=True, seed=seed)


@pytest.mark.parametrize("seed", [0, 1])
def test_explicit_first_pair_of_a_row_brings_its_bias_prior(seed: int) -> None:
    """Rows without pairs yet (n = 0): the event's pair is the first of both rows, so ℓ gains λ_b·(b² + c²)
    and the bias step is 1/(1 + λ_b) (plus η_b)."""
    _one_event_check("explicit", True, fit_biases=True, seed=seed, counts=False)


@pytest.mark.parametrize("new_pair", [True, False], ids=["new_pair", "old_pair"])
def test_explicit_step_without_biases(new_pair: bool) -> None:
    _one_event_check("explicit", new_pair, fit_biases=False, seed=5)


@pytest.mark.parametrize("new_pair", [True, False], ids=["new_pair", "old_pair"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_implicit_step_is_half_gradient_with_proximal_gravity(new_pair: bool, seed: int) -> None:
    _one_event_check("implicit", new_pair, seed=seed)


def test_implicit_new_and_old_pair_steps_differ() -> None:
    """The new-pair loss is not the old-pair one (the check above would pass vacuously if the kernel
    ignored the flag and the reference did too)."""
    rng = np.random.default_rng(9)
    params = SgdParams(LossParams("implicit", reg=0.07, alpha=3.0, w0=0.2), learning_rate=0.1)
    base = _random_state(rng, 3, 4, _K)
    new, old = base.copy(), base.copy()
    _run(new, params, [_USER], [_ITEM], [2.0], [1.0], [True])
    _run(old, params, [_USER], [_ITEM], [2.0], [1.0], [False])
    assert np.max(np.abs(new.user_rows[_USER] - old.user_rows[_USER])) > 1e-3


# ------------------------------------------------------------------------------- Gramians stay exact


@pytest.mark.parametrize("seed", [0, 1])
def test_gramians_track_updated_rows(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k, n_users, n_items, n_events = 6, 15, 12, 400
    params = SgdParams(LossParams("implicit", reg=0.05, alpha=2.0, w0=0.1), learning_rate=0.05)
    state = _random_state(rng, n_users, n_items, k)
    state.user_gramian = state.user_rows.astype(np.float64).T @ state.user_rows.astype(np.float64)
    state.item_gramian = state.item_rows.astype(np.float64).T @ state.item_rows.astype(np.float64)
    start_u, start_v = state.user_rows.copy(), state.item_rows.copy()
    ev_u = rng.integers(0, n_users, n_events)
    ev_i = rng.integers(0, n_items, n_events)
    _run(
        state,
        params,
        ev_u,
        ev_i,
        rng.uniform(0.5, 2.0, n_events),
        np.ones(n_events),
        rng.random(n_events) < 0.3,
    )

    U = state.user_rows.astype(np.float64)
    V = state.item_rows.astype(np.float64)
    assert np.max(np.abs(U - start_u)) > 1e-2  # the rows really moved
    assert np.max(np.abs(V - start_v)) > 1e-2
    for kept, exact in ((state.user_gramian, U.T @ U), (state.item_gramian, V.T @ V)):
        assert np.linalg.norm(kept - exact) <= 1e-8 * np.linalg.norm(exact)


# ---------------------------------------------------------------------------- batch-boundary invariance


def _random_stream(rng: np.random.Generator, n_events: int, n_users: int, n_items: int, mode: str):
    ev_u = rng.integers(0, n_users, n_events)
    ev_i = rng.integers(0, n_items, n_events)
    seen: set[tuple[int, int]] = set()
    ev_new = np.zeros(n_events, dtype=bool)
    for t, pair in enumerate(zip(ev_u.tolist(), ev_i.tolist(), strict=True)):
        ev_new[t] = pair not in seen
        seen.add(pair)
    if mode == "explicit":
        values = rng.integers(1, 6, n_events).astype(np.float64) + rng.choice([0.0, 0.5], n_events)
    else:
        values = rng.uniform(0.2, 2.0, n_events)
    weights = rng.uniform(0.5, 1.5, n_events)
    return ev_u, ev_i, values, weights, ev_new


@pytest.mark.parametrize("mode", ["explicit", "implicit"])
def test_batch_boundaries_do_not_matter(mode: str) -> None:
    rng = np.random.default_rng(123)
    n_users, n_items, k, n_events = 12, 9, 4, 300
    params = SgdParams(LossParams(mode, reg=0.05, reg_bias=0.02, alpha=2.0, w0=0.05), learning_rate=0.03)
    start = _random_state(rng, n_users, n_items, k, counts=False)
    start.value_sum, start.value_count = 0.0, 0
    stream = _random_stream(rng, n_events, n_users, n_items, mode)
    assert stream[4].sum() < n_events // 2  # many repeated pairs

    whole = start.copy()
    whole_predictions = _run(whole, params, *stream)
    assert np.all(np.isfinite(whole_predictions))
    assert np.max(np.abs(whole.user_rows - start.user_rows)) > 1e-2

    for size in (1, 7, 50):
        split = start.copy()
        parts = [
            _run(split, params, *(column[s : s + size] for column in stream))
            for s in range(0, n_events, size)
        ]
        np.testing.assert_array_equal(np.concatenate(parts), whole_predictions)
        np.testing.assert_array_equal(split.user_rows, whole.user_rows)
        np.testing.assert_array_equal(split.item_rows, whole.item_rows)
        np.testing.assert_array_equal(split.user_bias, whole.user_bias)
        np.testing.assert_array_equal(split.item_bias, whole.item_bias)
        np.testing.assert_array_equal(split.user_counts, whole.user_counts)
        np.testing.assert_array_equal(split.item_counts, whole.item_counts)
        np.testing.assert_array_equal(split.user_gramian, whole.user_gramian)
        np.testing.assert_array_equal(split.item_gramian, whole.item_gramian)
        assert (split.value_sum, split.value_count) == (whole.value_sum, whole.value_count)


# ----------------------------------------------------------------------------------- steps left out


def _fresh_batch(rng: np.random.Generator, ev_user, ev_item, ev_pair, n_users: int, n_items: int, k: int):
    """Rows half in the model, half entering at their first event; every pair new (an empty history)."""
    n = len(ev_user)
    return SgdBatch(
        user_rows=rng.normal(0.0, 0.3, size=(n_users, k)).astype(DTYPE),
        user_bias=np.zeros(n_users, DTYPE),
        user_counts=np.arange(n_users, dtype=np.int64) % 2,
        item_rows=rng.normal(0.0, 0.3, size=(n_items, k)).astype(DTYPE),
        item_bias=np.zeros(n_items, DTYPE),
        item_counts=np.arange(n_items, dtype=np.int64) % 2,
        event_user=np.asarray(ev_user, dtype=np.int64),
        event_item=np.asarray(ev_item, dtype=np.int64),
        event_pair=np.asarray(ev_pair, dtype=np.int64),
        event_value=rng.integers(1, 6, size=n).astype(np.float64),
        event_weight=rng.choice([0.5, 1.0, 4.0], size=n),
        pair_new=np.ones(int(np.max(ev_pair, initial=-1)) + 1, dtype=bool),
        user_entered=np.arange(n_users) % 2 == 1,
        item_entered=np.arange(n_items) % 2 == 1,
        value_sum=30.0,
        value_count=10,
        item_gramian=_spd(rng, k, 0.5),
        user_gramian=_spd(rng, k, 0.5),
    )


@pytest.mark.parametrize(
    ("mode", "learning_rate", "bound"), [("explicit", 0.05, 1.0), ("implicit", 0.5, 0.7)]
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_step_left_out_leaves_no_trace(mode: str, learning_rate: float, bound: float, seed: int) -> None:
    """Run a batch under a tight bound, then the same batch without the events it left out: every array
    (rows, biases, counts, Gramians, pair newness, which rows entered) and every prediction is the same,
    bit for bit. A left-out event's prediction is NaN; an applied one's is finite."""
    rng = np.random.default_rng(seed)
    n_users, n_items, k, n = 5, 6, 3, 120
    ev_user, ev_item = rng.integers(n_users, size=n), rng.integers(n_items, size=n)
    ev_pair = ev_user * n_items + ev_item
    params = SgdParams(LossParams(mode, reg=0.05, reg_bias=0.02, alpha=2.0, w0=0.3), learning_rate)  # type: ignore[arg-type]
    full = _fresh_batch(np.random.default_rng(seed), ev_user, ev_item, ev_pair, n_users, n_items, k)
    predictions, value_sum, value_count = sgd_step(full, params, bound)
    applied = np.isfinite(predictions)
    assert 0 < applied.sum() < n  # the bound binds for some steps, not all
    if mode == "implicit":  # some left-out step is a row's entry into a Gramian (restored from its copy)
        before = _fresh_batch(np.random.default_rng(seed), ev_user, ev_item, ev_pair, n_users, n_items, k)
        entered_u, entered_i, entering_left_out = before.user_entered.copy(), before.item_entered.copy(), 0
        for t in range(n):
            if not applied[t]:
                entering_left_out += int(not entered_u[ev_user[t]] or not entered_i[ev_item[t]])
            else:
                entered_u[ev_user[t]] = entered_i[ev_item[t]] = True
        assert entering_left_out > 0
    kept = np.flatnonzero(applied)
    part = _fresh_batch(np.random.default_rng(seed), ev_user, ev_item, ev_pair, n_users, n_items, k)
    part = replace(
        part,
        event_user=part.event_user[kept],
        event_item=part.event_item[kept],
        event_pair=part.event_pair[kept],
        event_value=full.event_value[kept],
        event_weight=full.event_weight[kept],
    )
    part_predictions, part_sum, part_count = sgd_step(part, params, bound)
    np.testing.assert_array_equal(part_predictions, predictions[kept])
    assert (part_sum, part_count) == (value_sum, value_count) and value_count == 10 + len(kept)
    for field in ("user_rows", "user_bias", "user_counts", "item_rows", "item_bias", "item_counts",
                  "pair_new", "user_entered", "item_entered", "item_gramian", "user_gramian"):  # fmt: skip
        np.testing.assert_array_equal(getattr(part, field), getattr(full, field), err_msg=field)
    for rows in (full.user_rows, full.item_rows, full.user_bias, full.item_bias):
        assert np.isfinite(rows).all() and np.abs(rows).max() <= bound


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_an_implicit_step_whose_system_overflows_is_left_out_not_raised(seed: int) -> None:
    """Weights near the float limits (an operator may raise STREAMMF_MODEL__WEIGHT_MAX that far) make the
    proximal system's pivots overflow to inf − inf or round to 0: the event is left out (NaN prediction,
    rows untouched), never a division by zero out of the kernel."""
    rng = np.random.default_rng(seed)
    k, n = 6, 40
    gram = _spd(rng, k, 0.5)
    user_rows = rng.normal(0, 0.1, (1, k)).astype(DTYPE)
    item_rows = rng.normal(0, 0.1, (1, k)).astype(DTYPE)
    batch = SgdBatch(
        user_rows=user_rows.copy(),
        user_bias=np.zeros(1, dtype=DTYPE),
        user_counts=np.array([3]),
        item_rows=item_rows.copy(),
        item_bias=np.zeros(1, dtype=DTYPE),
        item_counts=np.array([4]),
        event_user=np.zeros(n, dtype=np.int64),
        event_item=np.zeros(n, dtype=np.int64),
        event_pair=np.zeros(n, dtype=np.int64),
        event_value=np.full(n, 5.0),
        event_weight=10.0 ** rng.uniform(20, 300, size=n),
        pair_new=np.array([True]),
        user_entered=np.array([True]),
        item_entered=np.array([True]),
        value_sum=0.0,
        value_count=0,
        item_gramian=gram.copy(),
        user_gramian=gram.copy(),
    )
    predictions, _, value_count = sgd_step(batch, SgdParams(LossParams("implicit"), 0.05), 100.0)
    assert np.isnan(predictions).all() and value_count == 0
    np.testing.assert_array_equal(batch.user_rows, user_rows)
    np.testing.assert_array_equal(batch.item_rows, item_rows)


# ------------------------------------------------------------------------------------------ it learns


def _epoch_batch(U, V, users, items, values) -> SgdBatch:
    """A plain-SGD epoch: every observation counts as a new pair, so every step carries its L2 share
    (the weighted-λ objective Σ_obs [e² + λ(‖u‖² + ‖v‖²)]); counts and μ are unused without biases."""
    n = len(users)
    return SgdBatch(
        user_rows=U,
        user_bias=np.zeros(len(U), dtype=DTYPE),
        user_counts=np.zeros(len(U), dtype=np.int64),
        item_rows=V,
        item_bias=np.zeros(len(V), dtype=DTYPE),
        item_counts=np.zeros(len(V), dtype=np.int64),
        event_user=np.asarray(users, dtype=np.int64),
        event_item=np.asarray(items, dtype=np.int64),
        event_pair=np.arange(n, dtype=np.int64),
        event_value=np.asarray(values, dtype=np.float64),
        event_weight=np.ones(n),
        pair_new=np.ones(n, dtype=bool),
        user_entered=np.ones(len(U), dtype=bool),
        item_entered=np.ones(len(V), dtype=bool),
        value_sum=0.0,
        value_count=0,
        item_gramian=np.zeros((U.shape[1], U.shape[1])),
        user_gramian=np.zeros((U.shape[1], U.shape[1])),
    )


_RANK2 = np.array([[3, 1, 1, 3, 1], [1, 2, 4, 1, 3], [3, 1, 1, 3, 1], [4, 3, 5, 4, 4]], dtype=np.float64)
_HIDDEN = {(0, 1): 1.0, (3, 2): 5.0}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_hidden_entries_of_rank2_matrix(seed: int) -> None:
    """The two hidden entries are determined by rank 2 (row 0 = row 2 on the observed columns; row 3 =
    row 1 + row 2), so the minimiser of the barely-regularised objective predicts them."""
    assert np.linalg.matrix_rank(_RANK2) == 2
    rng = np.random.default_rng(seed)
    observed = [(i, j) for i in range(4) for j in range(5) if (i, j) not in _HIDDEN]
    assert len(observed) == 18
    rows = np.array([i for i, _ in observed])
    cols = np.array([j for _, j in observed])
    U = rng.normal(0.0, 0.5, size=(4, 2)).astype(DTYPE)
    V = rng.normal(0.0, 0.5, size=(5, 2)).astype(DTYPE)
    loss = LossParams("explicit", reg=1e-4, reg_bias=0.0, reg_prior=0.0)
    epochs = 2000
    for epoch in range(epochs):
        params = SgdParams(loss, learning_rate=0.05 / (1.0 + 0.001 * epoch), fit_biases=False)
        order = rng.permutation(len(observed))
        sgd_step(_epoch_batch(U, V, rows[order], cols[order], _RANK2[rows[order], cols[order]]), params)
    predicted = U.astype(np.float64) @ V.astype(np.float64).T
    for (i, j), truth in _HIDDEN.items():
        assert predicted[i, j] == pytest.approx(truth, abs=0.05), f"entry ({i}, {j})"
    assert np.sqrt(np.mean((predicted[rows, cols] - _RANK2[rows, cols]) ** 2)) < 0.02


def test_recovers_low_rank_matrix_held_out() -> None:
    rng = np.random.default_rng(7)
    n_users, n_items, rank = 40, 30, 3
    truth = rng.normal(0.0, 1.0, (n_users, rank)) @ rng.normal(0.0, 1.0, (rank, n_items))
    mask = rng.random((n_users, n_items)) < 0.7
    train_u, train_i = np.nonzero(mask)
    test_u, test_i = np.nonzero(~mask)
    U = rng.normal(0.0, 0.3, size=(n_users, rank)).astype(DTYPE)
    V = rng.normal(0.0, 0.3, size=(n_items, rank)).astype(DTYPE)
    loss = LossParams("explicit", reg=0.01, reg_bias=0.0, reg_prior=0.0)

    def held_out_rmse() -> float:
        predicted = U.astype(np.float64) @ V.astype(np.float64).T
        return float(np.sqrt(np.mean((predicted[test_u, test_i] - truth[test_u, test_i]) ** 2)))

    initial = held_out_rmse()
    for epoch in range(300):
        params = SgdParams(loss, learning_rate=0.02 / (1.0 + 0.01 * epoch), fit_biases=False)
        order = rng.permutation(len(train_u))
        sgd_step(
            _epoch_batch(U, V, train_u[order], train_i[order], truth[train_u[order], train_i[order]]), params
        )
    spread = float(np.std(truth[test_u, test_i]))
    final = held_out_rmse()
    assert final < 0.1 * spread, (final, spread, initial)


# ------------------------------------------------------------------------------- properties (hypothesis)


@st.composite
def _batches(draw):
    mode = draw(st.sampled_from(["explicit", "implicit"]))
    k = draw(st.integers(1, 6))
    n_users = draw(st.integers(1, 6))
    n_items = draw(st.integers(1, 6))
    n_events = draw(st.integers(0, 25))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    state = _random_state(rng, n_users, n_items, k, std=0.2, counts=draw(st.booleans()))
    state.value_count = draw(st.integers(0, 50))
    state.value_sum = 3.0 * state.value_count
    stream = _random_stream(rng, n_events, n_users, n_items, mode)
    params = SgdParams(
        LossParams(mode, reg=0.05, reg_bias=0.02, alpha=draw(st.sampled_from([0.0, 1.0, 5.0])), w0=0.05),
        learning_rate=draw(st.sampled_from([0.001, 0.01, 0.05])),
        fit_biases=draw(st.booleans()),
    )
    return state, stream, params


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_batches())
def test_outputs_keep_shapes_and_stay_finite(case) -> None:
    state, stream, params = case
    before = state.copy()
    predictions = _run(state, params, *stream)
    n_events = len(stream[0])
    assert predictions.shape == (n_events,)
    assert np.all(np.isfinite(predictions))
    for name in ("user_rows", "user_bias", "user_counts", "item_rows", "item_bias", "item_counts"):
        new, old = getattr(state, name), getattr(before, name)
        assert new.shape == old.shape and new.dtype == old.dtype, name
        assert np.all(np.isfinite(new)), name
    assert state.user_gramian.shape == state.item_gramian.shape == (state.user_rows.shape[1],) * 2
    assert np.all(np.isfinite(state.user_gramian)) and np.all(np.isfinite(state.item_gramian))
    assert state.value_count == before.value_count + n_events
    assert state.value_sum == pytest.approx(before.value_sum + float(np.sum(stream[2])))
    assert np.sum(state.user_counts - before.user_counts) == int(np.sum(stream[4]))


@settings(max_examples=30, deadline=None)
@given(_batches())
def test_empty_batch_changes_nothing(case) -> None:
    state, _, params = case
    before = state.copy()
    empty_i = np.empty(0, dtype=np.int64)
    empty_f = np.empty(0, dtype=np.float64)
    predictions = _run(state, params, empty_i, empty_i, empty_f, empty_f, np.empty(0, dtype=bool))
    assert predictions.shape == (0,)
    for name in (
        "user_rows", "user_bias", "user_counts", "item_rows", "item_bias", "item_counts",
        "item_gramian", "user_gramian",
    ):  # fmt: skip
        np.testing.assert_array_equal(getattr(state, name), getattr(before, name), err_msg=name)
    assert (state.value_sum, state.value_count) == (before.value_sum, before.value_count)


def _textbook_prox_row(
    G: np.ndarray, c: float, x: np.ndarray, other: np.ndarray, a: float, b: float, shift: float
) -> np.ndarray:
    """`_prox_row`'s system solved by the textbook Cholesky (left-looking, one entry at a time)."""
    k = len(x)
    rhs = [x[f] + b * other[f] for f in range(k)]
    m = [[c * G[f, h] + a * other[f] * other[h] for h in range(k)] for f in range(k)]
    for f in range(k):
        m[f][f] += 1.0 + shift
    for j in range(k):
        total = m[j][j]
        for p in range(j):
            total -= m[j][p] * m[j][p]
        m[j][j] = math.sqrt(total)
        for i in range(j + 1, k):
            total = m[i][j]
            for p in range(j):
                total -= m[i][p] * m[j][p]
            m[i][j] = total / m[j][j]
    y = [0.0] * k
    for i in range(k):
        total = rhs[i]
        for p in range(i):
            total -= m[i][p] * y[p]
        y[i] = total / m[i][i]
    out = [0.0] * k
    for i in range(k - 1, -1, -1):
        total = y[i]
        for p in range(i + 1, k):
            total -= m[p][i] * out[p]
        out[i] = total / m[i][i]
    return np.array(out)


@pytest.mark.parametrize("k", [1, 3, 4, 5, 32, 37])
def test_the_proximal_solve_is_the_textbook_cholesky_to_the_bit(k: int) -> None:
    """The kernel's Cholesky runs several entries side by side for speed; each must still take the
    textbook form's operations in its order, or a model's bytes would depend on the loop layout."""
    rng = np.random.default_rng(k)
    rows = rng.normal(size=(50, k))
    G = rows.T @ rows
    x, other = rng.normal(size=k), rng.normal(size=k)
    out, system, work = np.empty(k), np.empty((k, k)), np.empty(k)
    _prox_row(G, 0.37, x, other, 0.81, 1.3, 0.02, out, system, work)
    expected = _textbook_prox_row(G, 0.37, x, other, 0.81, 1.3, 0.02)
    assert out.tobytes() == expected.tobytes()
    np.testing.assert_allclose(
        (np.eye(k) * 1.02 + 0.37 * G + 0.81 * np.outer(other, other)) @ out, x + 1.3 * other, rtol=1e-9
    )
