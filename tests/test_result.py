"""``Fit.to_arviz``: the importance weights in ``sample_stats`` belong to the posterior group's draws.

The weights are recomputed independently of ppvi's draw machinery: the model's log joint from Pyro's own trace of
the model conditioned on each draw, the guide's density from scipy (a log-normal for the positive site, Jacobian
included); k-hat from ArviZ's own ``psislw``.
"""

from __future__ import annotations

import math

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.ops.indexing import Vindex
from scipy import stats

import ppvi
from ppvi.models import fake_gaussian

NUM_DRAWS = 1000


@pytest.fixture
def meanfield_fit() -> ppvi.Fit:
    y = fake_gaussian.simulate(num_points=20).double()
    return ppvi.fit(fake_gaussian.model, y, guide="meanfield", steps=50, engine="pyro")


def test_sample_stats_log_weights_are_log_joint_minus_guide_density_of_the_posterior_draws(meanfield_fit):
    data = meanfield_fit.to_arviz(NUM_DRAWS, seed=3)
    mu = data.posterior["mu"].values[0]
    sd = data.posterior["sd"].values[0]
    log_weight = data.sample_stats["log_weight"].values[0]
    assert log_weight.shape == (NUM_DRAWS,) and data.sample_stats["log_weight"].dims == ("chain", "draw")
    # The posterior group is what fit.sample gives for the same seed, so the weights line up with those draws too.
    sampled = meanfield_fit.sample(NUM_DRAWS, seed=3)
    np.testing.assert_array_equal(mu, sampled["mu"].numpy())
    np.testing.assert_array_equal(sd, sampled["sd"].numpy())
    # Mean-field over (mu, log sd): independent normals, so sd is log-normal in the constrained space.
    loc, scale = (t.detach().numpy() for t in meanfield_fit.guide._loc_scale())
    y = meanfield_fit.args[0]
    for index in (0, 1, 17, NUM_DRAWS - 1):
        conditioned = poutine.condition(
            fake_gaussian.model, data={"mu": torch.tensor(mu[index]), "sd": torch.tensor(sd[index])}
        )
        log_joint = float(poutine.trace(conditioned).get_trace(y).log_prob_sum())
        log_guide = stats.norm.logpdf(mu[index], loc[0], scale[0]) + stats.lognorm.logpdf(
            sd[index], s=scale[1], scale=np.exp(loc[1])
        )
        assert log_weight[index] == pytest.approx(log_joint - log_guide, rel=1e-9, abs=1e-9)


def test_sample_stats_khat_is_arviz_psislw_khat_and_the_diagnosis_one(meanfield_fit):
    data = meanfield_fit.to_arviz(NUM_DRAWS, seed=0)
    _, arviz_khat = az.psislw(data.sample_stats["log_weight"].values[0], reff=1.0)
    diagnosis = meanfield_fit.diagnose(NUM_DRAWS, seed=0)
    assert float(arviz_khat) == pytest.approx(diagnosis.khat, abs=1e-8)
    assert data.sample_stats.attrs["khat"] == pytest.approx(diagnosis.khat, abs=1e-12)
    assert data.sample_stats.attrs["khat_threshold"] == pytest.approx(diagnosis.threshold)
    np.testing.assert_allclose(
        data.sample_stats["log_weight"].values[0], meanfield_fit.log_weights(NUM_DRAWS, seed=0).numpy(), rtol=1e-12
    )
    assert "observed_data" in data.groups() and data.observed_data["y"].shape == (20,)


def test_the_weights_survive_netcdf(meanfield_fit, tmp_path):
    """``ppvi fit --out`` writes the InferenceData to netCDF: the weights and k-hat must come back."""
    data = meanfield_fit.to_arviz(200, seed=0)
    data.to_netcdf(tmp_path / "fit.nc")
    loaded = az.from_netcdf(tmp_path / "fit.nc")
    np.testing.assert_array_equal(loaded.sample_stats["log_weight"].values, data.sample_stats["log_weight"].values)
    assert loaded.sample_stats.attrs["khat"] == data.sample_stats.attrs["khat"]


def test_a_map_fit_has_no_weights_and_says_why():
    y = fake_gaussian.simulate(num_points=20).double()
    data = ppvi.fit(fake_gaussian.model, y, guide="map").to_arviz(200)
    assert "sample_stats" not in data.groups()
    assert "MAP" in data.posterior.attrs["log_weight_missing"]
    assert data.posterior["mu"].shape == (1, 200)


def test_too_few_draws_for_a_pareto_fit_give_weights_and_an_infinite_khat_without_a_warning():
    y = fake_gaussian.simulate(num_points=20).double()
    data = ppvi.fit(fake_gaussian.model, y, guide="laplace").to_arviz(10)  # a warning would fail the test
    assert data.sample_stats["log_weight"].shape == (1, 10)
    assert math.isinf(data.sample_stats.attrs["khat"]) and "too few" in data.sample_stats.attrs["khat_missing"]


def test_enumerated_model_weights_come_with_the_deterministic_sites():
    """Weighted draws of a model with enumerated sites lack its deterministic sites; to_arviz fills them in from
    the same seed's draws, and the weights are the marginal ones of those draws."""
    generator = torch.Generator().manual_seed(0)
    y = torch.cat([torch.randn(8, generator=generator) - 2, torch.randn(8, generator=generator) + 2]).double()

    def mixture(y):
        locs = pyro.sample("locs", dist.Normal(torch.zeros(2, dtype=y.dtype), 5.0).to_event(1))
        pyro.deterministic("gap", locs[..., 1] - locs[..., 0])
        with pyro.plate("data", y.shape[0]):
            z = pyro.sample("z", dist.Categorical(torch.ones(2, dtype=y.dtype) / 2), infer={"enumerate": "parallel"})
            pyro.sample("y", dist.Normal(Vindex(locs)[..., z], 1.0), obs=y)

    fit = ppvi.fit(mixture, y, guide="meanfield", steps=20, engine="pyro")
    data = fit.to_arviz(100, seed=1)
    locs = data.posterior["locs"].values[0]
    np.testing.assert_allclose(data.posterior["gap"].values[0], locs[:, 1] - locs[:, 0], rtol=1e-12)
    np.testing.assert_allclose(data.sample_stats["log_weight"].values[0], fit.log_weights(100, seed=1).numpy())
    np.testing.assert_allclose(locs, fit.weighted_draws(100, seed=1)[0]["locs"].numpy(), rtol=1e-10)
