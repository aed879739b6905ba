"""The lectures' variational autoencoder on scikit-learn's 8x8 digits: train, score, draw.

Two VAEs are trained with ``models.vae.train`` (``ppvi.fit`` with the fast ``AmortizedELBO``) on dynamically
binarized training digits: one with a 2-D latent space, for the lecture's manifold figure and the latent means
coloured by label, and one with ``--latent-dim`` dimensions for the likelihood table, in which the
importance-sampled test log-likelihood (L = ``--samples``) and the ELBO of the VAE stand next to the baselines
(independent Bernoulli pixels, a mixture of Bernoullis, pPCA), all on the same binarized test digits. Figures
(PNG): samples from the prior, reconstructions, the manifold grid over z in [-2, 2]^2, latent means by label,
and the ELBO curves.

Run: ``python examples/vae.py [--output vae_figures] [--steps 3000] [--latent-dim 10] [--samples 1000]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ppvi.amortized import log_likelihood  # noqa: E402
from ppvi.data import binarize, digits  # noqa: E402
from ppvi.models import image_baselines  # noqa: E402
from ppvi.models import vae as vae_module  # noqa: E402

#: Hidden units for 64-pixel digits (400 is for 784-pixel MNIST).
HIDDEN_DIM = 128
#: Adam's learning rate: a small network on a small data set tolerates three times the usual 1e-3.
LEARNING_RATE = 3e-3


def main(output: str | Path = "vae_figures", steps: int = 3000, latent_dim: int = 10, samples: int = 1000,
         seed: int = 0) -> dict[str, Path]:
    """Train, print the likelihood table, save the figures; returns their paths by name."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    data = digits(seed=seed)
    train_images = torch.tensor(data.train_images)  # probabilities: binarized afresh at every step
    test_images = torch.tensor(binarize(data.test_images, seed=seed + 1))  # one fixed draw to score
    options = dict(hidden_dim=HIDDEN_DIM, steps=steps, learning_rate=LEARNING_RATE, dynamic_binarization=True,
                   device="cpu", seed=seed)
    fits = {
        "2-D": vae_module.train(train_images, latent_dim=2, **options),
        f"{latent_dim}-D": vae_module.train(train_images, latent_dim=latent_dim, **options),
    }
    vae = fits[f"{latent_dim}-D"].guide
    estimate = log_likelihood(vae.model, vae, test_images, num_samples=samples, seed=seed)
    train_binary = torch.tensor(binarize(data.train_images, seed=seed + 2))
    table = image_baselines.baseline_table(train_binary, test_images, vae_estimate=estimate, seed=seed)
    print(f"Test log-likelihood on {test_images.shape[0]} binarized digits (nats per image, higher is better):")
    print(table.to_string(float_format=lambda value: f"{value:.2f}"))

    paths = {}

    def save(name: str, figure) -> None:
        paths[name] = output / f"{name}.png"
        figure.savefig(paths[name], dpi=120, bbox_inches="tight")
        plt.close(figure)

    save("samples", vae_module.plot_samples(vae))
    save("reconstructions", vae_module.plot_reconstructions(vae, test_images))
    save("manifold", vae_module.plot_manifold(fits["2-D"].guide))
    save("latent_means", vae_module.plot_latent_means(fits["2-D"].guide, test_images, data.test_labels))
    figure, ax = plt.subplots(figsize=(7, 4))
    for label, fit in fits.items():
        vae_module.plot_elbo(fit, label=f"{label} latent", ax=ax)
    ax.axhline(table.loc["independent Bernoulli pixels", "test log-likelihood"], ls="--", color="gray",
               label="independent pixels (test)")
    ax.legend(loc="lower right", fontsize=8)
    save("elbo", figure)
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="vae_figures")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--latent-dim", type=int, default=10)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    for name, path in main(arguments.output, arguments.steps, arguments.latent_dim, arguments.samples,
                           arguments.seed).items():
        print(f"{name}: {path}")
