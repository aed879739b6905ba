"""Batch and match (BaM): a full-rank Gaussian by closed-form proximal steps on a score-based divergence.

Cai, Modi, Pillaud-Vivien, Margossian, Gower, Blei & Saul (2024), "Batch and match: black-box variational inference
with a score-based divergence", ICML (PMLR 235); equation numbers below are the paper's. BaM minimises the
score-based divergence ``D(q; p) = E_q ||grad log q - grad log p||^2_{Cov(q)}`` (eq. 2) over Gaussians ``q`` by a
stochastic proximal point method (Algorithm 1). Each iteration

* **batch** (eqs. 4, 6): draws ``z_1..z_B ~ q_t = N(mu_t, Sigma_t)``, evaluates the scores ``g_b = grad log p(z_b)``,
  and forms their means ``z_bar``, ``g_bar`` and covariances ``C``, ``Gamma`` (divided by ``B``);
* **match** (eqs. 5, 8): sets ``q_{t+1} = argmin_q D_hat_{q_t}(q; p) + (2 / lambda_t) KL(q_t; q)``, whose minimiser
  is in closed form: with (eqs. 10-11)

  ``U = lambda_t Gamma + lambda_t / (1 + lambda_t) g_bar g_bar^T``,
  ``V = Sigma_t + lambda_t C + lambda_t / (1 + lambda_t) (mu_t - z_bar)(mu_t - z_bar)^T``,

  the covariance solves ``Sigma U Sigma + Sigma = V`` (eq. 9), ``Sigma_{t+1} = 2 V (I + (I + 4 U V)^{1/2})^{-1}``
  (eq. 12, Lemma B.1), and the mean is ``mu_{t+1} = mu_t / (1 + lambda_t) + lambda_t / (1 + lambda_t)
  (Sigma_{t+1} g_bar + z_bar)`` (eq. 13).

The reference implementation (github.com/modichirag/GSM-VI, ``gsmvi/bam.py``, ``bam_update``) and Turing's
AdvancedVI.jl (``FisherMinBatchMatch``) compute exactly these updates.

Numerics. The divergence (Property 2) and the KL regulariser are both invariant under affine maps of the
coordinates, so the match step commutes with them, and each step is computed in the coordinates whitened by the
current Gaussian, ``z = mu_t + L_t e``: there ``mu_t = 0``, ``Sigma_t = I``, the draws are the standard normal ``e_b``
and the scores ``L_t^T g_b``. ``V`` then has every eigenvalue at least 1, whatever the conditioning of the posterior
(kidiq's un-centred regression has a covariance condition number near 1e7). Eq. 12 is evaluated as in the proof of
Lemma B.2 (eqs. 65-74): with ``V = P P^T`` (Cholesky) and ``P^T U P = E Lambda E^T`` (symmetric eigendecomposition,
eigenvalues clipped at 0), ``Sigma_{t+1} = P E diag(2 / (1 + sqrt(1 + 4 Lambda))) E^T P^T``, symmetric positive
definite by construction; its Cholesky factor comes from a QR factorisation of ``(P E diag(.)^{1/2})^T``, and the
new factor is ``L_{t+1} = L_t chol(Sigma_{t+1}^{whitened})``, a product of lower-triangular matrices. No covariance
is ever formed and refactored in the original coordinates.

Learning rate. ``lambda_t = B D / (t + 1)`` by default, the decaying schedule the paper uses for non-Gaussian and
posteriordb targets (Sections 5.1-5.2); a constant ``lambda = B D`` is its choice for Gaussian targets (Section 5.1).
Theorem 3.1: for a Gaussian target and infinite batch, the errors contract by ``1 - lambda beta / (1 + lambda)`` per
iteration, so ``lambda = B D`` (hundreds) all but solves a Gaussian target in one step once ``B > D``.

Start. Theorem 3.1's ``beta = min(alpha, (1 + lambda) / (1 + lambda + ||eps_0||^2))`` shrinks with the squared
distance ``||eps_0||^2`` of the start's mean from the target's, in target sds: from far away BaM crawls. Measured on
kidiq from ``N(0, I)`` with ``B = 8`` (``log sigma`` 85 posterior sds off, the slope 10, the intercept 4; the
posterior sds of slope and ``log sigma`` 0.06 and 0.03 against the start's 1): after 100 iterations (800 gradient
evaluations) the mean was still 26 reference sds off. From ppvi's Laplace start it needs 5 iterations. Start it
from the Laplace approximation (loc, ``scale_tril_from_precision(precision)``), or from any Gaussian within a few
posterior sds of the answer.

Stopping and output. :class:`ppvi.solvers._gaussian.MovementRule` (no knowledge of the answer: the Jeffreys
divergence between iterates), and the average of the last ``window`` iterates is returned (Polyak-Ruppert): on a
non-Gaussian target BaM's iterates jitter around their fixed point with the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
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
    lower_factor_of_product,
    safe_cholesky,
    value_and_gradient,
)

__all__ = [
    "BatchAndMatchInfo",
    "BatchAndMatchResult",
    "BatchAndMatchState",
    "default_batch_size",
    "init",
    "match",
    "paper_learning_rate",
    "run",
    "step",
]

#: Fewest draws with a finite log density and gradient for a match step: below half the batch the Gaussian puts
#: much of its mass where the target has none (an overflowing exp, a point outside the support), and its statistics
#: would describe only the part of it that is left.
MINIMUM_FINITE_FRACTION = 0.5
#: When a step is refused for lack of finite draws, the Gaussian's spread is multiplied by this before the next
#: batch: its draws move halfway back to its mean, where the density was finite when the Gaussian was built.
REJECTION_SHRINK = 0.5


class BatchAndMatchState(NamedTuple):
    """State of BaM between iterations.

    Attributes
    ----------
    loc, scale_tril : torch.Tensor
        The current Gaussian ``q_t``: mean ``(D,)`` and Cholesky factor ``(D, D)`` of its covariance.
    iteration : int
        Iterations taken (``t``).
    gradient_evaluations : int
        Points at which the gradient of ``log p`` has been evaluated so far.
    """

    loc: torch.Tensor
    scale_tril: torch.Tensor
    iteration: int
    gradient_evaluations: int


class BatchAndMatchInfo(NamedTuple):
    """What one BaM iteration saw.

    Attributes
    ----------
    elbo : float
        ``mean_b log p(z_b) + H(q_t)`` over the batch's finite draws: an unbiased ELBO estimate of ``q_t`` (up to the
        unknown normaliser of ``p``), free since the log densities come with the scores.
    score_divergence : float
        The batch estimate of ``D(q_t; p)`` (eq. 3): ``mean_b ||e_b + L_t^T g_b||^2`` in whitened coordinates. Zero
        at a Gaussian target's answer; it levels off above zero for other targets.
    step_divergence : float
        Jeffreys divergence between ``q_t`` and ``q_{t+1}`` (:func:`ppvi.solvers._gaussian.jeffreys_divergence`);
        ``inf`` for a refused step.
    learning_rate : float
        ``lambda_t``.
    num_finite : int
        Draws of the batch with a finite log density and gradient.
    accepted : bool
        Whether the match step was taken (False: too few finite draws, or a non-finite update; see :func:`step`).
    """

    elbo: float
    score_divergence: float
    step_divergence: float
    learning_rate: float
    num_finite: int
    accepted: bool


#: Result of :func:`run`: the shared result of ppvi's Gaussian solvers (:class:`ppvi.solvers._gaussian.SolverResult`).
BatchAndMatchResult = SolverResult


def default_batch_size(dimension: int) -> int:
    """Default batch ``B = max(8, 4 D)``.

    The match step estimates ``D x D`` covariances ``C`` and ``Gamma`` from ``B`` draws; with ``B <= D`` they are
    singular and BaM corrects the Gaussian only in the span of the batch (the paper's deep generative model needed
    ``B`` near ``D``, Section 5.3). Measured from ppvi's Laplace start over 10 seeds, stopping on
    :class:`ppvi.solvers._gaussian.MovementRule` with a window of 5 (unconstrained coordinates, against
    posteriordb's reference draws): ``B = 2 D`` left the worst mean 0.11 reference sds off on sblrc-blr (276
    gradient evaluations at most), ``3 D`` 0.08 (324), ``4 D`` 0.06 (288) and 0.075 on arK-arK (140): larger
    batches settle in fewer iterations, so they cost little more.
    """
    return max(8, 4 * dimension)


def paper_learning_rate(batch_size: int, dimension: int) -> Callable[[int], float]:
    """The paper's decaying schedule ``lambda_t = B D / (t + 1)`` (Sections 5.1-5.2), ``t`` counted from 0."""
    scale = float(batch_size * dimension)
    return lambda iteration: scale / (iteration + 1)


def init(
    log_density: LogDensity | None,
    loc: torch.Tensor,
    scale_tril: torch.Tensor | None = None,
    *,
    covariance: torch.Tensor | None = None,
) -> BatchAndMatchState:
    """The state at a starting Gaussian ``N(loc, scale_tril scale_tril^T)`` or ``N(loc, covariance)``.

    Parameters
    ----------
    log_density : callable or None
        Unused (the interface of every solver takes it); BaM evaluates nothing at its start.
    loc : torch.Tensor
        Starting mean ``(D,)``.
    scale_tril : torch.Tensor, optional
        Starting Cholesky factor ``(D, D)``; the identity when neither it nor ``covariance`` is given.
    covariance : torch.Tensor, optional
        Starting covariance ``(D, D)``, factored by :func:`ppvi.solvers._gaussian.safe_cholesky`.
    """
    start = initial_gaussian(loc, scale_tril, covariance)
    return BatchAndMatchState(start.loc, start.scale_tril, 0, 0)


def match(
    standard: torch.Tensor, whitened_scores: torch.Tensor, learning_rate: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The match step (eqs. 9-13) in the coordinates where ``q_t = N(0, I)``.

    Parameters
    ----------
    standard : torch.Tensor
        The batch ``e_b`` ``(B, D)``, draws of ``N(0, I)``.
    whitened_scores : torch.Tensor
        The target's scores in these coordinates, ``L_t^T g_b``, ``(B, D)``.
    learning_rate : float
        ``lambda_t > 0``.

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        The new mean ``(D,)`` and the Cholesky factor ``(D, D)`` of the new covariance, in these coordinates.
    """
    count, dimension = standard.shape
    rate = float(learning_rate)
    identity = torch.eye(dimension, dtype=standard.dtype, device=standard.device)
    # Batch statistics, eq. 6 (covariances divided by B).
    draws_mean = standard.mean(0)
    scores_mean = whitened_scores.mean(0)
    centred_draws = standard - draws_mean
    centred_scores = whitened_scores - scores_mean
    draws_covariance = centred_draws.T @ centred_draws / count
    scores_covariance = centred_scores.T @ centred_scores / count
    shrink = rate / (1.0 + rate)
    # Eqs. 10-11 with mu_t = 0 and Sigma_t = I.
    u_matrix = rate * scores_covariance + shrink * torch.outer(scores_mean, scores_mean)
    v_matrix = identity + rate * draws_covariance + shrink * torch.outer(draws_mean, draws_mean)
    # Eq. 12 through Lemma B.2 (eqs. 65-74): V = P P^T, P^T U P = E diag(nu) E^T,
    # Sigma = P E diag(2 / (1 + sqrt(1 + 4 nu))) E^T P^T.
    v_factor = safe_cholesky(v_matrix)
    congruent = v_factor.T @ u_matrix @ v_factor
    eigenvalues, eigenvectors = torch.linalg.eigh(0.5 * (congruent + congruent.T))
    eigenvalues = eigenvalues.clamp(min=0.0)
    weights = 2.0 / (1.0 + torch.sqrt(1.0 + 4.0 * eigenvalues))
    root = (v_factor @ eigenvectors) * weights.sqrt()  # Sigma_{t+1} = root root^T
    # Eq. 13 with mu_t = 0.
    new_loc = shrink * (root @ (root.T @ scores_mean) + draws_mean)
    return new_loc, lower_factor_of_product(root)


def step(
    state: BatchAndMatchState,
    log_density: LogDensity,
    generator: torch.Generator | None = None,
    *,
    batch_size: int,
    learning_rate: float,
) -> tuple[BatchAndMatchState, BatchAndMatchInfo]:
    """One BaM iteration (Algorithm 1, lines 3-7): draw a batch, evaluate its scores, match.

    Draws whose log density or gradient is not finite are left out of the statistics. If fewer than
    :data:`MINIMUM_FINITE_FRACTION` of the batch are finite (or the update itself is not finite), the step is
    refused: the mean stays and the spread is multiplied by :data:`REJECTION_SHRINK`. The batch's gradient
    evaluations are counted either way.

    Parameters
    ----------
    state : BatchAndMatchState
    log_density : callable
        Batched ``(B, D) -> (B,)`` unnormalised log density.
    generator : torch.Generator, optional
        Source of the draws.
    batch_size : int
        ``B``.
    learning_rate : float
        ``lambda_t > 0``.
    """
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate}")
    current = GaussianApproximation(state.loc, state.scale_tril)
    points, standard = draw(current, batch_size, generator)
    values, gradients = value_and_gradient(log_density, points)
    finite = finite_rows(values, gradients)
    num_finite = int(finite.sum())
    evaluations = state.gradient_evaluations + batch_size
    refused = BatchAndMatchState(
        state.loc, REJECTION_SHRINK * state.scale_tril, state.iteration + 1, evaluations
    )
    if num_finite < max(2, math.ceil(MINIMUM_FINITE_FRACTION * batch_size)):
        info = BatchAndMatchInfo(math.nan, math.nan, math.inf, float(learning_rate), num_finite, False)
        return refused, info
    standard, values = standard[finite], values[finite]
    whitened_scores = gradients[finite] @ state.scale_tril  # rows L^T g_b
    elbo = float(values.mean() + entropy(current))
    score_divergence = float(((standard + whitened_scores) ** 2).sum(-1).mean())
    try:
        whitened_loc, whitened_factor = match(standard, whitened_scores, learning_rate)
    except ValueError:  # a non-finite statistic reached the factorisation
        whitened_loc = whitened_factor = None
    if whitened_loc is None or not bool(torch.isfinite(whitened_loc).all() & torch.isfinite(whitened_factor).all()):
        info = BatchAndMatchInfo(elbo, score_divergence, math.inf, float(learning_rate), num_finite, False)
        return refused, info
    new = GaussianApproximation(state.loc + state.scale_tril @ whitened_loc, state.scale_tril @ whitened_factor)
    movement = jeffreys_divergence(current, new)
    info = BatchAndMatchInfo(elbo, score_divergence, movement, float(learning_rate), num_finite, True)
    return BatchAndMatchState(new.loc, new.scale_tril, state.iteration + 1, evaluations), info


def run(
    log_density: LogDensity,
    initial_loc: torch.Tensor,
    initial_scale_tril: torch.Tensor | None = None,
    *,
    batch_size: int | None = None,
    max_iterations: int = 200,
    generator: torch.Generator | None = None,
    learning_rate: float | Callable[[int], float] | None = None,
    stopping_rule: MovementRule | None = None,
) -> BatchAndMatchResult:
    """Fit a full-rank Gaussian to ``log_density`` by BaM from a starting Gaussian.

    Parameters
    ----------
    log_density : callable
        Batched ``(B, D) -> (B,)`` unnormalised log density on unconstrained coordinates, float64.
    initial_loc : torch.Tensor
        Starting mean ``(D,)``, e.g. ppvi's Laplace start's mode (``LaplaceStart.loc``).
    initial_scale_tril : torch.Tensor, optional
        Starting Cholesky factor ``(D, D)``, e.g. ``scale_tril_from_precision(LaplaceStart.precision)``; the
        identity by default.
    batch_size : int, optional
        Draws per iteration ``B``; :func:`default_batch_size` by default.
    max_iterations : int
        Cap on iterations.
    generator : torch.Generator, optional
        Source of the draws (seed it for a reproducible fit).
    learning_rate : float or callable, optional
        ``lambda_t``: a constant, or a function of the iteration ``t`` (from 0); by default the paper's
        :func:`paper_learning_rate`.
    stopping_rule : MovementRule, optional
        When to stop (:class:`ppvi.solvers._gaussian.MovementRule`; its defaults by default).

    Returns
    -------
    BatchAndMatchResult
        The average of the last ``stopping_rule.window`` iterates (:func:`ppvi.solvers._gaussian.average`), in the
        coordinates of the log density.
    """
    state = init(log_density, initial_loc, initial_scale_tril)
    dimension = state.loc.shape[-1]
    batch_size = default_batch_size(dimension) if batch_size is None else int(batch_size)
    if batch_size < 2:
        raise ValueError(f"batch_size must be at least 2 (BaM needs batch covariances), got {batch_size}")
    if learning_rate is None:
        schedule = paper_learning_rate(batch_size, dimension)
    elif callable(learning_rate):
        schedule = learning_rate
    else:
        constant = float(learning_rate)
        schedule = lambda iteration: constant  # noqa: E731
    return iterate_until_settled(
        state,
        lambda state: step(
            state, log_density, generator, batch_size=batch_size, learning_rate=schedule(state.iteration)
        ),
        max_iterations,
        stopping_rule,
    )
