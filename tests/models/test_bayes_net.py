"""The fully visible sigmoid belief network against a hand-written loop, brute-force enumeration, its own
generating parameters, and a chi-square test of its ancestral sampler."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats

from ppvi.models import bayes_net


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread is fastest, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _all_images(height: int, width: int) -> torch.Tensor:
    """Every binary image of the size, in raster order of their bits: ``(2^(h w), h, w)``, float64."""
    bits = list(itertools.product([0.0, 1.0], repeat=height * width))
    return torch.tensor(bits, dtype=torch.float64).reshape(-1, height, width)


def _random_network(image_shape, seed: int = 1) -> bayes_net.FVSBN:
    return bayes_net.FVSBN(image_shape, seed=seed, init_scale=1.0).double()


def test_log_likelihood_is_the_hand_written_chain_of_logistic_regressions():
    network = _random_network((3, 4))
    weight = network.weight.detach().numpy()
    bias = network.bias.detach().numpy()
    generator = torch.Generator().manual_seed(2)
    images = torch.bernoulli(torch.full((5, 3, 4), 0.4, dtype=torch.float64), generator=generator)
    for image, value in zip(images, network.log_prob(images), strict=True):
        x = image.reshape(-1).numpy()
        by_hand = 0.0
        for d in range(x.size):
            logit = bias[d] + sum(weight[d, j] * x[j] for j in range(d))  # parents: the pixels before d only
            by_hand += stats.bernoulli.logpmf(x[d], 1 / (1 + math.exp(-logit)))
        assert float(value) == pytest.approx(by_hand, rel=1e-10)


def test_likelihood_normalises_over_every_binary_image():
    network = _random_network((3, 2))
    assert float(network.log_prob(_all_images(3, 2)).exp().sum()) == pytest.approx(1.0, abs=1e-12)


def test_output_i_never_depends_on_input_j_at_or_after_i():
    network = _random_network((4, 5))
    point = torch.rand(1, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    jacobian = torch.autograd.functional.jacobian(lambda x: network.logits(x.reshape(1, 4, 5)).reshape(-1),
                                                 point.reshape(-1))
    at_or_after = torch.ones(20, 20).triu().bool()
    assert (jacobian[at_or_after] == 0).all()  # exactly zero, not merely small
    assert (jacobian[~at_or_after] != 0).all()  # and every earlier pixel is a parent


def test_ancestral_samples_follow_the_likelihood():
    network = _random_network((2, 2), seed=4)
    draws = network.sample(4000, seed=5)
    codes = (draws.reshape(-1, 4) * torch.tensor([8.0, 4.0, 2.0, 1.0])).sum(1).long()  # raster bits -> index
    observed = np.bincount(codes.numpy(), minlength=16)
    expected = 4000 * network.log_prob(_all_images(2, 2)).exp().numpy()
    assert stats.chisquare(observed, expected).pvalue > 1e-3


def test_sampling_is_seeded_binary_and_leaves_the_global_random_state_alone():
    network = _random_network((3, 3))
    state = torch.get_rng_state()
    first, again, other = network.sample(6, seed=7), network.sample(6, seed=7), network.sample(6, seed=8)
    assert torch.equal(torch.get_rng_state(), state)
    assert first.shape == (6, 3, 3) and ((first == 0) | (first == 1)).all()
    assert torch.equal(first, again) and not torch.equal(first, other)
    # ancestral sampling pixel by pixel equals the generic sampler (one whole pass per pixel) on the same draws
    generic = bayes_net.AutoregressiveImageModel.sample(network, 6, seed=7)
    assert torch.equal(generic, first)


def test_fit_recovers_the_likelihood_of_the_generating_network():
    truth = _random_network((2, 3), seed=9)
    train = truth.sample(6000, seed=10)
    test = truth.sample(2000, seed=11)
    fitted, result = bayes_net.fit(train, epochs=20, batch_size=250, weight_decay=0.0, learning_rate=2e-2)
    assert result.epochs == 20 and result.losses[-1] < result.losses[0]
    true_value = float(truth.log_prob(test).mean())
    assert float(fitted.log_prob(test).mean()) == pytest.approx(true_value, abs=0.03)


def test_clear_errors_for_images_it_cannot_score():
    network = bayes_net.FVSBN((3, 3))
    with pytest.raises(ValueError, match="binary"):
        network.log_prob(torch.full((2, 3, 3), 0.5))
    with pytest.raises(ValueError, match=r"reshape flat images"):
        network.log_prob(torch.zeros(2, 9))
    with pytest.raises(ValueError, match=r"built for \(3, 3\)"):
        network.log_prob(torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="image_shape"):
        bayes_net.FVSBN((3,))
    with pytest.raises(ValueError, match="num_samples"):
        network.sample(0)
