"""Weighted alternating least squares: exact (or conjugate-gradient) row solves of the objective L.

With the other side fixed, L separates into one small ridge regression per row. For user i, with
x = u_i (implicit) or x = [u_i; b_i] against features z_j = [v_j; 1] (explicit with biases):

    implicit (Hu, Koren & Volinsky 2008, with their Gramian trick; targets a_ij = 1):
        A_i = w0·VᵀV + Σ_{j∈obs(i)} (w_ij − w0) v_j v_jᵀ + λ_i I
        b_i = Σ_{j∈obs(i)} w_ij v_j
    explicit (observed entries only, residual target t_ij = a_ij − μ − c_j):
        A_i = Σ_{j∈obs(i)} w_ij z_j z_jᵀ + diag(λ_i, …, λ_i, λ_b)
        b_i = Σ_{j∈obs(i)} w_ij t_ij z_j
    x = A_i⁻¹ b_i

and symmetrically for items with UᵀU. Rows without observations get zero factors and zero bias (a
bias held fixed with ``fit_biases=False`` keeps its value): the exact minimiser in implicit mode, the
prior mean in explicit mode.

Two kernels solve A_i x = b_i for all rows in parallel (numba, prange over cost-balanced chunks of rows):

* ``"cholesky"``: forms A_i (O(n_i·d²)) and factorises it (O(d³/3)) — the exact row minimiser.
* ``"cg"``: `CG_STEPS` conjugate-gradient steps warm-started from the current row, never forming A_i
  (O(CG_STEPS·(d² + n_i·d)) per row), as in Takács, Pilászy & Tikk (2011) and implicit's
  ``least_squares_cg``. Each step minimises the row's quadratic over a growing Krylov space around the
  warm start, so a half-step still never increases L; across WALS iterations it converges to the same
  fixed points as the exact solve.

`wals` and the half-steps use ``"cg"`` by default: on bench/bench_wals.py (100k × 20k, 1.76M entries,
k = 64, 2 threads) it takes 0.58 s per iteration against 2.4 s for the exact solve and 0.81 s for
implicit's CG, and its objective trajectory matches implicit's CG to 6-7 digits, 0.03% above the exact
solve's after 5 iterations (the gap closes as iterations go on). The fold-in functions always solve
exactly: a new row has no warm start, and they touch few rows.

Kernels accumulate in float64 and store float32. ``fastmath`` is off in the kernels; only the
dot-product helper `_dot` allows reassociation (no other fast-math flag), so its reduction vectorises.
`_solve_rows_reference` and `_solve_rows_cg_reference` are the slow numpy versions the tests compare to.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numba
import numpy as np
from numba import njit, prange

from streammf.model.factors import DTYPE, Factors, LossParams, NonFiniteFactorsError
from streammf.model.interactions import Interactions
from streammf.model.objective import gramian, weighted_reg

Solver = Literal["cg", "cholesky"]
DEFAULT_SOLVER: Solver = "cg"
# Steps per row per half-iteration; implicit uses 3 too. More steps buy little: the next WALS iteration
# restarts from a better point anyway.
CG_STEPS = 3
# Stop a row's CG once ‖r‖² falls below this (the row is solved to float32 precision long before).
_CG_RESIDUAL_FLOOR = 1e-20
# Chunks of rows per thread: enough to balance power-law rows when a thread is slowed down by a neighbour.
_CHUNKS_PER_THREAD = 32


class SolvedRows(NamedTuple):
    """Rows solved by a fold-in: factors (n_rows, k) float32 and biases (n_rows,) float32."""

    factors: np.ndarray
    bias: np.ndarray


@dataclass(frozen=True)
class _RowProblem:
    """The per-row least-squares problems of one side, with the other side held fixed."""

    rows: Interactions  # n_rows × n_other
    other: np.ndarray  # (n_other, k) float32, C-contiguous
    other_bias: np.ndarray  # (n_other,) float32
    fixed_bias: np.ndarray  # (n_rows,) float32: own biases, subtracted from targets when not fitted
    gram: np.ndarray  # (k, k) float64: w0·OᵀO in implicit mode, zeros in explicit mode
    w0: float
    reg: np.ndarray  # (n_rows,) float64: λ_i
    bias_reg: np.ndarray  # (n_rows,) float64: λ_b (the count-independent bias prior)
    offset: float  # μ
    implicit: bool
    fit_bias: bool

    @property
    def k(self) -> int:
        return int(self.other.shape[1])

    @property
    def dim(self) -> int:
        return self.k + 1 if self.fit_bias else self.k


# ---------------------------------------------------------------------------------------------------
# Public API


def solve_users(
    interactions: Interactions,
    factors: Factors,
    params: LossParams,
    user_reg: np.ndarray | None = None,
    *,
    fit_biases: bool = True,
    solver: Solver = DEFAULT_SOLVER,
) -> Factors:
    """One half-step: every user row re-solved against the fixed item factors. Inputs are not modified.

    ``user_reg`` is λ_i per user (default: `weighted_reg`, λ·n_i + λ_0). ``fit_biases=False`` (explicit mode)
    holds the biases and μ at their values in ``factors`` instead of solving for them; pass zeros for a
    pure ⟨u, v⟩ model.
    """
    _check_inputs(interactions, factors, params)
    problem = _row_problem(
        interactions,
        other=factors.item,
        other_bias=factors.item_bias,
        own_bias=factors.user_bias,
        global_mean=factors.global_mean,
        params=params,
        reg=user_reg,
        fit_biases=fit_biases,
    )
    solved = _solve_rows(problem, factors.user, factors.user_bias, solver, side="user")
    return Factors(
        solved.factors, factors.item.copy(), solved.bias, factors.item_bias.copy(), factors.global_mean
    )


def solve_items(
    interactions: Interactions,
    factors: Factors,
    params: LossParams,
    item_reg: np.ndarray | None = None,
    *,
    fit_biases: bool = True,
    solver: Solver = DEFAULT_SOLVER,
) -> Factors:
    """One half-step: every item row re-solved against the fixed user factors. Inputs are not modified."""
    _check_inputs(interactions, factors, params)
    problem = _row_problem(
        interactions.transposed,
        other=factors.user,
        other_bias=factors.user_bias,
        own_bias=factors.item_bias,
        global_mean=factors.global_mean,
        params=params,
        reg=item_reg,
        fit_biases=fit_biases,
    )
    solved = _solve_rows(problem, factors.item, factors.item_bias, solver, side="item")
    return Factors(
        factors.user.copy(), solved.factors, factors.user_bias.copy(), solved.bias, factors.global_mean
    )


def wals(
    interactions: Interactions,
    factors: Factors,
    params: LossParams,
    iterations: int,
    user_reg: np.ndarray | None = None,
    item_reg: np.ndarray | None = None,
    callback: Callable[[int, Factors], None] | None = None,
    *,
    fit_biases: bool = True,
    solver: Solver = DEFAULT_SOLVER,
) -> Factors:
    """``iterations`` rounds of (users, then items), warm-started from ``factors``; returns new Factors.

    ``callback(iteration, factors)`` runs after each round (iteration counts from 0), e.g. to record
    the objective. μ = ``factors.global_mean`` is held fixed; set it (e.g. to the mean rating) first.
    """
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    _check_inputs(interactions, factors, params)
    if user_reg is None:
        user_reg = weighted_reg(interactions.row_counts(), params.reg, params.reg_prior)
    if item_reg is None:
        item_reg = weighted_reg(interactions.col_counts(), params.reg, params.reg_prior)
    current = factors
    for iteration in range(iterations):
        current = solve_users(interactions, current, params, user_reg, fit_biases=fit_biases, solver=solver)
        current = solve_items(interactions, current, params, item_reg, fit_biases=fit_biases, solver=solver)
        if callback is not None:
            callback(iteration, current)
    return current if iterations > 0 else factors.copy()


def fold_in_users(
    rows: Interactions,
    factors: Factors,
    params: LossParams,
    user_reg: np.ndarray | None = None,
    *,
    fit_biases: bool = True,
) -> SolvedRows:
    """Exact factors for some users from their observations, items held fixed.

    ``rows`` is a small (n_these_users, n_items) matrix — e.g. ``interactions.take_rows(user_ids)`` or
    `Interactions.from_coo` of a new user's events. Reads ``factors.item``, ``factors.item_bias`` and
    ``factors.global_mean`` only. With ``fit_biases=False`` the returned biases are zero.
    """
    return _fold_in(
        rows, factors.item, factors.item_bias, factors.global_mean, params, user_reg, fit_biases, "user"
    )


def fold_in_items(
    columns: Interactions,
    factors: Factors,
    params: LossParams,
    item_reg: np.ndarray | None = None,
    *,
    fit_biases: bool = True,
) -> SolvedRows:
    """Exact factors for some items from their observations, users held fixed.

    ``columns`` is (n_these_items, n_users): the items' columns as rows, e.g.
    ``interactions.transposed.take_rows(item_ids)``. Reads ``factors.user``, ``factors.user_bias`` and
    ``factors.global_mean`` only.
    """
    return _fold_in(
        columns, factors.user, factors.user_bias, factors.global_mean, params, item_reg, fit_biases, "item"
    )


def _fold_in(
    rows: Interactions,
    other: np.ndarray,
    other_bias: np.ndarray,
    global_mean: float,
    params: LossParams,
    reg: np.ndarray | None,
    fit_biases: bool,
    side: str,
) -> SolvedRows:
    _check_fold_in(rows, other, other_bias, params, side="item" if side == "user" else "user")
    problem = _row_problem(
        rows,
        other=other,
        other_bias=other_bias,
        own_bias=np.zeros(rows.shape[0], dtype=DTYPE),
        global_mean=global_mean,
        params=params,
        reg=reg,
        fit_biases=fit_biases,
    )
    return _solve_rows(problem, None, None, "cholesky", side=side)


# ---------------------------------------------------------------------------------------------------
# Assembly and dispatch


def _row_problem(
    rows: Interactions,
    *,
    other: np.ndarray,
    other_bias: np.ndarray,
    own_bias: np.ndarray,
    global_mean: float,
    params: LossParams,
    reg: np.ndarray | None,
    fit_biases: bool,
) -> _RowProblem:
    implicit = params.mode == "implicit"
    counts = rows.row_counts()
    reg = (
        weighted_reg(counts, params.reg, params.reg_prior)
        if reg is None
        else np.asarray(reg, dtype=np.float64)
    )
    if reg.shape != (rows.shape[0],):
        raise ValueError(f"regularisation must have one entry per row ({rows.shape[0]},), got {reg.shape}")
    if not np.all(np.isfinite(reg)) or np.any(reg < 0):
        raise ValueError("regularisation must be finite and >= 0")
    other = np.ascontiguousarray(other, dtype=DTYPE)
    w0 = params.unobserved_weight if implicit else 0.0
    # w0·OᵀO is the same for every row: computed once per half-step (the Gramian trick).
    gram = w0 * gramian(other) if w0 > 0 else np.zeros((other.shape[1], other.shape[1]))
    return _RowProblem(
        rows=rows,
        other=other,
        other_bias=np.ascontiguousarray(other_bias, dtype=DTYPE),
        fixed_bias=np.ascontiguousarray(own_bias, dtype=DTYPE),
        gram=np.ascontiguousarray(gram),
        w0=float(w0),
        reg=np.ascontiguousarray(reg),
        bias_reg=np.full(rows.shape[0], params.reg_bias, dtype=np.float64),
        offset=float(global_mean) if not implicit else 0.0,
        implicit=implicit,
        fit_bias=fit_biases and not implicit,
    )


def _solve_rows(
    problem: _RowProblem,
    warm_factors: np.ndarray | None,
    warm_bias: np.ndarray | None,
    solver: Solver,
    side: str,
) -> SolvedRows:
    """Run a numba kernel over all rows; ``warm_*`` is the CG starting point (ignored by Cholesky)."""
    n_rows = problem.rows.shape[0]
    out_bias = problem.fixed_bias.copy()  # stays as is unless biases are fitted
    targets = problem.rows.targets
    chunk_starts = _chunk_starts(problem.rows.row_counts(), problem.dim)
    common = (
        targets.indptr,
        targets.indices,
        targets.data,
        problem.rows.weights,
        problem.other,
        problem.other_bias,
        problem.fixed_bias,
        problem.gram,
        problem.w0,
        problem.reg,
        problem.bias_reg,
        problem.offset,
        problem.implicit,
        problem.fit_bias,
        chunk_starts,
    )
    # Dynamic scheduling of the (cost-balanced) chunks: a thread slowed down by a noisy neighbour or a
    # heavy item does not hold the others up.
    with numba.parallel_chunksize(1):
        if solver == "cholesky":
            out = np.empty((n_rows, problem.k), dtype=DTYPE)
            _cholesky_rows_kernel(*common, out, out_bias)
        elif solver == "cg":
            if warm_factors is None or warm_bias is None:
                raise ValueError("the CG solver needs a warm start")
            out = np.array(warm_factors, dtype=DTYPE, order="C", copy=True)
            if problem.fit_bias:
                out_bias = np.array(warm_bias, dtype=DTYPE, copy=True)
            _cg_rows_kernel(*common, CG_STEPS, out, out_bias)
        else:
            raise ValueError(f"solver must be 'cg' or 'cholesky', got {solver!r}")
    bad_rows = ~np.isfinite(out).all(axis=1) | ~np.isfinite(out_bias)
    if bad_rows.any():
        raise NonFiniteFactorsError(
            f"{side} solve produced NaN/inf in {int(bad_rows.sum())} of {n_rows} rows "
            f"(first: {int(np.flatnonzero(bad_rows)[0])}): non-finite inputs, or a singular row system "
            "(zero regularisation?)"
        )
    return SolvedRows(out, out_bias)


def _chunk_starts(counts: np.ndarray, dim: int) -> np.ndarray:
    """Row boundaries of chunks of about equal cost (n_i·d + d² per row), for the parallel kernels."""
    n_rows = counts.size
    n_chunks = min(n_rows, _CHUNKS_PER_THREAD * numba.get_num_threads())
    if n_chunks <= 1:
        return np.array([0, n_rows], dtype=np.int64)
    cumulative_cost = np.cumsum(counts * dim + dim * dim, dtype=np.float64)
    cut_costs = np.linspace(0.0, cumulative_cost[-1], n_chunks + 1)[1:-1]
    cuts = np.searchsorted(cumulative_cost, cut_costs, side="right")
    return np.unique(np.concatenate(([0], cuts, [n_rows]))).astype(np.int64)


def _check_inputs(interactions: Interactions, factors: Factors, params: LossParams) -> None:
    if interactions.mode != params.mode:
        raise ValueError(f"interactions are {interactions.mode}, params are {params.mode}")
    n_users, n_items = interactions.shape
    if factors.user.ndim != 2 or factors.item.ndim != 2 or factors.user.shape[1] != factors.item.shape[1]:
        raise ValueError(
            f"factor matrices must be 2-D with equal k: {factors.user.shape}, {factors.item.shape}"
        )
    if factors.user.shape[0] != n_users or factors.item.shape[0] != n_items:
        raise ValueError(
            f"factors have {factors.user.shape[0]} users × {factors.item.shape[0]} items, "
            f"interactions are {n_users} × {n_items}"
        )
    if factors.user_bias.shape != (n_users,) or factors.item_bias.shape != (n_items,):
        raise ValueError("bias vectors must have one entry per user/item")


def _check_fold_in(
    rows: Interactions, other: np.ndarray, other_bias: np.ndarray, params: LossParams, side: str
) -> None:
    if rows.mode != params.mode:
        raise ValueError(f"rows are {rows.mode}, params are {params.mode}")
    if other.ndim != 2 or rows.shape[1] != other.shape[0] or other_bias.shape != (other.shape[0],):
        raise ValueError(
            f"rows have {rows.shape[1]} columns but there are {other.shape[0]} {side} factors "
            f"and {other_bias.shape} {side} biases"
        )


# ---------------------------------------------------------------------------------------------------
# Numba kernels. Shared argument order (after the CSR arrays of the rows being solved):
#   other, other_bias, fixed_bias, gram, w0, reg, bias_reg, offset, implicit, fit_bias, chunk_starts
# Per entry p = (row, j): curvature c = w − w0 (implicit) or w (explicit) goes into A,
# w·t with t = 1 (implicit) or a − μ − c_j [− b_i if biases are held fixed] goes into b.


@njit(cache=True, fastmath=False, inline="always")
def _entry_target(
    data_p: float, offset: float, other_bias_j: float, fixed_bias_row: float, implicit: bool, fit_bias: bool
) -> float:
    """t_ij: 1 in implicit mode, else the rating less everything the row's unknowns do not explain."""
    if implicit:
        return 1.0
    target = np.float64(data_p) - offset - np.float64(other_bias_j)
    if not fit_bias:
        target -= np.float64(fixed_bias_row)
    return target


@njit(cache=True, fastmath={"reassoc"})
def _dot(x: np.ndarray, y: np.ndarray, n: int) -> float:
    """Σ_f x_f·y_f, accumulated in float64 (y is float64).

    The one function that licenses reassociation, and only that flag ("reassoc": NaN and inf keep
    their meaning, so non-finite inputs still surface): it lets LLVM split the sum over SIMD lanes,
    6x faster than the strictly serial sum at k = 64, and the CG kernel spends most of its time here.
    Not inlined at the numba level, so the flag stays on these instructions only.
    """
    total = 0.0
    for f in range(n):
        total += x[f] * y[f]
    return total


@njit(cache=True, fastmath=False)
def _cholesky_solve_inplace(a: np.ndarray, rhs: np.ndarray, panel: np.ndarray, d: int) -> bool:
    """Solve a·x = rhs for SPD ``a`` (only its lower triangle is read), overwriting ``rhs`` with x.

    Right-looking Cholesky a = L·Lᵀ in panels of 4 columns, with the forward substitution L·y = rhs
    fused in, then Lᵀ·x = y by rows of L. The bulk of the work, the rank-4 update of the trailing
    triangle, runs over contiguous rows with the panel copied into ``panel`` (4, d): 4 multiply-adds
    per load/store of ``a``, which is what makes it vectorise well (2x the unblocked version at d = 64).
    Returns False if a pivot is not > 0 (matrix not positive definite, or NaN).
    """
    for block in range(0, d, 4):
        block_end = min(block + 4, d)
        # Factor the panel's columns; updates from earlier panels are already applied.
        for j in range(block, block_end):
            for c in range(block, j):
                ljc = a[j, c]
                for i in range(j, d):
                    a[i, j] -= a[i, c] * ljc
            pivot = a[j, j]
            if not pivot > 0.0:
                return False
            diagonal = np.sqrt(pivot)
            a[j, j] = diagonal
            inverse = 1.0 / diagonal
            y = rhs[j] * inverse
            rhs[j] = y
            for i in range(j + 1, d):
                lij = a[i, j] * inverse
                a[i, j] = lij
                rhs[i] -= lij * y
        if block_end == d:
            break
        if block_end - block == 4:
            p0, p1, p2, p3 = panel[0], panel[1], panel[2], panel[3]
            for p in range(block_end, d):
                p0[p] = a[p, block]
                p1[p] = a[p, block + 1]
                p2[p] = a[p, block + 2]
                p3[p] = a[p, block + 3]
            for i in range(block_end, d):
                row = a[i]
                l0, l1, l2, l3 = row[block], row[block + 1], row[block + 2], row[block + 3]
                for p in range(block_end, i + 1):
                    row[p] -= (l0 * p0[p] + l1 * p1[p]) + (l2 * p2[p] + l3 * p3[p])
        else:
            for i in range(block_end, d):
                for c in range(block, block_end):
                    lic = a[i, c]
                    for p in range(block_end, i + 1):
                        a[i, p] -= lic * a[p, c]
    for j in range(d - 1, -1, -1):
        row = a[j]
        x = rhs[j] / row[j]
        rhs[j] = x
        for p in range(j):
            rhs[p] -= row[p] * x
    return True


@njit(parallel=True, fastmath=False, cache=True, nogil=True)
def _cholesky_rows_kernel(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    weights: np.ndarray,
    other: np.ndarray,
    other_bias: np.ndarray,
    fixed_bias: np.ndarray,
    gram: np.ndarray,
    w0: float,
    reg: np.ndarray,
    bias_reg: np.ndarray,
    offset: float,
    implicit: bool,
    fit_bias: bool,
    chunk_starts: np.ndarray,
    out: np.ndarray,
    out_bias: np.ndarray,
) -> None:
    k = other.shape[1]
    d = k + 1 if fit_bias else k
    for chunk in prange(chunk_starts.size - 1):
        a = np.empty((d, d))
        rhs = np.empty(d)
        # Up to 4 observations at a time: features z and curvature-scaled features, one row each.
        z = np.zeros((4, d))  # zeros: padding lanes multiply it by 0, so it must never hold NaN garbage
        scaled = np.empty((4, d))
        panel = np.empty((4, d))
        for row in range(chunk_starts[chunk], chunk_starts[chunk + 1]):
            start = indptr[row]
            end = indptr[row + 1]
            if start == end:
                out[row, :] = 0.0
                if fit_bias:
                    out_bias[row] = 0.0
                continue
            # A starts as w0·OᵀO (zeros in explicit mode) plus the ridge; only the lower triangle is used.
            for r in range(k):
                for s in range(r + 1):
                    a[r, s] = gram[r, s]
                a[r, r] += reg[row]
                rhs[r] = 0.0
            if fit_bias:
                for s in range(d):
                    a[k, s] = 0.0
                a[k, k] = bias_reg[row]
                rhs[k] = 0.0
                for q in range(4):
                    z[q, k] = 1.0
            for group in range(start, end, 4):
                in_group = min(4, end - group)
                for q in range(4):
                    if q < in_group:
                        p = group + q
                        j = indices[p]
                        weight = np.float64(weights[p])
                        curvature = weight - w0 if implicit else weight
                        wt = weight * _entry_target(
                            data[p], offset, other_bias[j], fixed_bias[row], implicit, fit_bias
                        )
                        for f in range(k):
                            z[q, f] = other[j, f]
                        for f in range(d):
                            scaled[q, f] = curvature * z[q, f]
                            rhs[f] += wt * z[q, f]
                    else:  # pad the group with a zero-weight observation
                        for f in range(d):
                            scaled[q, f] = 0.0
                # Rank-4 update of the lower triangle: 4 multiply-adds per load/store of A.
                z0, z1, z2, z3 = z[0], z[1], z[2], z[3]
                for r in range(d):
                    row_a = a[r]
                    s0, s1, s2, s3 = scaled[0, r], scaled[1, r], scaled[2, r], scaled[3, r]
                    for s in range(r + 1):
                        row_a[s] += (s0 * z0[s] + s1 * z1[s]) + (s2 * z2[s] + s3 * z3[s])
            if _cholesky_solve_inplace(a, rhs, panel, d):
                for f in range(k):
                    out[row, f] = rhs[f]
                if fit_bias:
                    out_bias[row] = rhs[k]
            else:
                out[row, :] = np.nan


@njit(cache=True, fastmath=False, inline="always")
def _apply_row_system(
    x: np.ndarray,
    result: np.ndarray,
    features: np.ndarray,
    curvatures: np.ndarray,
    n: int,
    gram: np.ndarray,
    reg_row: float,
    bias_reg_row: float,
    implicit: bool,
    fit_bias: bool,
    k: int,
    d: int,
) -> None:
    """result = A_i·x without forming A_i: w0·OᵀO·x + ridge·x + Σ_obs c·(z·x)·z."""
    for f in range(k):
        result[f] = reg_row * x[f]
    if fit_bias:
        result[k] = bias_reg_row * x[k]
    if implicit:
        for f in range(k):
            result[f] += _dot(gram[f], x, k)
    for q in range(n):
        z = features[q]
        coefficient = curvatures[q] * _dot(z, x, d)
        for f in range(d):
            result[f] += coefficient * z[f]


@njit(parallel=True, fastmath=False, cache=True, nogil=True)
def _cg_rows_kernel(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    weights: np.ndarray,
    other: np.ndarray,
    other_bias: np.ndarray,
    fixed_bias: np.ndarray,
    gram: np.ndarray,
    w0: float,
    reg: np.ndarray,
    bias_reg: np.ndarray,
    offset: float,
    implicit: bool,
    fit_bias: bool,
    chunk_starts: np.ndarray,
    cg_steps: int,
    out: np.ndarray,
    out_bias: np.ndarray,
) -> None:
    k = other.shape[1]
    d = k + 1 if fit_bias else k
    for chunk in prange(chunk_starts.size - 1):
        first_row = chunk_starts[chunk]
        last_row = chunk_starts[chunk + 1]
        longest = 0
        for row in range(first_row, last_row):
            longest = max(longest, indptr[row + 1] - indptr[row])
        # The row's features z_j gathered once, in float64, for the 1 + cg_steps products with A_i:
        # contiguous and cache-resident instead of 4 scattered float32 reads of the other side's rows.
        features = np.empty((longest, d))
        curvatures = np.empty(longest)
        x = np.empty(d)
        residual = np.empty(d)
        direction = np.empty(d)
        a_direction = np.empty(d)
        for row in range(first_row, last_row):
            start = indptr[row]
            n = indptr[row + 1] - start
            if n == 0:
                out[row, :] = 0.0
                if fit_bias:
                    out_bias[row] = 0.0
                continue
            for f in range(k):
                x[f] = out[row, f]
            if fit_bias:
                x[k] = out_bias[row]
            # residual = b − A·x, with b = Σ_obs w·t·z
            for f in range(d):
                residual[f] = 0.0
            for q in range(n):
                p = start + q
                j = indices[p]
                weight = np.float64(weights[p])
                curvatures[q] = weight - w0 if implicit else weight
                z = features[q]
                for f in range(k):
                    z[f] = other[j, f]
                if fit_bias:
                    z[k] = 1.0
                wt = weight * _entry_target(
                    data[p], offset, other_bias[j], fixed_bias[row], implicit, fit_bias
                )
                for f in range(d):
                    residual[f] += wt * z[f]
            _apply_row_system(
                x,
                a_direction,
                features,
                curvatures,
                n,
                gram,
                reg[row],
                bias_reg[row],
                implicit,
                fit_bias,
                k,
                d,
            )
            for f in range(d):
                residual[f] -= a_direction[f]
            residual_norm = _dot(residual, residual, d)
            if not np.isfinite(residual_norm):
                # NaN/inf inputs: make it visible (the caller raises) instead of keeping the warm start.
                for f in range(d):
                    x[f] = np.nan
            elif residual_norm > _CG_RESIDUAL_FLOOR:
                for f in range(d):
                    direction[f] = residual[f]
                for _ in range(cg_steps):
                    _apply_row_system(
                        direction, a_direction, features, curvatures, n, gram, reg[row], bias_reg[row],
                        implicit, fit_bias, k, d,
                    )  # fmt: skip
                    curvature_along = _dot(direction, a_direction, d)
                    if not curvature_along > 0.0:
                        break
                    step = residual_norm / curvature_along
                    for f in range(d):
                        x[f] += step * direction[f]
                        residual[f] -= step * a_direction[f]
                    new_norm = _dot(residual, residual, d)
                    if new_norm < _CG_RESIDUAL_FLOOR:
                        break
                    ratio = new_norm / residual_norm
                    for f in range(d):
                        direction[f] = residual[f] + ratio * direction[f]
                    residual_norm = new_norm
            for f in range(k):
                out[row, f] = x[f]
            if fit_bias:
                out_bias[row] = x[k]


# ---------------------------------------------------------------------------------------------------
# Pure-numpy references (slow; for tests)


def _row_system_reference(problem: _RowProblem, row: int) -> tuple[np.ndarray, np.ndarray]:
    """(A_i, b_i) of one row, formed literally from the formulas in the module docstring."""
    targets = problem.rows.targets
    start, end = int(targets.indptr[row]), int(targets.indptr[row + 1])
    cols = targets.indices[start:end]
    features = problem.other[cols].astype(np.float64)
    if problem.fit_bias:
        features = np.hstack([features, np.ones((cols.size, 1))])
    weights = problem.rows.weights[start:end].astype(np.float64)
    if problem.implicit:
        curvature = weights - problem.w0
        residual_targets = np.ones(cols.size)
    else:
        curvature = weights
        residual_targets = (
            targets.data[start:end].astype(np.float64) - problem.offset - problem.other_bias[cols]
        )
        if not problem.fit_bias:
            residual_targets -= problem.fixed_bias[row]
    a = features.T @ (curvature[:, None] * features)
    a[: problem.k, : problem.k] += problem.gram
    a[np.arange(problem.k), np.arange(problem.k)] += problem.reg[row]
    if problem.fit_bias:
        a[problem.k, problem.k] += problem.bias_reg[row]
    return a, features.T @ (weights * residual_targets)


def _solve_rows_reference(problem: _RowProblem) -> SolvedRows:
    """Exact row solves with np.linalg.solve, one row at a time."""
    n_rows, k = problem.rows.shape[0], problem.k
    out = np.zeros((n_rows, k))
    out_bias = problem.fixed_bias.astype(np.float64)
    counts = problem.rows.row_counts()
    for row in range(n_rows):
        if counts[row] == 0:
            if problem.fit_bias:
                out_bias[row] = 0.0
            continue
        a, b = _row_system_reference(problem, row)
        x = np.linalg.solve(a, b)
        out[row] = x[:k]
        if problem.fit_bias:
            out_bias[row] = x[k]
    return SolvedRows(out.astype(DTYPE), out_bias.astype(DTYPE))


def _solve_rows_cg_reference(
    problem: _RowProblem, warm_factors: np.ndarray, warm_bias: np.ndarray, steps: int
) -> SolvedRows:
    """Textbook CG on the explicitly formed A_i, warm-started, same stopping rules as the kernel."""
    n_rows, k = problem.rows.shape[0], problem.k
    out = warm_factors.astype(np.float64)
    out_bias = (warm_bias if problem.fit_bias else problem.fixed_bias).astype(np.float64)
    counts = problem.rows.row_counts()
    for row in range(n_rows):
        if counts[row] == 0:
            out[row] = 0.0
            if problem.fit_bias:
                out_bias[row] = 0.0
            continue
        a, b = _row_system_reference(problem, row)
        x = np.append(out[row], out_bias[row]) if problem.fit_bias else out[row].copy()
        residual = b - a @ x
        direction = residual.copy()
        residual_norm = residual @ residual
        if residual_norm > _CG_RESIDUAL_FLOOR:
            for _ in range(steps):
                a_direction = a @ direction
                curvature_along = direction @ a_direction
                if not curvature_along > 0.0:
                    break
                step = residual_norm / curvature_along
                x += step * direction
                residual -= step * a_direction
                new_norm = residual @ residual
                if new_norm < _CG_RESIDUAL_FLOOR:
                    break
                direction = residual + (new_norm / residual_norm) * direction
                residual_norm = new_norm
        out[row] = x[:k]
        if problem.fit_bias:
            out_bias[row] = x[k]
    return SolvedRows(out.astype(DTYPE), out_bias.astype(DTYPE))
