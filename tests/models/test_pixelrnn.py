"""PixelRNN (Row LSTM): its triangular receptive field, the autoregressive property by exact gradients,
normalisation by enumerating every binary image, the likelihood against a pixel-by-pixel computation, and the
sampler against the likelihood."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats

from ppvi.models import pixelrnn

#: Small networks (4 feature maps, 4 LSTM units, 2 layers): the properties tested do not depend on the size.
SMALL = dict(channels=4, hidden=4, num_layers=2)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread is fastest, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _all_images(height: int, width: int) -> torch.Tensor:
    """Every binary image of the size, ``(2^(h w), h, w)``, float64; image ``k`` has the bits of ``k`` in raster
    order, most significant first."""
    bits = list(itertools.product([0.0, 1.0], repeat=height * width))
    return torch.tensor(bits, dtype=torch.float64).reshape(-1, height, width)


def _network(image_shape, seed: int = 1) -> pixelrnn.PixelRNN:
    network = pixelrnn.PixelRNN(image_shape, seed=seed, **SMALL).double()
    with torch.no_grad():  # non-trivial biases too, so that no conditional is 1/2 by symmetry
        for parameter in network.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, dtype=torch.float64,
                                             generator=torch.Generator().manual_seed(seed)))
    return network


def test_the_row_lstm_receptive_field_is_a_triangle():
    """Pixel (1, 0) does not see pixel (0, 4), four columns right in the row above (the 7x7 mask-A layer reaches
    three), but pixel (2, 0) does (each row step of the LSTM state widens the field by one column each side): the
    paper's triangular field (its Figure 4), which misses some earlier pixels."""
    network = _network((3, 6))
    points = 4
    inputs = torch.rand(points * 18, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    jacobian = torch.autograd.functional.jacobian(lambda x: network.logits(x.reshape(points, 3, 6)).reshape(-1),
                                                 inputs)
    size = jacobian.abs().reshape(points, 18, points, 18).diagonal(dim1=0, dim2=2).amax(-1)  # (output, input)
    assert size[6, 4] == 0 and size[6, 3] > 0
    assert size[12, 4] > 0


def test_output_i_never_depends_on_input_j_at_or_after_i():
    height, width = 5, 6
    network = _network((height, width))
    pixels, points = height * width, 4
    inputs = torch.rand(points * pixels, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    # images do not interact, so the Jacobian of the batch is block diagonal: one (pixels x pixels) block each
    jacobian = torch.autograd.functional.jacobian(
        lambda x: network.logits(x.reshape(points, height, width)).reshape(-1), inputs)
    blocks = torch.stack([jacobian[k * pixels:(k + 1) * pixels, k * pixels:(k + 1) * pixels] for k in range(points)])
    at_or_after = torch.ones(pixels, pixels).triu().bool()
    assert (blocks[:, at_or_after] == 0).all()  # exactly zero, at every point: the masks, not small weights
    # not vacuous: each pixel sees its left neighbour and the pixel above (at some point: a ReLU may be off)
    left = [(i, i - 1) for i in range(pixels) if i % width]
    above = [(i, i - width) for i in range(width, pixels)]
    assert all(blocks[:, i, j].abs().max() > 0 for i, j in left + above)


def test_likelihood_normalises_over_every_binary_image():
    network = _network((3, 2))
    assert float(network.log_prob(_all_images(3, 2)).exp().sum()) == pytest.approx(1.0, abs=1e-12)


def test_likelihood_is_the_product_of_conditionals_computed_one_pixel_at_a_time():
    """Each conditional from a separate pass in which every pixel from ``i`` on is replaced by noise."""
    height, width = 4, 4
    network = _network((height, width))
    generator = torch.Generator().manual_seed(3)
    images = torch.bernoulli(torch.full((3, height, width), 0.5, dtype=torch.float64), generator=generator)
    for image, value in zip(images, network.log_prob(images), strict=True):
        total = 0.0
        for i in range(height * width):
            corrupted = image.reshape(-1).clone()
            corrupted[i:] = torch.rand(height * width - i, dtype=torch.float64, generator=generator)
            with torch.no_grad():
                logit = float(network.logits(corrupted.reshape(1, height, width)).reshape(-1)[i])
            total += stats.bernoulli.logpmf(float(image.reshape(-1)[i]), 1 / (1 + math.exp(-logit)))
        assert float(value) == pytest.approx(total, rel=1e-10)


def test_samples_follow_the_likelihood():
    network = _network((2, 2), seed=4)
    draws = network.sample(4000, seed=5)
    codes = (draws.reshape(-1, 4) * torch.tensor([8.0, 4.0, 2.0, 1.0], dtype=torch.float64)).sum(1).long()
    observed = np.bincount(codes.numpy(), minlength=16)
    expected = 4000 * network.log_prob(_all_images(2, 2)).exp().numpy()
    assert stats.chisquare(observed, expected).pvalue > 1e-3


def test_sampling_is_seeded_binary_and_leaves_the_global_random_state_alone():
    network = pixelrnn.PixelRNN((4, 3), **SMALL)
    state = torch.get_rng_state()
    first, again, other = network.sample(5, seed=7), network.sample(5, seed=7), network.sample(5, seed=8)
    assert torch.equal(torch.get_rng_state(), state)
    assert first.shape == (5, 4, 3) and ((first == 0) | (first == 1)).all()
    assert torch.equal(first, again) and not torch.equal(first, other)
    # the same seed builds the same network, without touching the global random state either
    assert all(torch.equal(p, q) for p, q in zip(network.parameters(), pixelrnn.PixelRNN((4, 3), **SMALL).parameters(),
                                                  strict=True))
    assert torch.equal(torch.get_rng_state(), state)


def test_training_learns_a_two_image_distribution():
    """Images all on or all off, half and half: the best model has NLL log 2 (the first pixel decides)."""
    generator = torch.Generator().manual_seed(6)
    on = torch.bernoulli(torch.full((512,), 0.5), generator=generator)
    images = on[:, None, None].expand(512, 3, 3).contiguous()
    network, result = pixelrnn.fit(images, epochs=12, batch_size=32, learning_rate=1e-2, channels=8, num_layers=1)
    assert result.losses[-1] < result.losses[0]
    assert -float(network.log_prob(images).mean()) == pytest.approx(math.log(2), abs=0.05)


def test_clear_errors():
    network = pixelrnn.PixelRNN((3, 3), **SMALL)
    with pytest.raises(ValueError, match="binary"):
        network.log_prob(torch.full((2, 3, 3), 0.5))
    with pytest.raises(ValueError, match="reshape flat images"):
        network.log_prob(torch.zeros(2, 9))
    with pytest.raises(ValueError, match=r"built for \(3, 3\)"):
        network.log_prob(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="binary"):
        pixelrnn.fit(torch.rand(4, 3, 3))
    with pytest.raises(ValueError, match="hidden"):
        pixelrnn.PixelRNN((3, 3), hidden=0)
