"""Batched Gaussian variational inference: ``M`` independent problems in one vectorised optimisation.

VSBC and SBC (:mod:`ppvi.calibration`) fit a Gaussian guide to each of ``M`` simulated posteriors. Here the ``M``
guides are trained at once: parameters of shape ``(M, D)`` (and ``(M, D, D)`` Cholesky factors for
``"fullrank"``), one log density ``(S, A, D) -> (S, A)`` evaluated for the ``A`` replications still training,
and the functional Adam of :mod:`ppvi.engine` with per-replication learning rates and epsilons. Each replication's
loss depends only on its own parameters, so the summed loss gives every replication its own gradient.

The state is a NamedTuple and the step a pure function of it (NumPyro's ``svi.py`` ``init``/``update``, blackjax's
``vi/`` modules): :func:`init` builds a :class:`BatchedState` from a batched Laplace start, :func:`update` takes
one Adam step of the replications still training, :func:`end_window` applies the stopping rule and the stage rule
of :mod:`ppvi.training` at the end of each window and freezes finished replications, and :func:`run` is the loop.

Random numbers come from :class:`ReplicationStreams`: the noise of replication ``m`` at step ``t`` is a function
of ``(seed, m, t)`` only, not of which other replications share its batch. A run over any subset of the
replications -- one shard of a Dask cluster (:mod:`ppvi.sharding`) -- therefore gives exactly the fits of a run
over all of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import numpy as np
import torch

from ppvi import engine as engines
from ppvi import training
from ppvi.convergence import StoppingRule, is_stationary
from ppvi.fit import PRECONDITIONED_ADAM_EPSILON
from ppvi.guides import DEFAULT_INIT_SCALE, factor_row_scale
from ppvi.initialization import BatchedLaplaceStart

__all__ = [
    "RANDOM_BLOCK_SIZE", "ReplicationStreams", "BatchedState", "BatchedFit", "init", "update", "end_window", "run",
]

GuideFamily = Literal["meanfield", "fullrank"]

#: Replications per random stream. Every draw takes the values of whole blocks, so a batch that holds part of a
#: block draws up to ``RANDOM_BLOCK_SIZE - 1`` unused rows; 64 keeps that waste small while a batch of M = 1000
#: replications makes 16 draw calls a step (one call per replication would cost more than the step itself).
RANDOM_BLOCK_SIZE = 64
#: Adam's own epsilon, for replications trained in raw unconstrained units (no Laplace start); whitened ones use
#: ``ppvi.fit``'s :data:`~ppvi.fit.PRECONDITIONED_ADAM_EPSILON`.
RAW_ADAM_EPSILON = 1e-8


class ReplicationStreams:
    """Standard normal draws per replication that do not depend on which replications share the batch.

    Replications are grouped in blocks of :data:`RANDOM_BLOCK_SIZE` consecutive *global* indices. Block ``b``
    draws from its own ``torch.Generator``, seeded by ``numpy.random.SeedSequence((seed, purpose, b))``, and every
    draw takes the values of its whole block and keeps the rows asked for. So the noise of replication ``m`` at
    the ``t``-th draw is a function of ``(seed, purpose, m, t)`` alone (SeedSequence's hashing makes the blocks'
    streams independent; O'Neill 2015 and numpy's documentation on parallel streams).

    Parameters
    ----------
    seed : int
        The run's seed.
    purpose : int
        Separates the streams of different uses of the same replications (training noise, Monte Carlo p-values,
        SBC draws), so that one use drawing more never shifts another.
    device, dtype
        Of the draws.
    """

    def __init__(self, seed: int, purpose: int, device: torch.device | str, dtype: torch.dtype):
        self.seed, self.purpose = int(seed), int(purpose)
        self.device, self.dtype = torch.device(device), dtype
        self._generators: dict[int, torch.Generator] = {}

    def _generator(self, block: int) -> torch.Generator:
        generator = self._generators.get(block)
        if generator is None:
            state = np.random.SeedSequence((self.seed, self.purpose, block)).generate_state(2, np.uint32)
            generator = torch.Generator(device=self.device)
            # 63 bits of the block's state: torch seeds take a non-negative int64.
            generator.manual_seed((int(state[0]) << 31) ^ int(state[1]))
            self._generators[block] = generator
        return generator

    def normal(self, batch_shape: Sequence[int], replications: torch.Tensor, event_shape: Sequence[int]):
        """Draws of shape ``(*batch_shape, len(replications), *event_shape)`` for the *global* indices
        ``replications`` (sorted ascending)."""
        indices = replications.detach().cpu().long()
        blocks = torch.unique(indices // RANDOM_BLOCK_SIZE)
        pieces = [
            torch.randn(
                (*batch_shape, RANDOM_BLOCK_SIZE, *event_shape), generator=self._generator(int(block)),
                device=self.device, dtype=self.dtype,
            )
            for block in blocks
        ]
        drawn = torch.cat(pieces, dim=len(batch_shape))
        rows = torch.searchsorted(blocks, indices // RANDOM_BLOCK_SIZE) * RANDOM_BLOCK_SIZE
        rows = (rows + indices % RANDOM_BLOCK_SIZE).to(self.device)
        return drawn.index_select(len(batch_shape), rows)


class BatchedState(NamedTuple):
    """The state of a batched Gaussian fit between steps.

    Attributes
    ----------
    parameters : tuple of torch.Tensor
        Of the ``A`` replications still training, in each one's whitened coordinates: ``loc`` ``(A, D)``,
        softplus-inverse scales ``(A, D)`` and, for ``"fullrank"``, the strictly lower triangle ``(A, D, D)``.
    adam : ppvi.engine.AdamState
        Adam's moments of ``parameters``.
    active : torch.Tensor
        The positions (in ``0..M-1``) of the replications still training, ascending.
    step : int
        Steps taken.
    stage, stage_start : numpy.ndarray
        Per replication: the index into :data:`ppvi.training.STAGES` and the step the stage began.
    step_factor : torch.Tensor
        Per replication: ``STAGES[stage]``, the factor on the learning rate.
    window_loc, window_scale : torch.Tensor
        Sums of the unwhitened iterates of the current window (for Polyak averaging), of the active replications.
    window_count : int
        Iterates summed.
    final_loc, final_scale : torch.Tensor
        The averaged fits of the frozen replications (zeros for those still training).
    converged : numpy.ndarray
        Per replication, whether it stopped on the stopping rule.
    steps_taken : numpy.ndarray
        Per replication, steps trained (the cap for those still training).
    """

    parameters: tuple[torch.Tensor, ...]
    adam: engines.AdamState
    active: torch.Tensor
    step: int
    stage: np.ndarray
    stage_start: np.ndarray
    step_factor: torch.Tensor
    window_loc: torch.Tensor | None
    window_scale: torch.Tensor | None
    window_count: int
    final_loc: torch.Tensor
    final_scale: torch.Tensor
    converged: np.ndarray
    steps_taken: np.ndarray


class BatchedFit(NamedTuple):
    """The outcome of :func:`run`.

    Attributes
    ----------
    loc : torch.Tensor
        ``(M, D)`` fitted means of the unconstrained latent vector.
    scale : torch.Tensor
        ``(M, D)`` sds (``"meanfield"``) or ``(M, D, D)`` Cholesky factors (``"fullrank"``).
    converged : numpy.ndarray
        Per replication, whether it stopped on the stopping rule (all ``False`` for a fixed number of steps).
    steps : numpy.ndarray
        Steps each replication trained.
    losses : numpy.ndarray
        ``(steps run, M)`` negative ELBO estimates, NaN once a replication is frozen.
    """

    loc: torch.Tensor
    scale: torch.Tensor
    converged: np.ndarray
    steps: np.ndarray
    losses: np.ndarray


def scale_of(guide: GuideFamily, raw_scale: torch.Tensor, *lower: torch.Tensor) -> torch.Tensor:
    """The whitened scale: softplus of ``raw_scale`` (sds), plus, for ``"fullrank"``, the strictly lower triangle
    with its rows scaled by :func:`ppvi.guides.factor_row_scale`, as :class:`ppvi.guides.FullRankGuide` does (its
    docstring says why: without it, the factor of a guide over some 40 coordinates or more random-walks into an
    ill-conditioned one)."""
    diagonal = torch.nn.functional.softplus(raw_scale)
    if guide == "meanfield":
        return diagonal
    row_scale = factor_row_scale(diagonal.shape[-1]).to(diagonal)
    return torch.diag_embed(diagonal) + lower[0].tril(-1) * row_scale[:, None]


def transform(guide: GuideFamily, loc: torch.Tensor, scale: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``loc + scale noise`` for noise ``(..., A, D)``: elementwise (``"meanfield"``) or by the triangular factor
    (guide draws from whitened noise, and whitened points to unconstrained ones with the Laplace centre and factor)."""
    if guide == "meanfield":
        return loc + scale * noise
    return loc + (scale @ noise.unsqueeze(-1)).squeeze(-1)


def init(start: BatchedLaplaceStart, guide: GuideFamily) -> BatchedState:
    """The state before the first step: ``q = N(0, I)`` in the whitened coordinates of each replication's Laplace
    approximation; a replication without a usable mode starts at its (prior-median) centre with scale
    :data:`ppvi.guides.DEFAULT_INIT_SCALE` in unconstrained units, as :func:`ppvi.fit` does."""
    M, D = start.center.shape
    like = start.center
    raw_unit = math.log(math.expm1(1.0))  # softplus^{-1}(1)
    raw_fallback = math.log(math.expm1(DEFAULT_INIT_SCALE))
    raw = torch.where(start.succeeded, torch.tensor(raw_unit, dtype=like.dtype, device=like.device), raw_fallback)
    parameters = [torch.zeros_like(like), raw.unsqueeze(-1).expand(M, D).clone()]
    if guide == "fullrank":
        parameters.append(torch.zeros(M, D, D, dtype=like.dtype, device=like.device))
    final_scale_shape = (M, D) if guide == "meanfield" else (M, D, D)
    return BatchedState(
        parameters=tuple(parameters), adam=engines.adam_init(parameters),
        active=torch.arange(M, device=like.device), step=0,
        stage=np.zeros(M, dtype=int), stage_start=np.zeros(M, dtype=int),
        step_factor=torch.full((M,), training.STAGES[0], dtype=like.dtype, device=like.device),
        window_loc=None, window_scale=None, window_count=0,
        final_loc=torch.zeros_like(like), final_scale=torch.zeros(final_scale_shape, dtype=like.dtype,
                                                                  device=like.device),
        converged=np.zeros(M, dtype=bool), steps_taken=np.zeros(M, dtype=int),
    )


def update(
    state: BatchedState,
    start: BatchedLaplaceStart,
    guide: GuideFamily,
    log_density: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    learning_rate: float,
) -> tuple[BatchedState, torch.Tensor]:
    """One Adam step of the replications still training; returns the new state and their losses ``(A,)``.

    The loss is the path-derivative estimator of the negative ELBO (Roeder, Wu & Duvenaud 2017, "Sticking the
    landing"): ``log q`` with its parameters detached, averaged over the ``S`` draws ``noise`` ``(S, A, D)``. The
    constant ``log|det factor|`` of the whitening is left out. A replication whose loss is not finite gets no
    update (its gradient is zeroed), the others are unaffected.

    Parameters
    ----------
    log_density : callable
        ``(z, active) -> (S, A)``: ``log p(y_m, T(z)) + log|det J_T(z)|`` of unconstrained draws ``z``
        ``(S, A, D)`` for the replications at positions ``active``.
    """
    active = state.active
    leaves = [parameter.detach().requires_grad_(True) for parameter in state.parameters]
    with torch.enable_grad():
        loc, scale = leaves[0], scale_of(guide, *leaves[1:])
        w = transform(guide, loc, scale, noise)
        if guide == "meanfield":
            log_q = torch.distributions.Normal(loc.detach(), scale.detach()).log_prob(w).sum(-1)
        else:
            log_q = torch.distributions.MultivariateNormal(
                loc.detach(), scale_tril=scale.detach(), validate_args=False
            ).log_prob(w)
        center, factor = start.center[active], start.factor[active]
        z = transform(guide, center, factor, w)  # unwhitened: z = center + factor w
        per_replication = (log_q - log_density(z, active)).mean(0)
        finite = torch.isfinite(per_replication)
        loss = torch.where(finite, per_replication, torch.zeros_like(per_replication)).sum()
        gradients = torch.autograd.grad(loss, leaves)
    with torch.no_grad():
        epsilon = torch.where(
            start.succeeded[active],
            torch.tensor(PRECONDITIONED_ADAM_EPSILON, dtype=loc.dtype, device=loc.device),
            RAW_ADAM_EPSILON,
        )
        parameters, adam = engines.adam_update(
            [leaf.detach() for leaf in leaves], [gradient.nan_to_num(0.0, 0.0, 0.0) for gradient in gradients],
            state.adam, learning_rate * state.step_factor[active], epsilon,
        )
        current_loc = transform(guide, center, factor, parameters[0])
        whitened_scale = scale_of(guide, *parameters[1:])
        current_scale = factor * whitened_scale if guide == "meanfield" else factor @ whitened_scale
        if state.window_count == 0:
            window_loc, window_scale = current_loc, current_scale
        else:
            window_loc, window_scale = state.window_loc + current_loc, state.window_scale + current_scale
    new_state = state._replace(
        parameters=tuple(parameters), adam=adam, step=state.step + 1,
        window_loc=window_loc, window_scale=window_scale, window_count=state.window_count + 1,
    )
    return new_state, per_replication.detach()


def end_window(
    state: BatchedState, losses: np.ndarray, finish: bool, stopping: bool, rule: StoppingRule
) -> BatchedState:
    """At the end of a window: advance stationary replications to the next of :data:`ppvi.training.STAGES`
    (:func:`ppvi.training.advance_stages`), freeze those past the last stage -- and all of them when ``finish``
    -- at the average of the window's iterates (Polyak averaging), and drop them from the batch.

    Parameters
    ----------
    losses : numpy.ndarray
        ``(steps so far, M)`` losses (NaN where a replication was frozen).
    finish : bool
        The step cap is reached: freeze every replication still training.
    stopping : bool
        Whether the stopping rule applies (``False`` for a fixed number of steps).
    """
    window = rule.window
    average_loc, average_scale = state.window_loc / state.window_count, state.window_scale / state.window_count
    positions = np.arange(len(state.active))  # positions in the active batch
    global_index = state.active.cpu().numpy()
    stage, stage_start = state.stage.copy(), state.stage_start.copy()
    step_factor, converged = state.step_factor.clone(), state.converged.copy()
    if finish:
        newly = positions
    elif stopping:
        stationary = np.asarray([
            i for i, m in zip(positions, global_index, strict=True)
            if np.isfinite(losses[-2 * window :, m]).all() and is_stationary(losses[stage_start[m] :, m], rule)
        ], dtype=int)
        advanced, finished = training.advance_stages(stage[global_index[stationary]])
        moving = stationary[~finished]
        stage[global_index[moving]] = advanced[~finished]
        stage_start[global_index[moving]] = state.step
        step_factor[torch.as_tensor(global_index[moving], dtype=torch.long)] = torch.as_tensor(
            [training.STAGES[k] for k in advanced[~finished]], dtype=step_factor.dtype
        ).to(step_factor.device)
        newly = np.sort(stationary[finished])
        converged[global_index[newly]] = True
    else:
        newly = np.zeros(0, dtype=int)
    state = state._replace(
        stage=stage, stage_start=stage_start, step_factor=step_factor, converged=converged,
        window_loc=None, window_scale=None, window_count=0,
    )
    if len(newly) == 0:
        return state
    device = state.active.device
    frozen = torch.as_tensor(global_index[newly], dtype=torch.long, device=device)
    newly_positions = torch.as_tensor(newly, dtype=torch.long, device=device)
    final_loc, final_scale = state.final_loc.clone(), state.final_scale.clone()
    final_loc[frozen] = average_loc[newly_positions]
    final_scale[frozen] = average_scale[newly_positions]
    steps_taken = state.steps_taken.copy()
    steps_taken[global_index[newly]] = state.step
    keep = torch.ones(len(state.active), dtype=torch.bool, device=device)
    keep[newly_positions] = False
    return state._replace(
        parameters=tuple(parameter[keep] for parameter in state.parameters),
        adam=engines.keep_replications(state.adam, keep), active=state.active[keep],
        final_loc=final_loc, final_scale=final_scale, steps_taken=steps_taken,
    )


def run(
    log_density: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    start: BatchedLaplaceStart,
    guide: GuideFamily,
    *,
    max_steps: int,
    stopping: bool,
    learning_rate: float,
    num_particles: int,
    streams: ReplicationStreams,
    replication_index: torch.Tensor,
) -> BatchedFit:
    """Train all replications until each is frozen (see :func:`end_window`) or ``max_steps``.

    Parameters
    ----------
    log_density : callable
        ``(z, active) -> (S, A)``, as :func:`update`.
    start : BatchedLaplaceStart
        Each replication's centre and whitening factor (:func:`ppvi.initialization.batched_laplace_start`).
    max_steps : int
        The step cap (with ``stopping=False``: the exact number of steps).
    stopping : bool
        Stop each replication by the stopping rule of :mod:`ppvi.convergence` (window 100) and the stages of
        :mod:`ppvi.training`; otherwise train ``max_steps`` steps and average the last window.
    learning_rate : float
        Adam's learning rate (in whitened coordinates).
    num_particles : int
        Monte Carlo draws per replication per step.
    streams : ReplicationStreams
        The source of the noise.
    replication_index : torch.Tensor
        The global index of each of the ``M`` replications (what ``streams`` is keyed by).
    """
    rule = StoppingRule(window=StoppingRule().window)
    state = init(start, guide)
    M, D = start.center.shape
    losses = np.full((max_steps, M), np.nan)
    while len(state.active):
        noise = streams.normal((num_particles,), replication_index[state.active], (D,))
        active = state.active.cpu().numpy()
        state, step_losses = update(state, start, guide, log_density, noise, learning_rate)
        losses[state.step - 1, active] = step_losses.double().cpu().numpy()
        finish = state.step == max_steps
        if state.step % rule.window == 0 or finish:
            state = end_window(state, losses[: state.step], finish, stopping, rule)
    return BatchedFit(state.final_loc, state.final_scale, state.converged, state.steps_taken, losses[: state.step])
