"""ppvi.models.funnel: exact moments against Monte Carlo draws of the model, the log density against the formula, and
broadcasting over a particle plate."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from scipy import special, stats

from ppvi.models import funnel

#: Draws behind the Monte Carlo checks (dimension 3: v and two x, so a million draws stay small and fast).
NUM_DRAWS = 1_000_000
DIMENSION = 3
#: A moment check fails beyond this many Monte Carlo standard errors (the draws are seeded by the conftest).
TOLERANCE_SE = 5.0


def _model_draws(num_draws: int, dimension: int) -> dict[str, np.ndarray]:
    """Draws of the model's sites under a vectorised particle plate, as float64 numpy arrays."""
    with torch.no_grad(), pyro.plate("particles", num_draws, dim=-1):
        trace = poutine.trace(funnel.model).get_trace(dimension, torch.float64)
    return {name: trace.nodes[name]["value"].numpy() for name in ("v", "x")}


def _x_marginal_cdf(t: np.ndarray, nodes: int = 120) -> np.ndarray:
    """``P(x_i <= t) = E_v[Phi(t exp(-v / 2))]`` by Gauss-Hermite quadrature over ``v ~ N(0, 3)``."""
    points, weights = np.polynomial.hermite_e.hermegauss(nodes)  # weight exp(-z^2 / 2)
    v = funnel.V_SCALE * points
    phi = special.ndtr(np.asarray(t)[..., None] * np.exp(-v / 2))
    return (phi * weights).sum(-1) / math.sqrt(2 * math.pi)


def test_exact_moments_have_the_sites_shapes_and_the_closed_form():
    moments = funnel.exact_moments(5)
    assert set(moments) == {"v", "x"}
    assert moments["v"][0].shape == moments["v"][1].shape == ()
    assert moments["x"][0].shape == moments["x"][1].shape == (4,)
    np.testing.assert_array_equal(moments["v"][1], 3.0)
    # sd(x_i)^2 = E[exp(v)], here by quadrature rather than the log-normal formula
    points, weights = np.polynomial.hermite_e.hermegauss(80)
    second_moment = (np.exp(funnel.V_SCALE * points) * weights).sum() / math.sqrt(2 * math.pi)
    np.testing.assert_allclose(moments["x"][1] ** 2, second_moment, rtol=1e-10)
    np.testing.assert_allclose(moments["x"][1], math.exp(9 / 4), rtol=1e-15)


def test_exact_moments_agree_with_monte_carlo_draws_of_the_model():
    draws = _model_draws(NUM_DRAWS, DIMENSION)
    moments = funnel.exact_moments(DIMENSION)
    v, x = draws["v"], draws["x"]
    assert v.shape == (NUM_DRAWS,) and x.shape == (NUM_DRAWS, DIMENSION - 1)
    # v is normal: the standard error of the sample sd is sd / sqrt(2 n).
    assert abs(v.mean() - moments["v"][0]) < TOLERANCE_SE * 3.0 / math.sqrt(NUM_DRAWS)
    assert abs(v.std(ddof=1) - moments["v"][1]) < TOLERANCE_SE * 3.0 / math.sqrt(2 * NUM_DRAWS)
    x_sd = moments["x"][1]
    np.testing.assert_array_less(np.abs(x.mean(0) - moments["x"][0]), TOLERANCE_SE * x_sd / math.sqrt(NUM_DRAWS))
    # The sample second moment of x_i has variance (E[x^4] - E[x^2]^2) / n = (3 e^18 - e^9) / n: a relative
    # standard error of sqrt(3 e^9 - 1) / sqrt(n), 16 % at a million draws. The funnel's tails are that heavy, so
    # this direct check is honest but loose (observed: a few %); the tight checks of sd(x) follow.
    relative_se = math.sqrt(3 * math.exp(9) - 1) / math.sqrt(NUM_DRAWS)
    np.testing.assert_array_less(np.abs((x**2).mean(0) / x_sd**2 - 1), TOLERANCE_SE * relative_se)
    # sd(x_i)^2 = E[exp(v)] (checked by quadrature above) holds for the model's draws when v ~ N(0, 3) (the sd of
    # v above; its whole law below) and x / exp(v / 2) is N(0, 1) independently of v: both checked tightly here.
    assert stats.kstest(v[:100_000], stats.norm(0, 3).cdf).pvalue > 1e-3
    standardised = x / np.exp(v / 2)[:, None]
    np.testing.assert_array_less(np.abs(standardised.mean(0)), TOLERANCE_SE / math.sqrt(NUM_DRAWS))
    np.testing.assert_array_less(np.abs(standardised.std(0, ddof=1) - 1), TOLERANCE_SE / math.sqrt(2 * NUM_DRAWS))
    for z in standardised.T:
        assert abs(np.corrcoef(np.abs(z), v)[0, 1]) < TOLERANCE_SE / math.sqrt(NUM_DRAWS)
        assert abs(np.corrcoef(z**2, v)[0, 1]) < TOLERANCE_SE / math.sqrt(NUM_DRAWS)


def test_marginal_of_x_matches_the_exact_scale_mixture():
    """The whole marginal law of x_i, not just two moments: Kolmogorov-Smirnov against the quadrature CDF."""
    x = _model_draws(20_000, DIMENSION)["x"][:, 0]
    assert stats.kstest(x, _x_marginal_cdf).pvalue > 1e-3
    exact = funnel.exact_draws(20_000, DIMENSION, seed=1)["x"][:, 0]
    assert stats.kstest(exact, _x_marginal_cdf).pvalue > 1e-3


def test_exact_draws_have_the_exact_moments_and_are_reproducible():
    draws = funnel.exact_draws(200_000, dimension=4, seed=3)
    assert draws["v"].shape == (200_000,) and draws["x"].shape == (200_000, 3)
    assert abs(draws["v"].mean()) < TOLERANCE_SE * 3.0 / math.sqrt(200_000)
    assert abs(draws["v"].std(ddof=1) - 3.0) < TOLERANCE_SE * 3.0 / math.sqrt(400_000)
    standardised = draws["x"] / np.exp(draws["v"] / 2)[:, None]
    np.testing.assert_array_less(np.abs(standardised.std(0, ddof=1) - 1), TOLERANCE_SE / math.sqrt(400_000))
    again = funnel.exact_draws(200_000, dimension=4, seed=3)
    np.testing.assert_array_equal(draws["x"], again["x"])
    assert not np.array_equal(draws["v"], funnel.exact_draws(200_000, dimension=4, seed=4)["v"])


def _formula(v: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Neal's funnel log density, written out: log N(v | 0, 3) + sum_i log N(x_i | 0, exp(v / 2))."""
    log_v = -0.5 * (v / 3.0) ** 2 - math.log(3.0) - 0.5 * math.log(2 * math.pi)
    scale = np.exp(v / 2)[..., None]
    log_x = -0.5 * (x / scale) ** 2 - np.log(scale) - 0.5 * math.log(2 * math.pi)
    return log_v + log_x.sum(-1)


def test_log_density_equals_the_formula_at_random_points():
    rng = np.random.default_rng(0)
    for _ in range(5):
        v = rng.uniform(-8, 8)
        x = rng.normal(0, 5, size=9)
        values = {"v": torch.tensor(v, dtype=torch.float64), "x": torch.tensor(x, dtype=torch.float64)}
        trace = poutine.trace(poutine.condition(funnel.model, data=values)).get_trace(10, torch.float64)
        assert float(trace.log_prob_sum()) == pytest.approx(float(_formula(np.array(v), x)), rel=1e-12, abs=1e-12)


def test_log_density_broadcasts_over_a_particle_plate():
    rng = np.random.default_rng(1)
    v = rng.uniform(-6, 6, size=7)
    x = rng.normal(0, 3, size=(7, 4))
    values = {"v": torch.tensor(v), "x": torch.tensor(x)}
    with pyro.plate("particles", 7, dim=-1):
        trace = poutine.trace(poutine.condition(funnel.model, data=values)).get_trace(5, torch.float64)
    trace.compute_log_prob()
    assert trace.nodes["v"]["fn"].batch_shape == (7,)
    assert trace.nodes["x"]["fn"].batch_shape == (7,) and trace.nodes["x"]["fn"].event_shape == (4,)
    per_particle = (trace.nodes["v"]["log_prob"] + trace.nodes["x"]["log_prob"]).numpy()
    np.testing.assert_allclose(per_particle, _formula(v, x), rtol=1e-12)
    # Two batch dimensions, the particle plate left of another
    with pyro.plate("outer", 2, dim=-2), pyro.plate("inner", 3, dim=-1):
        draws = poutine.trace(funnel.model).get_trace(5, torch.float64)
    assert draws.nodes["v"]["value"].shape == (2, 3) and draws.nodes["x"]["value"].shape == (2, 3, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_constants_follow_the_requested_dtype(dtype):
    v, x = funnel.model(4, dtype)
    assert v.dtype == x.dtype == dtype and x.shape == (3,)


def test_default_dtype_is_torchs_default(float64_default):
    v, x = funnel.model()
    assert v.dtype == x.dtype == torch.float64 and x.shape == (9,)


@pytest.mark.parametrize("dimension", [1, 0, 2.5, True])
def test_rejects_a_dimension_without_x(dimension):
    with pytest.raises(ValueError, match="dimension"):
        funnel.model(dimension)
    with pytest.raises(ValueError, match="dimension"):
        funnel.exact_moments(dimension)
