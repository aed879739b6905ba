"""The lecture's Gaussian-mixture figure: the data, the components fitted by EM, CAVI and ppvi's SVI, the
responsibilities, and the three objectives iteration by iteration.

The data are the lecture's 2-D mixture ``0.5 N([0,3], [[1,.1],[.1,1]]) + 0.5 N([1,0], [[8,3],[3,2]])``
(:func:`models.gmm.simulate_lecture_mixture`). Three fits of two components:

- EM (:func:`models.gmm.em`): maximum likelihood; its trace is the log-likelihood per point;
- CAVI (:func:`models.gmm.cavi`): mean-field VI for the conjugate Normal-Wishart model with scikit-learn's default
  prior; its trace is the ELBO per point;
- SVI (``ppvi.fit(models.gmm.model, x, 2)``): mean-field ADVI on the non-conjugate model with the assignments
  summed out by enumeration; its trace is the (Monte Carlo) ELBO per point at every step.

The models differ (priors, and EM has none), so the three objectives need not agree; all three are close to the
log-likelihood per point at the maximum-likelihood estimate, since with 1,000 points the priors weigh little.

Run: ``python examples/gmm.py [--output-directory DIR] [--num-points N] [--steps S] [--seed S]``. Writes
``gmm_components.png`` and ``gmm_traces.png`` into the directory and prints the final objectives.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Ellipse

import ppvi
from ppvi.models import gmm

#: Draws of the SVI guide behind its posterior means and responsibilities.
NUM_DRAWS = 1000
#: Ellipses are drawn at two standard deviations (Mahalanobis radius 2; 86 % of the mass of a 2-D Gaussian).
ELLIPSE_RADIUS = 2.0
#: How the three fits are drawn: colour and line style.
STYLES = {"truth": ("black", "-"), "EM": ("C0", "--"), "CAVI": ("C1", ":"), "SVI": ("C2", "-")}
#: Line widths: SVI's ellipses wide and underneath, so EM's and CAVI's (often on top of them) stay visible.
LINE_WIDTHS = {"truth": 1.8, "EM": 1.8, "CAVI": 2.2, "SVI": 4.0}


def _ellipse(mean: np.ndarray, covariance: np.ndarray, name: str, label: str | None) -> Ellipse:
    """The ``ELLIPSE_RADIUS``-sd contour of ``N(mean, covariance)``, drawn in the style of fit ``name``."""
    colour, style = STYLES[name]
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    angle = np.degrees(np.arctan2(eigenvectors[1, -1], eigenvectors[0, -1]))
    width, height = 2 * ELLIPSE_RADIUS * np.sqrt(eigenvalues[::-1])
    return Ellipse(mean, width, height, angle=angle, fill=False, edgecolor=colour, linestyle=style,
                   linewidth=LINE_WIDTHS[name], alpha=0.6 if name == "SVI" else 1.0, label=label)


def fit_all(x: torch.Tensor, steps: int | None, seed: int) -> dict:
    """EM, CAVI and SVI on ``x`` with two components, each relabelled to match the lecture's components."""
    em = gmm.em(x, 2, seed=seed)
    cavi = gmm.cavi(x, 2, seed=seed)
    fit = ppvi.fit(gmm.model, x, 2, guide="meanfield", steps=steps, seed=seed)
    weights, means, covariances = gmm.fit_components(fit.sample(NUM_DRAWS, seed=seed))
    responsibilities = gmm.posterior_responsibilities(fit, NUM_DRAWS, seed=seed).numpy()
    components = {
        "EM": (em.means, em.covariances, em.responsibilities),
        "CAVI": (cavi.means, cavi.covariances, cavi.responsibilities),
        "SVI": (means.mean(0).numpy(), covariances.mean(0).numpy(), responsibilities),
    }
    aligned = {}
    for name, (fitted_means, fitted_covariances, resp) in components.items():
        order = gmm.match_components(fitted_means, gmm.LECTURE_MEANS)
        aligned[name] = (fitted_means[order], fitted_covariances[order], resp[:, order])
    num_points = x.shape[0]
    traces = {"EM": em.log_likelihood, "CAVI": cavi.elbo / num_points, "SVI": fit.elbo / num_points}
    return {"components": aligned, "traces": traces, "fit": fit}


def plot_components(x: np.ndarray, labels: np.ndarray, components: dict) -> Figure:
    """Three panels: the data by true component with the true ellipses; the fitted ellipses of EM, CAVI and
    SVI; the data coloured by SVI's responsibility of the second component."""
    figure = Figure(figsize=(15, 4.8), layout="constrained")
    data_axes, fit_axes, resp_axes = figure.subplots(1, 3, sharex=True, sharey=True)
    for k in range(2):
        data_axes.scatter(*x[labels == k].T, s=6, alpha=0.5, color=f"C{k + 3}", label=f"component {k + 1}")
        truth = _ellipse(gmm.LECTURE_MEANS[k], gmm.LECTURE_COVARIANCES[k], "truth", "truth" if k == 0 else None)
        data_axes.add_patch(truth)
    data_axes.set_title("data and the generating components")
    fit_axes.scatter(*x.T, s=4, alpha=0.25, color="grey")
    for name in ("SVI", "EM", "CAVI"):  # SVI's wide line first, underneath
        means, covariances, _ = components[name]
        for k in range(2):
            fit_axes.add_patch(_ellipse(means[k], covariances[k], name, name if k == 0 else None))
        fit_axes.scatter(*means.T, marker="x", color=STYLES[name][0], s=60)
    fit_axes.set_title(f"fitted components ({ELLIPSE_RADIUS:g}-sd ellipses)")
    resp = components["SVI"][2][:, 1]
    points = resp_axes.scatter(*x.T, c=resp, cmap="coolwarm", vmin=0, vmax=1, s=8)
    figure.colorbar(points, ax=resp_axes, label="$r_{i2}$")
    resp_axes.set_title(r"SVI responsibilities $r_{i2}$, averaged over the guide")
    for axes in (data_axes, fit_axes):
        axes.legend(loc="upper left")
    for axes in (data_axes, fit_axes, resp_axes):
        axes.set_xlabel("$x_1$")
    data_axes.set_ylabel("$x_2$")
    return figure


def plot_traces(traces: dict) -> Figure:
    """EM's log-likelihood and CAVI's ELBO per iteration; SVI's ELBO per step (all per point)."""
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    iteration_axes, step_axes = figure.subplots(1, 2, sharey=True)
    for name in ("EM", "CAVI"):
        colour, style = STYLES[name]
        label = "EM log-likelihood" if name == "EM" else "CAVI ELBO"
        iteration_axes.plot(np.arange(len(traces[name])), traces[name], color=colour, linestyle=style, marker="o",
                            markersize=3, label=label)
    iteration_axes.set_xlabel("iteration")
    iteration_axes.set_ylabel("objective per point (nats)")
    iteration_axes.set_title("EM and CAVI: monotone")
    iteration_axes.legend()
    step_axes.plot(np.arange(1, len(traces["SVI"]) + 1), traces["SVI"], color=STYLES["SVI"][0], linewidth=0.8,
                   label="SVI ELBO (one estimate per step)")
    step_axes.axhline(traces["EM"][-1], color=STYLES["EM"][0], linestyle="--", label="EM final log-likelihood")
    step_axes.set_xlabel("step")
    step_axes.set_title("ppvi SVI (enumerated assignments), from the Laplace start")
    step_axes.legend()
    if len(traces["SVI"]):  # the first steps can be far below; show the part that matters
        low = min(np.quantile(traces["SVI"], 0.05), traces["CAVI"][0], traces["EM"][0])
        high = max(traces["SVI"].max(), traces["EM"][-1], traces["CAVI"][-1])
        iteration_axes.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
    return figure


def main(
    output_directory: str | Path = ".", num_points: int = gmm.DEFAULT_NUM_POINTS, steps: int | None = None,
    seed: int = 0,
) -> dict[str, Path]:
    """Fit EM, CAVI and SVI to the lecture's mixture, save the two figures and print the final objectives.

    Parameters
    ----------
    output_directory : str or pathlib.Path
        Where ``gmm_components.png`` and ``gmm_traces.png`` are written (created if missing).
    num_points : int
        Points drawn from the lecture's mixture.
    steps : int, optional
        SVI steps; by default until ppvi's stopping rule holds.
    seed : int
        Seed of the data, the k-means starts and the SVI fit.

    Returns
    -------
    dict of str to pathlib.Path
        ``{"components": ..., "traces": ...}``: the saved figures.
    """
    output_directory = Path(output_directory)
    output_directory.mkdir(parents=True, exist_ok=True)
    x, labels = gmm.simulate_lecture_mixture(num_points, seed)
    result = fit_all(x, steps, seed)
    traces = result["traces"]
    tail = max(1, len(traces["SVI"]) // 10)  # the ELBO estimate of one step is noisy: average the last tenth
    print(f"EM log-likelihood per point: {traces['EM'][-1]:.4f} after {len(traces['EM']) - 1} iterations")
    print(f"CAVI ELBO per point:         {traces['CAVI'][-1]:.4f} after {len(traces['CAVI']) - 1} iterations")
    print(f"SVI ELBO per point:          {traces['SVI'][-tail:].mean():.4f} after {result['fit'].steps} steps")
    for name, (means, _, _) in result["components"].items():
        print(f"{name:>4} means: {np.array2string(means, precision=3)}")
    paths = {"components": output_directory / "gmm_components.png", "traces": output_directory / "gmm_traces.png"}
    plot_components(x.numpy(), labels.numpy(), result["components"]).savefig(paths["components"], dpi=110)
    plot_traces(traces).savefig(paths["traces"], dpi=110)
    print(f"figures saved to {paths['components']} and {paths['traces']}")
    return paths


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-directory", default=".", help="where to save the figures (default: .)")
    parser.add_argument("--num-points", type=int, default=gmm.DEFAULT_NUM_POINTS, help="points (default: 1000)")
    parser.add_argument("--steps", type=int, default=None, help="SVI steps (default: until converged)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data and fits (default: 0)")
    return parser.parse_args()


if __name__ == "__main__":
    arguments = _arguments()
    main(arguments.output_directory, arguments.num_points, arguments.steps, arguments.seed)
