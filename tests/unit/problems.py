"""Small seeded random MF problems shared by the objective and WALS tests."""

from __future__ import annotations

import numpy as np

from streammf.model.factors import DTYPE, Factors, LossParams, Mode
from streammf.model.interactions import Interactions


def random_problem(
    seed: int,
    mode: Mode,
    n_users: int = 13,
    n_items: int = 9,
    density: float = 0.35,
    k: int = 3,
    *,
    params: LossParams | None = None,
    empty_first_row_and_column: bool = False,
    global_mean: float = 3.1,
) -> tuple[Interactions, Factors, LossParams]:
    rng = np.random.default_rng(seed)
    params = params or LossParams(mode, reg=0.07, reg_bias=0.03, alpha=2.5, w0=0.2)
    observed = rng.random((n_users, n_items)) < density
    if empty_first_row_and_column:  # rows and columns without observations must be handled too
        observed[0] = False
        observed[:, 0] = False
    users, items = np.nonzero(observed)
    if mode == "explicit":
        values = rng.integers(1, 6, users.size).astype(float)
        weights = rng.uniform(0.5, 2.0, users.size)
    else:
        values = rng.exponential(1.0, users.size)
        weights = None
    interactions = Interactions.from_coo(users, items, values, (n_users, n_items), params, weights)
    biased = mode == "explicit"
    factors = Factors(
        rng.normal(0, 0.5, (n_users, k)).astype(DTYPE),
        rng.normal(0, 0.5, (n_items, k)).astype(DTYPE),
        (rng.normal(0, 0.3, n_users) if biased else np.zeros(n_users)).astype(DTYPE),
        (rng.normal(0, 0.3, n_items) if biased else np.zeros(n_items)).astype(DTYPE),
        global_mean if biased else 0.0,
    )
    return interactions, factors, params
