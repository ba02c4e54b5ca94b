import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from csmf.errors import WeightsError
from csmf.weights import (
    cumulative_slice_scores,
    objective_coefficients,
    parse_weights,
    slice_scale,
)

OBJ = ("exposure", "click", "conversion")


def test_paper_triplet_gives_cumulative_slice_scale():
    # <k_d+k_o+k_r, k_o+k_r, k_r> for <1, 1.8, 1.2>
    np.testing.assert_allclose(objective_coefficients([1, 1.8, 1.2]), [4.0, 3.0, 1.2], rtol=1e-6)
    np.testing.assert_allclose(
        slice_scale([1, 1.8, 1.2], [2, 1, 3]), [4, 4, 3, 1.2, 1.2, 1.2], rtol=1e-6
    )


@given(st.lists(st.floats(0, 100, allow_nan=False), min_size=1, max_size=6).filter(any))
def test_coefficients_are_suffix_sums(k):
    c = objective_coefficients(k)
    for t in range(len(k)):
        assert math.isclose(c[t], sum(k[t:]), rel_tol=1e-5, abs_tol=1e-5)


def test_by_name_missing_names_are_zero():
    assert parse_weights({"click": 2}, OBJ) == (0.0, 2.0, 0.0)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"purchase": 1}, "unknown objective(s) ['purchase']"),
        ([1, 2], "expected 3 weights"),
        ([1, float("nan"), 1], "weight for 'click' must be finite"),
        ([1, float("inf"), 1], "weight for 'click' must be finite"),
        ([1, -0.5, 1], "weight for 'click' must be >= 0, got -0.5"),
        ([0, 0, 0], "must not all be zero"),
        ([1e308, 1, 1], "weight for 'exposure' must be <= 1e+06, got 1e+308"),
        ([0, 1e-300, 0], "weights are too small: the largest is 1e-300"),
        (["a", 1, 1], "weight for 'exposure' must be a number, got 'a'"),
    ],
)
def test_bad_weights_are_refused_with_a_message(weights, message):
    with pytest.raises(WeightsError) as err:
        parse_weights(weights, OBJ)
    assert message in str(err.value)


def test_weights_at_the_bounds_give_finite_float32_scales():
    for k in ([1e6, 1e6, 1e6], [1e-6, 0, 0], [1e6, 0, 1e-6]):
        assert np.isfinite(slice_scale(parse_weights(k, OBJ), [2, 1, 3])).all()


@pytest.mark.parametrize("sizes", [(2, 1, 3), (3, 0, 3), (0, 4, 2), (6, 0, 0)])
def test_cumulative_slice_scores_match_a_direct_sum_even_with_empty_slices(sizes):
    rng = np.random.default_rng(0)
    e = rng.standard_normal(6).astype(np.float32)
    v = rng.standard_normal((5, 6)).astype(np.float32)
    got = cumulative_slice_scores(e, v, sizes)
    ends = np.cumsum(sizes)
    want = np.stack([(v[:, :end] * e[:end]).sum(1) for end in ends], axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # and the fused score is the weighted sum of these s_t
    # (docs/design.md#owned-units-and-why-one-search-is-exact)
    k = np.array([1.0, 1.8, 1.2], np.float32)
    np.testing.assert_allclose(got @ k, v @ (e * slice_scale(k, sizes)), rtol=1e-5, atol=1e-5)
