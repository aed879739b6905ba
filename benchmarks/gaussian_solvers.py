"""Full-rank Gaussian solvers against ppvi's full-rank ADVI: gradient evaluations, wall time and accuracy.

For each posterior, each method fits a full-rank Gaussian on the unconstrained coordinates:

* ``advi``: ``ppvi.fit(model, *data, guide="fullrank", seed=s, progress=False)``, Adam from ppvi's Laplace start;
  its gradient evaluations are ``fit.steps x 8`` (8 draws per step);
* ``bam``: :func:`ppvi.solvers.batch_and_match.run` from the Laplace start (loc, Cholesky factor of the inverse
  Hessian), with its defaults;
* ``gsm``: :func:`ppvi.solvers.gaussian_score_matching.run`, likewise;
* ``pathfinder``: :func:`ppvi.solvers.pathfinder.run` from ``T(0)`` (the point the Laplace start's L-BFGS starts
  from: Pathfinder is its own start).

Where the Laplace start fails (no mode), ADVI starts from ppvi's default initialisation and BaM/GSM from
``N(0, I)``. Gradient evaluations are counted by wrapping the log density (points evaluated with gradients); the
Laplace start's own cost (its L-BFGS evaluations, plus ``D`` Hessian-vector products for the exact Hessian) is
shown apart as ``+laplace``, and is the same for ADVI, BaM and GSM. Pathfinder's ELBO draws (log densities without
gradient) are not in its count; they are listed in the notes.

Accuracy: ``N = 20,000`` draws of each Gaussian, mapped to the constrained space (deterministic sites included, as
posteriordb's reference draws hold them), against the reference: the worst ``|mean - reference mean| /
reference sd`` and the range of ``sd / reference sd`` over every scalar. References: posteriordb's NUTS draws, or
the exact moments of the funnel and the banana. ``elbo``: ``E_q[log p - log q]`` from the same draws on the
unconstrained coordinates; for one posterior the methods share the unknown ``log p(x)``, so a higher ELBO is a
smaller ``KL(q || p)`` (the funnel and the banana are normalised: there the ELBO is ``-KL``). Full-rank ADVI
maximises it: it is the best Gaussian in KL, the answer the solvers are judged against where no Gaussian fits.

Run::

    python benchmarks/gaussian_solvers.py                      # every posterior, seeds 0-2
    python benchmarks/gaussian_solvers.py --seeds 1 --posteriors kidiq-kidscore_momiq sblrc-blr

The posteriors are those of ``benchmarks/posteriordb_models.py`` (ten posteriordb posteriors, eight schools
centred, Neal's funnel in 10-D and the banana); without that module, the five of ``ppvi.models.posteriordb``, the
funnel and the banana. The posteriordb data come from the shared folder (``$PPVI_SHARED``, else ``../shared``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import ppvi  # noqa: E402
from ppvi.initialization import laplace_start  # noqa: E402
from ppvi.solvers import (  # noqa: E402
    batch_and_match,
    gaussian_score_matching,
    log_density_of,
    pathfinder,
    scale_tril_from_precision,
)
from ppvi.solvers._gaussian import GaussianApproximation, gaussian_log_density  # noqa: E402

#: Draws of each fitted Gaussian for the moments and the ELBO: Monte Carlo error 0.007 sds on a mean, 0.5 % on a sd.
NUM_DRAWS = 20_000
#: ADVI's draws per step (ppvi's PRECONDITIONED_NUM_PARTICLES).
ADVI_PARTICLES = 8
METHODS = ("advi", "bam", "gsm", "pathfinder")


def shared_folder() -> Path:
    candidate = os.environ.get("PPVI_SHARED")
    return Path(candidate) if candidate else REPO_ROOT.parent / "shared"


def posteriors() -> tuple[tuple[str, ...], Callable[[str], tuple], Callable[[str], dict]]:
    """The posterior names, ``name -> (model, args)`` and ``name -> reference`` (draws ``{site: (N, ...)}`` or exact
    moments ``{site: (mean, sd)}``)."""
    try:
        import posteriordb_models
    except ImportError:
        posteriordb_models = None
    if posteriordb_models is not None:
        return (
            posteriordb_models.POSTERIORS,
            posteriordb_models.pyro_model,
            lambda name: posteriordb_models.load_reference(name)[0],
        )
    from ppvi.models import banana, funnel
    from ppvi.models.posteriordb import POSTERIORS, load_posterior

    def model_of(name: str) -> tuple:
        if name == "funnel":
            return lambda: funnel.model(10, torch.float64), ()
        if name == "banana":
            return lambda: banana.model(dtype=torch.float64), ()
        case = load_posterior(name, shared_folder() / "posteriordb")
        return case.model, tuple(argument.double() for argument in case.args)

    def reference_of(name: str) -> dict:
        if name == "funnel":
            return funnel.exact_moments(10)
        if name == "banana":
            return banana.exact_moments()
        return load_posterior(name, shared_folder() / "posteriordb").reference_draws

    return (*POSTERIORS, "funnel", "banana"), model_of, reference_of


class CountedLogDensity:
    """A log density that counts the points it evaluates: with gradients (``gradient``) and without (``density``)."""

    def __init__(self, log_density: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.log_density = log_density
        self.gradient = 0
        self.density = 0

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and points.requires_grad:
            self.gradient += points.shape[0]
        else:
            self.density += points.shape[0]
        return self.log_density(points)


class Row(NamedTuple):
    posterior: str
    dimension: int
    method: str
    seed: int
    gradient_evaluations: int
    laplace_evaluations: int
    seconds: float
    mean_error: float
    sd_ratio_low: float
    sd_ratio_high: float
    elbo: float
    converged: bool
    note: str


def accuracy(density, reference: dict, approximation: GaussianApproximation) -> tuple[float, float, float, float]:
    """Worst mean error in reference sds, sd ratio range, and the ELBO estimate, from ``NUM_DRAWS`` draws."""
    generator = torch.Generator().manual_seed(12345)
    loc, scale_tril = approximation
    points = loc + torch.randn(NUM_DRAWS, loc.shape[0], generator=generator, dtype=torch.float64) @ scale_tril.T
    with torch.no_grad():
        values = density(points)
        elbo = float((values - gaussian_log_density(approximation, points)).mean())
    draws = density.constrain(points, deterministic=True)
    worst, low, high = 0.0, math.inf, 0.0
    for name, expected in reference.items():
        if name not in draws:
            continue
        fitted = draws[name].numpy().reshape(NUM_DRAWS, -1)
        if isinstance(expected, tuple):  # exact moments
            mean, sd = (np.asarray(value, dtype=np.float64).reshape(-1) for value in expected)
        else:
            expected = np.asarray(expected, dtype=np.float64).reshape(len(expected), -1)
            mean, sd = expected.mean(0), expected.std(0)
        worst = max(worst, float((np.abs(fitted.mean(0) - mean) / sd).max()))
        ratio = fitted.std(0) / sd
        low, high = min(low, float(ratio.min())), max(high, float(ratio.max()))
    return worst, low, high, elbo


def run_posterior(name: str, model: Callable, args: tuple, reference: dict, seeds: list[int],
                  methods: tuple[str, ...]) -> list[Row]:
    density = log_density_of(model, *args)
    dimension = density.dimension
    counted = CountedLogDensity(density)
    started = time.perf_counter()
    start = laplace_start(lambda point: -counted(point.unsqueeze(0))[0], torch.zeros(dimension, dtype=torch.float64))
    laplace_seconds = time.perf_counter() - started
    # L-BFGS's evaluations, the Hessian's one evaluation, and D Hessian-vector products.
    laplace_evaluations = counted.gradient + (dimension if start.succeeded else 0)
    if start.succeeded:
        initial = GaussianApproximation(start.loc, scale_tril_from_precision(start.precision))
        start_note = ""
    else:
        initial = GaussianApproximation(torch.zeros(dimension, dtype=torch.float64),
                                        torch.eye(dimension, dtype=torch.float64))
        start_note = "no Laplace start (no mode): N(0, I)"
    rows = []
    for seed in seeds:
        for method in methods:
            counted = CountedLogDensity(density)
            generator = torch.Generator().manual_seed(seed)
            started = time.perf_counter()
            note, setup_seconds = start_note, laplace_seconds
            if method == "advi":
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    fit = ppvi.fit(model, *args, guide="fullrank", seed=seed, progress=False)
                posterior = fit.guide.posterior()
                approximation = GaussianApproximation(
                    posterior.loc.detach().double(), posterior.scale_tril.detach().double()
                )
                evaluations, converged = fit.steps * ADVI_PARTICLES, bool(fit.converged)
                setup_seconds = 0.0  # ppvi.fit's time includes its own Laplace start
                note = f"{fit.steps} steps" + ("" if start.succeeded else "; ADVI from ppvi's default start")
            elif method in ("bam", "gsm"):
                solver = batch_and_match if method == "bam" else gaussian_score_matching
                result = solver.run(counted, initial.loc, initial.scale_tril, generator=generator)
                approximation = GaussianApproximation(result.loc, result.scale_tril)
                evaluations, converged = result.gradient_evaluations, result.converged
                assert evaluations == counted.gradient, (evaluations, counted.gradient)
                note = "; ".join(filter(None, [start_note, f"{result.iterations} iterations"]))
            else:
                setup_seconds = 0.0
                result = pathfinder.run(counted, torch.zeros(dimension, dtype=torch.float64), generator=generator)
                approximation = GaussianApproximation(result.loc, result.scale_tril)
                evaluations, converged = result.gradient_evaluations, result.converged
                note = (f"{result.iterations} L-BFGS iterations, best at {result.best_iteration}; "
                        f"+{result.density_evaluations} log densities")
            seconds = time.perf_counter() - started + setup_seconds
            mean_error, low, high, elbo = accuracy(density, reference, approximation)
            laplace = 0 if method == "pathfinder" or not start.succeeded else laplace_evaluations
            rows.append(Row(name, dimension, method, seed, evaluations, laplace, seconds, mean_error, low, high, elbo,
                            converged, note))
            print(f"  {name} {method} seed {seed}: {evaluations} (+{laplace}) evaluations, {seconds:.2f} s, mean "
                  f"{mean_error:.3f}, sd {low:.2f}-{high:.2f}, elbo {elbo:.2f}", file=sys.stderr, flush=True)
    return rows


def summarise(rows: list[Row]) -> str:
    """One line per posterior and method: median evaluations and seconds over seeds, worst errors, median ELBO."""
    lines = [
        "| posterior | D | method | grad evals (+laplace) | vs ADVI | wall s | worst mean err (ref sd) | sd ratio | "
        "ELBO - ADVI's | converged |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = dict.fromkeys((row.posterior, row.method) for row in rows)
    advi = {
        posterior: np.median([row.gradient_evaluations for row in rows if row.posterior == posterior
                              and row.method == "advi"])
        for posterior, _ in keys
        if any(row.posterior == posterior and row.method == "advi" for row in rows)
    }
    advi_elbo = {
        posterior: np.median([row.elbo for row in rows if row.posterior == posterior and row.method == "advi"])
        for posterior in advi
    }
    for posterior, method in keys:
        group = [row for row in rows if row.posterior == posterior and row.method == method]
        elbo = float(np.median([row.elbo for row in group])) - advi_elbo.get(posterior, 0.0)
        evaluations = float(np.median([row.gradient_evaluations for row in group]))
        ratio = f"{evaluations / advi[posterior]:.3f}" if posterior in advi else ""
        laplace = group[0].laplace_evaluations
        lines.append(
            f"| {posterior} | {group[0].dimension} | {method} | {evaluations:.0f} (+{laplace}) | {ratio} | "
            f"{np.median([row.seconds for row in group]):.2f} | {max(row.mean_error for row in group):.3f} | "
            f"{min(row.sd_ratio_low for row in group):.2f}-{max(row.sd_ratio_high for row in group):.2f} | "
            f"{elbo:+.3f} | {sum(row.converged for row in group)}/{len(group)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--posteriors", nargs="*", help="names (default: all)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..n-1 per method (default 3)")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    options = parser.parse_args(argv)
    torch.set_default_dtype(torch.float64)
    names, model_of, reference_of = posteriors()
    rows: list[Row] = []
    for name in options.posteriors or names:
        model, args = model_of(name)
        rows.extend(run_posterior(name, model, args, reference_of(name), list(range(options.seeds)),
                                  tuple(options.methods)))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, seeds 0-{options.seeds - 1}; worst errors "
          "and sd ratios over seeds, median evaluations, seconds and ELBO")
    print(summarise(rows))
    notes = sorted({f"{row.posterior} {row.method}: {row.note}" for row in rows if row.note and row.seed == 0})
    print("\n".join(["", "Notes (seed 0):", *notes]))


if __name__ == "__main__":
    main()
