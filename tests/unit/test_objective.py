"""The objective (Gramian trick vs dense formula) and its input, `Interactions`."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from streammf.model.factors import DTYPE, Factors, LossParams, Mode
from streammf.model.interactions import Interactions
from streammf.model.objective import (
    dense_objective_reference,
    objective,
    predict_entries,
    rmse,
    weighted_reg,
)
from tests.unit.problems import random_problem

# --- objective ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["implicit", "explicit"])
@pytest.mark.parametrize("seed", range(5))
def test_objective_matches_dense_reference(mode: Mode, seed: int) -> None:
    interactions, factors, params = random_problem(seed, mode)
    assert objective(interactions, factors, params) == pytest.approx(
        dense_objective_reference(interactions, factors, params), rel=1e-10
    )


@pytest.mark.parametrize("mode", ["implicit", "explicit"])
def test_objective_with_custom_regularisation_matches_dense(mode: Mode) -> None:
    interactions, factors, params = random_problem(11, mode)
    rng = np.random.default_rng(0)
    user_reg = rng.uniform(0, 1, interactions.shape[0])
    item_reg = rng.uniform(0, 1, interactions.shape[1])
    assert objective(interactions, factors, params, user_reg, item_reg) == pytest.approx(
        dense_objective_reference(interactions, factors, params, user_reg, item_reg), rel=1e-10
    )


def test_implicit_objective_by_hand() -> None:
    # One user, two items, entry (0, 0) observed with strength 1: w = 1 + 2·1 = 3.
    params = LossParams("implicit", reg=0.5, alpha=2.0, w0=0.25, reg_prior=1.5)
    interactions = Interactions.from_coo([0], [0], [1.0], (1, 2), params)
    factors = Factors(
        np.array([[1.0, 2.0]], DTYPE),
        np.array([[0.5, 0.0], [1.0, 1.0]], DTYPE),
        np.zeros(1, DTYPE),
        np.zeros(2, DTYPE),
    )
    # p00 = 0.5, p01 = 3; λ_user = 0.5·1 + 1.5, λ_items = 0.5·(1, 0) + 1.5·(1, 0): the prior only on rows
    # with observations
    expected = 3 * (1 - 0.5) ** 2 + 0.25 * 3.0**2 + 2.0 * 5.0 + 2.0 * 0.25 + 0.0 * 2.0
    assert objective(interactions, factors, params) == pytest.approx(expected)
    assert dense_objective_reference(interactions, factors, params) == pytest.approx(expected)


def test_explicit_objective_ignores_unobserved_and_regularises_biases() -> None:
    params = LossParams("explicit", reg=0.0, reg_bias=0.5)
    interactions = Interactions.from_coo([0, 0], [0, 1], [4.0, 2.0], (2, 2), params, weights=[1.0, 2.0])
    factors = Factors(
        np.zeros((2, 1), DTYPE), np.zeros((2, 1), DTYPE), np.array([1.0, 7.0], DTYPE), np.zeros(2, DTYPE), 2.0
    )
    # p = 3 for both observed entries; user 1 has no entries, so its bias costs nothing; user 0's prior is
    # count-independent: λ_b·b², not λ_b·n·b².
    expected = 1.0 * (4 - 3) ** 2 + 2.0 * (2 - 3) ** 2 + 0.5 * 1.0**2
    assert objective(interactions, factors, params) == pytest.approx(expected)


def test_objective_of_empty_interactions_is_the_regularisation_and_unobserved_term() -> None:
    params = LossParams("implicit", reg=0.3, w0=0.5)
    interactions = Interactions.from_coo([], [], [], (3, 4), params)
    _, factors, _ = random_problem(0, "implicit", 3, 4)
    assert objective(interactions, factors, params) == pytest.approx(
        dense_objective_reference(interactions, factors, params), rel=1e-10
    )


def test_objective_rejects_mismatched_inputs() -> None:
    interactions, factors, params = random_problem(0, "implicit")
    with pytest.raises(ValueError, match="explicit"):
        objective(interactions, factors, LossParams("explicit"))
    with pytest.raises(ValueError, match="shapes"):
        objective(interactions, factors, params, user_reg=np.ones(2))


def test_weighted_reg_is_lambda_times_count() -> None:
    np.testing.assert_allclose(weighted_reg(np.array([0, 1, 5]), 0.1), [0.0, 0.1, 0.5])
    np.testing.assert_allclose(weighted_reg(np.array([0, 1, 5]), 0.1, 2.0), [0.0, 2.1, 2.5])
    assert weighted_reg(np.array([3]), 0.1).dtype == np.float64


def test_predict_entries_and_rmse() -> None:
    factors = Factors(
        np.array([[1.0, 0.0], [0.0, 2.0]], DTYPE),
        np.array([[3.0, 1.0]], DTYPE),
        np.array([0.5, -0.5], DTYPE),
        np.array([0.25], DTYPE),
        1.0,
    )
    np.testing.assert_allclose(predict_entries(factors, [0, 1], [0, 0]), [4.75, 2.75])
    assert rmse(factors, [0, 1], [0, 0], [4.75, 3.75]) == pytest.approx(np.sqrt(0.5))


# --- Interactions ---------------------------------------------------------------------------------


def test_explicit_duplicates_keep_the_last_rating_and_its_weight() -> None:
    params = LossParams("explicit")
    interactions = Interactions.from_coo(
        [1, 0, 1, 1], [2, 0, 2, 0], [5.0, 3.0, 1.0, 0.0], (2, 3), params, weights=[1.0, 1.0, 4.0, 2.0]
    )
    dense = interactions.targets.toarray()
    assert dense[1, 2] == 1.0
    assert interactions.nnz == 3
    # The zero rating at (1, 0) is an observation, not an absent entry.
    np.testing.assert_array_equal(interactions.row_counts(), [1, 2])
    np.testing.assert_array_equal(interactions.weights, np.array([1.0, 2.0, 4.0], DTYPE))


def test_implicit_duplicates_sum_strengths_and_weights_are_confidences() -> None:
    params = LossParams("implicit", alpha=3.0)
    interactions = Interactions.from_coo([0, 0, 1], [1, 1, 0], [1.0, 2.0, 0.5], (2, 2), params)
    np.testing.assert_array_equal(interactions.targets.toarray(), [[0.0, 3.0], [0.5, 0.0]])
    np.testing.assert_allclose(interactions.weights, [1 + 3 * 3.0, 1 + 3 * 0.5])
    with pytest.raises(ValueError, match="implicit"):
        Interactions.from_coo([0], [0], [1.0], (1, 1), params, weights=[2.0])
    with pytest.raises(ValueError, match=">= 0"):
        Interactions.from_coo([0], [0], [-1.0], (1, 1), params)


def test_layout_is_float32_csr_with_int32_indices() -> None:
    interactions, _, _ = random_problem(3, "explicit")
    for matrix in (interactions, interactions.transposed):
        assert matrix.targets.dtype == np.float32 and matrix.weights.dtype == np.float32
        assert matrix.targets.indices.dtype == np.int32 and matrix.targets.indptr.dtype == np.int32


@pytest.mark.parametrize("mode", ["implicit", "explicit"])
def test_transposed_keeps_weights_aligned_and_is_cached(mode: Mode) -> None:
    interactions, _, _ = random_problem(4, mode)
    flipped = interactions.transposed
    assert flipped is interactions.transposed and flipped.transposed is interactions
    np.testing.assert_array_equal(flipped.targets.toarray(), interactions.targets.toarray().T)
    weights = sp.csr_matrix((interactions.weights, interactions.targets.indices, interactions.targets.indptr))
    flipped_weights = sp.csr_matrix((flipped.weights, flipped.targets.indices, flipped.targets.indptr))
    np.testing.assert_array_equal(flipped_weights.toarray(), weights.toarray().T)
    np.testing.assert_array_equal(flipped.row_counts(), interactions.col_counts())


def test_take_rows_selects_rows_with_their_weights() -> None:
    interactions, _, _ = random_problem(5, "explicit")
    picked = interactions.take_rows(np.array([4, 0, 4]))
    assert picked.shape == (3, interactions.shape[1])
    dense = interactions.targets.toarray()
    np.testing.assert_array_equal(picked.targets.toarray(), dense[[4, 0, 4]])
    full_weights = sp.csr_matrix(
        (interactions.weights, interactions.targets.indices, interactions.targets.indptr)
    )
    picked_weights = sp.csr_matrix((picked.weights, picked.targets.indices, picked.targets.indptr))
    np.testing.assert_array_equal(picked_weights.toarray(), full_weights.toarray()[[4, 0, 4]])


def test_from_coo_validates_input() -> None:
    params = LossParams("explicit")
    with pytest.raises(ValueError, match="out of range"):
        Interactions.from_coo([2], [0], [1.0], (2, 2), params)
    with pytest.raises(ValueError, match="finite"):
        Interactions.from_coo([0], [0], [np.nan], (2, 2), params)
    with pytest.raises(ValueError, match="length"):
        Interactions.from_coo([0, 1], [0], [1.0], (2, 2), params)
    with pytest.raises(TypeError, match="integers"):
        Interactions.from_coo([0.5], [0], [1.0], (2, 2), params)
