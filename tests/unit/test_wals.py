"""WALS row solves: kernels vs numpy references vs dense least squares, descent, recovery, fold-in."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streammf.model.factors import DTYPE, Factors, LossParams, Mode, NonFiniteFactorsError
from streammf.model.interactions import Interactions
from streammf.model.objective import objective, rmse, weighted_reg
from streammf.model.wals import (
    CG_STEPS,
    _cg_rows_kernel,
    _chunk_starts,
    _row_problem,
    _RowProblem,
    _solve_rows,
    _solve_rows_cg_reference,
    _solve_rows_reference,
    fold_in_items,
    fold_in_users,
    solve_items,
    solve_users,
    wals,
)
from tests.unit.problems import random_problem as shared_random_problem

SOLVERS = ("cholesky", "cg")


def random_problem(
    seed: int,
    mode: Mode,
    n_users: int = 17,
    n_items: int = 11,
    density: float = 0.4,
    k: int = 4,
    w0: float = 0.2,
) -> tuple[Interactions, Factors, LossParams]:
    params = LossParams(mode, reg=0.05, reg_bias=0.02, alpha=3.0, w0=w0)
    return shared_random_problem(
        seed,
        mode,
        n_users,
        n_items,
        density,
        k,
        params=params,
        empty_first_row_and_column=True,
        global_mean=3.0,
    )


def user_problem(
    interactions: Interactions, factors: Factors, params: LossParams, fit_biases: bool
) -> _RowProblem:
    return _row_problem(
        interactions,
        other=factors.item,
        other_bias=factors.item_bias,
        own_bias=factors.user_bias,
        global_mean=factors.global_mean,
        params=params,
        reg=None,
        fit_biases=fit_biases,
    )


CASES = [
    ("implicit", True, 0.2),
    ("implicit", True, 0.0),
    ("explicit", True, 0.0),
    ("explicit", False, 0.0),
]


# --- kernels vs numpy references ------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "fit_biases", "w0"), CASES)
@pytest.mark.parametrize("seed", range(3))
def test_cholesky_kernel_matches_numpy_reference(mode: Mode, fit_biases: bool, w0: float, seed: int) -> None:
    interactions, factors, params = random_problem(seed, mode, w0=w0, n_users=60, k=7)
    problem = user_problem(interactions, factors, params, fit_biases)
    fast = _solve_rows(problem, None, None, "cholesky", side="user")
    slow = _solve_rows_reference(problem)
    np.testing.assert_allclose(fast.factors, slow.factors, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fast.bias, slow.bias, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("mode", "fit_biases", "w0"), CASES)
@pytest.mark.parametrize("seed", range(3))
def test_cg_kernel_matches_numpy_reference(mode: Mode, fit_biases: bool, w0: float, seed: int) -> None:
    interactions, factors, params = random_problem(seed, mode, w0=w0, n_users=60, k=7)
    problem = user_problem(interactions, factors, params, fit_biases)
    fast = _solve_rows(problem, factors.user, factors.user_bias, "cg", side="user")
    slow = _solve_rows_cg_reference(problem, factors.user, factors.user_bias, CG_STEPS)
    np.testing.assert_allclose(fast.factors, slow.factors, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fast.bias, slow.bias, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["implicit", "explicit"])
def test_cg_with_enough_steps_is_the_exact_solve(mode: Mode) -> None:
    interactions, factors, params = random_problem(7, mode, k=5)
    problem = user_problem(interactions, factors, params, fit_biases=True)
    targets = problem.rows.targets
    out = factors.user.copy()
    out_bias = factors.user_bias.copy()
    _cg_rows_kernel(
        targets.indptr, targets.indices, targets.data, problem.rows.weights, problem.other,
        problem.other_bias, problem.fixed_bias, problem.gram, problem.w0, problem.reg, problem.bias_reg,
        problem.offset, problem.implicit, problem.fit_bias,
        _chunk_starts(problem.rows.row_counts(), problem.dim), 4 * problem.dim, out, out_bias,
    )  # fmt: skip
    exact = _solve_rows_reference(problem)
    np.testing.assert_allclose(out, exact.factors, atol=2e-5)
    np.testing.assert_allclose(out_bias, exact.bias, atol=2e-5)


# --- each row solve is the exact minimiser of the dense objective ---------------------------------


def dense_row_minimiser(
    interactions: Interactions, factors: Factors, params: LossParams, user: int
) -> tuple[np.ndarray, float]:
    """argmin over (u_i, b_i) of the dense objective, by weighted least squares with lstsq."""
    dense_targets = interactions.targets.toarray()[user].astype(np.float64)
    observed = np.zeros(interactions.shape[1], dtype=bool)
    row_weights = np.zeros(interactions.shape[1])
    start, end = interactions.targets.indptr[user], interactions.targets.indptr[user + 1]
    observed[interactions.targets.indices[start:end]] = True
    row_weights[interactions.targets.indices[start:end]] = interactions.weights[start:end]
    n_i = observed.sum()
    item = factors.item.astype(np.float64)
    if params.mode == "implicit":
        # Every column is a term: weight w_ij towards 1 if observed, w0 towards 0 otherwise.
        weight = np.where(observed, row_weights, params.w0)
        target = observed.astype(np.float64)
        design = item
        ridge = np.full(factors.k, params.reg * n_i + params.reg_prior * (n_i > 0))
    else:
        weight = row_weights[observed]
        target = dense_targets[observed] - factors.global_mean - factors.item_bias[observed]
        design = np.hstack([item[observed], np.ones((n_i, 1))])
        ridge = np.append(
            np.full(factors.k, params.reg * n_i + params.reg_prior * (n_i > 0)), params.reg_bias
        )
    stacked = np.vstack([np.sqrt(weight)[:, None] * design, np.diag(np.sqrt(ridge))])
    rhs = np.concatenate([np.sqrt(weight) * target, np.zeros(ridge.size)])
    solution = np.linalg.lstsq(stacked, rhs, rcond=None)[0]
    if params.mode == "implicit":
        return solution, 0.0
    return solution[:-1], float(solution[-1])


@pytest.mark.parametrize("mode", ["implicit", "explicit"])
@pytest.mark.parametrize("seed", range(3))
def test_user_solve_is_the_dense_least_squares_minimiser(mode: Mode, seed: int) -> None:
    interactions, factors, params = random_problem(seed, mode)
    solved = solve_users(interactions, factors, params, solver="cholesky")
    for user in range(interactions.shape[0]):
        expected_row, expected_bias = dense_row_minimiser(interactions, factors, params, user)
        np.testing.assert_allclose(solved.user[user], expected_row, rtol=1e-4, atol=1e-5)
        assert solved.user_bias[user] == pytest.approx(expected_bias, abs=1e-5)


@pytest.mark.parametrize("mode", ["implicit", "explicit"])
def test_item_solve_is_the_user_solve_of_the_transposed_problem(mode: Mode) -> None:
    interactions, factors, params = random_problem(3, mode)
    solved = solve_items(interactions, factors, params, solver="cholesky")
    flipped = Factors(factors.item, factors.user, factors.item_bias, factors.user_bias, factors.global_mean)
    for item in range(interactions.shape[1]):
        expected_row, expected_bias = dense_row_minimiser(interactions.transposed, flipped, params, item)
        np.testing.assert_allclose(solved.item[item], expected_row, rtol=1e-4, atol=1e-5)
        assert solved.item_bias[item] == pytest.approx(expected_bias, abs=1e-5)


def test_rows_without_observations_are_zero() -> None:
    interactions, factors, params = random_problem(0, "explicit")
    for solver in SOLVERS:
        solved = wals(interactions, factors, params, 1, solver=solver)
        assert not solved.user[0].any() and solved.user_bias[0] == 0.0
        assert not solved.item[0].any() and solved.item_bias[0] == 0.0


# --- descent --------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize(("mode", "fit_biases", "w0"), CASES)
@pytest.mark.parametrize("seed", range(4))
def test_objective_never_increases_across_half_steps(
    solver: str, mode: Mode, fit_biases: bool, w0: float, seed: int
) -> None:
    interactions, factors, params = random_problem(seed, mode, w0=w0, n_users=40, n_items=25, k=6)
    current = factors
    previous = objective(interactions, current, params)
    for _ in range(6):
        for half_step in (solve_users, solve_items):
            current = half_step(interactions, current, params, fit_biases=fit_biases, solver=solver)
            value = objective(interactions, current, params)
            # Slack: factors are stored as float32 after a float64 solve.
            assert value <= previous * (1 + 1e-6) + 1e-9
            previous = value


def test_wals_reports_each_iteration_and_leaves_inputs_untouched() -> None:
    interactions, factors, params = random_problem(1, "explicit")
    before = factors.copy()
    trace: list[tuple[int, float]] = []
    result = wals(
        interactions,
        factors,
        params,
        3,
        callback=lambda it, f: trace.append((it, objective(interactions, f, params))),
    )
    assert [it for it, _ in trace] == [0, 1, 2]
    assert trace[-1][1] == pytest.approx(objective(interactions, result, params))
    for name in ("user", "item", "user_bias", "item_bias"):
        np.testing.assert_array_equal(getattr(factors, name), getattr(before, name))


def test_cg_default_reaches_the_exact_objective() -> None:
    interactions, factors, params = random_problem(2, "implicit", n_users=80, n_items=50, k=8)
    # ALS from one start converges slowly; both solvers approach the same value (0.4% apart after 15
    # iterations, 0.002% after 30 on this problem).
    exact = objective(interactions, wals(interactions, factors, params, 30, solver="cholesky"), params)
    default = objective(interactions, wals(interactions, factors, params, 30), params)
    assert default == pytest.approx(exact, rel=1e-3)


# --- recovery -------------------------------------------------------------------------------------


def test_recovers_two_hidden_entries_of_a_rank_two_matrix() -> None:
    matrix = np.array([[3, 1, 1, 3, 1], [1, 2, 4, 1, 3], [3, 1, 1, 3, 1], [4, 3, 5, 4, 4]], dtype=float)
    observed = np.ones_like(matrix, dtype=bool)
    observed[0, 1] = observed[3, 2] = False
    users, items = np.nonzero(observed)
    params = LossParams("explicit", reg=1e-3, reg_bias=0.0, reg_prior=0.0)
    interactions = Interactions.from_coo(users, items, matrix[users, items], matrix.shape, params)
    rng = np.random.default_rng(0)
    # No biases: they are held at zero with μ = 0 (fit_biases=False), so p = ⟨u, v⟩.
    start = Factors(
        rng.normal(0, 1, (4, 2)).astype(DTYPE),
        rng.normal(0, 1, (5, 2)).astype(DTYPE),
        np.zeros(4, DTYPE),
        np.zeros(5, DTYPE),
        0.0,
    )
    for solver in SOLVERS:
        solved = wals(interactions, start, params, 100, fit_biases=False, solver=solver)
        assert not solved.user_bias.any() and not solved.item_bias.any()
        predicted = solved.user.astype(np.float64) @ solved.item.T
        assert predicted[0, 1] == pytest.approx(1.0, abs=0.05)
        assert predicted[3, 2] == pytest.approx(5.0, abs=0.05)


def test_recovers_a_low_rank_matrix_from_sixty_percent_of_its_entries() -> None:
    rng = np.random.default_rng(42)
    n_users, n_items, rank = 50, 40, 3
    truth = rng.normal(0, 1, (n_users, rank)) @ rng.normal(0, 1, (rank, n_items)) + 3.0
    observed = rng.random(truth.shape) < 0.6
    users, items = np.nonzero(observed)
    held_users, held_items = np.nonzero(~observed)
    params = LossParams("explicit", reg=1e-4, reg_bias=1e-4, reg_prior=0.0)
    interactions = Interactions.from_coo(users, items, truth[users, items], truth.shape, params)
    start = Factors(
        rng.normal(0, 0.1, (n_users, rank)).astype(DTYPE),
        rng.normal(0, 0.1, (n_items, rank)).astype(DTYPE),
        np.zeros(n_users, DTYPE),
        np.zeros(n_items, DTYPE),
        float(truth[observed].mean()),
    )
    solved = wals(interactions, start, params, 60)
    assert rmse(solved, held_users, held_items, truth[~observed]) < 0.05 * truth.std()


# --- fold-in --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["implicit", "explicit"])
def test_fold_in_users_matches_the_full_user_solve(mode: Mode) -> None:
    interactions, factors, params = random_problem(5, mode)
    trained = wals(interactions, factors, params, 3)
    full = solve_users(interactions, trained, params, solver="cholesky")
    some_users = np.array([7, 0, 3])
    folded = fold_in_users(interactions.take_rows(some_users), trained, params)
    np.testing.assert_allclose(folded.factors, full.user[some_users], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(folded.bias, full.user_bias[some_users], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["implicit", "explicit"])
def test_fold_in_items_matches_the_full_item_solve(mode: Mode) -> None:
    interactions, factors, params = random_problem(6, mode)
    trained = wals(interactions, factors, params, 3)
    full = solve_items(interactions, trained, params, solver="cholesky")
    some_items = np.array([2, 5])
    folded = fold_in_items(interactions.transposed.take_rows(some_items), trained, params)
    np.testing.assert_allclose(folded.factors, full.item[some_items], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(folded.bias, full.item_bias[some_items], rtol=1e-6, atol=1e-7)


def test_fold_in_a_new_user_from_their_events() -> None:
    interactions, factors, params = random_problem(8, "explicit")
    trained = wals(interactions, factors, params, 3)
    new_user = Interactions.from_coo([0, 0], [3, 4], [5.0, 1.0], (1, interactions.shape[1]), params)
    folded = fold_in_users(
        new_user, trained, params, user_reg=weighted_reg(new_user.row_counts(), params.reg)
    )
    assert folded.factors.shape == (1, factors.k) and folded.bias.shape == (1,)
    # The new user's predictions move towards their ratings: item 3 above item 4.
    predicted = folded.factors[0] @ trained.item[[3, 4]].T + folded.bias[0] + trained.item_bias[[3, 4]]
    assert predicted[0] > predicted[1]


# --- failures -------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", SOLVERS)
def test_non_finite_results_raise(solver: str) -> None:
    interactions, factors, params = random_problem(0, "implicit")
    broken = factors.copy()
    broken.item[3, 1] = np.nan
    with pytest.raises(NonFiniteFactorsError):
        solve_users(interactions, broken, params, solver=solver)


def test_rejects_mismatched_inputs() -> None:
    interactions, factors, params = random_problem(0, "implicit")
    with pytest.raises(ValueError, match="explicit"):
        solve_users(interactions, factors, LossParams("explicit"))
    with pytest.raises(ValueError, match="one entry per row"):
        solve_users(interactions, factors, params, user_reg=np.ones(3))
    with pytest.raises(ValueError, match="solver"):
        solve_users(interactions, factors, params, solver="lu")  # type: ignore[arg-type]


# --- properties -----------------------------------------------------------------------------------


@st.composite
def problems(draw: st.DrawFn) -> tuple[Interactions, Factors, LossParams]:
    mode = draw(st.sampled_from(["implicit", "explicit"]))
    n_users = draw(st.integers(1, 12))
    n_items = draw(st.integers(1, 12))
    k = draw(st.integers(1, 6))
    n_events = draw(st.integers(0, 40))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    params = LossParams(
        mode,
        reg=draw(st.floats(1e-3, 1.0)),
        reg_bias=draw(st.floats(0.0, 1.0)),
        alpha=draw(st.floats(0.0, 20.0)),
        w0=draw(st.floats(0.0, 1.0)),
    )
    users = rng.integers(0, n_users, n_events)
    items = rng.integers(0, n_items, n_events)
    values = rng.uniform(0, 5, n_events)
    interactions = Interactions.from_coo(users, items, values, (n_users, n_items), params)
    factors = Factors(
        rng.normal(0, 1, (n_users, k)).astype(DTYPE),
        rng.normal(0, 1, (n_items, k)).astype(DTYPE),
        np.zeros(n_users, DTYPE),
        np.zeros(n_items, DTYPE),
        2.5 if mode == "explicit" else 0.0,
    )
    return interactions, factors, params


@settings(max_examples=40, deadline=None)
@given(problems(), st.sampled_from(SOLVERS), st.booleans())
def test_wals_preserves_shapes_and_stays_finite(
    problem: tuple[Interactions, Factors, LossParams], solver: str, fit_biases: bool
) -> None:
    interactions, factors, params = problem
    solved = wals(interactions, factors, params, 2, fit_biases=fit_biases, solver=solver)  # type: ignore[arg-type]
    for name in ("user", "item", "user_bias", "item_bias"):
        assert getattr(solved, name).shape == getattr(factors, name).shape
        assert getattr(solved, name).dtype == DTYPE
    solved.check_finite()
    assert np.isfinite(objective(interactions, solved, params))
    if interactions.nnz == 0:
        assert not solved.user.any() and not solved.item.any()


@settings(max_examples=20, deadline=None)
@given(problems())
def test_fold_in_preserves_shapes(problem: tuple[Interactions, Factors, LossParams]) -> None:
    interactions, factors, params = problem
    rows = interactions.take_rows(np.arange(interactions.shape[0])[::-1])
    folded = fold_in_users(rows, factors, params)
    assert folded.factors.shape == factors.user.shape and folded.bias.shape == factors.user_bias.shape
    assert np.all(np.isfinite(folded.factors))
