"""Batched Gaussian variational inference: ``M`` independent problems in one vectorised optimisation.

VSBC and SBC (:mod:`ppvi.calibration`) fit a Gaussian guide to each of ``M`` simulated posteriors. Here the ``M``
guides are trained at once: parameters of shape ``(M, D)`` (and ``(M, D, D)`` Cholesky factors for
``"fullrank"``), one log density ``(S, A, D) -> (S, A)`` evaluated for the ``A`` replications still training,
and the functional Adam of :mod:`ppvi.engine` with per-replication learning rates and epsilons. Each replication's
loss depends only on its own parameters, so the summed loss gives every replication its own gradient.

The state is a NamedTuple and the step a pure function of it (NumPyro's ``svi.py`` ``init``/``update``, blackjax's
``vi/`` modules): :func:`init` builds a :class:`BatchedState` from a batched Laplace start, :func:`update` takes
one Adam step of the replications in it, and :func:`keep` drops those that stopped. The loop is
:func:`ppvi.training.run_batch`, the one ``ppvi.fit`` trains through: :func:`run` hands it these three functions,
and it applies each replication's stages, stopping rule, averaging and checks.

The arithmetic of a step is one pure function of tensors, :func:`step_arithmetic`. :func:`eager_step` runs it as it
is (the model through Pyro at every step); :class:`TracedBatchedStep` traces it once, model, gradient and Adam,
into one ATen graph whose number of replications is a symbol, and replays it or compiles it with TorchInductor:
one graph for a batch that shrinks at every window, for every shard and every ``M``. NumPyro's answer to the same
problem is ``jax.vmap`` over a jitted per-replication step; here the model is vectorised by Pyro's plates (a
replication plate and a particle plate around the model), and the symbolic batch size does what ``vmap`` would
add: the trace is of the batched step itself, so nothing is re-traced when the batch changes. A model that does
not run in those plates (``a + X @ beta``) has its log density batched by :func:`torch.func.vmap` instead
(:mod:`ppvi.calibration`), and the tracer follows vmap into the same kind of graph: vmap's batching rules are
ATen operations on the batched tensors, the replication dimension among them still a symbol.

Random numbers come from :class:`ReplicationStreams`: the noise of replication ``m`` at step ``t`` is a function
of ``(seed, m, t)`` only, not of which other replications share its batch. A run over any subset of the
replications -- one shard of a Dask cluster (:mod:`ppvi.sharding`) -- therefore gives exactly the fits of a run
over all of them.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from ppvi import engine as engines
from ppvi import training
from ppvi.convergence import StoppingRule
from ppvi.fit import PRECONDITIONED_ADAM_EPSILON
from ppvi.guides import DEFAULT_INIT_SCALE, factor_row_scale
from ppvi.initialization import BatchedLaplaceStart

__all__ = [
    "RANDOM_BLOCK_SIZE", "ReplicationStreams", "BatchedState", "BatchedFit", "StepFunction", "TracedBatchedStep",
    "eager_step", "init", "keep", "log_density_of", "own_draws_log_density", "run", "step_arithmetic",
    "training_draws_per_call", "unwhiten", "update",
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
        Of the draws. They are drawn in single precision and converted: torch's CPU generator fills float32
        normals with a vectorised Box-Muller and float64 ones element by element, 4.5x slower per value (measured:
        4.5 against 20 ns), which was an eighth of a CPU VSBC run. The noise of a Monte Carlo gradient needs no
        more than single precision; the optimisation itself stays in ``dtype``. They stay in single precision
        until the batch's rows are picked (converting first doubled the bytes the concatenation and the gather
        move: 1.4 against 0.7 ms a step at M = 1000, 8 particles and 10 coordinates), and a batch of consecutive
        replications is a view of the drawn values, not a gather.
    draws_per_call : int
        Draws of a block made by one generator call and handed out one per :meth:`normal` call (training asks
        for one draw per step). A block's ``t``-th draw is still a function of ``(seed, purpose, block, t)``:
        every block is asked at every step from the first, whichever batch it is in.
    """

    def __init__(
        self, seed: int, purpose: int, device: torch.device | str, dtype: torch.dtype, draws_per_call: int = 1
    ):
        self.seed, self.purpose = int(seed), int(purpose)
        self.device, self.dtype = torch.device(device), dtype
        self.draws_per_call = int(draws_per_call)
        self._generators: dict[int, torch.Generator] = {}
        self._chunks: dict[int, torch.Tensor] = {}  # block -> its next draws_per_call draws
        self._position = 0  # draws handed out of the current chunks
        self._assembled: tuple[torch.Tensor, torch.Tensor] | None = None  # (replications, their chunk rows)

    def _generator(self, block: int) -> torch.Generator:
        generator = self._generators.get(block)
        if generator is None:
            state = np.random.SeedSequence((self.seed, self.purpose, block)).generate_state(2, np.uint32)
            generator = torch.Generator(device=self.device)
            # 63 bits of the block's state: torch seeds take a non-negative int64.
            generator.manual_seed((int(state[0]) << 31) ^ int(state[1]))
            self._generators[block] = generator
        return generator

    def _fresh(self, block: int, shape: tuple[int, ...]) -> torch.Tensor:
        # Single precision until the rows are picked: the concatenation and the gather move half the bytes.
        return torch.randn(shape, generator=self._generator(block), device=self.device, dtype=torch.float32)

    def _select(self, drawn: torch.Tensor, axis: int, blocks: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The rows of ``indices`` along ``axis`` of ``drawn``, the concatenation of the whole ``blocks``: a view
        when they are consecutive (a batch that holds every replication of its blocks' range), a gather otherwise."""
        block_starts = torch.searchsorted(blocks, indices // RANDOM_BLOCK_SIZE) * RANDOM_BLOCK_SIZE
        rows = block_starts + indices % RANDOM_BLOCK_SIZE
        first, count = int(rows[0]), len(rows)
        if int(rows[-1]) - first == count - 1:  # sorted and distinct, so consecutive
            return drawn.narrow(axis, first, count)
        return drawn.index_select(axis, rows.to(self.device))

    def normal(self, batch_shape: Sequence[int], replications: torch.Tensor, event_shape: Sequence[int]):
        """Draws of shape ``(*batch_shape, len(replications), *event_shape)`` for the *global* indices
        ``replications`` (sorted ascending).

        With ``draws_per_call > 1`` the batch may only shrink from one call to the next (as a training batch does),
        so that every block is asked at every call from its first."""
        indices = replications.detach().cpu().long()
        blocks = torch.unique(indices // RANDOM_BLOCK_SIZE)
        shape = (*batch_shape, RANDOM_BLOCK_SIZE, *event_shape)
        axis = len(batch_shape)
        if self.draws_per_call == 1:
            drawn = torch.cat([self._fresh(int(block), shape) for block in blocks], dim=axis)
            return self._in_dtype(self._select(drawn, axis, blocks, indices))
        if self._position == self.draws_per_call or not self._chunks:
            self._chunks = {int(block): self._fresh(int(block), (self.draws_per_call, *shape)) for block in blocks}
            self._position, self._assembled = 0, None
        if self._assembled is None or not torch.equal(self._assembled[0], indices):
            # The batch changed (at the end of a window): gather its rows of the chunks, for the chunks' rest.
            if any(int(block) not in self._chunks or self._chunks[int(block)].shape[1:] != shape for block in blocks):
                raise RuntimeError("ReplicationStreams with draws_per_call > 1: the batch may only shrink")
            stacked = torch.cat([self._chunks[int(block)] for block in blocks], dim=axis + 1)
            self._assembled = (indices, self._select(stacked, axis + 1, blocks, indices))
        draw = self._assembled[1][self._position]
        self._position += 1
        return self._in_dtype(draw)

    def _in_dtype(self, drawn: torch.Tensor) -> torch.Tensor:
        """``drawn`` in the streams' dtype and contiguous: a copy only where either differs (single precision on a
        GPU: a draw that is already a contiguous block is handed out as it is, as before, with no launch a step)."""
        return drawn.to(self.dtype).contiguous()


#: Steps of training noise drawn per generator call: a call per block and step costs more than its values (about
#: 20 us against 5 ns a value), and ten steps at once cut that tenfold while the pending draws of M = 100,000
#: replications of 10 coordinates and 8 particles stay at 64 MB a step.
TRAINING_DRAWS_PER_CALL = 10
#: Values a block's generator draws in one call at most (2 MiB in float64), for guides of many coordinates.
NOISE_VALUES_PER_CALL = 2**18


def training_draws_per_call(num_particles: int, dimension: int) -> int:
    """Steps of training noise drawn per generator call (:class:`ReplicationStreams`' ``draws_per_call``): a
    function of the run's shapes only, never of the batch, so that shards draw alike."""
    per_step = num_particles * RANDOM_BLOCK_SIZE * dimension
    return max(1, min(TRAINING_DRAWS_PER_CALL, NOISE_VALUES_PER_CALL // per_step))


class BatchedState(NamedTuple):
    """The state of the ``A`` replications still training, between steps: what :func:`update` takes and returns,
    every field's leading dimension the replication (the :class:`ppvi.training.Stepper` state of
    :func:`ppvi.training.run_batch`).

    Attributes
    ----------
    parameters : tuple of torch.Tensor
        In each replication's whitened coordinates: ``loc`` ``(A, D)``, softplus-inverse scales ``(A, D)`` and, for
        ``"fullrank"``, the strictly lower triangle ``(A, D, D)``.
    adam : ppvi.engine.AdamState
        Adam's moments of ``parameters``.
    replications : torch.Tensor
        The global index of each (what :class:`ReplicationStreams` is keyed by).
    center, factor : torch.Tensor
        Each one's Laplace centre ``(A, D)`` and whitening factor (``(A, D)`` or ``(A, D, D)``).
    epsilon : torch.Tensor
        Adam's epsilon of each ``(A,)``: :data:`~ppvi.fit.PRECONDITIONED_ADAM_EPSILON` where the Laplace start
        succeeded, :data:`RAW_ADAM_EPSILON` where it did not.
    data : tuple of torch.Tensor
        Each one's data, each ``(A, ...)``.
    whitened_scale : torch.Tensor
        The current scale in whitened coordinates (:func:`scale_of` of the parameters: ``(A, D)`` sds or
        ``(A, D, D)`` Cholesky factors). With ``parameters[0]``, the whitened loc, it is what the loop averages:
        the unwhitening ``loc -> center + factor loc``, ``scale -> factor scale`` is affine, so it is applied once,
        to the averages, by :func:`run` (:func:`unwhiten`), not at every step (a batched matrix product of
        ``D x D`` factors a step, the costliest of a full-rank step's five).
    """

    parameters: tuple[torch.Tensor, ...]
    adam: engines.AdamState
    replications: torch.Tensor
    center: torch.Tensor
    factor: torch.Tensor
    epsilon: torch.Tensor
    data: tuple[torch.Tensor, ...]
    whitened_scale: torch.Tensor


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
    # One batched matrix product over the replications (einsum lowers to bmm). Writing the product out
    # (ppvi.engine.small_matrix_product), which fuses on one fit's small step, was slower here: the compiled
    # full-rank steps of eight schools at M = 1000 took 13 s written out and 9 s as bmm.
    return loc + torch.einsum("aij,...aj->...ai", scale, noise)


def log_density_of(guide: GuideFamily, loc: torch.Tensor, scale: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``log q(w)`` ``(S, A)`` of points ``w`` ``(S, A, D)`` under each replication's Gaussian: independent
    normals (``"meanfield"``, sds ``scale``) or ``N(loc, scale scale^T)`` (``"fullrank"``, ``scale`` lower
    triangular).

    The full-rank density is :func:`ppvi.engine.multivariate_normal_log_density`, which traces with a symbolic
    number of replications (:class:`TracedBatchedStep`), where ``torch.distributions.MultivariateNormal`` does not.
    """
    if guide == "meanfield":
        return torch.distributions.Normal(loc, scale, validate_args=False).log_prob(w).sum(-1)
    return engines.multivariate_normal_log_density(w - loc, scale)


def own_draws_log_density(
    guide: GuideFamily, loc: torch.Tensor, scale: torch.Tensor, noise: torch.Tensor, w: torch.Tensor
) -> torch.Tensor:
    """``log q(w)`` ``(S, A)`` of the guide's own draws ``w = loc + scale noise``, its parameters held fixed (the
    path-derivative estimator, Roeder, Wu & Duvenaud 2017): the value and the gradient in ``w`` of
    :func:`log_density_of`, without differentiating a triangular solve.

    For ``"fullrank"`` the standardised draw is ``scale^-1 (w - loc) = noise``, so the value is
    ``-|noise|^2 / 2 - log|det scale| - D/2 log 2 pi``, and the gradient in ``w`` is
    ``-(scale scale^T)^-1 (w - loc) = -scale^-T noise``: one triangular solve, computed without gradient and entered
    as a linear term in ``w``. Tracing the written-out solve of :func:`log_density_of` and its backward pass took
    most of the full-rank step's symbolic trace (5.7 s of a 17 s VSBC run of eight schools at M = 1000).
    ``"meanfield"`` keeps :func:`log_density_of`, whose elementwise density has no solve.
    """
    if guide == "meanfield":
        return log_density_of(guide, loc, scale, w)
    dimension = w.shape[-1]
    log_determinant = torch.diagonal(scale, dim1=-2, dim2=-1).abs().log().sum(-1)
    value = -0.5 * noise.pow(2).sum(-1) - log_determinant - 0.5 * dimension * math.log(2 * math.pi)
    with torch.no_grad():
        transposed, right_side = scale.transpose(-1, -2), noise.permute(1, 2, 0)  # (A, D, D), (A, D, S)
        direction = engines.symbolic_triangular_solve(transposed, right_side, upper=True)
        gradient = -direction.permute(2, 0, 1)  # (S, A, D): d log q / d w
    return value + ((w - w.detach()) * gradient).sum(-1)


def init(
    start: BatchedLaplaceStart, guide: GuideFamily, replications: torch.Tensor, data: Sequence[torch.Tensor] = ()
) -> BatchedState:
    """The state before the first step: ``q = N(0, I)`` in the whitened coordinates of each replication's Laplace
    approximation; a replication without a usable mode starts at its (prior-median) centre with scale
    :data:`ppvi.guides.DEFAULT_INIT_SCALE` in unconstrained units, as :func:`ppvi.fit` does.

    Parameters
    ----------
    start : BatchedLaplaceStart
        Each replication's centre and whitening factor (:func:`ppvi.initialization.batched_laplace_start`).
    replications : torch.Tensor
        The global index of each of the ``M`` replications (what the noise streams are keyed by).
    data : sequence of torch.Tensor
        The replications' data, each ``(M, ...)``.
    """
    M, D = start.center.shape
    like = start.center
    raw_unit = math.log(math.expm1(1.0))  # softplus^{-1}(1)
    raw_fallback = math.log(math.expm1(DEFAULT_INIT_SCALE))
    raw = torch.where(start.succeeded, torch.tensor(raw_unit, dtype=like.dtype, device=like.device), raw_fallback)
    parameters = [torch.zeros_like(like), raw.unsqueeze(-1).expand(M, D).clone()]
    if guide == "fullrank":
        parameters.append(torch.zeros(M, D, D, dtype=like.dtype, device=like.device))
    epsilon = torch.where(
        start.succeeded, torch.tensor(PRECONDITIONED_ADAM_EPSILON, dtype=like.dtype, device=like.device),
        RAW_ADAM_EPSILON,
    )
    return BatchedState(
        parameters=tuple(parameters), adam=engines.adam_init(parameters), replications=replications,
        center=start.center, factor=start.factor, epsilon=epsilon, data=tuple(data),
        whitened_scale=scale_of(guide, *parameters[1:]),
    )


def unwhiten(
    guide: GuideFamily, center: torch.Tensor, factor: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A Gaussian's whitened ``loc`` and ``scale`` in unconstrained coordinates, ``z = center + factor w``:
    ``(center + factor loc, factor scale)``, with ``factor`` and ``scale`` elementwise sds (``"meanfield"``) or
    lower-triangular factors (``"fullrank"``)."""
    return transform(guide, center, factor, loc), factor * scale if guide == "meanfield" else factor @ scale


StepFunction = Callable[..., tuple[torch.Tensor, ...]]


def step_arithmetic(
    guide: GuideFamily,
    log_density: Callable[..., torch.Tensor],
    parameter_count: int,
    *inputs: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """One Adam step of ``A`` replications as a pure function of tensors: what :func:`update` applies, and what
    :func:`trace_step` traces (and compiles) once for every batch size.

    The loss is the path-derivative estimator of the negative ELBO (Roeder, Wu & Duvenaud 2017, "Sticking the
    landing"): ``log q`` with its parameters detached, averaged over the ``S`` draws ``noise`` ``(S, A, D)``. The
    constant ``log|det factor|`` of the whitening is left out. A replication whose loss is not finite gets no
    update (its gradient is zeroed), the others are unaffected.

    Parameters
    ----------
    log_density : callable
        ``(z, *data) -> (S, A)``: ``log p(y_m, T(z)) + log|det J_T(z)|`` of unconstrained draws ``z``
        ``(S, A, D)``, given the ``A`` replications' data (each ``(A, ...)``).
    parameter_count : int
        The number of guide parameters (2 for ``"meanfield"``, 3 for ``"fullrank"``).
    *inputs : torch.Tensor
        In order: the parameters, Adam's first and second moments (``parameter_count`` each), the step sizes
        ``(A,)`` (learning rate times stage factor over Adam's first bias correction), Adam's
        ``sqrt(1 - beta2^t)`` (a tensor of shape ``(1,)``, so that a traced step serves every ``t``: the symbolic
        tracer would make a 0-dim one a Python scalar), the epsilons ``(A,)``, the
        noise ``(S, A, D)``, the Laplace centres ``(A, D)`` and factors (``(A, D)`` or ``(A, D, D)``), then the
        data.

    Returns
    -------
    tuple of torch.Tensor
        The new parameters, first and second moments, the losses ``(A,)``, and the new iterate's whitened scale
        (what Polyak averaging sums, with the whitened loc, the first parameter).
    """
    k = parameter_count
    parameters, first, second = inputs[:k], inputs[k : 2 * k], inputs[2 * k : 3 * k]
    step_size, correction2_sqrt, epsilon, noise, center, factor = inputs[3 * k : 3 * k + 6]
    data = inputs[3 * k + 6 :]
    leaves = [parameter.detach().requires_grad_(True) for parameter in parameters]
    with torch.enable_grad():
        loc, scale = leaves[0], scale_of(guide, *leaves[1:])
        w = transform(guide, loc, scale, noise)
        log_q = own_draws_log_density(guide, loc.detach(), scale.detach(), noise, w)
        z = transform(guide, center, factor, w)  # unwhitened: z = center + factor w
        per_replication = (log_q - log_density(z, *data)).mean(0)
        finite = torch.isfinite(per_replication)
        loss = torch.where(finite, per_replication, torch.zeros_like(per_replication)).sum()
        gradients = torch.autograd.grad(loss, leaves)
    with torch.no_grad():
        new_parameters, new_first, new_second = engines.adam_arithmetic(
            [leaf.detach() for leaf in leaves], [gradient.nan_to_num(0.0, 0.0, 0.0) for gradient in gradients],
            first, second, step_size, correction2_sqrt, epsilon,
        )
        whitened_scale = scale_of(guide, *new_parameters[1:])
    return (*new_parameters, *new_first, *new_second, per_replication.detach(), whitened_scale)


def parameter_count(guide: GuideFamily) -> int:
    """Tensors of a batched guide: loc and raw scale, plus the factor's lower triangle for ``"fullrank"``."""
    return 2 if guide == "meanfield" else 3


def eager_step(guide: GuideFamily, log_density: Callable[..., torch.Tensor]) -> StepFunction:
    """:func:`step_arithmetic` run as it is: the model's Python (Pyro's tracing) at every step."""
    return functools.partial(step_arithmetic, guide, log_density, parameter_count(guide))


class TracedBatchedStep:
    """:func:`step_arithmetic` traced once into one ATen graph with a symbolic batch size, replayed
    (``"traced"``) or compiled by TorchInductor for every batch size at once (``"compiled"``).

    The batch shrinks at every window as replications stop, so the graph is traced with the number of replications
    ``A`` as a symbol (:func:`torch.fx.experimental.proxy_tensor.make_fx`, ``tracing_mode="symbolic"``) and
    compiled with dynamic shapes: one trace and one compilation serve the whole run, and a run over another number
    of replications (another shard, another M) hits TorchInductor's on-disk cache. Tracing runs the model's Python
    once, on the first call; the graph holds no Pyro. Measured on eight schools, M = 1000, forward and backward of
    the log density: 13.4 ms eager, 10.3 ms traced, 2.7 ms compiled at A = 1000; 3.3, 1.4 and 0.12 ms at A = 10.

    Parameters
    ----------
    guide : {"meanfield", "fullrank"}
    log_density : callable
        As :func:`step_arithmetic`'s.
    compile : bool
        Compile the graph (a cold compilation takes 15-20 s on a 2-core CPU; TorchInductor caches it on
        disk).

    Raises
    ------
    ppvi.engine.NotTraceableError
        On the first call, when the model does not trace (control flow on sampled values, random draws of its
        own); the caller trains through :func:`eager_step` instead.
    """

    def __init__(self, guide: GuideFamily, log_density: Callable[..., torch.Tensor], compile: bool):
        self.guide, self.log_density, self.compile = guide, log_density, compile
        self.engine = "compiled" if compile else "traced"
        self._function: Callable | None = None

    def _arithmetic(self) -> StepFunction:
        return eager_step(self.guide, self.log_density)

    def _trace(self, inputs: tuple[torch.Tensor, ...]) -> Callable:
        from torch._subclasses.fake_tensor import FakeTensorMode, disable_fake_tensor_cache
        from torch.fx.experimental.proxy_tensor import make_fx
        from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

        # Only the number of replications is a symbol; the particles, the latent dimension and the data's own
        # shapes stay constants. Every replication dimension has the same size, so duck shaping gives them one
        # symbol; a constant dimension never joins it, whatever its size.
        mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
        count = parameter_count(self.guide)

        def fake(position: int, value: torch.Tensor) -> torch.Tensor:
            dynamic = [DimDynamic.STATIC] * value.dim()
            if position != 3 * count + 1:
                dynamic[1 if position == 3 * count + 3 else 0] = DimDynamic.DUCK
            context = StatelessSymbolicContext(dynamic_sizes=dynamic)
            return mode.from_tensor(value, symbolic_context=context)

        fakes = [fake(position, value) for position, value in enumerate(inputs)]
        state = torch.random.get_rng_state()
        # The fake-tensor dispatcher logs an operation it cannot run at ERROR level before raising; the refusal
        # reaches the caller as a NotTraceableError (and, under engine="auto", as the reason Pyro ran instead).
        fake_log = logging.getLogger("torch._subclasses.fake_tensor")
        level = fake_log.level
        fake_log.setLevel(logging.CRITICAL)
        try:
            # Without the fake-tensor dispatch cache: its entries, keyed on symbolic shapes, are hardly ever hit
            # again in one trace, and making them took about half of it (the full-rank step of eight schools,
            # several runs: 1.2-1.7 s without it, 2.0-3.9 s with it).
            with warnings.catch_warnings(), mode, disable_fake_tensor_cache(mode):
                # Symbolic tracing reasons about sizes with sympy; torch 2.13's own calls into it raise deprecation
                # warnings that no user can act on.
                warnings.simplefilter("ignore", DeprecationWarning)
                graph = make_fx(self._arithmetic())(*fakes)
        except engines.NotTraceableError:
            raise
        except Exception as error:  # the tracer's refusals: data-dependent control flow, unsupported operations
            raise engines.NotTraceableError(engines.tracing_failure(error)) from error
        finally:
            torch.random.set_rng_state(state)
            fake_log.setLevel(level)
        for node in graph.graph.nodes:
            target = node.target
            if isinstance(target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in target.tags:
                raise engines.NotTraceableError(
                    f"the model makes a random draw of its own ({target}), which a traced graph would repeat at "
                    "every step"
                )
        guards = [str(guard.expr) for guard in mode.shape_env.guards]
        if guards or mode.shape_env.replacements:
            raise engines.NotTraceableError(
                "the traced step does not hold for another number of replications (the model's Python, or an "
                f"operation it calls, tests it: {', '.join(guards) or mode.shape_env.replacements})"
            )
        self._check_batch_size_free(graph, inputs)
        if not self.compile:
            return graph
        fakes = [node.meta["val"] for node in graph.graph.nodes if node.op == "placeholder"]
        with warnings.catch_warnings():
            # TorchInductor (torch 2.13) calls parts of torch that torch itself has deprecated: warnings about
            # torch's own code, silenced while it compiles (as ppvi.engine does).
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            from torch._guards import TracingContext, detect_fake_mode, tracing
            from torch._inductor import config
            from torch._inductor.compile_fx import compile_fx

            # TorchInductor directly on the symbolic graph, in the tracer's fake mode and shape environment:
            # torch.compile would re-trace the graph through Dynamo first (measured: 3.8 against 1.9 s with a warm
            # cache) and check guards at every call; at the vector width that suits the step's short inner loops.
            options = engines.vector_width_options(engines.BATCHED_VECTOR_BITS)
            with config.patch(options), tracing(TracingContext(detect_fake_mode(fakes))):
                return compile_fx(graph, fakes)

    def _check_batch_size_free(self, graph: torch.fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> None:
        """Replay the graph on all replications but the last and compare with the eager step: behind the shape
        environment's guards, a second check that the graph does not hold the number of replications."""
        A = inputs[0].shape[0]
        if A < 3:
            return
        count = parameter_count(self.guide)
        smaller = tuple(
            value if i == 3 * count + 1 else value.narrow(1 if i == 3 * count + 3 else 0, 0, A - 1).contiguous()
            for i, value in enumerate(inputs)
        )
        state = torch.random.get_rng_state()
        try:
            replayed, expected = graph(*smaller), self._arithmetic()(*smaller)
        except Exception as error:
            raise engines.NotTraceableError(
                f"the traced step fails on another number of replications ({type(error).__name__})"
            ) from error
        finally:
            torch.random.set_rng_state(state)
        tolerance = 1e-6 if inputs[0].dtype == torch.float64 else 1e-3
        for left, right in zip(replayed, expected, strict=True):
            if left.shape != right.shape or not torch.allclose(left, right, rtol=tolerance, atol=tolerance,
                                                                equal_nan=True):
                raise engines.NotTraceableError(
                    "the traced step does not hold for another number of replications (the model's Python "
                    "depends on it)"
                )

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        count = parameter_count(self.guide)
        A = inputs[0].shape[0]
        if A == 1:
            # Compiled graphs specialise a dimension of size 1 (and retrace for it): a lone replication is run as
            # two copies of itself, the noise's replication dimension being its second.
            inputs = tuple(
                value if i == 3 * count + 1 else torch.cat([value, value], dim=1 if i == 3 * count + 3 else 0)
                for i, value in enumerate(inputs)
            )
        # The graph was traced on contiguous tensors and its views assume their strides.
        inputs = tuple(value.contiguous() for value in inputs)
        if self._function is None:
            self._function = self._trace(inputs)
        outputs = self._function(*inputs)
        return tuple(output[:1] for output in outputs) if A == 1 else tuple(outputs)


def update(
    state: BatchedState,
    step: StepFunction,
    learning_rates: np.ndarray | torch.Tensor,
    streams: ReplicationStreams,
    num_particles: int,
) -> tuple[BatchedState, torch.Tensor]:
    """One Adam step of the replications in ``state``; returns the new state and their losses ``(A,)``.

    Parameters
    ----------
    step : callable
        :func:`eager_step` or a :class:`TracedBatchedStep`: the arithmetic of :func:`step_arithmetic`.
    learning_rates : numpy.ndarray or torch.Tensor
        Each replication's learning rate ``(A,)`` (the loop's rate times its stage's factor).
    streams : ReplicationStreams
        The source of the noise, ``num_particles`` draws per replication.
    """
    like = state.center
    noise = streams.normal((num_particles,), state.replications, (like.shape[-1],))
    correction1, correction2_sqrt = engines.bias_corrections(state.adam.step + 1)
    step_size = torch.as_tensor(learning_rates, dtype=like.dtype).to(like.device) / correction1
    k = len(state.parameters)
    outputs = step(
        *state.parameters, *state.adam.first_moment, *state.adam.second_moment, step_size,
        torch.tensor([correction2_sqrt], dtype=like.dtype, device=like.device), state.epsilon, noise,
        state.center, state.factor, *state.data,
    )
    parameters, first, second = outputs[:k], outputs[k : 2 * k], outputs[2 * k : 3 * k]
    losses, whitened_scale = outputs[3 * k :]
    new_state = state._replace(
        parameters=tuple(parameters), adam=engines.AdamState(state.adam.step + 1, tuple(first), tuple(second)),
        whitened_scale=whitened_scale,
    )
    return new_state, losses


def keep(state: BatchedState, rows: torch.Tensor) -> BatchedState:
    """The state of the replications where the boolean mask ``rows`` ``(A,)`` holds (the others stopped)."""
    return BatchedState(
        parameters=tuple(parameter[rows] for parameter in state.parameters),
        adam=engines.keep_replications(state.adam, rows), replications=state.replications[rows],
        center=state.center[rows], factor=state.factor[rows], epsilon=state.epsilon[rows],
        data=tuple(value[rows] for value in state.data), whitened_scale=state.whitened_scale[rows],
    )


def run(
    step: StepFunction,
    start: BatchedLaplaceStart,
    guide: GuideFamily,
    *,
    max_steps: int,
    stopping: bool,
    learning_rate: float,
    num_particles: int,
    streams: ReplicationStreams,
    replication_index: torch.Tensor,
    data: Sequence[torch.Tensor] = (),
) -> BatchedFit:
    """Train all replications through :func:`ppvi.training.run_batch`, the loop ``ppvi.fit`` trains through, with
    the stopping rule's window (100 steps) as the check interval: each replication stops by the rule, with its own
    stages, averaging and non-finite and divergence checks, and leaves the batch.

    Parameters
    ----------
    step : callable
        :func:`eager_step` or a :class:`TracedBatchedStep`.
    start : BatchedLaplaceStart
        Each replication's centre and whitening factor (:func:`ppvi.initialization.batched_laplace_start`).
    max_steps : int
        The step cap (with ``stopping=False``: the exact number of steps).
    stopping : bool
        Stop each replication by the stopping rule of :mod:`ppvi.convergence` and the stages of
        :mod:`ppvi.training`; otherwise train ``max_steps`` steps and average the last window.
    learning_rate : float
        Adam's learning rate (in whitened coordinates).
    num_particles : int
        Monte Carlo draws per replication per step.
    streams : ReplicationStreams
        The source of the noise.
    replication_index : torch.Tensor
        The global index of each of the ``M`` replications (what ``streams`` is keyed by).
    data : sequence of torch.Tensor
        The replications' data, each ``(M, ...)``.

    Raises
    ------
    KeyboardInterrupt
        Passed on: a calibration has no partial answer to keep.
    """
    rule = StoppingRule(max_steps=max_steps)
    M = start.center.shape[0]
    device_rates: dict[str, Any] = {}

    def update_at(state: BatchedState, learning_rates: np.ndarray) -> tuple[BatchedState, torch.Tensor]:
        # The loop hands over the same array until a stage changes or the batch shrinks: copy it to the device then
        # only, not at every step (800 kB a step at M = 100,000).
        if device_rates.get("host") is not learning_rates:
            device_rates["host"] = learning_rates
            device_rates["device"] = torch.as_tensor(learning_rates, dtype=state.center.dtype).to(state.center.device)
        return update(state, step, device_rates["device"], streams, num_particles)

    stepper = training.Stepper(update_at, lambda state: (state.parameters[0], state.whitened_scale), keep)
    result = training.run_batch(
        stepper, init(start, guide, replication_index, data), M, learning_rate=learning_rate,
        steps=None if stopping else max_steps, rule=rule, check_interval=rule.window, progress=False,
    )
    if result.interrupted_step is not None:
        raise KeyboardInterrupt
    loc, scale = unwhiten(guide, start.center, start.factor, *result.iterates)
    return BatchedFit(loc, scale, result.converged, result.steps, result.losses)

