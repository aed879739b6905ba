"""``ppvi.fit(..., solver="batch_and_match")``: the full-rank Gaussian fitted by Batch-and-Match from the Laplace
start, checked against exact posteriors, with ADVI taking over where BaM cannot run."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

import ppvi


def conjugate_regression(X, y):
    """Bayesian linear regression with known noise: the posterior is exactly Gaussian (and correlated)."""
    beta = pyro.sample("beta", dist.Normal(torch.zeros(X.shape[1], dtype=X.dtype), 1.0).to_event(1))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal(X @ beta, 0.5), obs=y)


@pytest.fixture(scope="module")
def regression():
    generator = torch.Generator().manual_seed(3)
    X = torch.randn(40, 3, generator=generator, dtype=torch.float64)
    X[:, 1] += 2.0 * X[:, 0]  # correlated predictors, a correlated posterior
    y = X @ torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64) + 0.5 * torch.randn(40, generator=generator,
                                                                                    dtype=torch.float64)
    precision = torch.eye(3, dtype=torch.float64) + X.T @ X / 0.25
    covariance = torch.linalg.inv(precision)
    return (X, y), covariance @ (X.T @ y / 0.25), covariance


def test_batch_and_match_reaches_the_exact_gaussian_posterior_in_a_few_dozen_evaluations(regression):
    data, mean, covariance = regression
    fit = ppvi.fit(conjugate_regression, *data, guide="fullrank", solver="batch_and_match")
    assert fit.converged and "Batch-and-Match" in fit.message
    posterior = fit.guide.posterior()
    torch.testing.assert_close(posterior.loc, mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(posterior.covariance_matrix, covariance, rtol=1e-5, atol=1e-9)
    advi = ppvi.fit(conjugate_regression, *data, guide="fullrank")
    assert fit.steps * 24 < advi.steps * 8  # far fewer gradient evaluations (BaM's batch is at most 24 here)


def test_batch_and_match_without_a_mode_hands_over_to_advi():
    def no_mode():
        """The unconstrained density grows without bound as the scale shrinks: there is no mode to start from."""
        scale = pyro.sample("scale", dist.HalfCauchy(torch.tensor(1.0, dtype=torch.float64)))
        pyro.sample("x", dist.Normal(torch.tensor(0.0, dtype=torch.float64), scale).expand([5]).to_event(1))
        pyro.factor("unbounded", -5 * torch.log(scale))

    with pytest.warns(ppvi.FitWarning, match="Laplace start of guide 'fullrank' failed"):
        fit = ppvi.fit(no_mode, guide="fullrank", solver="batch_and_match", steps=50)
    assert "trained by ADVI instead" in fit.message


def test_a_solver_for_a_guide_it_cannot_fit_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="use it with guide='fullrank'"):
        ppvi.fit(conjugate_regression, torch.zeros(3, 2), torch.zeros(3), guide="meanfield", solver="batch_and_match")
    with pytest.raises(ValueError, match="unknown solver 'newton'"):
        ppvi.fit(conjugate_regression, torch.zeros(3, 2), torch.zeros(3), guide="fullrank", solver="newton")
