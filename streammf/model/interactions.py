"""The observed entries of the user × item matrix, in the layout the row solvers read.

What `targets.data` holds depends on the mode, because the objective's a_ij does:

* explicit: ``targets.data`` = a_ij, the rating; ``weights`` = w_ij, the event's weight (default 1).
* implicit: a_ij = 1 for every observed entry, so storing it would carry no information. ``targets.data``
  holds the accumulated strength s_ij instead (≥ 0), and ``weights`` = w_ij = 1 + α·s_ij
  (`LossParams.confidence`). Solvers never read ``targets.data`` in implicit mode; it is kept so the
  confidence can be recomputed for another α and so the matrix is the usual "user_items" input of other
  implicit-feedback libraries.

An entry is "observed" if it is stored in the CSR structure, whatever its value: an explicit rating of 0
is an observation, so these matrices are built by hand and never passed through scipy operations that
drop explicit zeros. Layout: float32 data, int32 indices and indptr, rows sorted, no duplicates.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import scipy.sparse as sp

from streammf.model.factors import DTYPE, LossParams, Mode

INDEX_DTYPE = np.int32
_MAX_INDEX = np.iinfo(INDEX_DTYPE).max


@dataclass(frozen=True)
class Interactions:
    """Observed entries of a rows × columns matrix with aligned per-entry weights.

    ``weights[p]`` belongs to the entry stored at position p of ``targets.data``/``targets.indices``.
    For the item-side solves, `transposed` is the same data as columns × rows, weights still aligned.
    """

    targets: sp.csr_matrix
    weights: np.ndarray
    mode: Mode

    def __post_init__(self) -> None:
        targets = self.targets
        if not sp.isspmatrix_csr(targets):
            raise TypeError(f"targets must be a scipy csr_matrix, got {type(targets).__name__}")
        if targets.dtype != DTYPE:
            raise TypeError(f"targets must be {np.dtype(DTYPE).name}, got {targets.dtype}")
        if targets.indices.dtype != INDEX_DTYPE or targets.indptr.dtype != INDEX_DTYPE:
            raise TypeError("targets.indices and targets.indptr must be int32")
        if self.weights.dtype != DTYPE or self.weights.shape != (targets.nnz,):
            raise ValueError(
                f"weights must be a float32 array aligned with targets.data ({targets.nnz},), "
                f"got {self.weights.dtype} {self.weights.shape}"
            )
        if self.mode not in ("explicit", "implicit"):
            raise ValueError(f"mode must be 'explicit' or 'implicit', got {self.mode!r}")
        # Duplicates or unsorted columns would make one pair count twice in the objective.
        if not targets.has_canonical_format:
            raise ValueError("targets must be in canonical CSR format (sorted indices, no duplicates)")

    @classmethod
    def from_coo(
        cls,
        users: np.ndarray,
        items: np.ndarray,
        values: np.ndarray,
        shape: tuple[int, int],
        params: LossParams,
        weights: np.ndarray | None = None,
    ) -> Interactions:
        """Build from (user, item, value) triples; ``values`` are ratings (explicit) or strengths (implicit).

        Duplicated (user, item) pairs: explicit mode keeps the LAST rating in input order together with
        that event's weight (a re-rating replaces the old one); implicit mode SUMS the strengths (repeated
        events accumulate evidence) and derives the confidence from the sum. ``weights`` is explicit-only:
        in implicit mode the weight is a function of the strength, so scale the strengths instead.
        """
        n_rows, n_cols = (int(shape[0]), int(shape[1]))
        if n_rows < 0 or n_cols < 0 or max(n_rows, n_cols) > _MAX_INDEX:
            raise ValueError(f"shape must be non-negative and fit int32, got {shape}")
        rows = _as_index_array(users, "users", n_rows)
        cols = _as_index_array(items, "items", n_cols)
        vals = np.asarray(values, dtype=np.float64).reshape(-1)
        if not rows.shape == cols.shape == vals.shape:
            raise ValueError(f"users, items, values differ in length: {rows.size}, {cols.size}, {vals.size}")
        if not np.all(np.isfinite(vals)):
            raise ValueError("values must be finite")

        if params.mode == "implicit":
            if weights is not None:
                raise ValueError("implicit mode derives weights from strengths (1 + alpha*s); pass none")
            if np.any(vals < 0):
                raise ValueError("implicit strengths must be >= 0")
            event_weights = None
        else:
            event_weights = (
                np.ones(vals.size) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
            )
            if event_weights.shape != vals.shape:
                raise ValueError(f"weights has {event_weights.size} entries, values has {vals.size}")
            if not np.all(np.isfinite(event_weights)) or np.any(event_weights < 0):
                raise ValueError("weights must be finite and >= 0")

        # lexsort is stable, so within one (row, col) group the input order survives: the group's last
        # element is the last event.
        order = np.lexsort((cols, rows))
        rows, cols, vals = rows[order], cols[order], vals[order]
        starts_group = np.ones(rows.size, dtype=bool)
        starts_group[1:] = (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1])
        group_starts = np.flatnonzero(starts_group)

        if params.mode == "implicit":
            data = np.add.reduceat(vals, group_starts) if vals.size else vals
            entry_weights = params.confidence(data)
        else:
            assert event_weights is not None
            group_ends = np.append(group_starts[1:], rows.size)[: group_starts.size] - 1
            data = vals[group_ends]
            entry_weights = event_weights[order][group_ends]
        return cls._from_sorted(
            rows[group_starts], cols[group_starts], data, entry_weights, (n_rows, n_cols), params.mode
        )

    @classmethod
    def _from_sorted(
        cls,
        rows: np.ndarray,
        cols: np.ndarray,
        data: np.ndarray,
        weights: np.ndarray,
        shape: tuple[int, int],
        mode: Mode,
    ) -> Interactions:
        """Assemble the CSR arrays directly from entries already sorted by (row, col) without duplicates."""
        if rows.size > _MAX_INDEX:
            raise ValueError(f"{rows.size} entries do not fit int32 CSR offsets")
        indptr = np.zeros(shape[0] + 1, dtype=INDEX_DTYPE)
        np.cumsum(np.bincount(rows, minlength=shape[0]), out=indptr[1:])
        targets = sp.csr_matrix(
            (
                np.ascontiguousarray(data, dtype=DTYPE),
                np.ascontiguousarray(cols, dtype=INDEX_DTYPE),
                indptr,
            ),
            shape=shape,
            copy=False,
        )
        # scipy may pick a wider index type on construction; the kernels are compiled for int32.
        targets.indices = targets.indices.astype(INDEX_DTYPE, copy=False)
        targets.indptr = targets.indptr.astype(INDEX_DTYPE, copy=False)
        targets.has_canonical_format = True
        return cls(targets, np.ascontiguousarray(weights, dtype=DTYPE), mode)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.targets.shape[0]), int(self.targets.shape[1]))

    @property
    def nnz(self) -> int:
        return int(self.targets.nnz)

    def row_counts(self) -> np.ndarray:
        """n_i: observed entries per row (int64)."""
        return np.diff(self.targets.indptr).astype(np.int64)

    def col_counts(self) -> np.ndarray:
        """m_j: observed entries per column (int64)."""
        return np.bincount(self.targets.indices, minlength=self.shape[1]).astype(np.int64)

    def row_ids(self) -> np.ndarray:
        """The row index of every stored entry, aligned with ``targets.indices`` (COO rows)."""
        return np.repeat(np.arange(self.shape[0], dtype=INDEX_DTYPE), np.diff(self.targets.indptr))

    @cached_property
    def transposed(self) -> Interactions:
        """The same entries as a columns × rows matrix, weights permuted along (cached both ways)."""
        rows = self.row_ids()
        # Entries are sorted by row; a stable sort by column leaves them sorted by (column, row).
        order = np.argsort(self.targets.indices, kind="stable")
        flipped = Interactions._from_sorted(
            self.targets.indices[order],
            rows[order],
            self.targets.data[order],
            self.weights[order],
            (self.shape[1], self.shape[0]),
            self.mode,
        )
        flipped.__dict__["transposed"] = self  # transposing back is free
        return flipped

    def take_rows(self, rows: np.ndarray) -> Interactions:
        """The given rows (in the given order) as a len(rows) × n_cols matrix, e.g. users to fold in."""
        picked = _as_index_array(rows, "rows", self.shape[0])
        indptr = self.targets.indptr.astype(np.int64)
        lengths = indptr[picked + 1] - indptr[picked]
        new_indptr = np.zeros(picked.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=new_indptr[1:])
        # Position of every picked entry in the source arrays: its row's start plus its offset within it.
        positions = np.repeat(indptr[picked] - new_indptr[:-1], lengths) + np.arange(new_indptr[-1])
        return Interactions._from_sorted(
            np.repeat(np.arange(picked.size), lengths),
            self.targets.indices[positions],
            self.targets.data[positions],
            self.weights[positions],
            (picked.size, self.shape[1]),
            self.mode,
        )


def _as_index_array(values: np.ndarray, name: str, bound: int) -> np.ndarray:
    array = np.asarray(values).reshape(-1)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{name} must be integers, got {array.dtype}")
    array = array.astype(np.int64, copy=False)
    if array.min() < 0 or array.max() >= bound:
        raise ValueError(f"{name} out of range [0, {bound})")
    return array
