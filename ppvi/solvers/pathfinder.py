"""Pathfinder: normal approximations along an L-BFGS path, the one with the best ELBO estimate kept.

Zhang, Carpenter, Gelman & Vehtari (2022), "Pathfinder: parallel quasi-Newton variational inference", JMLR 23(306);
arXiv:2108.03782. Algorithm and formula numbers below are the paper's, as blackjax's implementation cites them
(``blackjax/vi/pathfinder.py``, ``blackjax/optimizers/lbfgs.py``). Single-path Pathfinder (Algorithm 1):

1. run L-BFGS on ``-log p`` from the initial point, keeping the path ``theta_0..theta_L`` and its gradients;
2. at each ``theta_l``, form the inverse-Hessian estimate ``Sigma_l`` of L-BFGS from the last ``J`` position and
   gradient differences ``s = theta_l - theta_{l-1}``, ``y = grad f(theta_l) - grad f(theta_{l-1})`` (``f = -log
   p``): a diagonal ``alpha`` (the inner loop of Algorithm 3, the diagonal update of Gilbert & Lemarechal 1989)
   plus the BFGS corrections, ``Sigma_l = diag(alpha) + beta gamma beta^T`` (formula II.1, the compact form of
   Byrd, Nocedal & Schnabel 1994). Pairs breaking the curvature condition ``s^T y > eps ||y||^2`` (``eps =
   2.2e-16``) are left out, which keeps ``Sigma_l`` positive definite;
3. the local normal approximation is ``q_l = N(theta_l + Sigma_l grad log p(theta_l), Sigma_l)`` (a quasi-Newton
   step to the local mode, Algorithm 4 BFGS-Sample); its ELBO is estimated from ``K`` draws,
   ``mean_k log p(phi_k) - log q_l(phi_k)``;
4. return the ``q_l`` with the largest ELBO estimate.

Here ``Sigma_l`` is formed densely (``O(J D^2)`` per iteration) by applying the ``J`` stored BFGS updates to
``diag(alpha)`` in order, ``H <- (I - rho s y^T) H (I - rho y s^T) + rho s s^T`` with ``rho = 1 / y^T s``, which is
algebraically the compact form II.1 (Byrd, Nocedal & Schnabel 1994, Theorem 2.2); its Cholesky factor gives the
draws. This suits the tens to hundreds of coordinates of ppvi's full-rank fits.

L-BFGS's line search is the weak-Wolfe bisection of Lewis & Overton (2013, "Nonsmooth optimization via quasi-Newton
methods", Section 4.2), Armijo constant 1e-4 and curvature constant 0.9 (Nocedal & Wright 2006, Section 3.1's
usual quasi-Newton values); a trial point with a non-finite log density or gradient counts as an Armijo failure,
so the step shrinks back into the support. Each trial is one gradient evaluation; the ``K`` ELBO draws per
iteration are log-density evaluations without gradient, counted apart (``density_evaluations``).

Pathfinder is its own start: it begins at a point, not at a Gaussian, and its answer sits near the mode (the
best ELBO is usually reached in the last iterations of the path). Give it the point an optimiser would start from
(ppvi's prior median or ``T(0)``), not the mode of a Laplace start, where L-BFGS would stop at once with no
curvature pairs and the approximation would be ``N(mode, diag(alpha_0))``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ppvi.solvers._gaussian import (
    GaussianApproximation,
    LogDensity,
    draw,
    gaussian_log_density,
    safe_cholesky,
    value_and_gradient,
)

__all__ = [
    "PathfinderInfo",
    "PathfinderResult",
    "PathfinderState",
    "init",
    "local_approximation",
    "run",
    "step",
]

#: History size ``J`` of L-BFGS (Zhang et al.'s default, "J = 6").
HISTORY_SIZE = 6
#: Draws ``K`` per ELBO estimate (Zhang et al.'s default, "K = 5").
ELBO_DRAWS = 5
#: Curvature threshold of a kept pair, ``s^T y > eps ||y||^2`` (Zhang et al.: float64's machine epsilon).
CURVATURE_EPSILON = 2.2e-16
#: Armijo (sufficient decrease) and curvature constants of the weak Wolfe line search.
ARMIJO_CONSTANT = 1e-4
CURVATURE_CONSTANT = 0.9
#: Trials of one line search before L-BFGS gives up on the direction (step 2^-30 of the first trial).
MAXIMUM_LINE_SEARCH_TRIALS = 30
#: L-BFGS stops when the relative decrease of ``-log p`` over an iteration falls below this. Zhang et al. use
#: 1e-13 with Stan's optimiser; 1e-9 is where the objective's float64 round-off (a log density of order 1e3 summed
#: over a thousand terms) starts to dominate the decrease, and ends paths that have stopped improving the fit.
RELATIVE_TOLERANCE = 1e-9
#: ... or when the gradient's largest entry falls below this (nats per unconstrained unit).
GRADIENT_TOLERANCE = 1e-8


class PathfinderState(NamedTuple):
    """State of Pathfinder between L-BFGS iterations.

    Attributes
    ----------
    position, gradient : torch.Tensor
        The current point ``theta_l`` ``(D,)`` and ``grad log p`` there.
    value : float
        ``log p(theta_l)``.
    inverse_hessian_diagonal : torch.Tensor
        ``alpha_l`` ``(D,)``.
    position_differences, gradient_differences : tuple of torch.Tensor
        The kept pairs ``s`` and ``y`` (of ``f = -log p``), oldest first, at most ``HISTORY_SIZE``.
    best : GaussianApproximation
        The local approximation with the largest ELBO estimate so far.
    best_elbo : float
        Its ELBO estimate.
    iteration : int
        L-BFGS iterations taken.
    gradient_evaluations : int
        Points at which the gradient of ``log p`` was evaluated (line-search trials and the start).
    density_evaluations : int
        Points at which only ``log p`` was evaluated (the ELBO draws).
    converged : bool
        Whether L-BFGS has met its tolerance.
    """

    position: torch.Tensor
    gradient: torch.Tensor
    value: float
    inverse_hessian_diagonal: torch.Tensor
    position_differences: tuple[torch.Tensor, ...]
    gradient_differences: tuple[torch.Tensor, ...]
    best: GaussianApproximation
    best_elbo: float
    iteration: int
    gradient_evaluations: int
    density_evaluations: int
    converged: bool


class PathfinderInfo(NamedTuple):
    """What one Pathfinder iteration did: the ELBO estimate of this iterate's local approximation, the log density
    reached, the line search's trials, and whether the curvature pair was kept."""

    elbo: float
    log_density: float
    line_search_trials: int
    pair_kept: bool


class PathfinderResult(NamedTuple):
    """Result of :func:`run`.

    Attributes
    ----------
    loc, scale_tril : torch.Tensor
        The local approximation with the largest ELBO estimate.
    iterations : int
        L-BFGS iterations.
    gradient_evaluations : int
        Points at which the gradient of ``log p`` was evaluated.
    density_evaluations : int
        Points at which only ``log p`` was evaluated (``K`` per iteration, for the ELBO).
    converged : bool
        Whether L-BFGS met its tolerance before ``max_iterations``.
    elbo : torch.Tensor
        ELBO estimate of each iterate's local approximation (float64, length ``iterations + 1``).
    best_iteration : int
        The iterate whose approximation was returned.
    message : str
        How the run ended.
    """

    loc: torch.Tensor
    scale_tril: torch.Tensor
    iterations: int
    gradient_evaluations: int
    density_evaluations: int
    converged: bool
    elbo: torch.Tensor
    best_iteration: int
    message: str


def _diagonal_update(diagonal: torch.Tensor, position_step: torch.Tensor, gradient_step: torch.Tensor) -> torch.Tensor:
    """Algorithm 3's inner loop (Gilbert & Lemarechal 1989): the new diagonal ``alpha`` from the newest pair."""
    a = (gradient_step * diagonal * gradient_step).sum()
    b = (gradient_step * position_step).sum()
    c = (position_step / diagonal * position_step).sum()
    inverse = a / (b * diagonal) + gradient_step**2 / b - a * position_step**2 / (b * c * diagonal**2)
    return 1.0 / inverse


def local_approximation(state: PathfinderState) -> GaussianApproximation | None:
    """The normal approximation at the current iterate: ``N(theta + Sigma grad log p(theta), Sigma)`` with
    ``Sigma = diag(alpha)`` updated by the kept BFGS pairs (formula II.1, Algorithm 4); None if ``Sigma`` cannot
    be factored."""
    inverse_hessian = torch.diag(state.inverse_hessian_diagonal)
    for position_step, gradient_step in zip(state.position_differences, state.gradient_differences, strict=True):
        rho = 1.0 / (gradient_step @ position_step)
        hessian_gradient = inverse_hessian @ gradient_step
        inverse_hessian = (
            inverse_hessian
            - rho * (torch.outer(position_step, hessian_gradient) + torch.outer(hessian_gradient, position_step))
            + (rho**2 * (gradient_step @ hessian_gradient) + rho) * torch.outer(position_step, position_step)
        )
    try:
        scale_tril = safe_cholesky(inverse_hessian)
    except ValueError:
        return None
    loc = state.position + inverse_hessian @ state.gradient
    return GaussianApproximation(loc, scale_tril)


def _elbo(
    approximation: GaussianApproximation | None,
    log_density: LogDensity,
    generator: torch.Generator | None,
    num_draws: int,
) -> float:
    """``mean_k log p(phi_k) - log q(phi_k)`` over ``num_draws`` draws of ``q`` (no gradient); ``-inf`` if any draw
    has a non-finite log density (Zhang et al. treat such an approximation as unusable)."""
    if approximation is None:
        return -math.inf
    points, _ = draw(approximation, num_draws, generator)
    with torch.no_grad():
        values = log_density(points)
    if not bool(torch.isfinite(values).all()):
        return -math.inf
    return float((values - gaussian_log_density(approximation, points)).mean())


def init(
    log_density: LogDensity,
    loc: torch.Tensor,
    scale_tril: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    elbo_draws: int = ELBO_DRAWS,
) -> PathfinderState:
    """Start Pathfinder at the point ``loc``.

    Parameters
    ----------
    log_density : callable
        Batched unnormalised log density.
    loc : torch.Tensor
        Starting point ``theta_0`` ``(D,)``.
    scale_tril : torch.Tensor, optional
        If given, ``alpha_0 = diag(scale_tril scale_tril^T)``, the starting Gaussian's variances, as the initial
        diagonal inverse Hessian (Zhang et al. start from ``alpha_0 = 1``, the default).
    generator : torch.Generator, optional
        Source of the ELBO draws.
    elbo_draws : int
        ``K``.

    Raises
    ------
    ValueError
        If ``log p`` or its gradient is not finite at ``loc``.
    """
    position = torch.as_tensor(loc, dtype=torch.float64).detach().clone()
    values, gradients = value_and_gradient(log_density, position.unsqueeze(0))
    if not bool(torch.isfinite(values).all() & torch.isfinite(gradients).all()):
        raise ValueError("Pathfinder needs a starting point with a finite log density and gradient")
    if scale_tril is None:
        diagonal = torch.ones_like(position)
    else:
        diagonal = (torch.as_tensor(scale_tril, dtype=torch.float64) ** 2).sum(-1)
    start = GaussianApproximation(position, torch.diag(diagonal.sqrt()))
    state = PathfinderState(
        position, gradients[0], float(values[0]), diagonal, (), (), start, -math.inf, 0, 1, 0, False
    )
    approximation = local_approximation(state)
    elbo = _elbo(approximation, log_density, generator, elbo_draws)
    best = approximation if approximation is not None else state.best
    return state._replace(best=best, best_elbo=elbo, density_evaluations=elbo_draws)


def _direction(state: PathfinderState) -> torch.Tensor:
    """L-BFGS two-loop recursion (Nocedal & Wright 2006, Algorithm 7.4): ``-H grad f`` with ``H`` built on
    ``diag(alpha)``; ``grad f = -grad log p``."""
    vector = -state.gradient  # grad f
    coefficients = []
    pairs = list(zip(state.position_differences, state.gradient_differences, strict=True))
    for position_step, gradient_step in reversed(pairs):
        rho = 1.0 / (gradient_step @ position_step)
        coefficient = rho * (position_step @ vector)
        vector = vector - coefficient * gradient_step
        coefficients.append((rho, coefficient))
    vector = state.inverse_hessian_diagonal * vector
    for (position_step, gradient_step), (rho, coefficient) in zip(pairs, reversed(coefficients), strict=True):
        vector = vector + position_step * (coefficient - rho * (gradient_step @ vector))
    return -vector


def step(
    state: PathfinderState,
    log_density: LogDensity,
    generator: torch.Generator | None = None,
    *,
    history_size: int = HISTORY_SIZE,
    elbo_draws: int = ELBO_DRAWS,
) -> tuple[PathfinderState, PathfinderInfo]:
    """One L-BFGS iteration (weak Wolfe line search), then the local approximation at the new point and its ELBO.

    If the line search finds no acceptable step within :data:`MAXIMUM_LINE_SEARCH_TRIALS` trials, the state is
    returned unmoved with ``converged=True`` (the path has ended).
    """
    direction = _direction(state)
    slope = -(state.gradient @ direction)  # directional derivative of f = -log p
    if not slope < 0:  # not a descent direction: restart from the diagonal
        state = state._replace(position_differences=(), gradient_differences=())
        direction = state.inverse_hessian_diagonal * state.gradient
        slope = -(state.gradient @ direction)
    length = 1.0 if state.position_differences else min(1.0, 1.0 / float(state.gradient.abs().max()))
    lower, upper = 0.0, math.inf
    evaluations, accepted = 0, None
    objective = -state.value
    for _ in range(MAXIMUM_LINE_SEARCH_TRIALS):
        trial = state.position + length * direction
        values, gradients = value_and_gradient(log_density, trial.unsqueeze(0))
        evaluations += 1
        trial_objective, trial_gradient = -float(values[0]), gradients[0]
        finite = math.isfinite(trial_objective) and bool(torch.isfinite(trial_gradient).all())
        if not finite or trial_objective > objective + ARMIJO_CONSTANT * length * float(slope):
            upper = length
        elif -(trial_gradient @ direction) < CURVATURE_CONSTANT * float(slope):
            lower = length
        else:
            accepted = (trial, trial_gradient, -trial_objective)
            break
        length = 0.5 * (lower + upper) if math.isfinite(upper) else 2.0 * lower
    counted = state._replace(gradient_evaluations=state.gradient_evaluations + evaluations)
    if accepted is None:
        return counted._replace(converged=True), PathfinderInfo(-math.inf, state.value, evaluations, False)
    position, gradient, value = accepted
    position_step = position - state.position
    gradient_step = state.gradient - gradient  # the change of grad f
    keep = bool(position_step @ gradient_step > CURVATURE_EPSILON * (gradient_step @ gradient_step))
    diagonal = state.inverse_hessian_diagonal
    positions, gradients_history = state.position_differences, state.gradient_differences
    if keep:
        candidate = _diagonal_update(diagonal, position_step, gradient_step)
        if bool(torch.isfinite(candidate).all() & (candidate > 0).all()):
            diagonal = candidate
        positions = (*positions, position_step)[-history_size:]
        gradients_history = (*gradients_history, gradient_step)[-history_size:]
    decrease = abs(value - state.value) / max(abs(value), abs(state.value), 1.0)
    converged = decrease < RELATIVE_TOLERANCE or float(gradient.abs().max()) < GRADIENT_TOLERANCE
    moved = counted._replace(
        position=position, gradient=gradient, value=value, inverse_hessian_diagonal=diagonal,
        position_differences=positions, gradient_differences=gradients_history, iteration=state.iteration + 1,
        density_evaluations=state.density_evaluations + elbo_draws, converged=converged,
    )
    approximation = local_approximation(moved)
    elbo = _elbo(approximation, log_density, generator, elbo_draws)
    if elbo > moved.best_elbo:
        moved = moved._replace(best=approximation, best_elbo=elbo)
    return moved, PathfinderInfo(elbo, value, evaluations, keep)


def run(
    log_density: LogDensity,
    initial_loc: torch.Tensor,
    initial_scale_tril: torch.Tensor | None = None,
    *,
    max_iterations: int = 1000,
    generator: torch.Generator | None = None,
    history_size: int = HISTORY_SIZE,
    elbo_draws: int = ELBO_DRAWS,
) -> PathfinderResult:
    """Single-path Pathfinder (Algorithm 1) from the point ``initial_loc``.

    Parameters
    ----------
    log_density : callable
        Batched ``(B, D) -> (B,)`` unnormalised log density, float64.
    initial_loc : torch.Tensor
        Starting point of L-BFGS ``(D,)``.
    initial_scale_tril : torch.Tensor, optional
        Sets the initial diagonal inverse Hessian (see :func:`init`).
    max_iterations : int
        Cap on L-BFGS iterations (Zhang et al.'s ``L = 1000``).
    generator : torch.Generator, optional
        Source of the ELBO draws.
    history_size, elbo_draws : int
        ``J`` and ``K``.

    Returns
    -------
    PathfinderResult
        The stopping rule is L-BFGS's own (:data:`RELATIVE_TOLERANCE`, :data:`GRADIENT_TOLERANCE`): the path ends
        where the optimiser stops, and the best approximation along it is returned.
    """
    state = init(log_density, initial_loc, initial_scale_tril, generator=generator, elbo_draws=elbo_draws)
    elbos, best_iteration = [state.best_elbo], 0
    for _ in range(max_iterations):
        if state.converged:
            break
        previous_best = state.best_elbo
        state, info = step(state, log_density, generator, history_size=history_size, elbo_draws=elbo_draws)
        elbos.append(info.elbo)
        if state.best_elbo > previous_best:
            best_iteration = state.iteration
    message = (
        f"L-BFGS stopped after {state.iteration} iterations; best ELBO at iteration {best_iteration}"
        if state.converged
        else f"stopped at max_iterations={max_iterations}"
    )
    return PathfinderResult(
        state.best.loc, state.best.scale_tril, state.iteration, state.gradient_evaluations,
        state.density_evaluations, state.converged, torch.tensor(elbos, dtype=torch.float64), best_iteration, message,
    )
