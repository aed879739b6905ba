"""PSIS diagnostics on fits: log weights against scipy densities, k-hat regimes, corrected expectations."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy import stats

import ppvi
from ppvi.models import fake_gaussian


def _scale_model(y):
    scale = pyro.sample("scale", dist.Exponential(1.0))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(0.0, scale), obs=y)


def test_log_weights_equal_log_joint_minus_guide_density_with_jacobian():
    """For a positive latent, the guide is log-normal in the constrained space: scipy's lognorm density
    (Jacobian included) and scipy's log joint give the weights independently of ppvi's traces."""
    y = torch.tensor([0.5, -1.3, 2.1, 0.2, -0.7], dtype=torch.float64)
    fit = ppvi.fit(_scale_model, y, guide="meanfield", steps=200)
    draws = fit.sample(500, seed=7)["scale"].numpy()
    log_weights = fit.log_weights(500, seed=7).numpy()
    loc, scale = (t.detach().numpy() for t in fit.guide._loc_scale())
    log_joint = stats.expon.logpdf(draws) + stats.norm.logpdf(y.numpy()[None, :], 0, draws[:, None]).sum(1)
    log_guide = stats.lognorm.logpdf(draws, s=scale[0], scale=np.exp(loc[0]))
    np.testing.assert_allclose(log_weights, log_joint - log_guide, rtol=1e-10, atol=1e-10)


def test_exact_guide_has_small_khat_and_a_narrow_one_large():
    """Normal-Normal: the Laplace approximation is the exact posterior; a guide squeezed to a third of the
    posterior sd gives ratios with infinite variance (k = 1 - 1/3^2 ... > 0.7)."""
    data = torch.tensor([0.3, -1.2, 2.2, 0.9, 1.4], dtype=torch.float64)

    def model(y):
        location = pyro.sample("location", dist.Normal(0.0, 2.0))
        with pyro.plate("data", y.shape[0]):
            pyro.sample("y", dist.Normal(location, 1.0), obs=y)

    exact = ppvi.fit(model, data, guide="laplace")
    assert exact.diagnose().khat < 0.5 and exact.diagnose().verdict == "good"
    narrow = ppvi.fit(model, data, guide="laplace")
    with torch.no_grad():
        narrow.guide.preconditioner_scale.mul_(1 / 3)
    diagnosis = narrow.diagnose(num_samples=8000)
    assert diagnosis.khat > 0.7 and diagnosis.verdict == "bad"


def test_correlated_gaussian_meanfield_is_flagged_and_corrected():
    covariance = torch.tensor([[1.0, 0.9], [0.9, 1.0]], dtype=torch.float64)

    def model():
        pyro.sample("x", dist.MultivariateNormal(torch.zeros(2, dtype=torch.float64), covariance))

    meanfield = ppvi.fit(model, guide="meanfield")
    fullrank = ppvi.fit(model, guide="fullrank")
    assert meanfield.diagnose().khat > 0.7 > 0.5 > fullrank.diagnose().khat

    def second_moment(draws):
        return draws["x"][:, 0] ** 2  # E[x0^2] = 1 under the posterior

    estimate = meanfield.expectation(second_moment, num_samples=16_000)
    assert abs(float(estimate.corrected) - 1.0) < abs(float(estimate.raw) - 1.0)
    assert float(estimate.raw) == pytest.approx(1 - 0.9**2, rel=0.1)  # mean-field variance 1/precision_00


def test_expectation_needs_one_value_per_draw_and_map_has_no_weights():
    y = fake_gaussian.simulate().double()
    fit = ppvi.fit(fake_gaussian.model, y, guide="meanfield", steps=50)
    with pytest.raises(ValueError, match="one value per draw"):
        fit.expectation(lambda draws: draws["mu"].mean())
    with pytest.raises(ValueError, match="no importance weights"):
        ppvi.fit(fake_gaussian.model, y, guide="map").diagnose()
