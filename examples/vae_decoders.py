"""Bernoulli against Gaussian decoders: the same VAE on scikit-learn's 8x8 digits with the two likelihoods.

Two VAEs with the same encoder and decoder networks (``models.vae.train``: ``ppvi.fit`` with the fast
``AmortizedELBO``) differ only in ``p(x | z)``:

- ``likelihood="bernoulli"``: each pixel is a coin with probability ``sigmoid(decoder(z))``; its log-likelihood is
  minus the binary cross-entropy (Kingma & Welling 2014, appendix C.1). It scores binary pixels, so it is trained on
  dynamically binarized digits (a fresh draw of every pixel with probability its grey level, each time an image is
  used) and scored on one fixed binarization of the test digits;
- ``likelihood="gaussian"``: each pixel is ``N(decoder(z), sigma^2)`` with a fixed ``sigma`` (``--observation-scale``,
  0.1 of the [0, 1] range), so its log-likelihood is the squared error divided by ``2 sigma^2``, plus a constant
  (Kingma & Welling 2014, appendix C.2). It is trained and scored on the grey levels themselves.

The held-out ELBO of each (and the importance-sampled log-likelihood, the IWAE bound of Burda et al. 2016 with
``L = --samples``) is printed in nats per image, but the two are not comparable: one is a probability of 64 binary
pixels, the other a density on 64 grey levels (whose value depends on ``sigma`` and on the units of the pixels).
What can be compared is the pictures: the reconstructions (decoder means at the encoder's mean) against the grey
test digits, with their mean squared error beside that of predicting every digit by the mean training image, and
the samples from the prior. The Bernoulli decoder's mean is a probability image, grey where it is unsure; the
Gaussian's is a grey-level image, and nothing keeps it inside [0, 1].

Run: ``python examples/vae_decoders.py [--output-directory vae_decoders] [--steps 3000] [--latent-dim 10]
[--observation-scale 0.1] [--samples 1000]``. Writes ``reconstructions.png`` and ``samples.png``.

References
----------
D. P. Kingma and M. Welling (2014). Auto-encoding variational Bayes. *ICLR*.

Y. Burda, R. Grosse and R. Salakhutdinov (2016). Importance weighted autoencoders. *ICLR*.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ppvi.amortized import log_likelihood  # noqa: E402
from ppvi.data import binarize, digits  # noqa: E402
from ppvi.models import vae as vae_module  # noqa: E402

#: The two decoders, in the order they are drawn.
DECODERS = ("bernoulli", "gaussian")
#: Hidden units for 64-pixel digits, and Adam's learning rate (as examples/vae.py).
HIDDEN_DIM = 128
LEARNING_RATE = 3e-3
#: Standard deviation of the Gaussian decoder, in the units of the pixels ([0, 1]).
OBSERVATION_SCALE = 0.1
#: Test digits shown reconstructed, and samples drawn from each decoder.
SHOWN_DIGITS = 12
NUM_SAMPLES = 64


def train_decoders(data, steps: int, latent_dim: int, hidden_dim: int, observation_scale: float, seed: int) -> dict:
    """Train one VAE per decoder on the training digits: ``{"bernoulli": fit, "gaussian": fit}``."""
    images = torch.tensor(data.train_images)
    options = dict(latent_dim=latent_dim, hidden_dim=hidden_dim, steps=steps, learning_rate=LEARNING_RATE,
                   device="cpu", seed=seed, progress=False)
    return {
        "bernoulli": vae_module.train(images, likelihood="bernoulli", dynamic_binarization=True, **options),
        "gaussian": vae_module.train(images, likelihood="gaussian", observation_scale=observation_scale, **options),
    }


@torch.no_grad()
def reconstruct(vae: vae_module.VAE, images: torch.Tensor) -> torch.Tensor:
    """Decoder means at the encoder's means, ``E[x | z = E_q[z | x]]``, shape of ``images``."""
    return vae.decode(vae.encode(images)[0])


def evaluate(fits: dict, data, samples: int, seed: int) -> dict[str, dict[str, float]]:
    """Per decoder: held-out ELBO and IWAE log-likelihood (nats per image, on the data it models) and the mean
    squared error of its reconstructions of the grey test digits; and the error of the mean training image."""
    grey = torch.tensor(data.test_images)
    test_data = {"bernoulli": torch.tensor(binarize(data.test_images, seed=seed + 1)), "gaussian": grey}
    rows = {}
    for name, fit in fits.items():
        vae = fit.guide
        estimate = log_likelihood(vae.model, vae, test_data[name], num_samples=samples, seed=seed)
        error = (reconstruct(vae, test_data[name]) - grey).square().mean()
        rows[name] = {"held-out ELBO": estimate.elbo, "held-out log-likelihood": estimate.log_likelihood,
                      "reconstruction MSE": float(error)}
    mean_image = torch.tensor(data.train_images).mean(0)
    rows["mean training image"] = {"held-out ELBO": float("nan"), "held-out log-likelihood": float("nan"),
                                   "reconstruction MSE": float((grey - mean_image).square().mean())}
    return rows


def _tile(rows: list[torch.Tensor]) -> np.ndarray:
    """Rows of images ``(n, h, w)`` tiled into one array, with one-pixel gaps (0: white in ``gray_r``)."""
    count, height, width = rows[0].shape
    grid = np.zeros((len(rows) * (height + 1) - 1, count * (width + 1) - 1), dtype=np.float32)
    for row, images in enumerate(rows):
        for column, image in enumerate(images.detach().cpu().numpy()):
            top, left = row * (height + 1), column * (width + 1)
            grid[top : top + height, left : left + width] = image
    return grid


def plot_reconstructions(fits: dict, data, rows: dict, seed: int) -> Figure:
    """Grey test digits, their binarization (what the Bernoulli decoder sees), and each decoder's reconstruction."""
    grey = torch.tensor(data.test_images[:SHOWN_DIGITS])
    binary = torch.tensor(binarize(data.test_images, seed=seed + 1)[:SHOWN_DIGITS])
    pictures = [grey, binary, reconstruct(fits["bernoulli"].guide, binary), reconstruct(fits["gaussian"].guide, grey)]
    labels = ["test digits (grey levels)", "binarized (Bernoulli's data)",
              f"Bernoulli: mean probability (MSE {rows['bernoulli']['reconstruction MSE']:.4f})",
              f"Gaussian: mean grey level (MSE {rows['gaussian']['reconstruction MSE']:.4f})"]
    figure = Figure(figsize=(10, 3.2), layout="constrained")
    axes = figure.subplots()
    height = grey.shape[1] + 1
    axes.imshow(_tile(pictures), cmap="gray_r", vmin=0, vmax=1)
    axes.set_yticks([row * height + height / 2 - 1 for row in range(len(labels))], labels)
    axes.set_xticks([])
    axes.set_title("reconstructions: decoder means at the encoder's mean\n(MSE against the grey test digits)")
    return figure


def plot_samples(fits: dict, rows: dict, seed: int) -> Figure:
    """Decoder means of the same draws ``z ~ N(0, I)`` from the prior, one panel per decoder."""
    figure = Figure(figsize=(10, 5.4), layout="constrained")
    for axes, name in zip(figure.subplots(1, 2), DECODERS, strict=True):
        vae_module.plot_samples(fits[name].guide, NUM_SAMPLES, seed=seed, ax=axes)
        units = "binary pixels" if name == "bernoulli" else "grey levels, a density"
        axes.set_title(f"{name.capitalize()} decoder: held-out ELBO {rows[name]['held-out ELBO']:.1f} nats\n"
                       f"per image ({units})")
    figure.suptitle("samples from the prior (decoder means); the ELBOs are not comparable across decoders")
    return figure


def main(output_directory: str | Path = "vae_decoders", steps: int = 3000, latent_dim: int = 10,
         samples: int = 1000, hidden_dim: int = HIDDEN_DIM, observation_scale: float = OBSERVATION_SCALE,
         seed: int = 0) -> dict[str, Path]:
    """Train a Bernoulli and a Gaussian VAE on the digits, print their held-out scores and save the figures.

    Parameters
    ----------
    output_directory : str or pathlib.Path
        Where ``reconstructions.png`` and ``samples.png`` are written (created if missing).
    steps : int
        Adam steps of each VAE.
    latent_dim : int
        ``K``, the latent dimensions of both.
    samples : int
        ``L``, importance samples of the held-out log-likelihood (and of its ELBO).
    hidden_dim : int
        Hidden units of the encoder and the decoder.
    observation_scale : float
        ``sigma`` of the Gaussian decoder.
    seed : int
        Seed of the split, the binarization of the test digits, the training and the draws.

    Returns
    -------
    dict of str to pathlib.Path
        ``{"reconstructions": ..., "samples": ...}``: the saved figures.
    """
    output_directory = Path(output_directory)
    output_directory.mkdir(parents=True, exist_ok=True)
    data = digits(seed=seed)
    fits = train_decoders(data, steps, latent_dim, hidden_dim, observation_scale, seed)
    rows = evaluate(fits, data, samples, seed)
    print(f"Held-out scores on {data.test_images.shape[0]} test digits (nats per image, L={samples}); the ELBOs of "
          "the two decoders are in different units (binary pixels, grey-level densities):")
    print(f"{'':>20} {'held-out ELBO':>14} {'log-likelihood':>15} {'reconstruction MSE':>19}")
    for name, row in rows.items():
        print(f"{name:>20} {row['held-out ELBO']:14.2f} {row['held-out log-likelihood']:15.2f} "
              f"{row['reconstruction MSE']:19.4f}")
    paths = {"reconstructions": output_directory / "reconstructions.png",
             "samples": output_directory / "samples.png"}
    plot_reconstructions(fits, data, rows, seed).savefig(paths["reconstructions"], dpi=120)
    plot_samples(fits, rows, seed).savefig(paths["samples"], dpi=120)
    print(f"figures saved to {paths['reconstructions']} and {paths['samples']}")
    return paths


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-directory", default="vae_decoders", help="where to save the figures")
    parser.add_argument("--steps", type=int, default=3000, help="Adam steps of each VAE (default: 3000)")
    parser.add_argument("--latent-dim", type=int, default=10, help="latent dimensions (default: 10)")
    parser.add_argument("--samples", type=int, default=1000, help="importance samples L (default: 1000)")
    parser.add_argument("--hidden-dim", type=int, default=HIDDEN_DIM, help=f"hidden units (default: {HIDDEN_DIM})")
    parser.add_argument("--observation-scale", type=float, default=OBSERVATION_SCALE,
                        help=f"sigma of the Gaussian decoder (default: {OBSERVATION_SCALE})")
    parser.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    return parser.parse_args()


if __name__ == "__main__":
    arguments = _arguments()
    main(arguments.output_directory, arguments.steps, arguments.latent_dim, arguments.samples, arguments.hidden_dim,
         arguments.observation_scale, arguments.seed)
