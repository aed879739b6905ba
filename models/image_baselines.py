"""The "learning to draw MNIST" baselines of the lecture, scored on the same binary test images as the VAE.

- **independent Bernoulli pixels**: ``p(x) = prod_j mu_j^x_j (1 - mu_j)^(1 - x_j)``, maximum likelihood with
  add-``alpha`` (Laplace) smoothing, so a pixel never seen on in training does not give the test set ``-inf``;
- **mixture of Bernoullis** with ``K`` components, fitted by EM (Bishop 2006, PRML section 9.3.3), with the same
  smoothing as a Beta(1 + alpha, 1 + alpha) prior in the M step (MAP-EM);
- **probabilistic PCA** (a Gaussian with low-rank-plus-diagonal covariance; Tipping & Bishop 1999) from
  :mod:`models.ppca`. A Gaussian is a density, so its log density on 0/1 pixels is not a log-probability. Our
  choice: fit and score it on *dequantized* images ``x + u``, ``u ~ U[0, 1)^D`` (Theis, van den Oord & Bethge
  2016): the density then defines the discrete model ``P(x) = int_[0,1)^D p(x + u) du``, whose log-probability is
  at least the expected log density of ``x + u`` (Jensen), so its row is a lower bound in nats comparable with the
  Bernoulli rows (a loose one: the Gaussian wastes mass outside the unit cubes);
- the **VAE**: importance-sampled log-likelihood (:func:`ppvi.amortized.log_likelihood`) and its ELBO.

:func:`baseline_table` puts them in one ``pandas.DataFrame``, in nats per image (higher is better).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import pandas as pd
import torch

from models import ppca

#: Add-alpha smoothing of the Bernoulli probabilities: alpha = 1 is Laplace's rule of succession.
DEFAULT_SMOOTHING = 1.0


def _flat_binary(images, name: str = "images") -> torch.Tensor:
    tensor = torch.as_tensor(images, dtype=torch.float64)
    if tensor.dim() < 2:
        raise ValueError(f"{name} must have shape (num_images, ...), got {tuple(tensor.shape)}")
    tensor = tensor.reshape(tensor.shape[0], -1)
    if not ((tensor == 0) | (tensor == 1)).all():
        raise ValueError(f"{name} must be binary (0/1 pixels): binarize them first, e.g. with ppvi.data.binarize")
    return tensor


def independent_bernoulli(train_images, smoothing: float = DEFAULT_SMOOTHING) -> torch.Tensor:
    """Smoothed maximum-likelihood pixel probabilities ``(sum_n x_nj + alpha) / (N + 2 alpha)``, shape ``(D,)``."""
    if smoothing < 0:
        raise ValueError(f"smoothing must be >= 0, got {smoothing}")
    x = _flat_binary(train_images, "train_images")
    return (x.sum(0) + smoothing) / (x.shape[0] + 2 * smoothing)


def bernoulli_log_likelihood(probabilities: torch.Tensor, images) -> torch.Tensor:
    """``log p(x_n)`` of each image under independent Bernoulli pixels with ``probabilities`` (``(D,)``)."""
    x = _flat_binary(images)
    return x @ probabilities.log() + (1 - x) @ torch.log1p(-probabilities)


class BernoulliMixture(NamedTuple):
    """A mixture of products of Bernoullis: ``p(x) = sum_k weights_k prod_j probabilities_kj^x_j (...)``.

    Attributes
    ----------
    weights : torch.Tensor
        Mixing weights, ``(K,)``.
    probabilities : torch.Tensor
        Pixel probabilities per component, ``(K, D)``.
    log_likelihoods : torch.Tensor
        Training log-likelihood (summed over images, plus the log prior of the smoothing) after each EM iteration:
        non-decreasing, as EM guarantees.
    """

    weights: torch.Tensor
    probabilities: torch.Tensor
    log_likelihoods: torch.Tensor


def _component_log_likelihoods(probabilities: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return x @ probabilities.log().T + (1 - x) @ torch.log1p(-probabilities).T


def bernoulli_mixture(
    train_images,
    num_components: int = 10,
    *,
    iterations: int = 200,
    smoothing: float = DEFAULT_SMOOTHING,
    tolerance: float = 1e-6,
    seed: int = 0,
) -> BernoulliMixture:
    """Fit a mixture of Bernoullis by (MAP-)EM (Bishop 2006, section 9.3.3).

    E step: responsibilities ``r_nk`` proportional to ``weights_k p_k(x_n)``. M step: ``weights_k = N_k / N`` and
    ``probabilities_kj = (sum_n r_nk x_nj + alpha) / (N_k + 2 alpha)``, the mode under a Beta(1 + alpha, 1 + alpha)
    prior. Components start from the data mean perturbed at random (Bishop's initialisation, uniform in
    ``[0.25, 0.75]`` mixed one to one with the mean). Stops when the objective gains less than ``tolerance`` per
    image.
    """
    if not isinstance(num_components, int) or num_components < 1:
        raise ValueError(f"num_components must be a positive integer, got {num_components!r}")
    x = _flat_binary(train_images, "train_images")
    num_images, _ = x.shape
    generator = torch.Generator().manual_seed(seed)
    mean = independent_bernoulli(x, smoothing)
    probabilities = 0.5 * mean + 0.5 * (0.25 + 0.5 * torch.rand(num_components, x.shape[1], generator=generator,
                                                                 dtype=torch.float64))
    weights = torch.full((num_components,), 1.0 / num_components, dtype=torch.float64)
    trace = []
    for _ in range(iterations):
        joint = _component_log_likelihoods(probabilities, x) + weights.log()
        normaliser = torch.logsumexp(joint, 1, keepdim=True)
        log_prior = smoothing * (probabilities.log() + torch.log1p(-probabilities)).sum()
        trace.append(float(normaliser.sum() + log_prior))
        responsibilities = (joint - normaliser).exp()
        counts = responsibilities.sum(0)
        weights = counts / num_images
        probabilities = (responsibilities.T @ x + smoothing) / (counts[:, None] + 2 * smoothing)
        if len(trace) > 1 and trace[-1] - trace[-2] < tolerance * num_images:
            break
    return BernoulliMixture(weights, probabilities, torch.tensor(trace, dtype=torch.float64))


def bernoulli_mixture_log_likelihood(mixture: BernoulliMixture, images) -> torch.Tensor:
    """``log p(x_n)`` of each image under the mixture."""
    x = _flat_binary(images)
    return torch.logsumexp(_component_log_likelihoods(mixture.probabilities, x) + mixture.weights.log(), 1)


def dequantize(images, seed: int = 0) -> torch.Tensor:
    """``x + u``, ``u ~ U[0, 1)`` per pixel, flattened to ``(num_images, D)``, float64."""
    x = _flat_binary(images)
    generator = torch.Generator().manual_seed(seed)
    return x + torch.rand(x.shape, generator=generator, dtype=torch.float64)


def ppca_log_likelihood(train_images, test_images, latent_dim: int = 10, seed: int = 0) -> float:
    """Mean log density of dequantized test images under pPCA fitted (maximum likelihood) to dequantized training
    images: a lower bound, in nats per image, on the log-probability of the discrete model it induces."""
    train = dequantize(train_images, seed)
    test = dequantize(test_images, seed + 1)
    W, b, noise_variance = ppca.maximum_likelihood(train, latent_dim)
    return float(ppca.log_marginal_likelihood(test, W, b, noise_variance)) / test.shape[0]


def baseline_table(
    train_images,
    test_images,
    *,
    vae_estimate=None,
    num_components: int = 10,
    ppca_latent_dim: int = 10,
    smoothing: float = DEFAULT_SMOOTHING,
    seed: int = 0,
) -> pd.DataFrame:
    """The lecture's table: test log-likelihood (nats per image, higher is better) of each baseline on the same
    binary test images.

    Parameters
    ----------
    train_images, test_images
        Binary images ``(N, h, w)``.
    vae_estimate : ppvi.amortized.LikelihoodEstimate, optional
        The VAE's importance-sampled estimate on ``test_images``: adds its row (IS log-likelihood, ELBO beside).
    num_components : int
        ``K`` of the Bernoulli mixture.
    ppca_latent_dim : int
        Latent dimension of pPCA.

    Returns
    -------
    pandas.DataFrame
        Index ``model``; columns ``test log-likelihood`` (nats/image), ``ELBO`` (VAE only) and ``how``.
    """
    probabilities = independent_bernoulli(train_images, smoothing)
    mixture = bernoulli_mixture(train_images, num_components, smoothing=smoothing, seed=seed)
    independent = float(bernoulli_log_likelihood(probabilities, test_images).mean())
    mixed = float(bernoulli_mixture_log_likelihood(mixture, test_images).mean())
    gaussian = ppca_log_likelihood(train_images, test_images, ppca_latent_dim, seed)
    rows = [
        ("independent Bernoulli pixels", independent, math.nan, f"exact; add-{smoothing:g} smoothing"),
        (f"mixture of {num_components} Bernoullis", mixed, math.nan, "exact; MAP-EM"),
        (f"pPCA (K={ppca_latent_dim}), dequantized", gaussian, math.nan, "lower bound: Gaussian density of x + U[0,1)"),
    ]
    if vae_estimate is not None:
        rows.append(("VAE", vae_estimate.log_likelihood, vae_estimate.elbo,
                     f"importance sampling, L={vae_estimate.num_samples}"))
    return pd.DataFrame(rows, columns=["model", "test log-likelihood", "ELBO", "how"]).set_index("model")
