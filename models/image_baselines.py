"""The "learning to draw MNIST" baselines of the lecture, scored on the same binary test images as the VAE.

- **independent Bernoulli pixels**: ``p(x) = prod_j mu_j^x_j (1 - mu_j)^(1 - x_j)``, maximum likelihood with
  add-``alpha`` (Laplace) smoothing, so a pixel never seen on in training does not give the test set ``-inf``;
- **naive Bayes** as the lecture means it: a label ``y`` and, given it, independent Bernoulli pixels,
  ``p(x, y) = pi_y prod_j mu_yj^x_j (1 - mu_yj)^(1 - x_j)``, fitted with the labels (class frequencies, and
  add-``alpha`` smoothed pixel frequencies per class: scikit-learn's ``BernoulliNB``); scored as a density of
  the images alone, ``p(x) = sum_y p(x, y)`` (a mixture whose components were fitted with their labels known);
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

The whole "learning to draw MNIST" ladder, these rungs and the explicit-density models of
:mod:`models.bayes_net`, :mod:`models.pixelcnn` and :mod:`models.pixelrnn` beside the VAE, is fitted by
:func:`fit_ladder`; :func:`ladder_table` gives its likelihood table beside the published figures,
:func:`sampling_costs` the measured seconds per 64 samples, and :func:`plot_ladder_samples` the figure.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import pandas as pd
import torch

from ppvi.models import ppca

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


def _generator(seed: int | None) -> torch.Generator | None:
    return torch.Generator().manual_seed(seed) if seed is not None else None


def _check_count(num_samples: int) -> None:
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")


def sample_independent_bernoulli(probabilities: torch.Tensor, num_samples: int, image_shape,
                                 seed: int | None = 0) -> torch.Tensor:
    """``num_samples`` binary images ``(n, *image_shape)`` with independent pixels; ``seed`` seeds a private
    generator (the global random state is untouched; ``None`` uses it)."""
    _check_count(num_samples)
    uniforms = torch.rand(num_samples, probabilities.shape[-1], generator=_generator(seed), dtype=torch.float64)
    return (uniforms < probabilities.double()).to(torch.float32).reshape(num_samples, *image_shape)


class NaiveBayes(NamedTuple):
    """Class-conditional independent Bernoulli pixels: ``p(x, y) = prior_y prod_j p_yj^x_j (1 - p_yj)^(1 - x_j)``.

    Attributes
    ----------
    classes : torch.Tensor
        The labels, sorted, ``(K,)`` int64.
    log_prior : torch.Tensor
        ``log prior_y``: the log class frequencies of the training labels, ``(K,)``.
    probabilities : torch.Tensor
        Smoothed pixel frequencies per class, ``(K, D)``.
    """

    classes: torch.Tensor
    log_prior: torch.Tensor
    probabilities: torch.Tensor


def naive_bayes(train_images, train_labels, smoothing: float = DEFAULT_SMOOTHING) -> NaiveBayes:
    """Fit naive Bayes with the labels: ``prior_y = N_y / N`` and ``p_yj = (sum_{n: y_n = y} x_nj + alpha) /
    (N_y + 2 alpha)`` (maximum likelihood with add-``alpha`` smoothing; scikit-learn's ``BernoulliNB(alpha)``).

    Parameters
    ----------
    train_images
        Binary images ``(N, ...)``.
    train_labels
        Integer labels ``(N,)``.
    smoothing : float
        ``alpha`` (1 is Laplace's rule).
    """
    if smoothing < 0:
        raise ValueError(f"smoothing must be >= 0, got {smoothing}")
    x = _flat_binary(train_images, "train_images")
    labels = torch.as_tensor(train_labels)
    if labels.dim() != 1 or labels.shape[0] != x.shape[0]:
        raise ValueError(f"train_labels must have shape ({x.shape[0]},), one label per image, got "
                         f"{tuple(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        if labels.dtype == torch.bool or not bool((labels == labels.round()).all()):
            raise ValueError("train_labels must be integer class labels (e.g. 0..9), got non-integer values")
    labels = labels.long()
    classes, index, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    one_hot = torch.nn.functional.one_hot(index, classes.shape[0]).to(torch.float64)
    probabilities = (one_hot.T @ x + smoothing) / (counts[:, None].double() + 2 * smoothing)
    log_prior = counts.double().log() - math.log(x.shape[0])
    return NaiveBayes(classes, log_prior, probabilities)


def naive_bayes_joint_log_likelihood(model: NaiveBayes, images) -> torch.Tensor:
    """``log p(x_n, y = k)`` for every image and class, ``(N, K)`` (scikit-learn's ``predict_joint_log_proba``)."""
    return _component_log_likelihoods(model.probabilities, _flat_binary(images)) + model.log_prior


def naive_bayes_log_likelihood(model: NaiveBayes, images, labels=None) -> torch.Tensor:
    """``log p(x_n) = log sum_y p(x_n, y)`` of each image (the density of images, comparable with the other
    rungs); with ``labels``, the class-conditional ``log p(x_n | y_n)`` instead."""
    joint = naive_bayes_joint_log_likelihood(model, images)
    if labels is None:
        return torch.logsumexp(joint, 1)
    position = _class_positions(model, labels, joint.shape[0])
    return joint.gather(1, position[:, None])[:, 0] - model.log_prior[position]


def _class_positions(model: NaiveBayes, labels, count: int) -> torch.Tensor:
    """Index into ``model.classes`` of each label, or a ``ValueError`` for a wrong shape or an unseen class."""
    labels = torch.as_tensor(labels).long()
    if labels.shape != (count,):
        raise ValueError(f"labels must have shape ({count},), one per image, got {tuple(labels.shape)}")
    position = torch.searchsorted(model.classes, labels)
    known = (position < model.classes.shape[0]) & (model.classes[position.clamp(max=model.classes.shape[0] - 1)]
                                                   == labels)
    if not bool(known.all()):
        raise ValueError(f"labels hold classes never seen in training: {sorted(set(labels[~known].tolist()))}")
    return position


def sample_naive_bayes(model: NaiveBayes, num_samples: int, image_shape, labels=None,
                       seed: int | None = 0) -> torch.Tensor:
    """Ancestral sampling: ``y ~ prior`` (or the given ``labels``, one per sample), then the pixels given ``y``."""
    _check_count(num_samples)
    generator = _generator(seed)
    if labels is None:
        index = torch.multinomial(model.log_prior.exp(), num_samples, replacement=True, generator=generator)
    else:
        index = _class_positions(model, labels, num_samples)
    uniforms = torch.rand(num_samples, model.probabilities.shape[1], generator=generator, dtype=torch.float64)
    return (uniforms < model.probabilities[index]).to(torch.float32).reshape(num_samples, *image_shape)


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
    # sum_j x_j log p_kj + (1 - x_j) log(1 - p_kj) = x @ logit(p_k) + sum_j log(1 - p_kj): one product, and no
    # (N, D) copy 1 - x (which dominated EM's time on MNIST)
    log_off = torch.log1p(-probabilities)
    return x @ (probabilities.log() - log_off).T + log_off.sum(-1)


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


def sample_bernoulli_mixture(mixture: BernoulliMixture, num_samples: int, image_shape,
                             seed: int | None = 0) -> torch.Tensor:
    """Ancestral sampling from the mixture: a component ``k ~ weights``, then its independent pixels."""
    _check_count(num_samples)
    generator = _generator(seed)
    component = torch.multinomial(mixture.weights, num_samples, replacement=True, generator=generator)
    uniforms = torch.rand(num_samples, mixture.probabilities.shape[1], generator=generator, dtype=torch.float64)
    return (uniforms < mixture.probabilities[component]).to(torch.float32).reshape(num_samples, *image_shape)


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


def sample_ppca(W: torch.Tensor, b: torch.Tensor, noise_variance, num_samples: int, image_shape,
                seed: int | None = 0) -> torch.Tensor:
    """Draws of the discrete model pPCA induces on dequantized images, ``x = floor(b + W z + sigma eps)``, clipped
    to {0, 1} for display (the Gaussian puts some mass outside ``[0, 2)``, where the induced model has pixel
    values other than 0 and 1)."""
    _check_count(num_samples)
    generator = _generator(seed)
    latent = torch.randn(num_samples, W.shape[1], generator=generator, dtype=torch.float64)
    noise = torch.randn(num_samples, W.shape[0], generator=generator, dtype=torch.float64)
    values = b.double() + latent @ W.double().T + math.sqrt(float(noise_variance)) * noise
    return values.floor().clamp(0, 1).to(torch.float32).reshape(num_samples, *image_shape)


def baseline_table(
    train_images,
    test_images,
    *,
    vae_estimate=None,
    num_components: int = 10,
    ppca_latent_dim: int = 10,
    smoothing: float = DEFAULT_SMOOTHING,
    seed: int = 0,
    train_labels=None,
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
    train_labels : array, optional
        Labels of ``train_images``: adds the naive Bayes row (scored as ``p(x) = sum_y p(x, y)``).

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
    if train_labels is not None:
        classes = naive_bayes(train_images, train_labels, smoothing)
        rows.insert(1, ("naive Bayes (class-conditional Bernoulli)",
                        float(naive_bayes_log_likelihood(classes, test_images).mean()), math.nan,
                        f"exact p(x) = sum_y p(x, y); fitted with labels, add-{smoothing:g} smoothing"))
    if vae_estimate is not None:
        rows.append(("VAE", vae_estimate.log_likelihood, vae_estimate.elbo,
                     f"importance sampling, L={vae_estimate.num_samples}"))
    return pd.DataFrame(rows, columns=["model", "test log-likelihood", "ELBO", "how"]).set_index("model")


# -- the whole ladder: "learning to draw MNIST" ------------------------------------------------------------------


class Published(NamedTuple):
    """A published test negative log-likelihood on Larochelle & Murray's statically binarized MNIST."""

    nll: float
    source: str


#: Published test NLLs (nats per image) beside which the MNIST ladder is reported, by rung key. All are stated as
#: recalled (and as the issue quoted them): the pages we could search did not reach the papers' tables, so check
#: them against the papers before quoting. Burda et al.'s VAE figure is on *dynamically* binarized MNIST
#: (benchmarks/vae_mnist.py cites it too), not this statically binarized set.
PUBLISHED_BINARIZED_MNIST: dict[str, Published] = {
    "mixture": Published(137.64, "Larochelle & Murray 2011 (NADE), Table 2: mixture of 500 Bernoullis"),
    "fvsbn": Published(97.45, "Larochelle & Murray 2011 (NADE), Table 2: FVSBN"),
    "vae": Published(86.76, "Burda, Grosse & Salakhutdinov 2016, Table 1: VAE, 1 stochastic layer, k=1 "
                            "(dynamically binarized MNIST)"),
    "pixelcnn": Published(81.30, "van den Oord, Kalchbrenner & Kavukcuoglu 2016, Table 4: PixelCNN"),
    "pixelrnn": Published(80.54, "van den Oord et al. 2016, Table 4: Row LSTM (Diagonal BiLSTM, 7 layers: 79.20)"),
}


@dataclass(frozen=True)
class LadderSettings:
    """How each rung of :func:`fit_ladder` is fitted (defaults: digits-sized; see ``benchmarks/image_models.py``
    for the MNIST settings).

    Attributes
    ----------
    num_components, ppca_latent_dim, smoothing
        The Bernoulli mixture's ``K``, pPCA's latent dimension, add-alpha smoothing.
    fvsbn_epochs
        Adam epochs of the Bayes net (models.bayes_net.fit).
    autoregressive_epochs, autoregressive_train_images, batch_size, learning_rate
        Epochs of PixelCNN and PixelRNN, on the first ``autoregressive_train_images`` training images (all when
        ``None``), minibatch size and Adam's step.
    pixelcnn_channels, pixelcnn_layers, gated
        PixelCNN's feature maps and residual blocks; ``gated=True`` fits the Gated PixelCNN (vertical and
        horizontal stacks of gated layers, ``pixelcnn_layers`` of them) in its place.
    pixelrnn_channels, pixelrnn_hidden, pixelrnn_layers
        PixelRNN's feature maps, LSTM state size and Row LSTM layers.
    vae_latent_dim, vae_hidden_dim, vae_steps, vae_learning_rate, importance_samples
        The VAE (models.vae.train, batch 128) and ``L`` of its importance-sampled log-likelihood.
    seed
        Seed of every fit, evaluation and draw.
    """

    num_components: int = 10
    ppca_latent_dim: int = 10
    smoothing: float = DEFAULT_SMOOTHING
    fvsbn_epochs: int = 60
    autoregressive_epochs: int = 30
    autoregressive_train_images: int | None = None
    batch_size: int = 64
    learning_rate: float = 3e-3
    pixelcnn_channels: int = 32
    pixelcnn_layers: int = 4
    gated: bool = False
    pixelrnn_channels: int = 32
    pixelrnn_hidden: int = 32
    pixelrnn_layers: int = 2
    vae_latent_dim: int = 10
    vae_hidden_dim: int = 128
    vae_steps: int = 3000
    vae_learning_rate: float = 3e-3
    importance_samples: int = 1000
    seed: int = 0


class LadderData(NamedTuple):
    """Binary images for the ladder: ``(N, H, W)`` float32 tensors; labels ``None`` where the set has none."""

    train_images: torch.Tensor
    train_labels: torch.Tensor | None
    validation_images: torch.Tensor
    test_images: torch.Tensor


#: Share of the digits' training split held out for early stopping (MNIST has Larochelle & Murray's own split).
DIGITS_VALIDATION_FRACTION = 0.2


def ladder_data(dataset: str = "digits", root=None, *, seed: int = 0) -> LadderData:
    """The binary images of the ladder.

    Parameters
    ----------
    dataset : {"digits", "mnist"}
        ``"digits"``: scikit-learn's 8x8 digits (``ppvi.data.digits``, 1,437 / 360 split), binarized once
        (``ppvi.data.binarize``: training with numpy seed ``seed + 2``, test with ``seed + 1``, as examples/vae.py),
        the last ``DIGITS_VALIDATION_FRACTION`` of the training split held out for validation; labels kept.
        ``"mnist"``: Larochelle & Murray's statically binarized MNIST (``ppvi.data.binarized_mnist``): train 50,000,
        valid 10,000, test 10,000, no labels.
    root : path, optional
        For ``"mnist"``: the ``binarized_mnist.npz`` or its folder (default: ``ppvi.data``'s).
    seed : int
        Seed of the digits' split and binarization.
    """
    from ppvi import data as datasets

    if dataset == "digits":
        digits = datasets.digits(seed=seed)
        train = torch.from_numpy(datasets.binarize(digits.train_images, seed=seed + 2))
        test = torch.from_numpy(datasets.binarize(digits.test_images, seed=seed + 1))
        labels = torch.from_numpy(digits.train_labels)
        kept = round(train.shape[0] * (1 - DIGITS_VALIDATION_FRACTION))
        return LadderData(train[:kept], labels[:kept], train[kept:], test)
    if dataset == "mnist":
        mnist = datasets.binarized_mnist(root, include_validation=True)
        train = torch.from_numpy(mnist.train_images)
        # include_validation=True appends the 10,000 'valid' images after the 50,000 'train' images
        return LadderData(train[:50_000], None, train[50_000:], torch.from_numpy(mnist.test_images))
    raise ValueError(f"dataset must be 'digits' or 'mnist', got {dataset!r}")


class Rung(NamedTuple):
    """One fitted model of the ladder.

    Attributes
    ----------
    key : str
        Short name (``"independent"``, ``"naive_bayes"``, ``"mixture"``, ``"fvsbn"``, ``"ppca"``, ``"vae"``,
        ``"pixelcnn"``, ``"pixelrnn"``), the key of :data:`PUBLISHED_BINARIZED_MNIST`.
    name : str
        Row label.
    log_likelihood : float
        Mean test log-likelihood, nats per image (a lower bound for pPCA and the VAE).
    how : str
        How it was computed.
    fit_seconds : float
        Wall time of fitting and of scoring the test images (for the VAE, most of it is the importance sampling).
    sample : callable
        ``sample(num_samples, seed)``: binary images ``(num_samples, H, W)``.
    """

    key: str
    name: str
    log_likelihood: float
    how: str
    fit_seconds: float
    sample: Callable[[int, int | None], torch.Tensor]


def fit_ladder(
    train_images,
    test_images,
    *,
    train_labels=None,
    validation_images=None,
    settings: LadderSettings | None = None,
    models: tuple[str, ...] | None = None,
    progress: bool = False,
) -> list[Rung]:
    """Fit every rung of the lecture's ladder on the same binary training images and score it on the same binary
    test images: independent Bernoulli pixels, naive Bayes (needs ``train_labels``), a mixture of Bernoullis, the
    Bayes net (FVSBN), pPCA (its bound on dequantized images), the VAE (IS with ``L = importance_samples``),
    PixelCNN and PixelRNN (Row LSTM).

    Parameters
    ----------
    train_images, test_images
        Binary ``(N, H, W)``.
    train_labels : array, optional
        Labels of the training images; without them the naive Bayes rung is left out.
    validation_images : array, optional
        Binary ``(M, H, W)`` held out from training: the networks trained by epochs (FVSBN, PixelCNN, PixelRNN)
        keep the weights of their best epoch on them (early stopping).
    settings : LadderSettings, optional
        Sizes, epochs, steps; the defaults suit 8x8 digits.
    models : tuple of str, optional
        Keys of the rungs to fit (all by default).
    progress : bool
        Print each rung as it is fitted.

    Returns
    -------
    list of Rung
    """
    from ppvi.amortized import log_likelihood
    from ppvi.models import bayes_net, pixelcnn, pixelrnn
    from ppvi.models import vae as vae_module
    from ppvi.models.autoregressive import check_images

    settings = settings or LadderSettings()
    train = check_images(train_images, name="train_images").float()
    test = check_images(test_images, train.shape[1:], name="test_images").float()
    image_shape = tuple(train.shape[1:])
    validation = None
    if validation_images is not None:
        validation = check_images(validation_images, image_shape, name="validation_images").float()
    stopping = "best epoch on validation" if validation is not None else "last epoch"
    seed, smoothing = settings.seed, settings.smoothing
    wanted = set(models) if models is not None else None
    rungs: list[Rung] = []

    def add(key: str, fit: Callable[[], tuple[str, float, str, Callable]]) -> None:
        if wanted is not None and key not in wanted:
            return
        started = time.perf_counter()
        name, value, how, sampler = fit()
        rungs.append(Rung(key, name, value, how, time.perf_counter() - started, sampler))
        if progress:
            print(f"{name}: {value:.2f} nats per image ({rungs[-1].fit_seconds:.1f} s)", flush=True)

    def independent():
        probabilities = independent_bernoulli(train, smoothing)
        value = float(bernoulli_log_likelihood(probabilities, test).mean())
        return ("independent Bernoulli pixels", value, f"exact; add-{smoothing:g} smoothing",
                lambda n, s: sample_independent_bernoulli(probabilities, n, image_shape, s))

    def naive():
        classes = naive_bayes(train, train_labels, smoothing)
        value = float(naive_bayes_log_likelihood(classes, test).mean())
        return ("naive Bayes (class-conditional Bernoulli)", value,
                f"exact p(x) = sum_y p(y) p(x | y); {classes.classes.shape[0]} labelled classes",
                lambda n, s: sample_naive_bayes(classes, n, image_shape, seed=s))

    def mixture():
        fitted = bernoulli_mixture(train, settings.num_components, smoothing=smoothing, seed=seed)
        value = float(bernoulli_mixture_log_likelihood(fitted, test).mean())
        return (f"mixture of {settings.num_components} Bernoullis", value, "exact; MAP-EM",
                lambda n, s: sample_bernoulli_mixture(fitted, n, image_shape, s))

    def fvsbn():
        model, result = bayes_net.fit(train, epochs=settings.fvsbn_epochs, validation_images=validation, seed=seed)
        value = float(model.log_prob(test).mean())
        how = (f"exact; Adam, L2 {bayes_net.DEFAULT_WEIGHT_DECAY:g}, epoch {result.best_epoch} of {result.epochs} "
               f"({stopping})")
        return "Bayes net (FVSBN)", value, how, model.sample

    def gaussian():
        W, b, noise_variance = ppca.maximum_likelihood(dequantize(train, seed), settings.ppca_latent_dim)
        dequantized = dequantize(test, seed + 1)
        value = float(ppca.log_marginal_likelihood(dequantized, W, b, noise_variance)) / test.shape[0]
        return (f"pPCA (K={settings.ppca_latent_dim}), dequantized", value,
                "lower bound: Gaussian density of x + U[0,1)",
                lambda n, s: sample_ppca(W, b, noise_variance, n, image_shape, s))

    def vae():
        fit = vae_module.train(train, latent_dim=settings.vae_latent_dim, hidden_dim=settings.vae_hidden_dim,
                               steps=settings.vae_steps, learning_rate=settings.vae_learning_rate, device="cpu",
                               seed=seed, progress=False)
        network = fit.guide
        estimate = log_likelihood(network.model, network, test, num_samples=settings.importance_samples,
                                  chunk_size=min(100, settings.importance_samples), seed=seed)

        @torch.no_grad()
        def sample(n: int, s: int | None) -> torch.Tensor:
            _check_count(n)
            generator = _generator(s)
            latent = torch.randn(n, network.latent_dim, generator=generator)
            probabilities = network.decode(latent.to(next(network.parameters()))).double().cpu()
            uniforms = torch.rand(probabilities.shape, generator=generator, dtype=torch.float64)
            return (uniforms < probabilities).to(torch.float32)

        return (f"VAE (K={settings.vae_latent_dim})", estimate.log_likelihood,
                f"IS lower bound, L={settings.importance_samples} (ELBO {estimate.elbo:.2f}); "
                f"{settings.vae_steps} Adam steps", sample)

    subset = train[: settings.autoregressive_train_images] if settings.autoregressive_train_images else train
    common = dict(epochs=settings.autoregressive_epochs, batch_size=settings.batch_size,
                  learning_rate=settings.learning_rate, validation_images=validation, seed=seed)
    trained_on = f"{subset.shape[0]} training images" if subset.shape[0] < train.shape[0] else "all training images"

    def convolutional():
        model, result = pixelcnn.fit(subset, channels=settings.pixelcnn_channels, num_layers=settings.pixelcnn_layers,
                                     gated=settings.gated, **common)
        value = float(model.log_prob(test).mean())
        name = "Gated PixelCNN" if settings.gated else "PixelCNN"
        layers = "gated layers" if settings.gated else "blocks"
        return (name, value, f"exact; h={settings.pixelcnn_channels}, {settings.pixelcnn_layers} {layers}, epoch "
                             f"{result.best_epoch} of {result.epochs} ({stopping}) on {trained_on}", model.sample)

    def recurrent():
        model, result = pixelrnn.fit(subset, channels=settings.pixelrnn_channels, hidden=settings.pixelrnn_hidden,
                                     num_layers=settings.pixelrnn_layers, **common)
        value = float(model.log_prob(test).mean())
        return ("PixelRNN (Row LSTM)", value, f"exact; h={settings.pixelrnn_hidden}, {settings.pixelrnn_layers} "
                                              f"layers, epoch {result.best_epoch} of {result.epochs} ({stopping}) "
                                              f"on {trained_on}", model.sample)

    add("independent", independent)
    if train_labels is not None:
        add("naive_bayes", naive)
    add("mixture", mixture)
    add("fvsbn", fvsbn)
    add("ppca", gaussian)
    add("vae", vae)
    add("pixelcnn", convolutional)
    add("pixelrnn", recurrent)
    return rungs


def ladder_table(rungs: list[Rung], published: dict[str, Published] | None = None) -> pd.DataFrame:
    """Test negative log-likelihood (nats per image, lower is better) of each rung, with the published figure
    beside it where ``published`` (e.g. :data:`PUBLISHED_BINARIZED_MNIST`) has one.

    Returns
    -------
    pandas.DataFrame
        Index ``model``; columns ``test NLL``, ``published NLL``, ``fit seconds``, ``how``, ``published source``.
    """
    published = published or {}
    rows = []
    for rung in rungs:
        reference = published.get(rung.key)
        rows.append((rung.name, -rung.log_likelihood, reference.nll if reference else math.nan, rung.fit_seconds,
                     rung.how, reference.source if reference else ""))
    columns = ["model", "test NLL", "published NLL", "fit seconds", "how", "published source"]
    return pd.DataFrame(rows, columns=columns).set_index("model")


def sampling_costs(rungs: list[Rung], num_samples: int = 64,
                   seed: int = 0) -> tuple[pd.Series, dict[str, torch.Tensor]]:
    """Seconds to draw ``num_samples`` images from each rung (wall time, one call, after nothing is cached), and
    the draws themselves, by rung name."""
    seconds, draws = {}, {}
    for rung in rungs:
        started = time.perf_counter()
        draws[rung.name] = rung.sample(num_samples, seed)
        seconds[rung.name] = time.perf_counter() - started
    return pd.Series(seconds, name=f"seconds per {num_samples} samples"), draws


def plot_ladder_samples(draws: dict[str, torch.Tensor], seconds: pd.Series | None = None, columns: int = 8,
                        panels_per_row: int = 4):
    """"Learning to draw MNIST": the draws of every model side by side, one panel each, ``panels_per_row`` to a
    row (``seconds`` adds the sampling cost to each title). Returns the figure."""
    import matplotlib.pyplot as plt
    import numpy as np

    panel_rows = math.ceil(len(draws) / panels_per_row)
    panel_columns = min(panels_per_row, len(draws))
    figure, axes = plt.subplots(panel_rows, panel_columns, figsize=(3.2 * panel_columns, 3.8 * panel_rows),
                                squeeze=False, layout="constrained")
    for ax in axes.flat[len(draws):]:
        ax.axis("off")
    for ax, (name, images) in zip(axes.flat, draws.items()):  # noqa: B905 (spare panels stay empty)
        images = images.detach().float().cpu().numpy()
        count, height, width = images.shape
        rows = math.ceil(count / columns)
        grid = np.full((rows * (height + 1) - 1, columns * (width + 1) - 1), 0.5, dtype=np.float32)
        for index, image in enumerate(images):
            row, column = divmod(index, columns)
            top, left = row * (height + 1), column * (width + 1)
            grid[top : top + height, left : left + width] = image
        ax.imshow(grid, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        title = name.replace(" (", "\n(")
        if seconds is not None and name in seconds:
            title += f"\n{seconds[name]:.2g} s per {count}"
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    figure.suptitle("learning to draw: samples from each model")
    return figure
