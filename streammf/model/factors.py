"""The model's parameters and loss hyperparameters, shared by the SGD and WALS solvers.

The objective both solvers minimise (see README, "The objective"):

    L = Σ_obs w_ij (a_ij − p_ij)²  +  w0 Σ_unobs p_ij²
        + Σ_i λ_i ‖u_i‖² + Σ_j λ_j ‖v_j‖²  [+ λ_b (Σ_{i: n_i>0} b_i² + Σ_{j: m_j>0} c_j²)]
    with λ_i = λ·n_i + λ_0·[n_i > 0]

explicit: p_ij = μ + b_i + c_j + ⟨u_i, v_j⟩, w0 = 0, w_ij = the event's weight (default 1)
implicit: p_ij = ⟨u_i, v_j⟩, a_ij = 1, w_ij = 1 + α·s_ij (s_ij: accumulated strength), w0 > 0

The model's row regularisation is "weighted-λ" (ALS-WR), λ·n_i with n_i the number of observed entries
in row i (m_j for item columns) — exactly the sum of a constant per-observation L2 term, which is what a
per-event SGD step applies — plus a count-independent prior λ_0 that a row brings into L with its first
pair (the SGD step applies it there). The kernels take λ_i as a per-row vector.

Why the count-independent priors (issue #12): with λ·n alone, WALS fits a row with one or two
observations almost exactly (λ·n is tiny there), while one pass of SGD moves such a row only a little, so
on a catalogue where most items have 1-3 ratings every refresh made the next predictions worse (+0.03
RMSE on bench/quality.py's long tail). λ_0 = 5 turns that into a gain, and helps on ML-100k too.

The bias prior is count-independent: λ_b·b² once per row that has observations. A bias is then a ridge
mean of its row's residuals with λ_b pseudo-observations of zero, Σ r/(n + λ_b), so a row with one rating
keeps 1/(1 + λ_b) of its residual instead of all of it. SGD's bias step η_b + 1/(n + λ_b) is the
recursive form of that same mean (see `streammf.model.sgd`), so the refresh and the stream agree on rare
rows. (A count-weighted λ_b·n·b² prior, as the factors have, was measured to make every refresh hurt on
long-tail catalogues: WALS gave an item with one rating almost its full residual; issue #12.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from streammf.config import ModelSettings

Mode = Literal["explicit", "implicit"]
DEFAULTS = ModelSettings()
DTYPE = np.float32


@dataclass(frozen=True)
class LossParams:
    """The loss's hyperparameters; defaults are the settings' (streammf.config), the one place they live."""

    mode: Mode
    reg: float = DEFAULTS.reg
    reg_bias: float = DEFAULTS.reg_bias
    reg_prior: float = DEFAULTS.reg_prior  # λ_0: count-independent factor prior, per row with observations
    alpha: float = DEFAULTS.alpha
    w0: float = DEFAULTS.w0

    def __post_init__(self) -> None:
        if self.mode not in ("explicit", "implicit"):
            raise ValueError(f"mode must be 'explicit' or 'implicit', got {self.mode!r}")
        for name in ("reg", "reg_bias", "reg_prior", "alpha", "w0"):
            value = getattr(self, name)
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be finite and >= 0, got {value!r}")

    @property
    def unobserved_weight(self) -> float:
        """w0 of the objective: zero in explicit mode (unobserved entries are unknown, not zero)."""
        return self.w0 if self.mode == "implicit" else 0.0

    def confidence(self, strength: np.ndarray) -> np.ndarray:
        """Implicit-mode observation weight w_ij = 1 + α·s_ij."""
        return (1.0 + self.alpha * np.asarray(strength, dtype=np.float64)).astype(DTYPE)


@dataclass
class Factors:
    """Dense factor matrices of one model version (rows indexed by the caller's id maps)."""

    user: np.ndarray  # (n_users, k) float32
    item: np.ndarray  # (n_items, k) float32
    user_bias: np.ndarray  # (n_users,) float32, zeros in implicit mode
    item_bias: np.ndarray  # (n_items,) float32, zeros in implicit mode
    global_mean: float = 0.0

    @property
    def k(self) -> int:
        return int(self.user.shape[1])

    def copy(self) -> Factors:
        return Factors(
            self.user.copy(), self.item.copy(), self.user_bias.copy(), self.item_bias.copy(), self.global_mean
        )

    def check_finite(self) -> None:
        """Refuse to publish NaN/inf factors (a diverged solve must never reach readers)."""
        for name in ("user", "item", "user_bias", "item_bias"):
            if not np.all(np.isfinite(getattr(self, name))):
                raise NonFiniteFactorsError(f"{name} factors contain NaN or inf")
        if not np.isfinite(self.global_mean):
            raise NonFiniteFactorsError("global mean is NaN or inf")


class NonFiniteFactorsError(ArithmeticError):
    """A solver produced NaN or inf; nothing derived from it may be stored."""


def init_rows(ids: list[str] | np.ndarray, k: int, std: float, seed: int, side: str) -> np.ndarray:
    """Deterministic initial rows, one per id, independent of arrival order and of which process asks.

    Seeded from (seed, side, id) so the daemon, `evaluate` and every replica create the same row for the
    same new user or item: the id's 64-bit BLAKE2b key, counters 0, 1, … through SplitMix64 give uniform
    numbers, Box-Muller turns them into normal ones. Vectorised over ids (a seeded generator per id cost
    ~30 µs, a fifth of the daemon's time under a stream of new ids).
    """
    import hashlib

    n = len(ids)
    keys = np.fromiter(
        (
            int.from_bytes(
                hashlib.blake2b(f"{seed}:{side}:{ident}".encode(), digest_size=8).digest(), "little"
            )
            for ident in ids
        ),
        dtype=np.uint64,
        count=n,
    )
    pairs = (k + 1) // 2
    counters = np.arange(2 * pairs, dtype=np.uint64)
    bits = _splitmix64(keys[:, None] + counters[None, :] * _GOLDEN)
    uniform = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53  # in (0, 1): log is finite
    radius = np.sqrt(-2.0 * np.log(uniform[:, :pairs]))
    angle = 2.0 * np.pi * uniform[:, pairs:]
    normal = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)], axis=1)[:, :k]
    return (std * normal).astype(DTYPE)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on uint64 arrays (multiplications wrap modulo 2^64)."""
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))
