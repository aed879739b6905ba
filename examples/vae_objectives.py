"""KL annealing and free bits against the plain ELBO: which latent dimensions a VAE uses, and at what cost.

A VAE can leave latent dimensions unused: ``q(z_k | x) = p(z_k)`` for every ``x``, so ``z_k`` costs no KL and
carries no information ("posterior collapse"; Bowman et al. 2016). Two remedies change the objective while training:

- KL annealing (Bowman et al. 2016): the KL term's weight grows linearly from 0 to 1 over the first
  ``--warmup-steps`` steps, so the encoder learns to carry information before the prior pulls it back
  (``kl_warmup_steps`` of :func:`models.vae.train` and :class:`ppvi.amortized.AmortizedELBO`);
- free bits (Kingma et al. 2016, appendix C): each latent dimension's KL, averaged over the minibatch, is charged
  at least ``lambda`` nats (``--free-bits``), so the gradient never pushes a dimension below ``lambda`` and no
  dimension gains anything by collapsing (``free_bits`` of the same two).

Three VAEs (the same networks, seed and steps) are trained on dynamically binarized 8x8 digits with the plain
ELBO and with each remedy, and scored on one fixed binarization of the test digits: the KL of each latent
dimension, ``E_x KL(q(z_k | x) || N(0, 1))`` in closed form; the active units, dimensions whose encoder mean varies
across test digits, ``Cov_x(E_q[z_k | x]) > 0.01`` (Burda et al. 2016, section 5.2); and the held-out ELBO and
importance-sampled log-likelihood (L = ``--samples``), both of the plain model, whatever the objective trained.

Run: ``python examples/vae_objectives.py [--output-directory vae_objectives] [--steps 3000] [--latent-dim 20]
[--warmup-steps 1000] [--free-bits 0.25] [--samples 1000]``. Writes ``kl_per_dimension.png`` and ``elbo.png``.

References
----------
S. R. Bowman, L. Vilnis, O. Vinyals, A. M. Dai, R. Jozefowicz and S. Bengio (2016). Generating sentences from a
continuous space. *CoNLL*.

D. P. Kingma, T. Salimans, R. Jozefowicz, X. Chen, I. Sutskever and M. Welling (2016). Improved variational
inference with inverse autoregressive flow. *NeurIPS*.

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

#: Hidden units for 64-pixel digits, and Adam's learning rate (as examples/vae.py).
HIDDEN_DIM = 128
LEARNING_RATE = 3e-3
#: Burda et al.'s (2016) threshold on ``Cov_x(E_q[z_k | x])`` for an active unit.
ACTIVITY_THRESHOLD = 0.01
#: Colour of each objective in the figures.
COLOURS = {"ELBO": "C0", "KL annealing": "C1", "free bits": "C2"}


def objectives(warmup_steps: int, free_bits: float) -> dict[str, dict]:
    """The three objectives as options of :func:`models.vae.train`, by name."""
    return {"ELBO": {}, "KL annealing": {"kl_warmup_steps": warmup_steps}, "free bits": {"free_bits": free_bits}}


def train_all(data, steps: int, latent_dim: int, hidden_dim: int, warmup_steps: int, free_bits: float,
              seed: int) -> dict:
    """One VAE per objective, the same networks, seed and steps: ``{name: ppvi.Fit}``."""
    images = torch.tensor(data.train_images)  # probabilities: binarized afresh at every step
    options = dict(latent_dim=latent_dim, hidden_dim=hidden_dim, steps=steps, learning_rate=LEARNING_RATE,
                   dynamic_binarization=True, device="cpu", seed=seed, progress=False)
    return {name: vae_module.train(images, **options, **extra)
            for name, extra in objectives(warmup_steps, free_bits).items()}


@torch.no_grad()
def kl_per_dimension(vae: vae_module.VAE, images: torch.Tensor) -> torch.Tensor:
    """``E_x KL(q(z_k | x) || N(0, 1))`` for each latent dimension ``k``, in closed form, shape ``(K,)``."""
    loc, scale = vae.encode(images)
    return (0.5 * (loc.square() + scale.square() - 1.0) - scale.log()).mean(0)


@torch.no_grad()
def activity(vae: vae_module.VAE, images: torch.Tensor) -> torch.Tensor:
    """``Cov_x(E_q[z_k | x])`` for each latent dimension (Burda et al. 2016, eq. 19), shape ``(K,)``."""
    return vae.encode(images)[0].var(0)


def evaluate(fits: dict, test_images: torch.Tensor, samples: int, seed: int) -> dict[str, dict]:
    """Per objective: KL per dimension, activity, active units, held-out ELBO and log-likelihood (nats per image)."""
    rows = {}
    for name, fit in fits.items():
        vae = fit.guide
        estimate = log_likelihood(vae.model, vae, test_images, num_samples=samples, seed=seed)
        kl, variance = kl_per_dimension(vae, test_images), activity(vae, test_images)
        rows[name] = {"kl": kl.numpy(), "activity": variance.numpy(),
                      "active units": int((variance > ACTIVITY_THRESHOLD).sum()), "KL": float(kl.sum()),
                      "held-out ELBO": estimate.elbo, "held-out log-likelihood": estimate.log_likelihood}
    return rows


def plot_kl(rows: dict, free_bits: float) -> Figure:
    """Left: each objective's KL per latent dimension, sorted. Right: each dimension's activity, sorted."""
    figure = Figure(figsize=(13, 4.6), layout="constrained")
    kl_axes, activity_axes = figure.subplots(1, 2)
    width = 0.8 / len(rows)
    for index, (name, row) in enumerate(rows.items()):
        positions = np.arange(row["kl"].size) + (index - (len(rows) - 1) / 2) * width
        kl_axes.bar(positions, np.sort(row["kl"])[::-1], width, color=COLOURS[name],
                    label=f"{name}: {row['active units']} active, KL {row['KL']:.1f} nats")
        activity_axes.semilogy(np.sort(row["activity"])[::-1], marker="o", color=COLOURS[name], label=name)
    kl_axes.axhline(free_bits, color=COLOURS["free bits"], ls="--", lw=1, label=f"free bits lambda = {free_bits:g}")
    kl_axes.set_xlabel("latent dimension (sorted by KL)")
    kl_axes.set_ylabel("E_x KL(q(z_k | x) || p(z_k)) (nats)")
    kl_axes.set_title("KL per latent dimension, test digits")
    kl_axes.legend(fontsize=8)
    activity_axes.axhline(ACTIVITY_THRESHOLD, color="grey", ls="--", lw=1, label="active-unit threshold 0.01")
    activity_axes.set_xlabel("latent dimension (sorted by activity)")
    activity_axes.set_ylabel("Cov_x(E_q[z_k | x])")
    activity_axes.set_title("activity (Burda et al. 2016): unused dimensions fall below 0.01")
    activity_axes.legend(fontsize=8)
    return figure


def plot_elbo(fits: dict, rows: dict) -> Figure:
    """The objective each VAE trained, per step and per image, and its held-out ELBO (dashed)."""
    figure = Figure(figsize=(9, 5), layout="constrained")
    axes = figure.subplots()
    low, high = np.inf, -np.inf
    for name, fit in fits.items():
        drawn = len(axes.get_lines())
        vae_module.plot_elbo(fit, label=name, ax=axes)
        for line in axes.get_lines()[drawn:]:
            line.set_color(COLOURS[name])
        axes.axhline(rows[name]["held-out ELBO"], color=COLOURS[name], ls="--", lw=1)
        per_image = fit.elbo[np.isfinite(fit.elbo)] / fit.args[0].shape[0]
        low, high = min(low, np.percentile(per_image, 2)), max(high, per_image.max())
    axes.set_ylim(low - 2, high + 2)
    axes.set_title("the objective each VAE trained, per step (annealing: with that step's KL weight)\n"
                   "dashed: held-out ELBO of each")
    axes.legend(loc="lower right", fontsize=7)
    return figure


def main(output_directory: str | Path = "vae_objectives", steps: int = 3000, latent_dim: int = 20,
         warmup_steps: int = 1000, free_bits: float = 0.25, samples: int = 1000, hidden_dim: int = HIDDEN_DIM,
         seed: int = 0) -> dict[str, Path]:
    """Train a VAE with each objective, print the table and save the two figures.

    Parameters
    ----------
    output_directory : str or pathlib.Path
        Where ``kl_per_dimension.png`` and ``elbo.png`` are written (created if missing).
    steps : int
        Adam steps of each VAE.
    latent_dim : int
        ``K``: enough dimensions for the plain ELBO to leave some unused.
    warmup_steps : int
        Steps over which KL annealing raises the KL weight from 0 to 1.
    free_bits : float
        ``lambda``, free nats per latent dimension.
    samples : int
        ``L``, importance samples of the held-out log-likelihood (and of its ELBO).
    hidden_dim : int
        Hidden units of the encoder and the decoder.
    seed : int
        Seed of the split, the test binarization, the training and the draws.

    Returns
    -------
    dict of str to pathlib.Path
        ``{"kl_per_dimension": ..., "elbo": ...}``: the saved figures.
    """
    output_directory = Path(output_directory)
    output_directory.mkdir(parents=True, exist_ok=True)
    data = digits(seed=seed)
    test_images = torch.tensor(binarize(data.test_images, seed=seed + 1))  # one fixed draw to score
    fits = train_all(data, steps, latent_dim, hidden_dim, warmup_steps, free_bits, seed)
    rows = evaluate(fits, test_images, samples, seed)
    print(f"{latent_dim}-D VAEs on {test_images.shape[0]} binarized test digits (nats per image, L={samples}):")
    print(f"{'':>13} {'active units':>12} {'KL':>7} {'min KL_k':>8} {'held-out ELBO':>14} {'log-likelihood':>15}")
    for name, row in rows.items():
        print(f"{name:>13} {row['active units']:>12d} {row['KL']:7.2f} {row['kl'].min():8.3f} "
              f"{row['held-out ELBO']:14.2f} {row['held-out log-likelihood']:15.2f}")
    paths = {"kl_per_dimension": output_directory / "kl_per_dimension.png", "elbo": output_directory / "elbo.png"}
    plot_kl(rows, free_bits).savefig(paths["kl_per_dimension"], dpi=120)
    plot_elbo(fits, rows).savefig(paths["elbo"], dpi=120)
    print(f"figures saved to {paths['kl_per_dimension']} and {paths['elbo']}")
    return paths


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-directory", default="vae_objectives", help="where to save the figures")
    parser.add_argument("--steps", type=int, default=3000, help="Adam steps of each VAE (default: 3000)")
    parser.add_argument("--latent-dim", type=int, default=20, help="latent dimensions (default: 20)")
    parser.add_argument("--warmup-steps", type=int, default=1000, help="KL annealing steps (default: 1000)")
    parser.add_argument("--free-bits", type=float, default=0.25, help="free nats per dimension (default: 0.25)")
    parser.add_argument("--samples", type=int, default=1000, help="importance samples L (default: 1000)")
    parser.add_argument("--hidden-dim", type=int, default=HIDDEN_DIM, help=f"hidden units (default: {HIDDEN_DIM})")
    parser.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    return parser.parse_args()


if __name__ == "__main__":
    arguments = _arguments()
    main(arguments.output_directory, arguments.steps, arguments.latent_dim, arguments.warmup_steps,
         arguments.free_bits, arguments.samples, arguments.hidden_dim, arguments.seed)
