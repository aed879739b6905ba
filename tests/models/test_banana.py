"""ppvi.models.banana: exact moments against Monte Carlo draws of the model, the log density against the formula, and
broadcasting over a particle plate."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from scipy import stats

from ppvi.models import banana

#: Draws behind the Monte Carlo checks.
NUM_DRAWS = 1_000_000
#: A moment check fails beyond this many Monte Carlo standard errors (the draws are seeded by the conftest).
TOLERANCE_SE = 5.0
#: (curvature, scale, noise): the defaults, Haario et al.'s moderately twisted Gaussian (b = 0.03), a mirrored one.
SETTINGS = [
    (banana.CURVATURE, banana.SCALE, banana.NOISE),
    (-0.03, 10.0, 1.0),
    (-2.0, 0.5, 0.1),
]


def _model_draws(num_draws: int, curvature: float, scale: float, noise: float) -> dict[str, np.ndarray]:
    with torch.no_grad(), pyro.plate("particles", num_draws, dim=-1):
        trace = poutine.trace(banana.model).get_trace(curvature, scale, noise, torch.float64)
    return {name: trace.nodes[name]["value"].numpy() for name in ("x1", "x2")}


def _check_moments(draws: dict[str, np.ndarray], moments: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Sample mean and sd within ``TOLERANCE_SE`` standard errors; the sd's from the sample's fourth moment."""
    for name, values in draws.items():
        n = values.size
        mean, sd = (float(m) for m in moments[name])
        assert abs(values.mean() - mean) < TOLERANCE_SE * sd / math.sqrt(n), name
        # delta method: se(s) = se(s^2) / (2 s), se(s^2) = sd((x - mean)^2) / sqrt(n)
        squares = (values - values.mean()) ** 2
        sd_se = squares.std() / math.sqrt(n) / (2 * sd)
        assert abs(values.std(ddof=1) - sd) < TOLERANCE_SE * sd_se, name


def test_exact_moments_have_the_closed_form():
    moments = banana.exact_moments()
    assert set(moments) == {"x1", "x2"}
    assert all(part.shape == () for pair in moments.values() for part in pair)
    np.testing.assert_allclose(moments["x2"][1], math.sqrt(2 * 1.0 + 0.25))  # 1.5 at the defaults
    # Var(x2) = c^2 Var(x1^2) + noise^2, Var(x1^2) by Gauss-Hermite quadrature over x1 ~ N(0, s)
    curvature, scale, noise = 0.7, 2.0, 0.3
    points, weights = np.polynomial.hermite_e.hermegauss(20)
    weights = weights / weights.sum()
    squares = (scale * points) ** 2
    variance = curvature**2 * (weights * (squares - (weights * squares).sum()) ** 2).sum() + noise**2
    np.testing.assert_allclose(banana.exact_moments(curvature, scale, noise)["x2"][1] ** 2, variance, rtol=1e-12)


@pytest.mark.parametrize(("curvature", "scale", "noise"), SETTINGS)
def test_exact_moments_agree_with_monte_carlo_draws_of_the_model(curvature, scale, noise):
    draws = _model_draws(NUM_DRAWS, curvature, scale, noise)
    assert draws["x1"].shape == draws["x2"].shape == (NUM_DRAWS,)
    _check_moments(draws, banana.exact_moments(curvature, scale, noise))
    # The bend itself: Cov(x2, x1^2) = c Var(x1^2) = 2 c s^4, i.e. corr(x2, x1^2) = sqrt(2) c s^2 / sd(x2).
    expected = math.sqrt(2) * curvature * scale**2 / float(banana.exact_moments(curvature, scale, noise)["x2"][1])
    assert np.corrcoef(draws["x2"], draws["x1"] ** 2)[0, 1] == pytest.approx(expected, abs=TOLERANCE_SE * 2e-3)


@pytest.mark.parametrize(("curvature", "scale", "noise"), SETTINGS[:2])
def test_exact_draws_have_the_exact_moments_and_the_model_law(curvature, scale, noise):
    draws = banana.exact_draws(200_000, curvature, scale, noise, seed=2)
    _check_moments(draws, banana.exact_moments(curvature, scale, noise))
    model_draws = _model_draws(20_000, curvature, scale, noise)
    for name in ("x1", "x2"):
        assert stats.ks_2samp(draws[name][:20_000], model_draws[name]).pvalue > 1e-3, name
    np.testing.assert_array_equal(draws["x2"], banana.exact_draws(200_000, curvature, scale, noise, seed=2)["x2"])


def _formula(x1: np.ndarray, x2: np.ndarray, curvature: float, scale: float, noise: float) -> np.ndarray:
    """log N(x1 | 0, s) + log N(x2 | c (x1^2 - s^2), sigma), written out."""
    half_log_two_pi = 0.5 * math.log(2 * math.pi)
    log_x1 = -0.5 * (x1 / scale) ** 2 - math.log(scale) - half_log_two_pi
    log_x2 = -0.5 * ((x2 - curvature * (x1**2 - scale**2)) / noise) ** 2 - math.log(noise) - half_log_two_pi
    return log_x1 + log_x2


@pytest.mark.parametrize(("curvature", "scale", "noise"), SETTINGS)
def test_log_density_equals_the_formula_at_random_points(curvature, scale, noise):
    rng = np.random.default_rng(0)
    for _ in range(5):
        x1, x2 = rng.normal(0, 3 * scale), rng.normal(0, 3)
        values = {"x1": torch.tensor(x1, dtype=torch.float64), "x2": torch.tensor(x2, dtype=torch.float64)}
        conditioned = poutine.condition(banana.model, data=values)
        log_density = float(poutine.trace(conditioned).get_trace(curvature, scale, noise, torch.float64).log_prob_sum())
        assert log_density == pytest.approx(float(_formula(x1, x2, curvature, scale, noise)), rel=1e-12)


def test_log_density_broadcasts_over_a_particle_plate():
    rng = np.random.default_rng(1)
    x1, x2 = rng.normal(size=6), rng.normal(size=6)
    values = {"x1": torch.tensor(x1), "x2": torch.tensor(x2)}
    with pyro.plate("particles", 6, dim=-1):
        trace = poutine.trace(poutine.condition(banana.model, data=values)).get_trace(dtype=torch.float64)
    trace.compute_log_prob()
    assert trace.nodes["x2"]["fn"].batch_shape == (6,)
    per_particle = (trace.nodes["x1"]["log_prob"] + trace.nodes["x2"]["log_prob"]).numpy()
    np.testing.assert_allclose(per_particle, _formula(x1, x2, banana.CURVATURE, banana.SCALE, banana.NOISE), rtol=1e-12)
    with pyro.plate("outer", 2, dim=-2), pyro.plate("inner", 3, dim=-1):
        draws = poutine.trace(banana.model).get_trace()
    assert draws.nodes["x1"]["value"].shape == draws.nodes["x2"]["value"].shape == (2, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_constants_follow_the_requested_dtype(dtype):
    x1, x2 = banana.model(dtype=dtype)
    assert x1.dtype == x2.dtype == dtype


def test_default_dtype_is_torchs_default(float64_default):
    x1, x2 = banana.model()
    assert x1.dtype == x2.dtype == torch.float64


@pytest.mark.parametrize(("scale", "noise"), [(0.0, 1.0), (1.0, -0.5)])
def test_rejects_nonpositive_scales(scale, noise):
    with pytest.raises(ValueError, match="positive"):
        banana.model(1.0, scale, noise)
    with pytest.raises(ValueError, match="positive"):
        banana.exact_moments(1.0, scale, noise)
