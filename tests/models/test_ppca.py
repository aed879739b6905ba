"""Probabilistic PCA: the closed forms checked against outside references (scikit-learn, SciPy, Gaussian
conditioning by hand), the model's sites and the simulator's reproducibility."""

from __future__ import annotations

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from scipy import stats
from sklearn.decomposition import PCA

from ppvi.models import ppca

NUM_POINTS, DATA_DIM, LATENT_DIM, NOISE_SCALE = 300, 6, 2, 0.5


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return ppca.simulate(NUM_POINTS, DATA_DIM, LATENT_DIM, NOISE_SCALE, seed=1, dtype=torch.float64)


def random_parameters(seed: int = 2) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Parameters unrelated to the data (not the ML ones), so the checks do not lean on optimality."""
    generator = torch.Generator().manual_seed(seed)
    W = torch.randn(DATA_DIM, LATENT_DIM, generator=generator, dtype=torch.float64)
    b = torch.randn(DATA_DIM, generator=generator, dtype=torch.float64)
    return W, b, 0.7


def sklearn_pca(x: torch.Tensor) -> PCA:
    # "full" is the exact LAPACK SVD; "auto" could pick a randomized solver for larger problems.
    return PCA(n_components=LATENT_DIM, svd_solver="full").fit(x.numpy())


# --- maximum likelihood against scikit-learn ---
# scikit-learn estimates the covariance with N - 1 degrees of freedom (explained_variance_ = S**2 / (N - 1));
# the maximum-likelihood solution of Tipping & Bishop divides by N. So every second moment of sklearn's fit is
# ours times N / (N - 1). (With N > D both average the same D - K discarded eigenvalues for the noise.)


def test_maximum_likelihood_matches_sklearn_pca(data):
    x, _, _ = data
    W, b, noise_variance = ppca.maximum_likelihood(x, LATENT_DIM)
    pca = sklearn_pca(x)
    ddof = (NUM_POINTS - 1) / NUM_POINTS

    assert W.shape == (DATA_DIM, LATENT_DIM) and b.shape == (DATA_DIM,) and noise_variance.shape == ()
    np.testing.assert_allclose(b.numpy(), pca.mean_, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(noise_variance.item(), pca.noise_variance_ * ddof, rtol=1e-10)
    covariance = W @ W.T + noise_variance * torch.eye(DATA_DIM, dtype=torch.float64)
    np.testing.assert_allclose(covariance.numpy(), pca.get_covariance() * ddof, rtol=1e-10, atol=1e-12)
    # With R = I the columns of W are the principal axes, in order (up to sign).
    directions = (W / W.norm(dim=0)).numpy()
    np.testing.assert_allclose(np.abs(directions.T @ pca.components_.T), np.eye(LATENT_DIM), atol=1e-10)


def test_log_marginal_likelihood_matches_sklearn_score(data):
    """``PCA.score`` is the pPCA average log-likelihood (Bishop PRML 12.2.1) at sklearn's own estimates."""
    x, _, _ = data
    pca = sklearn_pca(x)
    expected = pca.score(x.numpy()) * NUM_POINTS

    # sklearn's parameters from its attributes: W = components^T (explained variance - sigma^2)^(1/2).
    W_sklearn = pca.components_.T * np.sqrt(pca.explained_variance_ - pca.noise_variance_)
    ours = ppca.log_marginal_likelihood(
        x, torch.from_numpy(W_sklearn), torch.from_numpy(pca.mean_), float(pca.noise_variance_)
    )
    np.testing.assert_allclose(ours.item(), expected, rtol=1e-12)

    # Our ML estimates rescaled to sklearn's N - 1 convention give the same value.
    W, b, noise_variance = ppca.maximum_likelihood(x, LATENT_DIM)
    scale = NUM_POINTS / (NUM_POINTS - 1)
    ours = ppca.log_marginal_likelihood(x, W * scale**0.5, b, noise_variance * scale)
    np.testing.assert_allclose(ours.item(), expected, rtol=1e-12)


# --- evidence and posterior against SciPy / Gaussian conditioning ---


def test_log_marginal_likelihood_matches_scipy(data):
    x, _, _ = data
    W, b, noise_variance = random_parameters()
    covariance = W.numpy() @ W.numpy().T + noise_variance * np.eye(DATA_DIM)
    expected = stats.multivariate_normal(mean=b.numpy(), cov=covariance).logpdf(x.numpy()).sum()

    for variance in (noise_variance, torch.tensor(noise_variance, dtype=torch.float64)):
        ours = ppca.log_marginal_likelihood(x, W, b, variance)
        assert ours.shape == () and ours.dtype == torch.float64
        np.testing.assert_allclose(ours.item(), expected, rtol=1e-12)


def test_posterior_matches_gaussian_conditioning(data):
    """Condition the joint Gaussian of (z, x) on x with the Schur complement, in NumPy."""
    x, _, _ = data
    W, b, noise_variance = random_parameters()
    W_np, b_np, x_np = W.numpy(), b.numpy(), x.numpy()
    # Joint: z ~ N(0, I), x = W z + b + eps  =>  cov(z, x) = W^T, cov(x) = W W^T + sigma^2 I.
    cov_zz = np.eye(LATENT_DIM)
    cov_zx = W_np.T
    cov_xx = W_np @ W_np.T + noise_variance * np.eye(DATA_DIM)
    expected_mean = np.linalg.solve(cov_xx, (x_np - b_np).T).T @ cov_zx.T
    expected_covariance = cov_zz - cov_zx @ np.linalg.solve(cov_xx, cov_zx.T)

    mean, covariance = ppca.posterior(x, W, b, noise_variance)
    assert mean.shape == (NUM_POINTS, LATENT_DIM) and covariance.shape == (LATENT_DIM, LATENT_DIM)
    np.testing.assert_allclose(mean.numpy(), expected_mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(covariance.numpy(), expected_covariance, rtol=1e-10, atol=1e-12)


# --- the maximum is a maximum, and only W W^T is identified ---


def test_maximum_likelihood_is_a_maximum(data):
    x, _, _ = data
    W, b, noise_variance = ppca.maximum_likelihood(x, LATENT_DIM)
    best = ppca.log_marginal_likelihood(x, W, b, noise_variance)

    # Stationary: the gradient vanishes at the closed form.
    parameters = [t.clone().requires_grad_() for t in (W, b, noise_variance)]
    for gradient in torch.autograd.grad(ppca.log_marginal_likelihood(x, *parameters), parameters):
        assert gradient.abs().max() < 1e-8

    # A maximum: small moves in random directions, either way, lower it.
    generator = torch.Generator().manual_seed(3)
    for _ in range(5):
        dW = 1e-2 * torch.randn(W.shape, generator=generator, dtype=torch.float64)
        db = 1e-2 * torch.randn(b.shape, generator=generator, dtype=torch.float64)
        for sign in (1.0, -1.0):
            assert ppca.log_marginal_likelihood(x, W + sign * dW, b, noise_variance) < best
            assert ppca.log_marginal_likelihood(x, W, b + sign * db, noise_variance) < best
    for factor in (0.95, 1.05):
        assert ppca.log_marginal_likelihood(x, W, b, noise_variance * factor) < best


def test_only_w_w_transpose_is_identified(data):
    x, _, _ = data
    W, b, noise_variance = ppca.maximum_likelihood(x, LATENT_DIM)
    generator = torch.Generator().manual_seed(4)
    R, _ = torch.linalg.qr(torch.randn(LATENT_DIM, LATENT_DIM, generator=generator, dtype=torch.float64))
    rotated = W @ R

    np.testing.assert_allclose((rotated @ rotated.T).numpy(), (W @ W.T).numpy(), atol=1e-12)
    np.testing.assert_allclose(
        ppca.log_marginal_likelihood(x, rotated, b, noise_variance).item(),
        ppca.log_marginal_likelihood(x, W, b, noise_variance).item(),
        rtol=1e-12,
    )
    # The posterior rotates with W: z -> R^T z.
    mean, covariance = ppca.posterior(x, W, b, noise_variance)
    rotated_mean, rotated_covariance = ppca.posterior(x, rotated, b, noise_variance)
    np.testing.assert_allclose(rotated_mean.numpy(), (mean @ R).numpy(), atol=1e-10)
    np.testing.assert_allclose(rotated_covariance.numpy(), (R.T @ covariance @ R).numpy(), atol=1e-12)


def test_maximum_likelihood_rejects_bad_latent_dim(data):
    x, _, _ = data
    for latent_dim in (0, DATA_DIM):
        with pytest.raises(ValueError, match="latent_dim"):
            ppca.maximum_likelihood(x, latent_dim)


# --- the Pyro model and the simulator ---


def test_model_joint_matches_closed_forms(data):
    """With z drawn from the exact posterior, log p(x, z) - log q(z) is the log evidence for every z."""
    x, W, b = data
    noise_variance = NOISE_SCALE**2
    mean, covariance = ppca.posterior(x, W, b, noise_variance)
    exact = pyro.distributions.MultivariateNormal(mean, covariance)
    log_evidence = ppca.log_marginal_likelihood(x, W, b, noise_variance)
    for _ in range(3):
        z = exact.sample()
        trace = poutine.trace(poutine.condition(ppca.model, data={"z": z})).get_trace(x, W, b, NOISE_SCALE)
        elbo_sample = trace.log_prob_sum() - exact.log_prob(z).sum()
        np.testing.assert_allclose(elbo_sample.item(), log_evidence.item(), rtol=1e-10)


def test_model_sites_and_shapes(data):
    x, W, b = data
    trace = poutine.trace(ppca.model).get_trace(None, W, b, NOISE_SCALE, num_points=7)
    assert trace.nodes["z"]["value"].shape == (7, LATENT_DIM)
    assert trace.nodes["z"]["fn"].event_shape == (LATENT_DIM,)
    assert trace.nodes["x"]["value"].shape == (7, DATA_DIM)
    assert trace.nodes["x"]["value"].dtype == torch.float64
    assert not trace.nodes["z"]["is_observed"] and not trace.nodes["x"]["is_observed"]
    assert trace.nodes["data"]["value"].shape == (7,)

    trace = poutine.trace(ppca.model).get_trace(x, W, b, NOISE_SCALE)
    assert trace.nodes["x"]["is_observed"] and trace.nodes["x"]["value"] is x
    assert trace.nodes["z"]["value"].shape == (NUM_POINTS, LATENT_DIM)

    # Defaults: nothing passed draws a default-sized data set in torch's default dtype.
    drawn = ppca.model()
    assert drawn.shape == (ppca.DEFAULT_NUM_POINTS, ppca.DEFAULT_DATA_DIM)
    assert drawn.dtype == torch.get_default_dtype()
    assert ppca.model(x).shape == x.shape  # W defaults to eye(D, K), D read off x
    assert poutine.trace(ppca.model).get_trace(x, latent_dim=3).nodes["z"]["value"].shape == (NUM_POINTS, 3)


def test_model_rejects_mismatched_shapes(data):
    x, W, b = data
    with pytest.raises(ValueError, match="latent_dim"):
        ppca.model(x, W, b, NOISE_SCALE, latent_dim=LATENT_DIM + 1)
    with pytest.raises(ValueError, match="b must have shape"):
        ppca.model(x, W, b[:-1], NOISE_SCALE)
    with pytest.raises(ValueError, match="x must have shape"):
        ppca.model(x[:, :-1], W, b, NOISE_SCALE)


def test_simulate_is_reproducible_and_private():
    state = torch.get_rng_state()
    first = ppca.simulate(50, 4, 2, 0.3, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    second = ppca.simulate(50, 4, 2, 0.3, seed=5)
    other = ppca.simulate(50, 4, 2, 0.3, seed=6)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])

    x, W, b = first
    assert x.shape == (50, 4) and W.shape == (4, 2) and b.shape == (4,)
    assert x.dtype == torch.get_default_dtype()
    assert ppca.simulate(seed=5, dtype=torch.float64)[0].dtype == torch.float64


def test_simulate_draws_from_the_model():
    """A large simulated data set recovers its generating covariance W W^T + sigma^2 I and mean b."""
    x, W, b = ppca.simulate(20_000, 4, 2, 0.3, seed=7, dtype=torch.float64)
    W_ml, b_ml, noise_variance = ppca.maximum_likelihood(x, 2)
    np.testing.assert_allclose(b_ml.numpy(), b.numpy(), atol=0.05)
    np.testing.assert_allclose((W_ml @ W_ml.T).numpy(), (W @ W.T).numpy(), atol=0.1 * W.square().sum().item())
    np.testing.assert_allclose(noise_variance.item(), 0.3**2, rtol=0.05)
