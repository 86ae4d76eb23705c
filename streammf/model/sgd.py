"""Online SGD on the weighted-MF objective (see `streammf.model.factors`), one event at a time, in order.

Each event's step descends the change in L that the event causes, evaluated at the current factors
("increment rule"), plus its share of the implicit-mode unobserved term:

explicit, prediction p = μ + b_u + c_i + ⟨u, v⟩, error e = a − p, event weight w:
    ℓ = w·e²  [+ λ(‖u‖² + ‖v‖²)  when the (u, i) pair is new: the pair adds one observed entry, so n_u and
               m_i grow by one and weighted-λ regularisation grows by exactly that]
              [+ λ_0‖u‖² + λ_b·b_u²  when it is the user's first pair (n_u becomes 1): the row enters L
               with its count-independent priors; likewise λ_0‖v‖² + λ_b·c_i² for the item's first pair]
implicit, p = ⟨u, v⟩, target 1, strength added s (value × weight):
    new pair: ℓ = (1 + α·s)(1 − p)² − w0·p² + λ(‖u‖² + ‖v‖²)   (entry moves from unobserved to observed)
              [+ λ_0‖u‖² at the user's first pair, λ_0‖v‖² at the item's, as in explicit mode]
    old pair: ℓ = α·s·(1 − p)²                                  (its confidence grows by α·s)
    gravity:  + (w0/n_u)·uᵀ G_V u + (w0/m_i)·vᵀ G_U v
The gravity share spreads the unobserved term w0·Σ_u uᵀG_V u (and its item-side twin) over a row's events,
so a pass over the data applies it once per row; it is never computed by densifying or sampling negatives.
G_V = VᵀV and G_U = UᵀU are kept current by exact rank-one updates after every step
(G += v'v'ᵀ − vvᵀ) inside the kernel, stored as deltas, and recomputed exactly at every WALS refresh.

Explicit mode takes the gradient step, halved (absorbed into the learning rate): x ← x − η·½∇ℓ, with
the scalar w·e clipped to ±max_gradient so that no single event can throw a row far (ordinary errors are
far inside the clip, so it changes nothing for them).
A bias takes the step η_b + 1/(n + λ_b). With η_b = 0 that is recursive least squares on the bias's part
of L: the accumulated curvature of Σ e² + λ_b·b² after n − 1 events is n − 1 + λ_b, and
b_n = b_{n−1} + e_n/(n + λ_b) turns the ridge mean Σ_{t<n} r_t/(n − 1 + λ_b) of the residuals r into
Σ_{t≤n} r_t/(n + λ_b) exactly. That is what WALS's row solve gives the bias for the same residuals, and
after a refresh the stream continues the refit's biases as if it had seen every event itself (tested).
η_b > 0 adds a constant rate on top, to track drifting biases of old rows.
Implicit mode's ℓ is quadratic in each row and stiff (confidence weights, the Gramian), so it takes the
implicit (proximal) step x' = argmin ½ℓ(x') + ‖x' − x‖²/2η, one small SPD solve per row: stable at any
η, with the same fixed points.
The global mean μ is the running mean of all values seen before the event.

Events run strictly in order, so a batch gives the same result as applying its events one by one, whatever
the batch boundaries: the daemon and `streammf evaluate` agree exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from streammf.model.factors import DEFAULTS, DTYPE, LossParams


@dataclass(frozen=True)
class SgdParams:
    loss: LossParams
    learning_rate: float = DEFAULTS.factor_learning_rate
    bias_learning_rate: float = DEFAULTS.bias_learning_rate
    fit_biases: bool = True  # explicit mode; False: p = ⟨u, v⟩ (no μ, biases held at their values)
    # Explicit mode: |w·e| is clipped to this (a Huber-like step), so one extreme event moves a row by a
    # bounded amount. Within the input bounds it never binds for ordinary errors
    # (see `LearnerParams.from_settings`).
    max_gradient: float = float("inf")


@dataclass
class SgdBatch:
    """Local rows of one batch (indexed 0..n-1) and its events, which refer to those rows.

    The kernel updates the arrays in place. A pair is new until one of its events is applied, and a row
    enters the implicit Gramian with its first applied event, so an event left out (see `sgd_step`) hands
    its pair's newness, and its row's entry, on to the next event that names them.
    """

    user_rows: np.ndarray  # (n_users, k) float32
    user_bias: np.ndarray  # (n_users,) float32
    user_counts: np.ndarray  # (n_users,) int64, n_u before the batch
    item_rows: np.ndarray  # (n_items, k) float32
    item_bias: np.ndarray  # (n_items,) float32
    item_counts: np.ndarray  # (n_items,) int64
    event_user: np.ndarray  # (n_events,) int64 local row
    event_item: np.ndarray  # (n_events,) int64 local row
    event_pair: np.ndarray  # (n_events,) int64 local (user, item) pair
    event_value: np.ndarray  # (n_events,) float64: rating or strength
    event_weight: np.ndarray  # (n_events,) float64
    pair_new: np.ndarray  # (n_pairs,) bool: no observation of the pair yet
    user_entered: np.ndarray  # (n_users,) bool: the row is in the model (and in the implicit Gramian)
    item_entered: np.ndarray  # (n_items,) bool
    value_sum: float  # running sums for μ, before the batch
    value_count: int
    item_gramian: np.ndarray  # (k, k) float64 (unused in explicit mode)
    user_gramian: np.ndarray  # (k, k) float64


def sgd_step(
    batch: SgdBatch, params: SgdParams, max_abs_factor: float = float("inf")
) -> tuple[np.ndarray, float, int]:
    """Run the batch's events in order. Returns (predictions before each step, value_sum, value_count).

    An event whose step would leave a coordinate of its user's or item's row (factors or bias) not finite
    or beyond ±max_abs_factor, once rounded to the stored float32, is left out: nothing of it is applied
    (rows, counts, Gramians, μ) and its prediction is NaN. An applied event's prediction is always finite.
    Checking each step as it is taken keeps a batch full of such events O(n)."""
    predictions = np.empty(len(batch.event_user), dtype=np.float64)
    loss = params.loss
    value_sum, value_count = _sgd_kernel(
        batch.user_rows,
        batch.user_bias,
        batch.user_counts,
        batch.item_rows,
        batch.item_bias,
        batch.item_counts,
        batch.event_user,
        batch.event_item,
        batch.event_pair,
        batch.event_value,
        batch.event_weight,
        batch.pair_new,
        batch.user_entered,
        batch.item_entered,
        float(batch.value_sum),
        int(batch.value_count),
        batch.item_gramian,
        batch.user_gramian,
        loss.mode == "explicit",
        params.fit_biases,
        params.max_gradient,
        params.learning_rate,
        params.bias_learning_rate,
        loss.reg,
        loss.reg_bias,
        loss.reg_prior,
        loss.alpha,
        loss.w0,
        float(max_abs_factor),
        predictions,
    )
    return predictions, value_sum, value_count


# nogil: the daemon learns a batch on a worker thread while its loop polls Kafka and decodes the next
# one; without the lock the kernel (~8 µs per implicit event) runs beside that work, not in turn with it.
@njit(cache=True, nogil=True)
def _sgd_kernel(
    U, bu, n_u, V, bv, m_i, ev_u, ev_i, ev_pair, ev_val, ev_w, pair_new, user_entered, item_entered,
    value_sum, value_count, G_V, G_U, explicit, fit_biases, max_gradient, lr, lr_b, reg, reg_b, reg_p, alpha,
    w0, bound, predictions,
):  # fmt: skip
    scratch = _work_arrays(U.shape[1])
    for t in range(ev_u.shape[0]):
        a = ev_u[t]
        b = ev_i[t]
        pair = ev_pair[t]
        mu = value_sum / value_count if explicit and fit_biases and value_count > 0 else 0.0
        p, applied = _sgd_event(
            a, b, ev_val[t], ev_w[t], pair_new[pair], not user_entered[a], not item_entered[b], mu, U, bu,
            n_u, V, bv, m_i, G_V, G_U, explicit, fit_biases, max_gradient, lr, lr_b, reg, reg_b, reg_p, alpha,
            w0, bound, scratch,
        )  # fmt: skip
        if applied:
            predictions[t] = p
            pair_new[pair] = False
            user_entered[a] = True
            item_entered[b] = True
            value_sum += ev_val[t]
            value_count += 1
        else:
            predictions[t] = np.nan
    return value_sum, value_count


@njit(cache=True)
def _work_arrays(k):  # fmt: skip
    """Scratch of `_sgd_event`: rows 0-4 hold u_old, v_old, r_u, r_v, solve work; then the k×k system,
    and the two Gramians as they were before a row entered them (restored if the step is not taken)."""
    return np.empty((5 + 3 * k, k), dtype=np.float64)


@njit(cache=True)
def _storable(x, bound):  # fmt: skip
    """x, rounded to the stored float32, is finite and within ±bound."""
    y = np.float64(np.float32(x))
    return np.isfinite(y) and abs(y) <= bound


@njit(cache=True)
def _sgd_event(
    a, b, value, weight, new, new_u, new_i, mu, U, bu, n_u, V, bv, m_i, G_V, G_U, explicit, fit_biases,
    max_gradient, lr, lr_b, reg, reg_b, reg_p, alpha, w0, bound, scratch,
):  # fmt: skip
    """One event's step on user row a and item row b, in place; returns (p before the step, applied).

    `new`: the pair's first observation; `new_u`/`new_i`: the row enters the model here (implicit
    Gramian). The step is computed aside and taken only if every coordinate it writes is `_storable`;
    otherwise nothing changes (a Gramian a row entered is restored from its copy). Shared by `sgd_step`
    and the exact per-event evaluation (`streammf.model.prequential`), so both take the very same step."""
    k = U.shape[1]
    u_old = scratch[0]
    v_old = scratch[1]
    r_u = scratch[2]
    r_v = scratch[3]
    work = scratch[4]
    system = scratch[5 : 5 + k]
    saved_user_gram = scratch[5 + k : 5 + 2 * k]
    saved_item_gram = scratch[5 + 2 * k : 5 + 3 * k]
    count_u = n_u[a] + 1 if new else n_u[a]
    count_i = m_i[b] + 1 if new else m_i[b]
    reg_on = 1.0 if new else 0.0
    # A row's first pair brings the row's count-independent priors into L (λ_0 on factors, λ_b on bias).
    first_u = 1.0 if new and count_u == 1 else 0.0
    first_i = 1.0 if new and count_i == 1 else 0.0
    dot = 0.0
    for f in range(k):
        u_old[f] = U[a, f]
        v_old[f] = V[b, f]
        dot += u_old[f] * v_old[f]
    bias_u = np.float64(bu[a])
    bias_i = np.float64(bv[b])
    if explicit:
        p = mu + bias_u + bias_i + dot
        # ½ dℓ/dp = −w·e, clipped: a step stays bounded however far off the prediction is.
        g = min(max(-weight * (value - p), -max_gradient), max_gradient)
        # Bias step η_b + 1/(n + λ_b): recursive least squares on Σ e² + λ_b·b² (the ridge mean of
        # the row's residuals, exact with η_b = 0), plus a constant rate that tracks drift.
        # The prior's gradient λ_b·b enters once, at the row's first pair.
        if fit_biases:
            bias_u = bias_u - (lr_b + 1.0 / max(count_u + reg_b, 1.0)) * (g + first_u * reg_b * bias_u)
            bias_i = bias_i - (lr_b + 1.0 / max(count_i + reg_b, 1.0)) * (g + first_i * reg_b * bias_i)
        shrink_u = reg_on * reg + first_u * reg_p
        shrink_i = reg_on * reg + first_i * reg_p
        for f in range(k):
            r_u[f] = u_old[f] - lr * (g * v_old[f] + shrink_u * u_old[f])
            r_v[f] = v_old[f] - lr * (g * u_old[f] + shrink_i * v_old[f])
    else:
        # A row entering the model joins the unobserved term: add it to its Gramian first (kept aside, as
        # the step may not be taken).
        if new_u:
            saved_user_gram[:, :] = G_U
            for f in range(k):
                for h in range(k):
                    G_U[f, h] += u_old[f] * u_old[h]
        if new_i:
            saved_item_gram[:, :] = G_V
            for f in range(k):
                for h in range(k):
                    G_V[f, h] += v_old[f] * v_old[h]
        p = dot
        s = value * weight
        # ½ℓ restricted to one row x (the other fixed at o) is ½a(x·o)² − b(x·o) + ½λ_on‖x‖² + ½c·xᵀGx:
        # new pair a = w − w0, b = w (w = 1 + α·s); old pair a = b = α·s.
        if new:
            conf = 1.0 + alpha * s
            a_coef = max(conf - w0, 0.0)  # clamped so the system stays SPD even if w0 > 1
            b_coef = conf
        else:
            a_coef = alpha * s
            b_coef = alpha * s
        gu = w0 / count_u if count_u > 0 else w0
        gv = w0 / count_i if count_i > 0 else w0
        # Implicit (proximal) step: (I + η(a·ooᵀ + λ_on·I + c·G)) x' = x + η·b·o, the exact minimiser of
        # ½ℓ + ‖x' − x‖²/2η. Confidence weights and the Gramian make the plain step stiff; this one is
        # stable at any η and has the same fixed points.
        shift_u = lr * (reg_on * reg + first_u * reg_p)
        shift_i = lr * (reg_on * reg + first_i * reg_p)
        _prox_row(G_V, lr * gu, u_old, v_old, lr * a_coef, lr * b_coef, shift_u, r_u, system, work)
        _prox_row(G_U, lr * gv, v_old, u_old, lr * a_coef, lr * b_coef, shift_i, r_v, system, work)
    sound = np.isfinite(p) and _storable(bias_u, bound) and _storable(bias_i, bound)
    for f in range(k):
        sound = sound and _storable(r_u[f], bound) and _storable(r_v[f], bound)
    if not sound:
        if not explicit and new_u:
            G_U[:, :] = saved_user_gram
        if not explicit and new_i:
            G_V[:, :] = saved_item_gram
        return p, False
    n_u[a] = count_u
    m_i[b] = count_i
    bu[a] = bias_u
    bv[b] = bias_i
    for f in range(k):
        U[a, f] = r_u[f]
        V[b, f] = r_v[f]
    if not explicit:
        # Keep the Gramians exact: swap the old rows' outer products for the new (float32-rounded) ones.
        for f in range(k):
            for h in range(k):
                G_V[f, h] += np.float64(V[b, f]) * V[b, h] - v_old[f] * v_old[h]
                G_U[f, h] += np.float64(U[a, f]) * U[a, h] - u_old[f] * u_old[h]
    return p, True


@njit(cache=True)
def _prox_row(G, c, x, other, a, b, shift, out, system, work):  # fmt: skip
    """out ← (I·(1 + shift) + c·G + a·other·otherᵀ)⁻¹ (x + b·other), by Cholesky (the matrix is SPD)."""
    k = x.shape[0]
    for f in range(k):
        out[f] = x[f] + b * other[f]
        for h in range(k):
            system[f, h] = c * G[f, h] + a * other[f] * other[h]
        system[f, f] += 1.0 + shift
    for j in range(k):  # L stored in the lower triangle
        total = system[j, j]
        for p in range(j):
            total -= system[j, p] * system[j, p]
        if not total > 0.0:  # overflowed (a weight near the float limits): no step, the event is left out
            out[:] = np.nan
            return
        diag = np.sqrt(total)
        system[j, j] = diag
        # Four entries of the column at a time: four independent chains of subtractions, each in the
        # same order as one at a time (the same result to the bit), which the CPU runs side by side.
        i = j + 1
        while i + 3 < k:
            t0, t1, t2, t3 = system[i, j], system[i + 1, j], system[i + 2, j], system[i + 3, j]
            for p in range(j):
                lj = system[j, p]
                t0 -= system[i, p] * lj
                t1 -= system[i + 1, p] * lj
                t2 -= system[i + 2, p] * lj
                t3 -= system[i + 3, p] * lj
            system[i, j], system[i + 1, j] = t0 / diag, t1 / diag
            system[i + 2, j], system[i + 3, j] = t2 / diag, t3 / diag
            i += 4
        while i < k:
            total = system[i, j]
            for p in range(j):
                total -= system[i, p] * system[j, p]
            system[i, j] = total / diag
            i += 1
    for i in range(k):  # L y = rhs
        total = out[i]
        for p in range(i):
            total -= system[i, p] * work[p]
        work[i] = total / system[i, i]
    for i in range(k - 1, -1, -1):  # Lᵀ x = y
        total = work[i]
        for p in range(i + 1, k):
            total -= system[p, i] * out[p]
        out[i] = total / system[i, i]


def event_loss_reference(
    u: np.ndarray,
    v: np.ndarray,
    bu: float,
    bv: float,
    value: float,
    weight: float,
    new_pair: bool,
    mu: float,
    n_u: int,
    m_i: int,
    item_gramian: np.ndarray,
    user_gramian: np.ndarray,
    params: LossParams,
) -> float:
    """ℓ of one event (the function the kernel's step descends), in plain numpy for gradient checks.

    n_u and m_i are the counts *including* this event's pair.
    """
    reg_on = 1.0 if new_pair else 0.0
    first_u = 1.0 if new_pair and n_u == 1 else 0.0  # the row's first pair brings its priors
    first_i = 1.0 if new_pair and m_i == 1 else 0.0
    if params.mode == "explicit":
        p = mu + bu + bv + float(u @ v)
        return (
            weight * (value - p) ** 2
            + reg_on * params.reg * (u @ u + v @ v)
            + params.reg_bias * (first_u * bu * bu + first_i * bv * bv)
            + params.reg_prior * (first_u * (u @ u) + first_i * (v @ v))
        )
    p = float(u @ v)
    s = value * weight
    data = (
        (1 + params.alpha * s) * (1 - p) ** 2 - params.w0 * p * p
        if new_pair
        else params.alpha * s * (1 - p) ** 2
    )
    gravity = params.w0 / n_u * (u @ item_gramian @ u) + params.w0 / m_i * (v @ user_gramian @ v)
    priors = params.reg_prior * (first_u * (u @ u) + first_i * (v @ v))
    return data + reg_on * params.reg * (u @ u + v @ v) + priors + gravity


__all__ = ["DTYPE", "SgdBatch", "SgdParams", "event_loss_reference", "sgd_step"]
