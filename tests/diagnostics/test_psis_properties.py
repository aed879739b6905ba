"""Property-based tests of ppvi.diagnostics.psis (hypothesis): the symmetries PSIS must have whatever the draws.

* shift: adding a constant to every log ratio (an unnormalised density's ``log Z``) changes neither ``khat``
  nor the normalised smoothed log weights;
* permutation: reordering the draws leaves ``khat`` unchanged and reorders the smoothed weights with them;
* batching: ``psis`` of a stacked ``(B, S)`` tensor (along either dimension) is ``psis`` of each row;
* normalisation: the smoothed log weights have log-sum-exp 0.

The log ratios are distinct multiples of 1e-3 (so no two draws tie, and no rounding of a shift can create a
tie or a flat tail) or the log ratios of normal proposals not too close to the target, light- and heavy-tailed
(``khat`` from -2 to about 0.9). Examples are derandomised, so the suite draws the same ones on every run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats

from ppvi.diagnostics import PSISWarning, psis, tail_length

#: Settings of every property here: few examples (each PSIS call is milliseconds), no deadline (the first
#: call pays torch's warm-up), the same examples on every run, and no example database written to the checkout.
PROPERTY_SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None)
#: Fewest draws that give PSIS a tail of 5 (tail_length(21) == 5); fewer only normalise, with a PSISWarning.
MINIMUM_SMOOTHED_DRAWS = 21
#: Most draws per row drawn here: tails of up to 3 sqrt(S) = 60 draws, plenty of smoothing to get wrong.
MAXIMUM_DRAWS = 400
#: Grid on which the tie-free log ratios lie, and their range.
GRID_STEP = 1e-3
GRID_RANGE = 200_000  # multiples of GRID_STEP either side of 0: log ratios in [-200, 200]
#: The same input after a shift: log ratios move by rounding (|shift| * eps ~ 1e-13), and khat and the weights,
#: smooth functions of the tail's exceedances, by no more than a small multiple of it.
SHIFT_TOLERANCE = 1e-8
#: The same input in another order or batch layout: sums are reduced in another order, so the last bits differ.
REDUCTION_ORDER = 1e-12


@st.composite
def log_ratios(draw: st.DrawFn, num_samples: int | None = None) -> np.ndarray:
    """One row of tie-free log importance ratios, float64, of ``num_samples`` draws (drawn when None)."""
    size = draw(st.integers(MINIMUM_SMOOTHED_DRAWS, MAXIMUM_DRAWS)) if num_samples is None else num_samples
    if draw(st.booleans()):
        grid = hnp.arrays(np.int64, size, elements=st.integers(-GRID_RANGE, GRID_RANGE), unique=True)
        return draw(grid).astype(np.float64) * GRID_STEP
    # log N(theta; 0, 1) - log N(theta; 0, s) for theta ~ N(0, s^2): khat = 1 - s^2 for s < 1, bounded for s > 1.
    # Not s near 1, where the ratios are constant up to rounding: a flat tail (khat = -inf), not smoothed.
    scale = draw(st.one_of(st.floats(0.3, 0.9), st.floats(1.1, 3.0)))
    seed = draw(st.integers(0, 2**32 - 1))
    theta = np.random.default_rng(seed).normal(0.0, scale, size=size)
    return stats.norm.logpdf(theta) - stats.norm.logpdf(theta, scale=scale)


@st.composite
def batches(draw: st.DrawFn) -> np.ndarray:
    """A ``(B, S)`` stack of independent rows of log ratios, ``B`` from 1 to 4."""
    size = draw(st.integers(MINIMUM_SMOOTHED_DRAWS, MAXIMUM_DRAWS))
    rows = draw(st.integers(1, 4))
    return np.stack([draw(log_ratios(size)) for _ in range(rows)])


def run_psis(values: np.ndarray, dim: int = -1) -> tuple[np.ndarray, np.ndarray]:
    smoothed, khat = psis(torch.from_numpy(values), dim=dim)
    assert smoothed.dtype == torch.float64 and khat.dtype == torch.float64
    return smoothed.numpy(), khat.numpy()


@PROPERTY_SETTINGS
@given(values=log_ratios(), shift=st.floats(-1000.0, 1000.0))
def test_khat_and_weights_are_invariant_to_a_constant_shift(values, shift):
    smoothed, khat = run_psis(values)
    shifted_smoothed, shifted_khat = run_psis(values + shift)

    assert np.isfinite(khat)  # distinct ratios and S >= 21: a fitted tail of at least 5 draws
    np.testing.assert_allclose(shifted_khat, khat, rtol=0, atol=SHIFT_TOLERANCE)
    np.testing.assert_allclose(shifted_smoothed, smoothed, rtol=0, atol=SHIFT_TOLERANCE)


@PROPERTY_SETTINGS
@given(values=log_ratios(), seed=st.integers(0, 2**32 - 1))
def test_permuting_the_draws_permutes_the_weights_and_keeps_khat(values, seed):
    permutation = np.random.default_rng(seed).permutation(len(values))
    smoothed, khat = run_psis(values)
    permuted_smoothed, permuted_khat = run_psis(values[permutation])

    # khat sees only the sorted tail, which a permutation leaves bit for bit the same.
    assert permuted_khat == khat
    np.testing.assert_allclose(permuted_smoothed, smoothed[permutation], rtol=0, atol=REDUCTION_ORDER)


@PROPERTY_SETTINGS
@given(stack=batches())
def test_a_batch_is_smoothed_row_by_row_along_either_dimension(stack):
    smoothed, khat = run_psis(stack)
    transposed_smoothed, transposed_khat = run_psis(np.ascontiguousarray(stack.T), dim=0)

    assert smoothed.shape == stack.shape and khat.shape == stack.shape[:1]
    for row, values in enumerate(stack):
        row_smoothed, row_khat = run_psis(values)
        np.testing.assert_allclose(khat[row], row_khat, rtol=0, atol=REDUCTION_ORDER)
        np.testing.assert_allclose(smoothed[row], row_smoothed, rtol=0, atol=REDUCTION_ORDER)
    np.testing.assert_allclose(transposed_khat, khat, rtol=0, atol=REDUCTION_ORDER)
    np.testing.assert_allclose(transposed_smoothed.T, smoothed, rtol=0, atol=REDUCTION_ORDER)


@PROPERTY_SETTINGS
@given(stack=batches())
def test_smoothed_weights_are_normalised(stack):
    smoothed, khat = run_psis(stack)

    assert np.isfinite(smoothed).all()
    np.testing.assert_allclose(np.logaddexp.reduce(smoothed, axis=-1), 0.0, rtol=0, atol=REDUCTION_ORDER)
    # Smoothing truncates at the largest raw ratio: no draw gains weight relative to the heaviest raw draw.
    largest = stack.argmax(-1)
    heaviest = np.take_along_axis(smoothed, largest[:, None], -1)
    assert (smoothed <= heaviest + REDUCTION_ORDER).all()
    assert khat.shape == stack.shape[:1]


@PROPERTY_SETTINGS
@given(values=st.integers(2, MINIMUM_SMOOTHED_DRAWS - 1).flatmap(log_ratios))
def test_too_few_draws_are_only_normalised_with_a_warning(values):
    assert tail_length(len(values)) < 5
    with pytest.warns(PSISWarning, match="tail draws"):
        smoothed, khat = run_psis(values)

    assert khat == np.inf
    np.testing.assert_allclose(smoothed, values - np.logaddexp.reduce(values), rtol=0, atol=REDUCTION_ORDER)
