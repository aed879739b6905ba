"""The lecture's image baselines against closed forms, known generating parameters and EM's guarantees."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from models import image_baselines as baselines
from models import ppca


@pytest.fixture
def mixture_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4000 binary 12-pixel vectors from two well separated Bernoulli products, weights 0.3 / 0.7."""
    generator = torch.Generator().manual_seed(0)
    probabilities = torch.tensor([[0.9] * 6 + [0.1] * 6, [0.2] * 6 + [0.8] * 6], dtype=torch.float64)
    weights = torch.tensor([0.3, 0.7], dtype=torch.float64)
    component = torch.multinomial(weights, 4000, replacement=True, generator=generator)
    x = torch.bernoulli(probabilities[component], generator=generator)
    return x.reshape(4000, 3, 4), probabilities, weights


def test_independent_bernoulli_is_laplace_smoothed_maximum_likelihood():
    x = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]], [[0.0, 0.0]]])
    probabilities = baselines.independent_bernoulli(x)
    torch.testing.assert_close(probabilities, torch.tensor([3 / 5, 1 / 5], dtype=torch.float64))
    expected = stats.bernoulli.logpmf([1, 0], [3 / 5, 1 / 5]).sum()
    assert float(baselines.bernoulli_log_likelihood(probabilities, x[:1])[0]) == pytest.approx(expected)


def test_bernoulli_mixture_recovers_the_generating_parameters(mixture_data):
    x, probabilities, weights = mixture_data
    fit = baselines.bernoulli_mixture(x, 2, seed=1)
    order = fit.weights.argsort()  # components are identified up to a permutation
    torch.testing.assert_close(fit.weights[order], weights, atol=0.03, rtol=0)
    torch.testing.assert_close(fit.probabilities[order], probabilities, atol=0.04, rtol=0)
    assert (fit.log_likelihoods.diff() >= -1e-8).all()  # EM never decreases its objective


def test_one_component_mixture_is_the_independent_model(mixture_data):
    x, _, _ = mixture_data
    mixture = baselines.bernoulli_mixture(x, 1)
    independent = baselines.independent_bernoulli(x)
    torch.testing.assert_close(mixture.probabilities[0], independent)
    torch.testing.assert_close(baselines.bernoulli_mixture_log_likelihood(mixture, x),
                               baselines.bernoulli_log_likelihood(independent, x))


def test_mixture_log_likelihood_by_hand(mixture_data):
    x, probabilities, weights = mixture_data
    mixture = baselines.BernoulliMixture(weights, probabilities, torch.zeros(0))
    point = x[0].reshape(-1).numpy()
    by_hand = math.log(sum(w * np.prod(stats.bernoulli.pmf(point, p)) for w, p in zip(weights.numpy(),
                                                                                   probabilities.numpy(),
                                                                                   strict=True)))
    assert float(baselines.bernoulli_mixture_log_likelihood(mixture, x[:1])[0]) == pytest.approx(by_hand)


def test_ppca_row_is_the_gaussian_density_of_dequantized_images(mixture_data):
    x, _, _ = mixture_data
    train, test = x[:3000], x[3000:]
    value = baselines.ppca_log_likelihood(train, test, latent_dim=2)
    W, b, noise_variance = ppca.maximum_likelihood(baselines.dequantize(train, 0), 2)
    covariance = (W @ W.T + noise_variance * torch.eye(12, dtype=torch.float64)).numpy()
    expected = stats.multivariate_normal(b.numpy(), covariance).logpdf(baselines.dequantize(test, 1).numpy()).mean()
    assert value == pytest.approx(expected, rel=1e-9)


def test_table_and_errors(mixture_data):
    x, _, _ = mixture_data
    table = baselines.baseline_table(x[:3000], x[3000:], num_components=2, ppca_latent_dim=2)
    assert list(table.columns) == ["test log-likelihood", "ELBO", "how"]
    assert table.loc["mixture of 2 Bernoullis", "test log-likelihood"] > table.loc[
        "independent Bernoulli pixels", "test log-likelihood"]
    with pytest.raises(ValueError, match="binary"):
        baselines.independent_bernoulli(torch.full((3, 2, 2), 0.5))
    with pytest.raises(ValueError, match="num_components"):
        baselines.bernoulli_mixture(x, 0)
