"""Both solvers put the same count-independent prior λ_b·b² on a bias (issue #12).

SGD's bias step η_b + 1/(n + λ_b) with η_b = 0 is recursive least squares on Σ_t (r_t − b)² + λ_b·b², so
after a row's events it holds exactly the bias WALS's row solve gives for the same residuals r_t; and
started from a refit's bias it continues as if it had seen the refit's events itself. With item factors
at zero, a user row's bias decouples from its factors, which makes both statements exact.
"""

from __future__ import annotations

import numpy as np
import pytest

from streammf.model.factors import DTYPE, Factors, LossParams
from streammf.model.interactions import Interactions
from streammf.model.sgd import SgdBatch, SgdParams, sgd_step
from streammf.model.wals import fold_in_users

_K = 3


def _sgd_user_bias(
    params: SgdParams,
    values: np.ndarray,
    item_bias: np.ndarray,
    start_bias: float,
    start_count: int,
    value_sum: float,
    value_count: int,
) -> tuple[float, np.ndarray]:
    """One user rates item t with values[t], t = 0..n−1, each pair new; item factors are zero. Returns the
    user's bias after the events and the residual r_t = a_t − μ_t − c_t each event saw."""
    n = len(values)
    batch = SgdBatch(
        user_rows=np.full((1, _K), 0.2, dtype=DTYPE),
        user_bias=np.array([start_bias], dtype=DTYPE),
        user_counts=np.array([start_count], dtype=np.int64),
        item_rows=np.zeros((n, _K), dtype=DTYPE),
        item_bias=item_bias.astype(DTYPE),
        item_counts=np.arange(n, dtype=np.int64) % 3,  # some items new, some not: no effect on the user
        event_user=np.zeros(n, dtype=np.int64),
        event_item=np.arange(n, dtype=np.int64),
        event_pair=np.arange(n, dtype=np.int64),
        event_value=values.astype(np.float64),
        event_weight=np.ones(n),
        pair_new=np.ones(n, dtype=bool),
        user_entered=np.ones(1, dtype=bool),
        item_entered=np.ones(n, dtype=bool),
        value_sum=value_sum,
        value_count=value_count,
        item_gramian=np.zeros((_K, _K)),
        user_gramian=np.zeros((_K, _K)),
    )
    before = batch.item_bias.copy()
    sgd_step(batch, params)
    mu = (value_sum + np.concatenate([[0.0], np.cumsum(values)[:-1]])) / (value_count + np.arange(n))
    return float(batch.user_bias[0]), values - mu - before.astype(np.float64)


def _wals_user_bias(residuals: np.ndarray, loss: LossParams) -> float:
    """WALS's exact row solve for one user whose entries have these residual targets (μ = 0, item
    biases 0, item factors 0)."""
    n = len(residuals)
    rows = Interactions.from_coo(np.zeros(n, dtype=np.int64), np.arange(n), residuals, (1, n), loss)
    factors = Factors(
        np.zeros((1, _K), DTYPE), np.zeros((n, _K), DTYPE), np.zeros(1, DTYPE), np.zeros(n, DTYPE), 0.0
    )
    return float(fold_in_users(rows, factors, loss).bias[0])


@pytest.mark.parametrize("reg_bias", [0.5, 5.0, 25.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_sgd_bias_after_a_rows_events_is_the_wals_row_solve(reg_bias: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    loss = LossParams("explicit", reg=0.05, reg_bias=reg_bias)
    params = SgdParams(loss, learning_rate=0.0, bias_learning_rate=0.0)
    values = rng.integers(1, 6, 7).astype(np.float64)
    item_bias = rng.normal(0.0, 0.4, 7)
    sgd_bias, residuals = _sgd_user_bias(params, values, item_bias, 0.0, 0, 35.0, 10)
    wals_bias = _wals_user_bias(residuals, loss)
    assert sgd_bias == pytest.approx(wals_bias, abs=2e-6)
    assert wals_bias == pytest.approx(residuals.sum() / (len(residuals) + reg_bias), abs=2e-6)
    # Not vacuous: the prior really shrinks the bias away from the plain mean of the residuals.
    assert abs(wals_bias - residuals.mean()) > 0.01


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sgd_continues_a_refit_bias_exactly(seed: int) -> None:
    """After a refresh (the row's bias solved by WALS over its first m events, count m), SGD on the next
    events lands where WALS over all of them would: the stream and the refit agree on rare rows."""
    rng = np.random.default_rng(seed)
    loss = LossParams("explicit", reg=0.05, reg_bias=5.0)
    params = SgdParams(loss, learning_rate=0.0, bias_learning_rate=0.0)
    residuals = rng.normal(0.3, 1.0, 9)
    m = 4
    refit_bias = _wals_user_bias(residuals[:m], loss)
    # μ is held (a huge count of earlier values at mean 3), so residuals are a − 3 − c.
    item_bias = rng.normal(0.0, 0.3, 9 - m)
    values = residuals[m:] + 3.0 + item_bias
    sgd_bias, seen = _sgd_user_bias(params, values, item_bias, refit_bias, m, 3.0e12, 10**12)
    np.testing.assert_allclose(seen, residuals[m:], atol=1e-6)
    assert sgd_bias == pytest.approx(_wals_user_bias(residuals, loss), abs=2e-6)


def test_a_count_weighted_prior_would_not_match() -> None:
    """The equivalence above depends on the prior's form: WALS with λ_b·n (the old rule) gives a row with
    one rating almost its whole residual, where SGD's step keeps 1/(1 + λ_b) of it."""
    loss = LossParams("explicit", reg=0.05, reg_bias=5.0)
    params = SgdParams(loss, learning_rate=0.0, bias_learning_rate=0.0)
    sgd_bias, residuals = _sgd_user_bias(params, np.array([5.0]), np.zeros(1), 0.0, 0, 30.0, 10)
    assert sgd_bias == pytest.approx(residuals[0] / 6.0, abs=1e-6)
    count_weighted = residuals[0] / (1.0 + 0.02 * 1)  # ridge with λ_b·n, λ_b = 0.02: the old WALS bias
    assert abs(sgd_bias - count_weighted) > 1.0
