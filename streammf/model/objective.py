"""The exact value of the objective L (see `streammf.model.factors`) for a set of factors, and error metrics.

    L = Σ_obs w_ij (a_ij − p_ij)²  +  w0 Σ_unobs p_ij²
        + Σ_i λ_i ‖u_i‖² + Σ_j λ_j ‖v_j‖²  [+ λ_b (Σ_{i: n_i>0} b_i² + Σ_{j: m_j>0} c_j²)]
    λ_i = λ·n_i + λ_0·[n_i > 0]  (`weighted_reg`)

`objective` never forms the dense matrix: the implicit-mode sum over the (many) unobserved entries uses
the Gramian identity

    Σ_unobs p_ij² = Σ_all p_ij² − Σ_obs p_ij² = Σ_i u_iᵀ (VᵀV) u_i − Σ_obs p_ij²
                  = ⟨UᵀU, VᵀV⟩_F − Σ_obs p_ij²

so it costs O((n_users + n_items)·k² + nnz·k). `dense_objective_reference` is the literal formula on a
dense matrix, for checking the former on small inputs.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from streammf.model.factors import Factors, LossParams
from streammf.model.interactions import Interactions

# Entries scored per numpy pass: bounds the float64 temporaries to ~16 MB at k = 64.
_CHUNK = 1 << 15
# Row blocks of `gramian`: fixed, so its float64 sums come out the same on any number of threads.
_GRAMIAN_BLOCKS = 64


def weighted_reg(counts: np.ndarray, reg: float, prior: float = 0.0) -> np.ndarray:
    """Per-row regularisation λ_i = λ·n_i + λ_0·[n_i > 0] (float64): ALS-WR's weighted λ plus the
    count-independent prior of a row with observations. The model's default (λ_0 = `LossParams.reg_prior`)."""
    counts = np.asarray(counts, dtype=np.float64)
    return reg * counts + prior * (counts > 0)


def predict_entries(factors: Factors, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """p_ij = μ + b_i + c_j + ⟨u_i, v_j⟩ for the given pairs (float64).

    Implicit-mode factors carry zero biases and μ = 0, so the same formula gives p_ij = ⟨u_i, v_j⟩.
    """
    users = np.asarray(users, dtype=np.int64).reshape(-1)
    items = np.asarray(items, dtype=np.int64).reshape(-1)
    out = np.empty(users.size, dtype=np.float64)
    for start in range(0, users.size, _CHUNK):
        u = users[start : start + _CHUNK]
        i = items[start : start + _CHUNK]
        dots = np.einsum("ek,ek->e", factors.user[u].astype(np.float64), factors.item[i].astype(np.float64))
        out[start : start + _CHUNK] = (
            dots + factors.user_bias[u].astype(np.float64) + factors.item_bias[i] + factors.global_mean
        )
    return out


def rmse(factors: Factors, users: np.ndarray, items: np.ndarray, values: np.ndarray) -> float:
    """Root mean squared error of `predict_entries` against ``values`` (e.g. held-out ratings)."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.size == 0:
        return float("nan")
    errors = predict_entries(factors, users, items) - values
    return float(np.sqrt(np.mean(errors * errors)))


def objective(
    interactions: Interactions,
    factors: Factors,
    params: LossParams,
    user_reg: np.ndarray | None = None,
    item_reg: np.ndarray | None = None,
) -> float:
    """L for these factors; ``user_reg``/``item_reg`` default to `weighted_reg` of the row/column counts."""
    _check_compatible(interactions, factors, params)
    user_reg, item_reg = _resolve_regs(interactions, params, user_reg, item_reg)
    weights = interactions.weights.astype(np.float64)
    predictions = _observed_predictions(interactions, factors, params)

    if params.mode == "implicit":
        errors = 1.0 - predictions
        loss = float(np.dot(weights * errors, errors))
        w0 = params.unobserved_weight
        if w0 > 0:
            # Σ_i u_iᵀ (VᵀV) u_i = ⟨UᵀU, VᵀV⟩_F
            all_entries = float(np.sum(gramian(factors.user) * gramian(factors.item)))
            loss += w0 * (all_entries - float(np.dot(predictions, predictions)))
    else:
        errors = interactions.targets.data.astype(np.float64) - predictions
        loss = float(np.dot(weights * errors, errors))
        user_bias = factors.user_bias.astype(np.float64)
        item_bias = factors.item_bias.astype(np.float64)
        # The bias prior is count-independent: one λ_b·b² per row in the model (a row with observations).
        loss += params.reg_bias * (
            float(np.dot((interactions.row_counts() > 0) * user_bias, user_bias))
            + float(np.dot((interactions.col_counts() > 0) * item_bias, item_bias))
        )
    loss += float(np.dot(user_reg, _row_norms_squared(factors.user)))
    loss += float(np.dot(item_reg, _row_norms_squared(factors.item)))
    return loss


def dense_objective_reference(
    interactions: Interactions,
    factors: Factors,
    params: LossParams,
    user_reg: np.ndarray | None = None,
    item_reg: np.ndarray | None = None,
) -> float:
    """The literal formula on the densified matrix. Memory O(n_users·n_items): small test inputs only."""
    _check_compatible(interactions, factors, params)
    user_reg, item_reg = _resolve_regs(interactions, params, user_reg, item_reg)
    n_users, n_items = interactions.shape
    observed = np.zeros((n_users, n_items), dtype=bool)
    targets = np.zeros((n_users, n_items))
    weights = np.zeros((n_users, n_items))
    rows = interactions.row_ids()
    cols = interactions.targets.indices
    observed[rows, cols] = True
    targets[rows, cols] = 1.0 if params.mode == "implicit" else interactions.targets.data
    weights[rows, cols] = interactions.weights

    user = factors.user.astype(np.float64)
    item = factors.item.astype(np.float64)
    predictions = user @ item.T
    if params.mode == "explicit":
        predictions += (
            factors.global_mean + factors.user_bias[:, None].astype(np.float64) + factors.item_bias[None, :]
        )
    loss = float(np.sum(np.where(observed, weights * (targets - predictions) ** 2, 0.0)))
    loss += params.unobserved_weight * float(np.sum(np.where(observed, 0.0, predictions**2)))
    loss += float(np.sum(user_reg * np.sum(user**2, axis=1)))
    loss += float(np.sum(item_reg * np.sum(item**2, axis=1)))
    if params.mode == "explicit":
        loss += params.reg_bias * float(
            np.sum(observed.any(axis=1) * factors.user_bias.astype(np.float64) ** 2)
            + np.sum(observed.any(axis=0) * factors.item_bias.astype(np.float64) ** 2)
        )
    return loss


def _observed_predictions(interactions: Interactions, factors: Factors, params: LossParams) -> np.ndarray:
    """p_ij at every stored entry, in storage order (biases only in explicit mode, as in L)."""
    rows = interactions.row_ids()
    cols = interactions.targets.indices
    if params.mode == "explicit":
        return predict_entries(factors, rows, cols)
    unbiased = Factors(
        factors.user,
        factors.item,
        np.zeros_like(factors.user_bias),
        np.zeros_like(factors.item_bias),
        0.0,
    )
    return predict_entries(unbiased, rows, cols)


def gramian(matrix: np.ndarray) -> np.ndarray:
    """MᵀM in float64 (k × k), without BLAS.

    The WALS half-steps need it right before their numba kernels, and a multi-threaded BLAS call there
    leaves OpenBLAS's worker threads spinning on the cores the kernels want (measured: 2-4x slower
    iterations with OPENBLAS_NUM_THREADS=2 on 2 cores). So it is a numba kernel on numba's own thread
    pool, with fixed row blocks summed in a fixed order: the result does not depend on the thread count.
    """
    matrix = np.ascontiguousarray(matrix)
    n_rows, k = matrix.shape
    n_blocks = max(1, min(_GRAMIAN_BLOCKS, n_rows))
    block_starts = np.linspace(0, n_rows, n_blocks + 1).astype(np.int64)
    partials = np.zeros((n_blocks, k, k))
    _gramian_lower_kernel(matrix, block_starts, partials)
    lower = partials.sum(axis=0)
    return np.tril(lower) + np.tril(lower, -1).T


@njit(parallel=True, fastmath=False, cache=True, nogil=True)
def _gramian_lower_kernel(matrix: np.ndarray, block_starts: np.ndarray, partials: np.ndarray) -> None:
    """partials[b] = lower triangle of Σ_{rows in block b} m mᵀ, four rows per pass over the triangle."""
    k = matrix.shape[1]
    for block in prange(block_starts.size - 1):
        acc = partials[block]
        row = block_starts[block]
        end = block_starts[block + 1]
        while row + 4 <= end:
            m0, m1, m2, m3 = matrix[row], matrix[row + 1], matrix[row + 2], matrix[row + 3]
            for r in range(k):
                a0, a1, a2, a3 = np.float64(m0[r]), np.float64(m1[r]), np.float64(m2[r]), np.float64(m3[r])
                acc_row = acc[r]
                for c in range(r + 1):
                    acc_row[c] += (a0 * m0[c] + a1 * m1[c]) + (a2 * m2[c] + a3 * m3[c])
            row += 4
        while row < end:
            m0 = matrix[row]
            for r in range(k):
                a0 = np.float64(m0[r])
                acc_row = acc[r]
                for c in range(r + 1):
                    acc_row[c] += a0 * m0[c]
            row += 1


def _row_norms_squared(matrix: np.ndarray) -> np.ndarray:
    return np.einsum("rk,rk->r", matrix, matrix, dtype=np.float64)


def _resolve_regs(
    interactions: Interactions,
    params: LossParams,
    user_reg: np.ndarray | None,
    item_reg: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    n_users, n_items = interactions.shape
    user_reg = (
        weighted_reg(interactions.row_counts(), params.reg, params.reg_prior)
        if user_reg is None
        else np.asarray(user_reg, dtype=np.float64)
    )
    item_reg = (
        weighted_reg(interactions.col_counts(), params.reg, params.reg_prior)
        if item_reg is None
        else np.asarray(item_reg, dtype=np.float64)
    )
    if user_reg.shape != (n_users,) or item_reg.shape != (n_items,):
        raise ValueError(
            f"user_reg/item_reg must have shapes ({n_users},)/({n_items},), "
            f"got {user_reg.shape}/{item_reg.shape}"
        )
    return user_reg, item_reg


def _check_compatible(interactions: Interactions, factors: Factors, params: LossParams) -> None:
    if interactions.mode != params.mode:
        raise ValueError(f"interactions are {interactions.mode}, params are {params.mode}")
    n_users, n_items = interactions.shape
    if factors.user.shape[0] != n_users or factors.item.shape[0] != n_items:
        raise ValueError(
            f"factors have {factors.user.shape[0]} users × {factors.item.shape[0]} items, "
            f"interactions are {n_users} × {n_items}"
        )
    if factors.user.shape[1] != factors.item.shape[1]:
        raise ValueError(
            f"user and item factors differ in k: {factors.user.shape[1]} vs {factors.item.shape[1]}"
        )
    if factors.user_bias.shape != (n_users,) or factors.item_bias.shape != (n_items,):
        raise ValueError("bias vectors must have one entry per user/item")
