"""Importance weights of models with enumerated discrete sites: the marginal log joint of many draws in one
vectorized pass must equal Pyro's TraceEnum_ELBO on a point-mass guide, draw by draw, and the exact mixture
likelihood written out with scipy."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceEnum_ELBO, config_enumerate
from pyro.ops.indexing import Vindex
from scipy import special, stats

import ppvi
from ppvi import enumeration
from ppvi.inputs import computation

#: Relative agreement demanded of two float64 evaluations of the same log density (sums in another order).
RELATIVE_TOLERANCE = 1e-8
NUM_POINTS = 40
#: The full data set that a fixed subsample of the subsampled model stands for: scale NUM_FULL / NUM_POINTS.
NUM_FULL = 100


def _data() -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    half = NUM_POINTS // 2
    return torch.cat([torch.randn(half, generator=generator) - 2, 0.5 * torch.randn(half, generator=generator) + 2])


def _mixture(y: torch.Tensor, mask: torch.Tensor | None = None, subsample: bool = False) -> None:
    """Two normal components, written for a batch of draws (``Vindex``); optionally the observations masked and
    the data plate a fixed subsample of ``NUM_FULL`` points (scale ``NUM_FULL / NUM_POINTS``)."""
    weights = pyro.sample("weights", dist.Dirichlet(torch.ones(2, dtype=y.dtype)))
    with pyro.plate("components", 2):
        locs = pyro.sample("locs", dist.Normal(torch.zeros((), dtype=y.dtype), 5.0))
        scales = pyro.sample("scales", dist.LogNormal(torch.zeros((), dtype=y.dtype), 1.0))
    indices = torch.arange(NUM_POINTS) if subsample else None
    with pyro.plate("data", NUM_FULL if subsample else NUM_POINTS, subsample=indices):
        z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
        with pyro.poutine.mask(mask=mask if mask is not None else True):
            # The components share dim -1 with the data: a singleton data dim lines a batch of draws up with z's.
            component_locs, component_scales = Vindex(locs.unsqueeze(-2))[..., z], Vindex(scales.unsqueeze(-2))[..., z]
            pyro.sample("y", dist.Normal(component_locs, component_scales), obs=y)


def _scipy_log_density(latent: np.ndarray, y: np.ndarray, mask: np.ndarray, scale: float) -> np.ndarray:
    """``log p(y, theta) + log|det J|`` of unconstrained points ``(u_w, u_loc_1, u_loc_2, u_s_1, u_s_2)``, written out:
    ``w_1 = sigmoid(u_w)`` (stick breaking, Jacobian ``w_1 w_2``), ``s = exp(u_s)`` (Jacobian ``s``)."""
    totals = []
    for u_weight, *rest in latent:
        locs, scales = np.array(rest[:2]), np.exp(rest[2:])
        weights = np.array([special.expit(u_weight), special.expit(-u_weight)])
        log_prior = (
            stats.dirichlet.logpdf(weights, [1.0, 1.0])
            + stats.norm.logpdf(locs, 0.0, 5.0).sum()
            + stats.lognorm.logpdf(scales, 1.0).sum()
        )
        per_point = special.logsumexp(np.log(weights) + stats.norm.logpdf(y[:, None], locs, scales), axis=1)
        log_jacobian = np.log(weights).sum() + np.log(scales).sum()
        totals.append(log_prior + scale * (per_point * mask).sum() + log_jacobian)
    return np.array(totals)


def _trace_enum_loop(fit: ppvi.Fit, latent: torch.Tensor) -> torch.Tensor:
    """The one-draw-at-a-time reference: Pyro's TraceEnum_ELBO on the guide fixed at each point."""
    elbo = TraceEnum_ELBO(max_plate_nesting=fit.max_plate_nesting)
    values = []
    for point in latent:
        with torch.enable_grad(), fit.guide.fixed_latent(point.clone().requires_grad_(True), fit.max_plate_nesting):
            values.append(-elbo.differentiable_loss(fit.model, fit.guide, *fit.args, **fit.kwargs).detach())
    return torch.stack(values)


def _laplace_fit(model, *args, **model_kwargs) -> ppvi.Fit:
    return ppvi.fit(model, *args, guide="laplace", model_kwargs=model_kwargs)


def _points_around_the_fit(fit: ppvi.Fit, num_points: int) -> torch.Tensor:
    posterior = fit.guide.posterior()
    with torch.no_grad():
        # Twice the guide's spread: points in the tails too, where a wrong Jacobian or scale would show most.
        return posterior.mean + 2 * (posterior.sample((num_points,)) - posterior.mean)


@pytest.mark.parametrize("variant", ["plain", "masked and subsampled"])
def test_vectorized_marginal_log_density_equals_trace_enum_and_scipy(variant):
    y = _data().double()
    subsample = variant != "plain"
    mask = (torch.arange(NUM_POINTS) % 3 != 0) if subsample else None
    fit = _laplace_fit(_mixture, y, mask=mask, subsample=subsample)
    latent = _points_around_the_fit(fit, 30)
    vectorized = enumeration.batched_marginal_log_density(
        fit.model, fit.guide, fit.args, fit.kwargs, latent, fit.max_plate_nesting
    )
    loop = _trace_enum_loop(fit, latent)
    mask_array = np.ones(NUM_POINTS) if mask is None else mask.double().numpy()
    scale = NUM_FULL / NUM_POINTS if subsample else 1.0
    exact = _scipy_log_density(latent.numpy(), y.numpy(), mask_array, scale)
    assert vectorized.shape == (30,)
    np.testing.assert_allclose(vectorized.numpy(), loop.numpy(), rtol=RELATIVE_TOLERANCE)
    np.testing.assert_allclose(vectorized.numpy(), exact, rtol=RELATIVE_TOLERANCE)


def test_log_weights_equal_the_draw_by_draw_ones_and_the_exact_density_minus_the_guide(monkeypatch):
    y = _data().double()
    fit = _laplace_fit(_mixture, y)
    num_samples = 100
    # 2000 log-probability entries a pass: about a dozen draws of this model, so the draws span several passes.
    monkeypatch.setattr(enumeration, "MARGINAL_PASS_ENTRIES", 2000)
    vectorized = fit.log_weights(num_samples, seed=1)
    assert fit._vectorizable
    fit._vectorizable = False  # force the one-draw-at-a-time path on the same draws
    sequential = fit.log_weights(num_samples, seed=1)
    np.testing.assert_allclose(vectorized.numpy(), sequential.numpy(), rtol=RELATIVE_TOLERANCE)
    # The draws are the guide's under the seed: recompute them and the weights from scipy's density.
    pyro.set_rng_seed(1)
    with torch.no_grad():
        posterior = fit.guide.posterior()
        latent = posterior.sample((num_samples,))
        log_q = posterior.log_prob(latent).numpy()
    exact = _scipy_log_density(latent.numpy(), y.numpy(), np.ones(NUM_POINTS), 1.0) - log_q
    np.testing.assert_allclose(vectorized.numpy(), exact, rtol=RELATIVE_TOLERANCE)


def test_lecture_mixture_diagnoses_thousands_of_draws_in_one_pass():
    from ppvi.models import gmm

    x, _ = gmm.simulate_lecture_mixture(300, seed=0)
    fit = _laplace_fit(gmm.model, x, 2)
    diagnosis = fit.diagnose(num_samples=2000)
    assert fit._vectorizable, "the lecture mixture broadcasts over draws: it must not fall back to the loop"
    assert math.isfinite(diagnosis.khat) and diagnosis.num_samples == 2000
    assert 0 < diagnosis.effective_sample_size <= 2000
    # LKJ, stick-breaking and softplus Jacobians, in a 2-D mixture: the same numbers as TraceEnum_ELBO per draw.
    latent = _points_around_the_fit(fit, 5)
    with computation(fit.device, fit.dtype), torch.no_grad():
        vectorized = enumeration.batched_marginal_log_density(
            fit.model, fit.guide, fit.args, fit.kwargs, latent, fit.max_plate_nesting
        )
    np.testing.assert_allclose(vectorized.numpy(), _trace_enum_loop(fit, latent).numpy(), rtol=RELATIVE_TOLERANCE)


@config_enumerate
def _one_draw_mixture(y: torch.Tensor) -> None:
    """Written for one draw at a time (``locs[z]``): indexing the draws dimension fails."""
    weights = pyro.sample("weights", dist.Dirichlet(torch.ones(2, dtype=y.dtype)))
    locs = pyro.sample("locs", dist.Normal(torch.zeros((), dtype=y.dtype), 5.0).expand([2]).to_event(1))
    with pyro.plate("data", y.shape[0]):
        z = pyro.sample("z", dist.Categorical(weights))
        pyro.sample("y", dist.Normal(locs[z], 1.0), obs=y)


@config_enumerate
def _draw_mixing_mixture(y: torch.Tensor) -> None:
    """Written for one draw at a time in a way that runs on a batch without an error but mixes the draws up
    (``shift.sum()`` adds every draw's shift): only the spot check against an unbatched run can tell."""
    weights = pyro.sample("weights", dist.Dirichlet(torch.ones(2, dtype=y.dtype)))
    shift = pyro.sample("shift", dist.Normal(torch.zeros((), dtype=y.dtype), 5.0))
    offsets = torch.tensor([-2.0, 2.0], dtype=y.dtype)
    with pyro.plate("data", y.shape[0]):
        z = pyro.sample("z", dist.Categorical(weights))
        pyro.sample("y", dist.Normal(shift.sum() + Vindex(offsets)[..., z], 1.0), obs=y)


@pytest.mark.parametrize("model", [_one_draw_mixture, _draw_mixing_mixture], ids=["fails", "mixes draws"])
def test_models_not_written_for_a_batch_of_draws_fall_back_to_one_draw_at_a_time(model):
    y = _data().double()
    fit = _laplace_fit(model, y)
    latent = _points_around_the_fit(fit, 4)
    with pytest.raises((ValueError, RuntimeError, IndexError)):
        enumeration.batched_marginal_log_density(fit.model, fit.guide, fit.args, fit.kwargs, latent, 0)
    log_weights = fit.log_weights(20, seed=2)
    assert not fit._vectorizable
    pyro.set_rng_seed(2)
    with torch.no_grad():
        posterior = fit.guide.posterior()
        latent = posterior.sample((20,))
        expected = _trace_enum_loop(fit, latent) - posterior.log_prob(latent)
    np.testing.assert_allclose(log_weights.numpy(), expected.numpy(), rtol=RELATIVE_TOLERANCE)
    assert math.isfinite(fit.diagnose(num_samples=50).khat)
