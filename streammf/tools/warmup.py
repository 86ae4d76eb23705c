"""Compile every numba kernel into numba's on-disk cache before the daemon needs it.

The kernels are `@njit(cache=True)`: the first call of each compiles it (about a minute for all of them on
a small machine) and writes the machine code to the cache (`NUMBA_CACHE_DIR`, else `__pycache__` beside the
sources); later processes load it in milliseconds. Without this, a fresh container spends its first
minute compiling the SGD kernel before it applies an event, and its first WALS refresh compiling again.
Run at image build time (Dockerfile) and before the demo's daemon starts.

A cached kernel is keyed by its argument types, so the warm-up calls each kernel through the same code
paths and dtypes the daemon uses: the learner's SGD step and a WALS refresh (via `evaluate`, in both
modes), both WALS solvers, and the fold-in a refresh runs to catch up with the stream.
"""

from __future__ import annotations

import time

import numpy as np

from streammf.config import ModelSettings
from streammf.model.factors import DTYPE, Factors
from streammf.model.interactions import Interactions
from streammf.model.wals import fold_in_items, fold_in_users, wals
from streammf.store.memory import MemoryStore
from streammf.stream.learner import LearnerParams
from streammf.tools.evaluate import evaluate
from streammf.tools.ratings import RatingsLog

MODES = ("explicit", "implicit")


def _tiny_log(n: int = 600, seed: int = 0) -> RatingsLog:
    rng = np.random.default_rng(seed)
    return RatingsLog(
        users=np.array([f"u{u}" for u in rng.integers(0, 40, n)]),
        items=np.array([f"i{i}" for i in rng.integers(0, 30, n)]),
        values=rng.integers(1, 6, n).astype(np.float64),
        timestamps=np.arange(n, dtype=np.float64),
    )


def warm_up() -> float:
    """Compiles (or loads) every kernel; returns the seconds it took."""
    started = time.perf_counter()
    log = _tiny_log()
    for mode in MODES:
        model = ModelSettings(name="warmup", mode=mode, factors=4)
        params = LearnerParams.from_settings(model)
        store = MemoryStore(model.name, model.mode, model.factors)
        evaluate(log, store, params, batch_size=100, refresh_every=len(log) // 2, refresh_iterations=1)
        _warm_solvers(mode, params)
    return time.perf_counter() - started


def _warm_solvers(mode: str, params: LearnerParams) -> None:
    """Both WALS solvers and both fold-ins, on arrays typed as a refresh's snapshot types them."""
    rng = np.random.default_rng(1)
    n_users, n_items, k = 20, 15, 4
    users, items = rng.integers(0, n_users, 200), rng.integers(0, n_items, 200)  # int64 positions
    values = rng.integers(1, 6, 200).astype(np.float64)
    interactions = Interactions.from_coo(users, items, values, (n_users, n_items), params.loss)
    biased = mode == "explicit"
    factors = Factors(
        rng.normal(0, 0.1, (n_users, k)).astype(DTYPE),
        rng.normal(0, 0.1, (n_items, k)).astype(DTYPE),
        np.zeros(n_users, dtype=DTYPE),
        np.zeros(n_items, dtype=DTYPE),
        3.0 if biased else 0.0,
    )
    for solver in ("cholesky", "cg"):
        wals(interactions, factors, params.loss, 1, fit_biases=biased, solver=solver)
    fold_in_users(interactions.take_rows(np.arange(2)), factors, params.loss, fit_biases=biased)
    fold_in_items(interactions.transposed.take_rows(np.arange(2)), factors, params.loss, fit_biases=biased)
