"""The pieces the solvers share (:mod:`ppvi.solvers._gaussian`): the Pyro-model adapter against a log density written
out with SciPy, the Gaussian helpers against torch.distributions and direct linear algebra."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy import stats
from torch.distributions import MultivariateNormal, kl_divergence

from ppvi.models.posteriordb import load_posterior
from ppvi.solvers import (
    GaussianApproximation,
    MovementRule,
    jeffreys_divergence,
    log_density_of,
    safe_cholesky,
    scale_tril_from_precision,
    value_and_gradient,
)


def test_model_log_density_is_kidiqs_unconstrained_density(posteriordb_root):
    """``log p(y | beta, sigma) + log HalfCauchy(sigma; 2.5) + log sigma`` at ``sigma = exp(z_3)`` (the flat prior on
    beta contributes nothing), with SciPy's densities; and the gradient of the batch against finite differences."""
    case = load_posterior("kidiq-kidscore_momiq", posteriordb_root)
    density = log_density_of(case.model, *case.args)
    mom_iq, kid_score = (argument.double().numpy() for argument in case.args)
    points = torch.tensor([[26.0, 0.6, math.log(18.0)], [20.0, 0.7, 2.5], [30.0, 0.55, 3.1]], dtype=torch.float64)

    expected = [
        stats.norm.logpdf(kid_score, b0 + b1 * mom_iq, math.exp(log_sigma)).sum()
        + stats.halfcauchy.logpdf(math.exp(log_sigma), scale=2.5)
        + log_sigma
        for b0, b1, log_sigma in points.tolist()
    ]

    assert density.dimension == 3 and density.site_names == ("beta", "sigma") and density.vectorized
    np.testing.assert_allclose(density(points).numpy(), expected, rtol=1e-10)
    values, gradients = value_and_gradient(density, points)
    step = 1e-6
    for coordinate in range(3):
        shift = torch.zeros(3, dtype=torch.float64)
        shift[coordinate] = step
        finite_difference = (density(points + shift) - density(points - shift)) / (2 * step)
        np.testing.assert_allclose(gradients[:, coordinate].numpy(), finite_difference.numpy(), rtol=1e-5, atol=1e-4)


def test_constrain_and_unconstrain_are_inverse(posteriordb_root):
    """Eight schools' reference draws to the unconstrained space and back (``tau`` through ``exp``)."""
    case = load_posterior("eight_schools-eight_schools_noncentered", posteriordb_root)
    density = log_density_of(case.model, *case.args)
    draws = {name: torch.as_tensor(values[:50], dtype=torch.float64) for name, values in case.latent_draws.items()}
    points = density.unconstrain(draws)
    torch.testing.assert_close(points[:, 1], draws["tau"].log())
    back = density.constrain(points)
    for name, values in draws.items():
        torch.testing.assert_close(back[name], values)


def test_model_that_does_not_broadcast_is_evaluated_point_by_point():
    def scalar_model():
        location = pyro.sample("location", dist.Normal(0.0, 1.0))
        scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        # float() accepts one number only: a batch of draws breaks this model, one point at a time does not.
        pyro.sample("y", dist.Normal(float(location), scale), obs=torch.tensor(0.5, dtype=torch.float64))

    density = log_density_of(scalar_model)
    points = torch.tensor([[0.1, -0.2], [1.0, 0.3]], dtype=torch.float64)
    expected = [
        stats.norm.logpdf(m) + stats.lognorm.logpdf(math.exp(s), 1.0) + s + stats.norm.logpdf(0.5, m, math.exp(s))
        for m, s in points.tolist()
    ]
    assert not density.vectorized
    np.testing.assert_allclose(density(points).detach().numpy(), expected, rtol=1e-10)


def test_rows_rejected_by_validation_are_not_finite():
    """A batch that Pyro's validation refuses (a NaN scale) is evaluated row by row; the bad row reads ``-inf``."""

    def log_density(points: torch.Tensor) -> torch.Tensor:
        return dist.Normal(0.0, points[:, 1].exp()).log_prob(points[:, 0])

    points = torch.tensor([[0.0, 0.0], [0.0, math.nan], [1.0, 1.0]], dtype=torch.float64)
    values, gradients = value_and_gradient(log_density, points)
    assert values[1] == -math.inf and torch.isnan(gradients[1]).all()
    torch.testing.assert_close(values[[0, 2]], log_density(points[[0, 2]]))


def test_jeffreys_divergence_is_the_sum_of_both_kl_divergences():
    generator = torch.Generator().manual_seed(0)
    factors = [torch.randn(4, 4, generator=generator, dtype=torch.float64) for _ in range(2)]
    first, second = (
        GaussianApproximation(torch.randn(4, generator=generator, dtype=torch.float64),
                              torch.linalg.cholesky(factor @ factor.T + torch.eye(4, dtype=torch.float64)))
        for factor in factors
    )
    distributions = [MultivariateNormal(g.loc, scale_tril=g.scale_tril) for g in (first, second)]
    expected = kl_divergence(*distributions) + kl_divergence(*reversed(distributions))
    assert math.isclose(jeffreys_divergence(first, second), float(expected), rel_tol=1e-10)


def test_scale_tril_from_precision_on_kidiq_like_conditioning():
    """A precision with condition number 1e10 (kidiq's Hessian has 1e7): the factor reproduces its inverse."""
    generator = torch.Generator().manual_seed(0)
    rotation, _ = torch.linalg.qr(torch.randn(5, 5, generator=generator, dtype=torch.float64))
    precision = rotation @ torch.diag(torch.logspace(-5, 5, 5, dtype=torch.float64)) @ rotation.T
    factor = scale_tril_from_precision(precision)
    assert torch.equal(factor, factor.tril()) and (factor.diagonal() > 0).all()
    torch.testing.assert_close(precision @ (factor @ factor.T), torch.eye(5, dtype=torch.float64), atol=1e-5, rtol=0)


def test_safe_cholesky_jitters_or_clips_and_refuses_nan():
    singular = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    factor = safe_cholesky(singular)
    torch.testing.assert_close(factor @ factor.T, singular, atol=1e-5, rtol=0)
    indefinite = torch.tensor([[1.0, 0.0], [0.0, -1e-3]], dtype=torch.float64)  # beyond any jitter: clipped
    clipped = safe_cholesky(indefinite)
    assert torch.isfinite(clipped).all() and (clipped.diagonal() > 0).all()
    with pytest.raises(ValueError, match="non-finite"):
        safe_cholesky(torch.full((2, 2), math.nan, dtype=torch.float64))


def test_movement_rule_tells_jitter_from_drift():
    """Iterates that jitter around a point pass; iterates drifting steadily do not, even when their net movement is
    within the tolerance."""
    identity = torch.eye(3, dtype=torch.float64)
    rule = MovementRule()
    generator = torch.Generator().manual_seed(0)
    count = rule.window + 1
    jitter = [GaussianApproximation(0.05 * torch.randn(3, generator=generator, dtype=torch.float64), identity)
              for _ in range(count)]
    # 0.08 sds in all over the window: under the tolerance, so only the drift test can refuse it.
    drift = [GaussianApproximation(torch.full((3,), 0.01 * step, dtype=torch.float64), identity)
             for step in range(count)]
    assert jeffreys_divergence(drift[0], drift[-1]) < rule.tolerance * 3
    for iterates, expected in ((jitter, True), (drift, False)):
        steps = [jeffreys_divergence(a, b) for a, b in zip(iterates[:-1], iterates[1:], strict=True)]
        assert rule.holds(iterates, steps) is expected
