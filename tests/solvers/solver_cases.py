"""Targets with known answers for the tests of :mod:`ppvi.solvers`, and the comparison with posteriordb's reference
draws. Nothing here uses the solvers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ppvi.initialization import laplace_start
from ppvi.models.posteriordb import PosteriorCase, load_posterior
from ppvi.solvers import ModelLogDensity, log_density_of, scale_tril_from_precision

#: Full-rank ADVI's gradient evaluations on kidiq and sblrc with ppvi's defaults (``ppvi.fit(model, *data,
#: guide="fullrank", seed=0)``: 400 steps of 8 draws on each, measured); the solvers are held to a tenth of it.
ADVI_GRADIENT_EVALUATIONS = 400 * 8
#: The issue's accuracy against posteriordb's reference draws: means within 0.1 reference sds, sds within 10 %.
MEAN_TOLERANCE = 0.1
SD_TOLERANCE = 0.1
#: Draws of the fitted Gaussian compared with the reference: Monte Carlo error 0.007 sds on a mean, 0.5 % on a sd.
NUM_DRAWS = 20_000


class GaussianTarget(NamedTuple):
    """A Gaussian target ``N(mean, covariance)`` as a batched log density."""

    mean: torch.Tensor
    covariance: torch.Tensor
    log_density: Callable[[torch.Tensor], torch.Tensor]


def gaussian_target(mean: torch.Tensor, scales: torch.Tensor, correlation: torch.Tensor) -> GaussianTarget:
    """``N(mean, diag(scales) R diag(scales))``. The precision ``diag(1/scales) R^{-1} diag(1/scales)`` is formed
    from the well-conditioned ``R`` alone, so it is accurate to float64 entry by entry however badly the scales
    differ (inverting the covariance itself would lose ``log10(condition number)`` digits)."""
    covariance = scales[:, None] * correlation * scales[None]
    precision = torch.linalg.inv(correlation) / scales[:, None] / scales[None]

    def log_density(points: torch.Tensor) -> torch.Tensor:
        centred = points - mean
        return -0.5 * ((centred @ precision) * centred).sum(-1)

    return GaussianTarget(mean, covariance, log_density)


def correlated_5d() -> GaussianTarget:
    """A 5-D Gaussian with correlations ``0.95^|i - j|`` (up to 0.95 between neighbours) and unequal scales."""
    index = torch.arange(5, dtype=torch.float64)
    correlation = 0.95 ** (index[:, None] - index[None]).abs()
    scales = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0], dtype=torch.float64)
    return gaussian_target(torch.tensor([1.0, -2.0, 3.0, 0.5, -1.0], dtype=torch.float64), scales, correlation)


def badly_scaled_10d() -> GaussianTarget:
    """A 10-D Gaussian whose standard deviations span 1e-3 to 1e3 (covariance condition number above 1e12), with
    random correlations, its mean a few of its own sds away from the origin."""
    generator = torch.Generator().manual_seed(0)
    factor = torch.randn(10, 10, generator=generator, dtype=torch.float64)
    correlation = factor @ factor.T / 10 + 0.2 * torch.eye(10, dtype=torch.float64)
    correlation = correlation / correlation.diagonal().sqrt()[:, None] / correlation.diagonal().sqrt()[None]
    scales = torch.logspace(-3, 3, 10, dtype=torch.float64)
    mean = scales * 3 * torch.randn(10, generator=generator, dtype=torch.float64)
    return gaussian_target(mean, scales, correlation)


def gaussian_errors(target: GaussianTarget, loc: torch.Tensor, scale_tril: torch.Tensor) -> tuple[float, float]:
    """Largest error of the mean in target sds, and of the covariance in units of ``sd_i sd_j``."""
    sd = target.covariance.diagonal().sqrt()
    covariance = scale_tril @ scale_tril.T
    mean_error = float(((loc - target.mean) / sd).abs().max())
    covariance_error = float(((covariance - target.covariance) / sd[:, None] / sd[None]).abs().max())
    return mean_error, covariance_error


class PosteriorProblem(NamedTuple):
    """A posteriordb posterior as a log density, with ppvi's Laplace start (L-BFGS and the exact Hessian)."""

    case: PosteriorCase
    log_density: ModelLogDensity
    laplace_loc: torch.Tensor
    laplace_scale_tril: torch.Tensor


def posterior_problem(name: str, root: Path) -> PosteriorProblem:
    case = load_posterior(name, root)
    density = log_density_of(case.model, *case.args)
    start = laplace_start(
        lambda point: -density(point.unsqueeze(0))[0], torch.zeros(density.dimension, dtype=torch.float64)
    )
    assert start.succeeded, start.message
    return PosteriorProblem(case, density, start.loc, scale_tril_from_precision(start.precision))


def reference_errors(problem: PosteriorProblem, loc: torch.Tensor, scale_tril: torch.Tensor) -> tuple[float, float]:
    """Worst ``|mean - reference mean| / reference sd`` and worst ``|sd / reference sd - 1|`` over every latent
    scalar, from ``NUM_DRAWS`` draws of ``N(loc, scale_tril scale_tril^T)`` mapped to the constrained space."""
    generator = torch.Generator().manual_seed(1)
    points = loc + torch.randn(NUM_DRAWS, loc.shape[0], generator=generator, dtype=torch.float64) @ scale_tril.T
    draws = problem.log_density.constrain(points)
    worst_mean = worst_sd = 0.0
    for name, reference in problem.case.latent_draws.items():
        expected = reference.reshape(reference.shape[0], -1)
        fitted = draws[name].numpy().reshape(NUM_DRAWS, -1)
        worst_mean = max(worst_mean, float((np.abs(fitted.mean(0) - expected.mean(0)) / expected.std(0)).max()))
        worst_sd = max(worst_sd, float(np.abs(fitted.std(0) / expected.std(0) - 1).max()))
    return worst_mean, worst_sd
