"""The VAE on scikit-learn's digits: it beats the independent-pixel baseline, its importance-sampled likelihood
behaves as the IWAE bound must, beta moves the KL the documented way, and a saved fit reloads and decodes
identically."""

from __future__ import annotations

import pyro
import pytest
import torch
from pyro import poutine

import ppvi
from ppvi.amortized import log_likelihood
from ppvi.data import binarize, digits
from ppvi.models import vae as vae_module
from ppvi.models.vae import VAE, train

#: Small networks and few steps: each fit takes a few seconds on one CPU core.
HIDDEN_DIM, LATENT_DIM, STEPS, LEARNING_RATE = 64, 8, 600, 3e-3


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    split = digits()
    return torch.tensor(binarize(split.train_images, seed=1)), torch.tensor(binarize(split.test_images, seed=2))


@pytest.fixture(scope="module")
def fitted(data):
    train_images, _ = data
    return train(train_images, latent_dim=LATENT_DIM, hidden_dim=HIDDEN_DIM, steps=STEPS, learning_rate=LEARNING_RATE,
                 device="cpu", batch_size=128)


def independent_pixels_log_likelihood(train_images: torch.Tensor, test_images: torch.Tensor) -> float:
    """Closed-form maximum likelihood of independent Bernoulli pixels (Laplace-smoothed), mean test log p(x)."""
    probability = (train_images.sum(0) + 1) / (train_images.shape[0] + 2)
    return float((test_images * probability.log() + (1 - test_images) * (1 - probability).log()).sum((1, 2)).mean())


def test_elbo_beats_independent_pixels_and_is_is_above_it_increasing_with_samples(fitted, data):
    train_images, test_images = data
    vae = fitted.guide
    baseline = independent_pixels_log_likelihood(train_images, test_images)
    estimates = [log_likelihood(vae.model, vae, test_images, num_samples=n, seed=0) for n in (1, 10, 200)]
    assert estimates[-1].elbo > baseline + 1.0  # nats per image; measured about 3.5 above
    for estimate in estimates:
        assert (estimate.per_point_log_likelihood >= estimate.per_point_elbo - 1e-9).all()
    values = [estimate.log_likelihood for estimate in estimates]
    assert values[0] < values[1] < values[2]
    assert values[2] - estimates[2].elbo > 0.1  # the bound tightens: not a trivial equality


def test_fit_record(fitted, data):
    train_images, _ = data
    assert fitted.steps == STEPS and fitted.elbo.shape == (STEPS,)
    early, late = fitted.elbo[:50].mean(), fitted.elbo[-50:].mean()
    assert late > early + 5 * train_images.shape[0]  # per image, +9.5 nats measured; the noise is far below 1
    assert fitted.dtype == torch.float32 and fitted.device.type == "cpu"


def test_beta_above_one_trades_reconstruction_for_a_smaller_kl(fitted, data):
    train_images, test_images = data
    heavy = train(train_images, latent_dim=LATENT_DIM, hidden_dim=HIDDEN_DIM, steps=STEPS,
                  learning_rate=LEARNING_RATE, device="cpu", kl_weight=4.0)

    def kl_and_reconstruction(vae: VAE) -> tuple[float, float]:
        with torch.no_grad():
            loc, scale = vae.encode(test_images)
            kl = 0.5 * (loc.square() + scale.square() - 1 - 2 * scale.log()).sum(-1).mean()
            logits = vae.decoder(loc)
            error = torch.nn.functional.binary_cross_entropy_with_logits(logits, test_images, reduction="none")
        return float(kl), float(error.sum((1, 2)).mean())

    kl_one, error_one = kl_and_reconstruction(fitted.guide)
    kl_four, error_four = kl_and_reconstruction(heavy.guide)
    assert kl_four < 0.7 * kl_one
    assert error_four > error_one


def test_saved_fit_reloads_and_decodes_identically(fitted, data, tmp_path):
    train_images, _ = data
    path = tmp_path / "vae.pt"
    fitted.save(path)
    fresh = VAE((8, 8), latent_dim=LATENT_DIM, hidden_dim=HIDDEN_DIM)
    loaded = ppvi.load(path, fresh.model, train_images, guide=fresh)
    assert loaded.guide is fresh
    latent = torch.randn(32, LATENT_DIM)
    assert torch.equal(fresh.decode(latent), fitted.guide.decode(latent))
    assert torch.equal(fresh.encode(train_images[:10])[0], fitted.guide.encode(train_images[:10])[0])
    assert loaded.steps == fitted.steps and torch.equal(torch.as_tensor(loaded.elbo), torch.as_tensor(fitted.elbo))


@pytest.mark.parametrize("architecture", ["mlp", "conv"])
@pytest.mark.parametrize("image_shape", [(8, 8), (28, 28)])
def test_sites_and_shapes(architecture, image_shape):
    vae = VAE(image_shape, latent_dim=3, hidden_dim=16, architecture=architecture)
    images = torch.bernoulli(torch.full((10, *image_shape), 0.5))
    trace = poutine.trace(poutine.replay(vae.model, poutine.trace(vae).get_trace(images, 4))).get_trace(images, 4)
    assert trace.nodes["z"]["value"].shape == (4, 3)
    assert trace.nodes["x"]["fn"].batch_shape == (4,) and trace.nodes["x"]["fn"].event_shape == image_shape
    assert trace.nodes["data"]["value"].shape == (4,) and trace.nodes["x"]["scale"] == 10 / 4
    with pyro.plate("particles", 5, dim=-2):  # model and guide broadcast over particles
        batched = poutine.trace(vae).get_trace(images, None)
    assert batched.nodes["z"]["value"].shape == (5, 10, 3)
    assert vae.decode(torch.zeros(2, 7, 3)).shape == (2, 7, *image_shape)


def test_gaussian_decoder_learned_and_fixed_variance():
    images = torch.rand(30, 8, 8)
    learned = VAE((8, 8), latent_dim=2, hidden_dim=8, likelihood="gaussian")
    assert learned.raw_observation_scale.shape == (8, 8)
    distribution = learned.likelihood_distribution(torch.zeros(5, 2))
    torch.testing.assert_close(distribution.base_dist.scale, torch.full((5, 8, 8), 0.1 + vae_module.MINIMUM_SCALE))
    fixed = VAE((8, 8), latent_dim=2, hidden_dim=8, likelihood="gaussian", observation_scale=0.3)
    mean = fixed.decoder(torch.zeros(1, 2))
    log_density = fixed.likelihood_distribution(torch.zeros(1, 2)).log_prob(images[:1])
    # squared error: log N(x | m, 0.3^2) summed over the 64 pixels
    expected = -0.5 * ((images[:1] - mean) / 0.3).square().sum() - 64 * (torch.log(torch.tensor(0.3)) + 0.5 * torch.log(
        torch.tensor(2 * torch.pi)))
    torch.testing.assert_close(log_density[0], expected)
    fit = train(images, latent_dim=2, hidden_dim=8, likelihood="gaussian", steps=30, device="cpu", batch_size=10)
    assert fit.steps == 30


def test_dynamic_binarization_observes_the_draw_the_guide_encoded():
    vae = VAE((8, 8), latent_dim=2, hidden_dim=8, dynamic_binarization=True)
    images = torch.rand(20, 8, 8)
    guide_trace = poutine.trace(vae).get_trace(images, 5)
    model_trace = poutine.trace(poutine.replay(vae.model, guide_trace)).get_trace(images, 5)
    observed = model_trace.nodes["x"]["value"]
    assert ((observed == 0) | (observed == 1)).all()
    assert observed is vae._minibatch_cache[2]
    binary = torch.bernoulli(images)
    assert torch.equal(vae._minibatch(binary, torch.arange(20)), binary)  # binary images are left as they are


def test_bad_inputs_get_clear_errors():
    grey = torch.rand(10, 8, 8)
    with pytest.raises(ValueError, match="binarize them"):
        train(grey, steps=2, device="cpu")
    with pytest.raises(ValueError, match=r"shape \(num_images, 8, 8\)"):
        VAE((8, 8)).model(torch.zeros(10, 64))
    with pytest.raises(ValueError, match="latent_dim"):
        VAE((8, 8), latent_dim=0)
    with pytest.raises(ValueError, match="architecture"):
        VAE((8, 8), architecture="transformer")
    with pytest.raises(ValueError, match="2-D latent space"):
        vae_module.plot_manifold(VAE((8, 8), latent_dim=3))


@pytest.mark.slow
def test_longer_fit_beats_the_mixture_of_bernoullis(data):
    """The lecture's table in order: a VAE trained for 3000 steps on dynamically binarized digits scores a higher
    importance-sampled test log-likelihood than a 10-component mixture of Bernoullis (measured: -22.5 against
    -23.8 nats per image)."""
    from ppvi.models import image_baselines

    split = digits()
    _, test_images = data
    fit = train(torch.tensor(split.train_images), latent_dim=10, hidden_dim=128, steps=3000, learning_rate=3e-3,
                dynamic_binarization=True, device="cpu")
    estimate = log_likelihood(fit.guide.model, fit.guide, test_images, num_samples=1000)
    train_binary = binarize(split.train_images, seed=1)
    mixture = image_baselines.bernoulli_mixture(train_binary, 10)
    mixture_score = float(image_baselines.bernoulli_mixture_log_likelihood(mixture, test_images).mean())
    assert estimate.log_likelihood > mixture_score + 0.5
    assert estimate.log_likelihood > estimate.elbo
