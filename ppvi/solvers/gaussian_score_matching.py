"""Gaussian score matching (GSM-VI): a full-rank Gaussian that matches the target's score exactly at each new draw.

Modi, Margossian, Yao, Gower, Blei & Saul (2023), "Variational inference with Gaussian score matching", NeurIPS.
At each draw ``z ~ q_t`` with score ``g = grad log p(z)``, GSM moves to the Gaussian closest to ``q_t`` in
``KL(q_t; q)`` among those whose own score equals ``g`` at ``z``. Cai et al. (2024, "Batch and match", ICML, App.
C.3) show this is the limit ``B = 1``, ``lambda -> infinity`` of batch and match, and restate the solution
(their eqs. 114-115, "identical to eqs. (42) and (23) in Modi et al. (2023)"):

* covariance (Modi et al. eq. 42): ``Sigma_{t+1} g g^T Sigma_{t+1} + Sigma_{t+1} = Sigma_t + (mu_t - z)(mu_t - z)^T``;
* mean (Modi et al. eq. 23): ``mu_{t+1} = Sigma_{t+1} g + z``.

The covariance equation is BaM's ``Sigma U Sigma + Sigma = V`` with the rank-one ``U = g g^T``, which Lemma B.3 of
Cai et al. solves in closed form (eq. 75 with ``Q = g``, ``K = 1``):
``Sigma_{t+1} = V - V g g^T V / (1/2 + (g^T V g + 1/4)^{1/2})^2``, ``V = Sigma_t + (mu_t - z)(mu_t - z)^T``; the
factor ``1/2 + (g^T V g + 1/4)^{1/2}`` is Modi et al.'s ``1 + rho``. A batch of ``B`` draws averages the ``B``
single-draw updates, means and covariances, as the reference implementation does (github.com/modichirag/GSM-VI,
``gsmvi/gsm.py``, ``gsm_update``: ``mu = mu0 + mean(mu_update)``, ``S = S0 + mean(S_update)``); an average of
positive-definite matrices is positive definite.

As in :mod:`ppvi.solvers.batch_and_match`, every step is computed in the coordinates whitened by the current
Gaussian (the KL and the score constraint are both equivariant under affine maps, so the update commutes with
them): there ``mu_t = 0``, ``Sigma_t = I``, ``V = I + e e^T``.

GSM has no learning rate: each draw's update matches its score exactly. On a Gaussian target every match is
consistent and GSM converges as fast as BaM; on any other target the successive draws ask for incompatible
Gaussians and the iterate keeps jumping (Cai et al. Section 4: "if the target is not exactly Gaussian, the updates
for GSM attempt to solve an infeasible problem"); :class:`ppvi.solvers._gaussian.MovementRule` then does not hold,
and the run ends at ``max_iterations`` with the average of its last iterates.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ppvi.solvers._gaussian import (
    GaussianApproximation,
    LogDensity,
    MovementRule,
    SolverResult,
    draw,
    entropy,
    finite_rows,
    initial_gaussian,
    iterate_until_settled,
    jeffreys_divergence,
    safe_cholesky,
    value_and_gradient,
)

__all__ = [
    "GaussianScoreMatchingInfo",
    "GaussianScoreMatchingResult",
    "GaussianScoreMatchingState",
    "default_batch_size",
    "init",
    "match",
    "run",
    "step",
]

#: Fewest finite draws for a step, as a fraction of the batch (see ``batch_and_match.MINIMUM_FINITE_FRACTION``).
MINIMUM_FINITE_FRACTION = 0.5
#: Spread multiplier after a refused step (see ``batch_and_match.REJECTION_SHRINK``).
REJECTION_SHRINK = 0.5


class GaussianScoreMatchingState(NamedTuple):
    """State of GSM between iterations: the Gaussian ``q_t`` (``loc``, ``scale_tril``), the iterations taken and the
    gradient evaluations spent."""

    loc: torch.Tensor
    scale_tril: torch.Tensor
    iteration: int
    gradient_evaluations: int


class GaussianScoreMatchingInfo(NamedTuple):
    """What one GSM iteration saw: as :class:`ppvi.solvers.batch_and_match.BatchAndMatchInfo`, without a learning
    rate."""

    elbo: float
    score_divergence: float
    step_divergence: float
    num_finite: int
    accepted: bool


#: Result of :func:`run`: the shared result of ppvi's Gaussian solvers (:class:`ppvi.solvers._gaussian.SolverResult`).
GaussianScoreMatchingResult = SolverResult


def default_batch_size(dimension: int) -> int:
    """Default batch ``B = max(8, 4 D)``, BaM's (:func:`ppvi.solvers.batch_and_match.default_batch_size`), so that
    the two compare draw for draw. Modi et al. found little gain beyond ``B = 2`` on Gaussian targets; averaging
    more single-draw updates damps the jumps on others."""
    return max(8, 4 * dimension)


def init(
    log_density: LogDensity | None,
    loc: torch.Tensor,
    scale_tril: torch.Tensor | None = None,
    *,
    covariance: torch.Tensor | None = None,
) -> GaussianScoreMatchingState:
    """The state at a starting Gaussian (see :func:`ppvi.solvers.batch_and_match.init`)."""
    start = initial_gaussian(loc, scale_tril, covariance)
    return GaussianScoreMatchingState(start.loc, start.scale_tril, 0, 0)


def match(standard: torch.Tensor, whitened_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch GSM update in the coordinates where ``q_t = N(0, I)``.

    For each draw ``e`` with whitened score ``g``: ``V = I + e e^T``, ``w = V g``, ``c = (1/2 + (g^T w +
    1/4)^{1/2})^{-2}``; the single-draw solution is ``Sigma' = V - c w w^T`` (Cai et al. eq. 75) and ``mu' =
    Sigma' g + e = (1 - c g^T w) w + e`` (Modi et al. eq. 23). The batch update is their average.

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        New mean ``(D,)`` and Cholesky factor ``(D, D)`` in these coordinates.
    """
    count, dimension = standard.shape
    identity = torch.eye(dimension, dtype=standard.dtype, device=standard.device)
    projection = (standard * whitened_scores).sum(-1)  # e^T g
    weighted = whitened_scores + standard * projection.unsqueeze(-1)  # w = V g = g + e (e^T g)
    quadratic = (whitened_scores * weighted).sum(-1)  # g^T V g
    coefficient = 1.0 / (0.5 + torch.sqrt(quadratic + 0.25)) ** 2
    locs = weighted * (1.0 - coefficient * quadratic).unsqueeze(-1) + standard
    covariance_matrix = (
        identity
        + standard.T @ standard / count
        - (weighted * coefficient.unsqueeze(-1)).T @ weighted / count
    )
    return locs.mean(0), safe_cholesky(covariance_matrix)


def step(
    state: GaussianScoreMatchingState,
    log_density: LogDensity,
    generator: torch.Generator | None = None,
    *,
    batch_size: int,
) -> tuple[GaussianScoreMatchingState, GaussianScoreMatchingInfo]:
    """One GSM iteration: draw a batch, evaluate its scores, average the single-draw matches.

    Non-finite draws are handled as in :func:`ppvi.solvers.batch_and_match.step`: left out, and the step refused
    (spread halved) when fewer than half the batch is finite or the update is not finite.
    """
    current = GaussianApproximation(state.loc, state.scale_tril)
    points, standard = draw(current, batch_size, generator)
    values, gradients = value_and_gradient(log_density, points)
    finite = finite_rows(values, gradients)
    num_finite = int(finite.sum())
    evaluations = state.gradient_evaluations + batch_size
    refused = GaussianScoreMatchingState(
        state.loc, REJECTION_SHRINK * state.scale_tril, state.iteration + 1, evaluations
    )
    if num_finite < max(1, math.ceil(MINIMUM_FINITE_FRACTION * batch_size)):
        return refused, GaussianScoreMatchingInfo(math.nan, math.nan, math.inf, num_finite, False)
    standard, values = standard[finite], values[finite]
    whitened_scores = gradients[finite] @ state.scale_tril
    elbo = float(values.mean() + entropy(current))
    score_divergence = float(((standard + whitened_scores) ** 2).sum(-1).mean())
    try:
        whitened_loc, whitened_factor = match(standard, whitened_scores)
    except ValueError:  # a non-finite statistic reached the factorisation
        return refused, GaussianScoreMatchingInfo(elbo, score_divergence, math.inf, num_finite, False)
    if not bool(torch.isfinite(whitened_loc).all() & torch.isfinite(whitened_factor).all()):
        return refused, GaussianScoreMatchingInfo(elbo, score_divergence, math.inf, num_finite, False)
    new = GaussianApproximation(state.loc + state.scale_tril @ whitened_loc, state.scale_tril @ whitened_factor)
    info = GaussianScoreMatchingInfo(elbo, score_divergence, jeffreys_divergence(current, new), num_finite, True)
    return GaussianScoreMatchingState(new.loc, new.scale_tril, state.iteration + 1, evaluations), info


def run(
    log_density: LogDensity,
    initial_loc: torch.Tensor,
    initial_scale_tril: torch.Tensor | None = None,
    *,
    batch_size: int | None = None,
    max_iterations: int = 200,
    generator: torch.Generator | None = None,
    stopping_rule: MovementRule | None = None,
) -> GaussianScoreMatchingResult:
    """Fit a full-rank Gaussian to ``log_density`` by GSM from a starting Gaussian.

    Parameters are those of :func:`ppvi.solvers.batch_and_match.run` without ``learning_rate``. The result is the
    average of the last ``stopping_rule.window`` iterates (:func:`ppvi.solvers._gaussian.average`).
    """
    state = init(log_density, initial_loc, initial_scale_tril)
    dimension = state.loc.shape[-1]
    batch_size = default_batch_size(dimension) if batch_size is None else int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return iterate_until_settled(
        state, lambda state: step(state, log_density, generator, batch_size=batch_size), max_iterations, stopping_rule
    )
