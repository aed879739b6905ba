"""The lecture's image baselines against closed forms, known generating parameters and EM's guarantees."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats

from ppvi.models import image_baselines as baselines
from ppvi.models import ppca


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


# -- naive Bayes, the samplers of the baselines and the ladder ----------------------------------------------------


@pytest.fixture
def labelled_digits() -> tuple[torch.Tensor, np.ndarray, torch.Tensor, np.ndarray]:
    """scikit-learn's 8x8 digits binarized at half intensity, split 1200 / 597."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images / 16.0 > 0.5, dtype=torch.float64)
    return images[:1200], bunch.target[:1200], images[1200:], bunch.target[1200:]


def test_naive_bayes_matches_scikit_learn_bernoulli_nb(labelled_digits):
    from sklearn.naive_bayes import BernoulliNB

    train, labels, test, test_labels = labelled_digits
    fitted = baselines.naive_bayes(train, labels)
    reference = BernoulliNB(alpha=1.0, binarize=None).fit(train.reshape(1200, -1).numpy(), labels)
    np.testing.assert_allclose(fitted.probabilities.log().numpy(), reference.feature_log_prob_, rtol=1e-12)
    np.testing.assert_allclose(fitted.log_prior.numpy(), reference.class_log_prior_, rtol=1e-12)
    flat = test.reshape(test.shape[0], -1).numpy()
    joint = reference.predict_joint_log_proba(flat)
    np.testing.assert_allclose(baselines.naive_bayes_joint_log_likelihood(fitted, test).numpy(), joint, rtol=1e-10)
    # log p(x) marginalises the label; log p(x | y) removes the prior of the true label
    from scipy.special import logsumexp

    np.testing.assert_allclose(baselines.naive_bayes_log_likelihood(fitted, test).numpy(), logsumexp(joint, 1),
                               rtol=1e-10)
    conditional = baselines.naive_bayes_log_likelihood(fitted, test, test_labels).numpy()
    rows = np.arange(len(test_labels))
    np.testing.assert_allclose(conditional, joint[rows, test_labels] - reference.class_log_prior_[test_labels],
                               rtol=1e-10)
    # it classifies as scikit-learn does (and well: the labels carry information the pixels share)
    predicted = fitted.classes[baselines.naive_bayes_joint_log_likelihood(fitted, test).argmax(1)].numpy()
    np.testing.assert_array_equal(predicted, reference.predict(flat))
    assert (predicted == test_labels).mean() > 0.8


def test_naive_bayes_density_by_hand_and_normalised():
    """Two classes over 3 pixels: p(x) by hand, and summing to one over all 8 images."""
    x = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]).reshape(3, 1, 3)
    fitted = baselines.naive_bayes(x, [4, 4, 7])
    torch.testing.assert_close(fitted.classes, torch.tensor([4, 7]))
    p4 = np.array([3 / 4, 2 / 4, 2 / 4])  # (count + 1) / (2 + 2)
    p7 = np.array([1 / 3, 1 / 3, 1 / 3])  # (0 + 1) / (1 + 2)
    point = np.array([1, 0, 1])
    by_hand = math.log(2 / 3 * np.prod(stats.bernoulli.pmf(point, p4))
                       + 1 / 3 * np.prod(stats.bernoulli.pmf(point, p7)))
    assert float(baselines.naive_bayes_log_likelihood(fitted, x[:1])[0]) == pytest.approx(by_hand)
    every = torch.tensor(list(itertools.product([0.0, 1.0], repeat=3))).reshape(8, 1, 3)
    assert float(baselines.naive_bayes_log_likelihood(fitted, every).exp().sum()) == pytest.approx(1.0)


def test_naive_bayes_errors():
    x = torch.zeros(3, 2, 2)
    with pytest.raises(ValueError, match="one label per image"):
        baselines.naive_bayes(x, [0, 1])
    with pytest.raises(ValueError, match="integer class labels"):
        baselines.naive_bayes(x, [0.5, 1.0, 0.0])
    with pytest.raises(ValueError, match="binary"):
        baselines.naive_bayes(torch.full((3, 2, 2), 0.3), [0, 1, 1])
    fitted = baselines.naive_bayes(x, [0, 1, 1])
    with pytest.raises(ValueError, match="never seen in training"):
        baselines.naive_bayes_log_likelihood(fitted, x, [0, 1, 5])
    with pytest.raises(ValueError, match="one per image"):
        baselines.sample_naive_bayes(fitted, 4, (2, 2), labels=[0, 1])
    with pytest.raises(ValueError, match="num_samples"):
        baselines.sample_naive_bayes(fitted, 0, (2, 2))


def test_baseline_samplers_are_seeded_and_follow_their_models(labelled_digits, mixture_data):
    train, labels, _, _ = labelled_digits
    fitted = baselines.naive_bayes(train, labels)
    state = torch.get_rng_state()
    draws = baselines.sample_naive_bayes(fitted, 2000, (8, 8), seed=1)
    assert draws.shape == (2000, 8, 8) and ((draws == 0) | (draws == 1)).all()
    assert torch.equal(draws, baselines.sample_naive_bayes(fitted, 2000, (8, 8), seed=1))
    mean = (fitted.log_prior.exp()[:, None] * fitted.probabilities).sum(0).reshape(8, 8)
    torch.testing.assert_close(draws.double().mean(0), mean, atol=0.045, rtol=0)  # 4 sd of a mean of 2000
    sevens = baselines.sample_naive_bayes(fitted, 2000, (8, 8), labels=[7] * 2000, seed=2)
    torch.testing.assert_close(sevens.double().mean(0), fitted.probabilities[7].reshape(8, 8), atol=0.045, rtol=0)

    x, probabilities, weights = mixture_data
    mixture = baselines.BernoulliMixture(weights, probabilities, torch.zeros(0))
    mixed = baselines.sample_bernoulli_mixture(mixture, 4000, (3, 4), seed=3)
    torch.testing.assert_close(mixed.double().mean(0).reshape(-1), weights @ probabilities, atol=0.03, rtol=0)
    independent = baselines.sample_independent_bernoulli(probabilities[0], 4000, (3, 4), seed=4)
    torch.testing.assert_close(independent.double().mean(0).reshape(-1), probabilities[0], atol=0.03, rtol=0)
    W, b, noise_variance = ppca.maximum_likelihood(baselines.dequantize(x), 2)
    gaussian = baselines.sample_ppca(W, b, noise_variance, 5, (3, 4), seed=5)
    assert gaussian.shape == (5, 3, 4) and ((gaussian == 0) | (gaussian == 1)).all()
    assert torch.equal(torch.get_rng_state(), state)  # every sampler drew from its own generator


def test_table_with_labels_adds_naive_bayes(mixture_data):
    x, _, _ = mixture_data
    labels = (x.reshape(4000, -1)[:, :6].sum(1) > 3).long()  # a label the pixels predict well
    table = baselines.baseline_table(x[:3000], x[3000:], num_components=2, ppca_latent_dim=2,
                                     train_labels=labels[:3000])
    naive = table.loc["naive Bayes (class-conditional Bernoulli)", "test log-likelihood"]
    assert naive > table.loc["independent Bernoulli pixels", "test log-likelihood"]


def test_ladder_table_puts_published_figures_beside_the_measured_ones():
    rungs = [baselines.Rung("fvsbn", "Bayes net (FVSBN)", -99.0, "exact", 1.0, lambda n, s: torch.zeros(n, 2, 2)),
             baselines.Rung("independent", "independent", -200.0, "exact", 0.1, lambda n, s: torch.zeros(n, 2, 2))]
    table = baselines.ladder_table(rungs, baselines.PUBLISHED_BINARIZED_MNIST)
    assert table.loc["Bayes net (FVSBN)", "test NLL"] == 99.0
    assert table.loc["Bayes net (FVSBN)", "published NLL"] == 97.45
    assert math.isnan(table.loc["independent", "published NLL"])
    seconds, draws = baselines.sampling_costs(rungs, num_samples=3)
    assert list(seconds.index) == ["Bayes net (FVSBN)", "independent"] and draws["independent"].shape == (3, 2, 2)
