"""Probabilistic PCA's exact posterior over the latent coordinates against ppvi's mean-field and full-rank fits.

With the loadings ``W``, the offset ``b`` and the noise scale ``sigma`` fixed, the posterior of pPCA's latent
coordinates is Gaussian and known exactly (Tipping & Bishop 1999, §3.2; Bishop 2006, eq. 12.42): the ``z_n`` are
independent, each ``N(M^{-1} W^T (x_n - b), sigma^2 M^{-1})`` with ``M = W^T W + sigma^2 I``, and the evidence
``log p(x)`` is known in closed form too (:func:`models.ppca.log_marginal_likelihood`). So is the best mean-field
Gaussian (Bishop 2006, §10.1.2): with ``Lambda = M / sigma^2`` the posterior precision, it has the exact means and
the sds ``1 / sqrt(Lambda_kk)`` of the *conditionals*, narrower than the marginals by ``sqrt(1 - rho^2)``, and its
ELBO falls short of ``log p(x)`` by ``KL(q || p) = N/2 (sum_k log Lambda_kk - log det Lambda)`` (``-N/2 log(1 -
rho^2)`` for ``K = 2``). A full-rank Gaussian holds the posterior exactly: its ELBO is ``log p(x)``.

The loadings here are two columns of length :data:`LOADING_LENGTH` at an angle whose cosine is
:data:`LOADING_COSINE` (nearly parallel): the data pin ``z_1 + z_2`` down better than ``z_1 - z_2``, so the
posterior of each ``z_n`` is strongly correlated (``rho = -0.81`` at the defaults) and the mean-field guide cannot
hold it. Both guides are fitted by ``ppvi.fit`` on the ``N x K`` local latents (full-rank: one dense ``NK x NK``
covariance, of which only the ``N`` diagonal ``K x K`` blocks are non-zero in the posterior), from ppvi's Laplace
start, with Adam's learning rate lowered to 0.01 (:data:`LEARNING_RATE`).

Run: ``python examples/ppca.py [--output-directory ppca] [--num-points 50] [--steps S] [--seed 0]``. Writes
``ppca_posterior.png`` and prints, per guide, the ELBO against its closed form and the error of the moments.

References
----------
M. E. Tipping and C. M. Bishop (1999). Probabilistic principal component analysis. *Journal of the Royal
Statistical Society, Series B* 61(3), 611-622.

C. M. Bishop (2006). *Pattern Recognition and Machine Learning*, §10.1.2 and §12.2. Springer.

A. Kucukelbir, D. Tran, R. Ranganath, A. Gelman and D. M. Blei (2017). Automatic differentiation variational
inference. *Journal of Machine Learning Research* 18(14), 1-45.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Ellipse  # noqa: E402

import ppvi  # noqa: E402
from ppvi.models import ppca  # noqa: E402

#: The guides compared with the exact posterior.
GUIDES = ("meanfield", "fullrank")
#: Data: ``N`` points in ``D`` dimensions from ``K = 2`` latent coordinates, with noise sd ``sigma``.
NUM_POINTS = 50
DATA_DIM = 5
NOISE_SCALE = 1.0
#: The two loadings: their length (in units of ``sigma``) and the cosine of the angle between them.
LOADING_LENGTH = 3.0
LOADING_COSINE = 0.9
#: Adam's learning rate. ppvi's default after a Laplace start (0.1) makes the full-rank guide drift away from the
#: exact posterior it starts on (its gradient is then zero up to rounding, and Adam scales rounding noise up to
#: full steps), so both guides get a smaller rate.
LEARNING_RATE = 0.01
#: Guide draws behind the moments of each fit.
NUM_DRAWS = 4000
#: Points whose posterior contours are drawn.
SHOWN_POINTS = 3
#: Contours at one and two standard deviations (Mahalanobis radius).
RADII = (1.0, 2.0)
#: Colour and line style of the exact posterior and of each guide.
STYLES = {"exact": ("black", "-"), "meanfield": ("C0", "--"), "fullrank": ("C1", ":")}
LABELS = {"exact": "exact posterior", "meanfield": "mean-field", "fullrank": "full-rank"}


def loadings(data_dim: int = DATA_DIM, length: float = LOADING_LENGTH, cosine: float = LOADING_COSINE,
             seed: int = 0) -> torch.Tensor:
    """Two loadings of length ``length`` at an angle of cosine ``cosine``, in a random plane of ``R^data_dim``.

    Returns
    -------
    torch.Tensor
        ``W``, shape ``(data_dim, 2)``, with ``W^T W = length^2 [[1, cosine], [cosine, 1]]``.
    """
    generator = torch.Generator().manual_seed(seed)
    plane, _ = torch.linalg.qr(torch.randn(data_dim, 2, generator=generator, dtype=torch.float64))
    first, second = plane.T
    return length * torch.stack([first, cosine * first + math.sqrt(1.0 - cosine**2) * second], dim=1)


def simulate(num_points: int = NUM_POINTS, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, W, b)``: the loadings of :func:`loadings`, ``b = 0``, and ``x`` drawn from :func:`models.ppca.model`."""
    W = loadings(seed=seed)
    b = torch.zeros(W.shape[0], dtype=W.dtype)
    with pyro.poutine.seed(rng_seed=seed):
        x = ppca.model(None, W, b, NOISE_SCALE, num_points=num_points)
    return x, W, b


def exact(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> dict:
    """The exact posterior, the best mean-field Gaussian and their ELBOs (Bishop 2006, §10.1.2 and §12.2).

    Returns
    -------
    dict
        ``mean`` ``(N, K)`` and ``covariance`` ``(K, K)`` of the posterior; ``meanfield_sd`` ``(K,)``, the sds
        ``1 / sqrt(Lambda_kk)`` of the optimal mean-field guide; ``log_evidence``, ``log p(x)`` (the full-rank
        optimum's ELBO) and ``meanfield_elbo``, ``log p(x) - KL(q_MF || p)``.
    """
    noise_variance = NOISE_SCALE**2
    mean, covariance = ppca.posterior(x, W, b, noise_variance)
    precision = torch.linalg.inv(covariance)
    diagonal = precision.diagonal()
    gap = 0.5 * x.shape[0] * (diagonal.log().sum() - torch.logdet(precision))
    log_evidence = ppca.log_marginal_likelihood(x, W, b, noise_variance)
    return {"mean": mean, "covariance": covariance, "meanfield_sd": diagonal.rsqrt(),
            "log_evidence": float(log_evidence), "meanfield_elbo": float(log_evidence - gap)}


def fit_guides(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, steps: int | None, seed: int) -> dict:
    """Fit each of :data:`GUIDES` to the posterior of ``z`` and read its moments off :data:`NUM_DRAWS` draws.

    Returns
    -------
    dict of str to dict
        Per guide: ``fit`` (the :class:`ppvi.Fit`), ``mean`` ``(N, K)`` and ``covariance`` ``(N, K, K)`` (each
        point's ``K x K`` block of the guide's covariance).
    """
    results = {}
    for guide in GUIDES:
        fit = ppvi.fit(ppca.model, x, W, b, NOISE_SCALE, guide=guide, steps=steps, learning_rate=LEARNING_RATE,
                       seed=seed, progress=False)
        draws = fit.sample(NUM_DRAWS, seed=seed)["z"].double()  # (draws, N, K)
        centred = draws - draws.mean(0)
        covariance = torch.einsum("snk,snl->nkl", centred, centred) / (NUM_DRAWS - 1)
        results[guide] = {"fit": fit, "mean": draws.mean(0), "covariance": covariance}
    return results


def _correlation(covariance: torch.Tensor) -> torch.Tensor:
    sd = covariance.diagonal(dim1=-2, dim2=-1).sqrt()
    return covariance[..., 0, 1] / (sd[..., 0] * sd[..., 1])


def summary(truth: dict, fits: dict) -> dict[str, dict[str, float]]:
    """Per guide: its final ELBO and the closed-form optimum's, the largest error of its means, its sds and
    correlation (averaged over points) beside the exact posterior's."""
    exact_sd = truth["covariance"].diagonal().sqrt()
    rows = {"exact": {"elbo": truth["log_evidence"], "optimum": truth["log_evidence"], "mean error": 0.0,
                      "sd z1": float(exact_sd[0]), "sd z2": float(exact_sd[1]),
                      "correlation": float(_correlation(truth["covariance"]))}}
    for guide, result in fits.items():
        sd = result["covariance"].diagonal(dim1=-2, dim2=-1).sqrt().mean(0)
        optimum = truth["meanfield_elbo"] if guide == "meanfield" else truth["log_evidence"]
        rows[guide] = {"elbo": result["fit"].final_elbo, "optimum": optimum,
                       "mean error": float((result["mean"] - truth["mean"]).abs().max()),
                       "sd z1": float(sd[0]), "sd z2": float(sd[1]),
                       "correlation": float(_correlation(result["covariance"]).mean())}
    return rows


def _ellipse(mean, covariance, radius: float, name: str, label: str | None) -> Ellipse:
    colour, style = STYLES[name]
    eigenvalues, eigenvectors = np.linalg.eigh(np.asarray(covariance))
    angle = np.degrees(np.arctan2(eigenvectors[1, -1], eigenvectors[0, -1]))
    width, height = 2 * radius * np.sqrt(eigenvalues[::-1])
    return Ellipse(np.asarray(mean), width, height, angle=angle, fill=False, edgecolor=colour, linestyle=style,
                   linewidth=2.2 if name == "meanfield" else 1.8, label=label)


def plot_posterior(truth: dict, fits: dict) -> Figure:
    """Top: the 1- and 2-sd contours of the exact posterior and of both guides for :data:`SHOWN_POINTS` points.
    Bottom: guide means against exact means, each guide's sds against the exact marginal sds and the mean-field
    optimum's, and the ELBO traces against their closed-form optima."""
    figure = Figure(figsize=(15, 9.5), layout="constrained")
    top, bottom = figure.subfigures(2, 1)
    contour_axes = top.subplots(1, SHOWN_POINTS, squeeze=False)[0]
    shown = np.linspace(0, truth["mean"].shape[0] - 1, SHOWN_POINTS).round().astype(int)
    for axes, point in zip(contour_axes, shown, strict=True):
        for name in ("exact", *GUIDES):
            mean = truth["mean"][point] if name == "exact" else fits[name]["mean"][point]
            covariance = truth["covariance"] if name == "exact" else fits[name]["covariance"][point]
            for radius in RADII:
                axes.add_patch(_ellipse(mean, covariance, radius, name, LABELS[name] if radius == 1 else None))
            axes.plot(*np.asarray(mean), marker="+", color=STYLES[name][0], markersize=10)
        centre = np.asarray(truth["mean"][point])
        reach = 2.6 * float(truth["covariance"].diagonal().sqrt().max())
        axes.set_xlim(centre[0] - reach, centre[0] + reach)
        axes.set_ylim(centre[1] - reach, centre[1] + reach)
        axes.set_aspect("equal")
        axes.set_xlabel("$z_{n1}$")
        axes.set_ylabel("$z_{n2}$")
        axes.set_title(f"$p(z_n \\mid x_n)$, n = {point}: 1- and 2-sd contours")
    contour_axes[0].legend(loc="upper right", fontsize=8)
    means_axes, sd_axes, elbo_axes = bottom.subplots(1, 3)
    exact_mean = truth["mean"].numpy().ravel()
    for guide in GUIDES:
        means_axes.scatter(exact_mean, fits[guide]["mean"].numpy().ravel(), s=12, alpha=0.7,
                           color=STYLES[guide][0], label=LABELS[guide])
    limits = [exact_mean.min(), exact_mean.max()]
    means_axes.plot(limits, limits, color="black", lw=0.8, label="equal")
    means_axes.set_xlabel("exact posterior mean")
    means_axes.set_ylabel("guide mean")
    means_axes.set_title("means of every $z_{nk}$")
    means_axes.legend(fontsize=8)
    exact_sd = truth["covariance"].diagonal().sqrt().numpy()
    positions = np.arange(exact_sd.size)
    sd_axes.bar(positions - 0.3, exact_sd, 0.2, color="black", label="exact (marginal)")
    sd_axes.bar(positions - 0.1, truth["meanfield_sd"].numpy(), 0.2, color="grey",
                label="mean-field optimum $1/\\sqrt{\\Lambda_{kk}}$")
    for offset, guide in zip((0.1, 0.3), GUIDES, strict=True):
        sds = fits[guide]["covariance"].diagonal(dim1=-2, dim2=-1).sqrt().numpy()  # (N, K)
        sd_axes.bar(positions + offset, sds.mean(0), 0.2, yerr=sds.std(0), color=STYLES[guide][0],
                    label=f"{LABELS[guide]} (mean over points)")
    sd_axes.set_xticks(positions, [f"$z_{{n{k + 1}}}$" for k in positions])
    sd_axes.set_ylabel("posterior sd")
    sd_axes.set_title("sds: mean-field holds the conditionals'")
    sd_axes.set_ylim(0, 1.45 * exact_sd.max())
    sd_axes.legend(fontsize=8, loc="upper center", ncol=2)
    elbo_axes.axhline(truth["log_evidence"], color="black", lw=1, label="$\\log p(x)$ (full-rank optimum)")
    elbo_axes.axhline(truth["meanfield_elbo"], color="grey", ls="--", lw=1,
                      label="$\\log p(x) - \\mathrm{KL}$ (mean-field optimum)")
    for guide in GUIDES:
        trace = fits[guide]["fit"].elbo
        elbo_axes.plot(np.arange(1, trace.size + 1), trace, color=STYLES[guide][0], lw=2.5 if guide == "fullrank"
                       else 0.8, alpha=0.7, label=f"{LABELS[guide]} ELBO")
    gap = truth["log_evidence"] - truth["meanfield_elbo"]
    elbo_axes.set_ylim(truth["meanfield_elbo"] - max(1.5 * gap, 2.0), truth["log_evidence"] + max(gap, 2.0))
    elbo_axes.set_xlabel("step")
    elbo_axes.set_ylabel("ELBO (nats)")
    elbo_axes.set_title("ELBO per step (Monte Carlo estimate)")
    elbo_axes.legend(fontsize=8, loc="lower right")
    return figure


def main(output_directory: str | Path = "ppca", num_points: int = NUM_POINTS, steps: int | None = None,
         seed: int = 0) -> dict[str, Path]:
    """Fit mean-field and full-rank guides to pPCA's posterior over ``z``, print the comparison with the exact
    posterior and save the figure.

    Parameters
    ----------
    output_directory : str or pathlib.Path
        Where ``ppca_posterior.png`` is written (created if missing).
    num_points : int
        ``N``, points drawn from the model (the guides have ``2 N`` coordinates).
    steps : int, optional
        Training steps of each fit; by default until ppvi's stopping rule holds.
    seed : int
        Seed of the loadings, the data, the fits and the draws.

    Returns
    -------
    dict of str to pathlib.Path
        ``{"posterior": ...}``: the saved figure.
    """
    output_directory = Path(output_directory)
    output_directory.mkdir(parents=True, exist_ok=True)
    x, W, b = simulate(num_points, seed)
    truth = exact(x, W, b)
    fits = fit_guides(x, W, b, steps, seed)
    rows = summary(truth, fits)
    print(f"pPCA, N = {num_points}, D = {W.shape[0]}, K = {W.shape[1]}: the posterior over z against the guides")
    print(f"{'':>10} {'ELBO':>10} {'optimum':>10} {'max |mean error|':>17} {'sd z1':>7} {'sd z2':>7} "
          f"{'correlation':>11}")
    for name, row in rows.items():
        print(f"{name:>10} {row['elbo']:10.3f} {row['optimum']:10.3f} {row['mean error']:17.4f} {row['sd z1']:7.3f} "
              f"{row['sd z2']:7.3f} {row['correlation']:11.3f}")
    optimum_sd = truth["meanfield_sd"].numpy()
    print(f"mean-field optimum's sds (1/sqrt(Lambda_kk)): {optimum_sd[0]:.3f}, {optimum_sd[1]:.3f}")
    paths = {"posterior": output_directory / "ppca_posterior.png"}
    plot_posterior(truth, fits).savefig(paths["posterior"], dpi=110)
    print(f"figure saved to {paths['posterior']}")
    return paths


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-directory", default="ppca", help="where to save the figure (default: ppca)")
    parser.add_argument("--num-points", type=int, default=NUM_POINTS, help=f"points N (default: {NUM_POINTS})")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: until converged)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data and fits (default: 0)")
    return parser.parse_args()


if __name__ == "__main__":
    arguments = _arguments()
    main(arguments.output_directory, arguments.num_points, arguments.steps, arguments.seed)
