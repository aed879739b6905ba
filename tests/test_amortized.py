"""AmortizedELBO against Pyro's own ELBOs and the closed forms; log_likelihood against exact marginal likelihoods."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch import nn

from ppvi.amortized import AmortizedELBO, log_likelihood
from ppvi.models import ppca
from ppvi.models.vae import VAE

NUM_IMAGES, BATCH = 60, 16


@pytest.fixture
def images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    return torch.bernoulli(torch.full((NUM_IMAGES, 4, 5), 0.3), generator=generator)


@pytest.fixture
def vae() -> VAE:
    torch.manual_seed(0)
    return VAE((4, 5), latent_dim=3, hidden_dim=8)


def loss_and_gradients(elbo, vae: VAE, images: torch.Tensor, seed: int = 1):
    vae.zero_grad()
    pyro.set_rng_seed(seed)
    loss = elbo.differentiable_loss(vae.model, vae, images, subsample_size=BATCH)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in vae.parameters()]


@pytest.mark.parametrize(
    ("ours", "pyros"), [(AmortizedELBO(), TraceMeanField_ELBO()), (AmortizedELBO(analytic_kl=False), Trace_ELBO())],
    ids=["meanfield", "trace"],
)
def test_same_loss_and_gradient_as_pyro(ours, pyros, vae, images):
    for seed in (1, 2):  # the first evaluation validates, later ones take the fast path: both must agree
        expected, expected_gradients = loss_and_gradients(pyros, vae, images, seed)
        loss, gradients = loss_and_gradients(ours, vae, images, seed)
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-4)
        for gradient, reference in zip(gradients, expected_gradients, strict=True):
            torch.testing.assert_close(gradient, reference, rtol=1e-5, atol=1e-5)


def test_bound_methods_are_recognised_as_the_same_model(vae, images):
    # vae.model is a new bound-method object at every access: the structure is validated once, not every step
    elbo = AmortizedELBO()
    for _ in range(3):
        elbo.differentiable_loss(vae.model, vae, images, subsample_size=BATCH)
    assert len(elbo._validated) == 1


def by_hand(vae: VAE, images: torch.Tensor, seed: int):
    """Reconstruction and KL terms of the ELBO written out: BCE with logits and the Gaussian KL formula, from
    the same minibatch and noise as Pyro draws them (randperm for the plate, then the reparameterised normal)."""
    torch.manual_seed(seed)
    index = torch.randperm(NUM_IMAGES)[:BATCH]
    batch = images[index]
    loc, scale = vae.encode(batch)
    latent = loc + scale * torch.randn_like(loc)
    logits = vae.decoder(latent)
    scale_up = NUM_IMAGES / BATCH
    reconstruction = scale_up * nn.functional.binary_cross_entropy_with_logits(logits, batch, reduction="sum")
    kl_per_dimension = 0.5 * (loc.square() + scale.square() - 1 - 2 * scale.log())
    return reconstruction.detach(), kl_per_dimension.detach()


def test_beta_scales_the_kl_term_only(vae, images):
    elbo = AmortizedELBO(kl_weight=4.0)
    with torch.no_grad():
        pyro.set_rng_seed(5)
        loss = elbo.differentiable_loss(vae.model, vae, images, subsample_size=BATCH)
        reconstruction, kl_per_dimension = by_hand(vae, images, 5)
    kl = NUM_IMAGES / BATCH * kl_per_dimension.sum()
    torch.testing.assert_close(elbo.last_terms.reconstruction, reconstruction)
    torch.testing.assert_close(elbo.last_terms.kl, kl)
    torch.testing.assert_close(loss, reconstruction + 4.0 * kl)


def test_kl_annealing_is_linear_from_zero(vae, images):
    warmup = 4
    elbo = AmortizedELBO(kl_weight=2.0, kl_warmup_steps=warmup)
    weights = []
    for step in range(6):
        loss = elbo.differentiable_loss(vae.model, vae, images, subsample_size=BATCH)
        terms = elbo.last_terms
        weight = float((loss.detach() - terms.reconstruction) / terms.kl)
        weights.append(weight)
        assert elbo.step == step + 1
    assert weights == pytest.approx([2.0 * min(1.0, t / warmup) for t in range(6)], abs=1e-5)
    with torch.no_grad():  # evaluations without gradients do not advance the clock
        elbo.differentiable_loss(vae.model, vae, images, subsample_size=BATCH)
    assert elbo.step == 6


def test_free_bits_clamp_each_dimension_averaged_over_the_minibatch(vae, images):
    free_bits = 0.3
    elbo = AmortizedELBO(free_bits=free_bits)
    with torch.no_grad():
        pyro.set_rng_seed(7)
        elbo.differentiable_loss(vae.model, vae, images, subsample_size=BATCH)
        _, kl_per_dimension = by_hand(vae, images, 7)
    expected = NUM_IMAGES * kl_per_dimension.mean(0).clamp(min=free_bits).sum()
    assert (kl_per_dimension.mean(0) < free_bits).any() or (kl_per_dimension.mean(0) > free_bits).any()
    torch.testing.assert_close(elbo.last_terms.kl, expected)


def test_free_bits_stop_the_gradient_of_dimensions_below_the_threshold(vae, images):
    # with a threshold above every dimension's KL, the KL term is constant: only the reconstruction drives the
    # encoder's scale, so the gradient equals that of the reconstruction term alone
    ours = AmortizedELBO(free_bits=1e6)
    reconstruction_only = AmortizedELBO(kl_weight=0.0)
    _, gradients = loss_and_gradients(ours, vae, images, 9)
    _, expected = loss_and_gradients(reconstruction_only, vae, images, 9)
    for gradient, reference in zip(gradients, expected, strict=True):
        torch.testing.assert_close(gradient, reference)


def test_bad_options_and_structures_are_refused(vae, images):
    with pytest.raises(ValueError, match="kl_weight"):
        AmortizedELBO(kl_weight=-1.0)
    with pytest.raises(ValueError, match="kl_warmup_steps"):
        AmortizedELBO(kl_warmup_steps=1.5)
    with pytest.raises(ValueError, match="analytic_kl=True"):
        AmortizedELBO(free_bits=1.0, analytic_kl=False)
    with pytest.raises(ValueError, match="data on a GPU"):
        AmortizedELBO(cuda_graph="on").differentiable_loss(vae.model, vae, images)

    def model():
        pyro.sample("a", dist.Normal(0.0, 1.0))
        pyro.sample("b", dist.Normal(0.0, 1.0))

    def guide_missing_b():
        pyro.sample("a", dist.Normal(0.0, 1.0))

    def guide_not_reparameterised():
        pyro.sample("a", dist.Normal(0.0, 1.0))
        pyro.sample("b", dist.Poisson(1.0))

    with pytest.raises(ValueError, match="'b' has no counterpart in the guide"):
        AmortizedELBO().differentiable_loss(model, guide_missing_b)
    with pytest.raises(ValueError, match="cannot be reparameterised"):
        AmortizedELBO().differentiable_loss(model, guide_not_reparameterised)


# --- the importance-sampling estimate against exact marginal likelihoods (linear Gaussian model) ---
DATA_DIM, LATENT_DIM, NOISE_SCALE = 4, 2, 0.5


def linear_gaussian(seed: int = 0):
    x, W, b = ppca.simulate(40, DATA_DIM, LATENT_DIM, NOISE_SCALE, seed=seed, dtype=torch.float64)
    mean, covariance = ppca.posterior(x, W, b, NOISE_SCALE**2)

    def model(data):
        with pyro.plate("data", data.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(LATENT_DIM, dtype=torch.float64), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ W.T + b, NOISE_SCALE).to_event(1), obs=data)

    def guide_with(width: float, shift: float):
        """A Gaussian guide: the exact posterior (width 1, shift 0) or a wrong one."""
        def guide(data):
            posterior_mean, _ = ppca.posterior(data, W, b, NOISE_SCALE**2)
            with pyro.plate("data", data.shape[0]):
                pyro.sample("z", dist.MultivariateNormal(posterior_mean + shift, width**2 * covariance))
        return guide

    exact = torch.stack([ppca.log_marginal_likelihood(point[None], W, b, NOISE_SCALE**2) for point in x])
    return x, model, guide_with, exact


def test_exact_posterior_gives_the_exact_log_likelihood_with_one_sample():
    x, model, guide_with, exact = linear_gaussian()
    estimate = log_likelihood(model, guide_with(1.0, 0.0), x, num_samples=1)
    torch.testing.assert_close(estimate.per_point_log_likelihood, exact)
    torch.testing.assert_close(estimate.per_point_elbo, exact)


def test_importance_sampling_tightens_towards_the_truth_with_more_samples():
    x, model, guide_with, exact = linear_gaussian(1)
    guide = guide_with(1.6, 0.3)  # too wide and shifted: the ELBO is well below log p(x)
    estimates = [log_likelihood(model, guide, x, num_samples=n, chunk_size=64, batch_size=16) for n in (1, 10, 300)]
    for estimate in estimates:  # log-mean-exp >= mean-log of the same draws, per point
        assert (estimate.per_point_log_likelihood >= estimate.per_point_elbo - 1e-9).all()
    gaps = [float(exact.mean()) - estimate.log_likelihood for estimate in estimates]
    assert gaps[0] > gaps[1] > gaps[2] > 0  # a lower bound in expectation, tightening with L (Burda et al. 2016)
    assert gaps[2] < 0.02 < 0.5 < gaps[0]
    assert abs(estimates[2].elbo - estimates[0].elbo) < 0.1 * gaps[0]  # the ELBO does not change with L
    assert math.isfinite(estimates[2].log_likelihood)


def test_log_likelihood_refuses_global_latents_and_bad_sizes():
    def model(data):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", data.shape[0]):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=data)

    def guide(data):
        pyro.sample("mu", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="only local latent variables"):
        log_likelihood(model, guide, torch.zeros(5), num_samples=3)
    with pytest.raises(ValueError, match="num_samples"):
        log_likelihood(model, guide, torch.zeros(5), num_samples=0)


def test_graph_replay_hands_autograd_the_captured_gradient(vae, images):
    """The CUDA-graph path's autograd plumbing, on the CPU: a stand-in 'graph' whose replay recomputes the loss
    and gradient into fixed buffers, as a captured graph would; backward must give the eager gradient."""
    from ppvi.amortized import _ReplayGraph, _run_pair, loss_terms

    parameters = list(vae.parameters())

    class Replayed:
        def __init__(self):
            self.graph = self

        def replay(self):
            pyro.set_rng_seed(11)
            with torch.enable_grad():  # a captured graph computed its gradient at capture, with gradients on
                terms = loss_terms(*_run_pair(vae.model, vae, (images,), {"subsample_size": BATCH}))
                loss = terms.reconstruction + terms.kl
                self.gradients = torch.autograd.grad(loss, parameters)
            self.loss = loss.detach()

    replayed = Replayed()
    loss = 3.0 * _ReplayGraph.apply(replayed, *parameters)
    loss.backward()
    expected, expected_gradients = loss_and_gradients(TraceMeanField_ELBO(), vae, images, 11)
    vae.zero_grad()
    loss = 3.0 * _ReplayGraph.apply(replayed, *parameters)
    loss.backward()
    torch.testing.assert_close(loss.detach(), 3.0 * expected)
    for parameter, reference in zip(parameters, expected_gradients, strict=True):
        torch.testing.assert_close(parameter.grad, 3.0 * reference)


def test_graph_safe_minibatches_are_uniform_subsets_without_repeats(vae, images):
    from ppvi.amortized import _SiteRecorder

    counts = torch.zeros(NUM_IMAGES)
    for _ in range(300):
        with _SiteRecorder(graph_safe_subsample=True) as recorder:
            vae(images, BATCH)
        index = recorder.subsamples["data"]
        assert index.unique().numel() == BATCH and 0 <= index.min() and index.max() < NUM_IMAGES
        counts[index] += 1
    # each image is in a minibatch with probability 16/60: 80 of 300 expected, sd about 7.7
    assert (counts - 80).abs().max() < 5 * 7.7
