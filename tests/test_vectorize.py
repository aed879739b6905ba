"""Every model runs over a batch of draws, whatever way it is written (ppvi.vectorize).

The reference for a model that does not broadcast is its broadcasting twin: the same density written for Pyro's
particle convention. Every public call must give the same numbers on both, and a model that broadcasts wrongly
(numpy-style, adding a dimension left of its plates) must never have its likelihood counted once per draw.
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import ppvi
from ppvi import vectorize
from ppvi.guides import GUIDES

NUM_POINTS, NUM_PREDICTORS = 60, 3


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    X = torch.randn(NUM_POINTS, NUM_PREDICTORS, generator=generator, dtype=torch.float64)
    logits = 0.3 + X @ torch.tensor([1.0, -0.5, 0.8], dtype=torch.float64)
    return X, torch.bernoulli(torch.sigmoid(logits), generator=generator)


def _priors() -> tuple[torch.Tensor, torch.Tensor]:
    a = pyro.sample("a", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 2.0))
    beta = pyro.sample("beta", dist.Normal(torch.zeros(NUM_PREDICTORS, dtype=torch.float64), 1.0).to_event(1))
    return a, beta


def _likelihood(logits: torch.Tensor, y: torch.Tensor) -> None:
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=logits), obs=y)


def broadcasting(X, y):
    """The reference: written for Pyro's particle convention."""
    a, beta = _priors()
    _likelihood(a + (X * beta).sum(-1), y)


def matrix_product(X, y):
    """Written for one draw: ``X @ beta`` does not broadcast over a batch of draws (it raises)."""
    a, beta = _priors()
    _likelihood(a + X @ beta, y)


def numpy_style(X, y):
    """Broadcasts, wrongly: ``a[..., None]`` adds a dimension left of the plate, which the plate of draws expands,
    so a batched run silently counts the likelihood once per draw."""
    a, beta = _priors()
    _likelihood(a[..., None] + (X * beta[..., None, :]).sum(-1), y)


def control_flow(X, y):
    """Python control flow on a sampled value: neither broadcasts nor vmaps."""
    a, beta = _priors()
    shift = 0.0 if a.detach() > 100.0 else 0.0  # always 0: the same density as the reference
    _likelihood(a + shift + (X * beta).sum(-1), y)


def _strategy(model, data) -> vectorize.Vectorization:
    guide = GUIDES["fullrank"].factory(model)
    with torch.no_grad():
        guide(*data)
    return vectorize.choose_strategy(model, guide, data, {}, max_plate_nesting=1)


def test_each_way_of_writing_the_model_gets_the_batched_evaluation_that_is_right_for_it(data):
    assert _strategy(broadcasting, data) == ("broadcast", "")
    product = _strategy(matrix_product, data)
    assert product.strategy == "vmap" and "does not broadcast" in product.reason
    extra = _strategy(numpy_style, data)
    assert extra.strategy == "vmap"
    assert f"site 'y' has a log-probability of shape (3, 3, {NUM_POINTS})" in extra.reason
    loop = _strategy(control_flow, data)
    assert loop.strategy == "sequential" and "torch.func.vmap cannot batch it" in loop.reason


@pytest.mark.parametrize("model", [matrix_product, numpy_style])
def test_every_public_call_on_a_model_that_does_not_broadcast_equals_the_broadcasting_one(data, model):
    reference = ppvi.fit(broadcasting, *data, guide="fullrank", seed=0)
    fit = ppvi.fit(model, *data, guide="fullrank", seed=0)
    assert fit.vectorization.strategy == "vmap" and "torch.func.vmap" in fit.message
    # The same steps (same draws, same log densities): the ELBO traces agree to round-off, not 8 times lower.
    np.testing.assert_allclose(fit.elbo, reference.elbo, rtol=1e-9, atol=1e-9)
    for name, value in reference.sample(500, seed=2).items():
        torch.testing.assert_close(fit.sample(500, seed=2)[name], value)
    torch.testing.assert_close(fit.log_weights(1000, seed=3), reference.log_weights(1000, seed=3))
    np.testing.assert_allclose(fit.summary().to_numpy(dtype=float), reference.summary().to_numpy(dtype=float))
    assert fit.diagnose().khat == pytest.approx(reference.diagnose().khat, rel=1e-9)
    posterior = fit.to_arviz().posterior
    expected = reference.to_arviz().posterior
    for name in ("a", "beta"):
        np.testing.assert_allclose(posterior[name].to_numpy(), expected[name].to_numpy())


def test_compare_runs_every_guide_batched_on_a_model_that_does_not_broadcast(data):
    table = ppvi.compare(matrix_product, *data, guides=("meanfield", "fullrank"), seed=0)
    reference = ppvi.compare(broadcasting, *data, guides=("meanfield", "fullrank"), seed=0)
    np.testing.assert_allclose(table["elbo"].to_numpy(dtype=float), reference["elbo"].to_numpy(dtype=float))


def test_a_model_that_vmap_cannot_batch_runs_one_draw_at_a_time_and_says_what_it_costs(data):
    with pytest.warns(ppvi.FitWarning, match="one draw at a time.*torch.where"):
        fit = ppvi.fit(control_flow, *data, guide="meanfield", seed=0)
    reference = ppvi.fit(broadcasting, *data, guide="meanfield", seed=0)
    assert fit.vectorization.strategy == "sequential"
    np.testing.assert_allclose(fit.elbo, reference.elbo, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(fit.log_weights(200, seed=3), reference.log_weights(200, seed=3))


def test_a_loaded_fit_finds_its_vectorization_again(data, tmp_path):
    fit = ppvi.fit(matrix_product, *data, guide="fullrank", seed=0, steps=50)
    fit.save(tmp_path / "fit.pt")
    loaded = ppvi.load(tmp_path / "fit.pt", matrix_product, *data)
    assert loaded.vectorization.strategy == "vmap"
    torch.testing.assert_close(loaded.log_weights(300, seed=1), fit.log_weights(300, seed=1))


def test_the_shape_check_names_the_site_and_the_convention():
    def model():
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 4):
            pyro.sample("y", dist.Normal(a[..., None, None], 1.0), obs=torch.zeros(4))

    with pyro.plate("_draws", 3, dim=-2), pyro.poutine.trace() as capture:
        pyro.condition(model, {"a": torch.zeros(3, 1)})()
    problems = vectorize.particle_shape_problems(capture.trace, 3, 1)
    assert len(problems) == 1 and "site 'y'" in problems[0] and "(3, N)" in problems[0]
