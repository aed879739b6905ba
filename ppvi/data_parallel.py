"""Data-parallel training of amortized guides (variational autoencoders) over several processes with PyTorch's
``DistributedDataParallel`` (DDP; Li et al. 2020, "PyTorch Distributed: experiences on accelerating data
parallel training", VLDB).

Every process (a *rank*) holds the same model and guide, draws its own minibatch of ``batch_size`` data points
and computes the negative ELBO of that minibatch with :class:`ppvi.amortized.AmortizedELBO`; DDP averages the
gradients over the ranks (an all-reduce during the backward pass), and every rank then takes the same Adam step,
so the parameters stay identical everywhere. The result equals, up to floating-point rounding, one process
training on the concatenation of the ranks' minibatches (``tests/test_data_parallel.py`` checks it):

- **scaling.** The model's subsampled plate scales a rank's minibatch of ``b`` points by ``N / b``, so each rank's
  loss is an unbiased estimate of the whole data set's negative ELBO. The mean of the ``R`` ranks' losses is the
  loss of the concatenated ``R b`` points scaled by ``N / (R b)``, and DDP's gradient average is its gradient.
- **minibatches.** At step ``t`` one random subset of ``R b`` distinct indices is drawn from ``(seed, t)``
  (:func:`world_indices`) and rank ``r`` takes its ``r``-th slice of ``b`` (:func:`rank_indices`): the ranks'
  minibatches are disjoint, and their concatenation is a uniformly random subset, as one process's subsampling
  plate would draw with ``subsample_size = R b``.
- **noise.** Before its step ``t`` evaluation, rank ``r`` seeds torch's global generator with
  :func:`noise_seed` ``(seed, r, t)``: the guide's reparameterised draws (and a dynamic binarization's) are
  reproducible, and a single-process reference can draw the same noise for the concatenated batch.
- **start.** The guide's parameters are those of the module handed in (pickled to every spawned rank, or built
  with the same seed on every ``torchrun`` rank); DDP also broadcasts rank 0's parameters when it wraps them.
- **optimizer.** Adam as :func:`ppvi.training.init` builds it, one per rank: the ranks' gradients are identical
  after the all-reduce, so are their Adam moments and steps. As :func:`ppvi.fit` does with a fixed number of
  steps, the iterates of the last ``min(StoppingRule.window, steps // 2)`` steps are averaged (Polyak & Juditsky
  1992).

Two ways to start the ranks:

- :func:`launch` spawns ``world_size`` processes from Python (``torch.multiprocessing``, a file-based rendezvous
  in a temporary folder) and returns rank 0's fit: for a notebook, a test or a benchmark;
- :func:`train` is one rank of a job started by ``torchrun --nproc-per-node=R script.py`` (which sets ``RANK``,
  ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``), or of a process group the caller initialised.

:func:`ppvi.models.vae.train` routes ``strategy="ddp"`` here. CPU processes talk over ``gloo``; GPUs (one per
rank) over ``nccl``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import inspect
import math
import os
import pickle
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyro
import torch
import torch.distributed as distributed
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ppvi import training
from ppvi.amortized import AmortizedELBO, parameters_outside
from ppvi.convergence import StoppingRule
from ppvi.inputs import accepts_keyword, random_state_kept
from ppvi.result import Fit, NonFiniteELBOError
from ppvi.tracing import max_plate_nesting_of, structure_trace

__all__ = [
    "BACKENDS",
    "TORCHRUN_VARIABLES",
    "Backend",
    "DataParallelFit",
    "is_distributed_rank",
    "launch",
    "noise_seed",
    "rank_indices",
    "train",
    "world_indices",
    "world_size_of_job",
]

Backend = Literal["auto", "gloo", "nccl"]
#: The process-group backends: ``gloo`` for CPU processes, ``nccl`` for one GPU per process.
BACKENDS = ("auto", "gloo", "nccl")
#: What ``torchrun`` sets for each rank, and :func:`train` needs when no process group exists yet.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
#: Steps between the ranks' joint checks for a non-finite loss (one small all-reduce), as ``ppvi.training.run``'s
#: default ``check_interval``.
DEFAULT_CHECK_INTERVAL = 50
#: How long a rank waits for the others at a collective before giving up: generous for a slow first step (the
#: validated first evaluation, a large model), yet a crashed peer surfaces in minutes instead of gloo's 30.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)
#: DistributedDataParallel's keyword arguments in this torch version.
_DDP_OPTIONS = frozenset(inspect.signature(DistributedDataParallel).parameters)
#: Stream labels of :func:`_seed`, so the minibatch draws and the noise never share a random stream.
_INDEX_STREAM, _NOISE_STREAM = 0, 1


# -- reproducible randomness -----------------------------------------------------------------------------------
def _seed(seed: int, *key: int) -> int:
    """A 64-bit seed from ``seed`` and a key, through NumPy's ``SeedSequence`` (well-mixed, independent streams
    for different keys)."""
    return int(np.random.SeedSequence(seed, spawn_key=key).generate_state(1, np.uint64)[0])


def world_indices(num_points: int, batch_size: int, world_size: int, step: int, seed: int) -> torch.Tensor:
    """The concatenation of all ranks' minibatch indices at ``step``: ``world_size * batch_size`` distinct indices
    of ``range(num_points)`` in random order, a function of ``(seed, step)`` alone.

    Parameters
    ----------
    num_points : int
        ``N``, the data set's size.
    batch_size : int
        ``b``, each rank's minibatch size.
    world_size : int
        ``R``, the number of ranks.
    step : int
        The training step (from 0).
    seed : int
        The training seed (>= 0).

    Returns
    -------
    torch.Tensor
        int64 indices on the CPU, shape ``(R * b,)``; rank ``r``'s are ``[r * b, (r + 1) * b)``.
    """
    generator = torch.Generator().manual_seed(_seed(seed, _INDEX_STREAM, step))
    return torch.randperm(num_points, generator=generator)[: world_size * batch_size]


def rank_indices(num_points: int, batch_size: int, world_size: int, rank: int, step: int, seed: int) -> torch.Tensor:
    """Rank ``rank``'s minibatch indices at ``step``: its slice of :func:`world_indices` (int64, CPU, ``(b,)``)."""
    return world_indices(num_points, batch_size, world_size, step, seed)[rank * batch_size : (rank + 1) * batch_size]


def noise_seed(seed: int, rank: int, step: int) -> int:
    """The seed of torch's global generator before rank ``rank``'s evaluation at ``step``: its guide's draws are
    then ``torch.empty(shape).normal_()`` (what a reparameterised ``Normal`` draws) right after
    ``torch.manual_seed(noise_seed(seed, rank, step))``."""
    return _seed(seed, _NOISE_STREAM, step, rank)


# -- the result ------------------------------------------------------------------------------------------------
class DataParallelFit(Fit):
    """A :class:`ppvi.Fit` trained by :mod:`ppvi.data_parallel`: the guide with rank 0's parameters (every rank's
    are the same) and the ELBO of every step averaged over the ranks, i.e. the ELBO estimate of the concatenated
    minibatch. ``engine`` is ``"ddp"``; ``args`` are the data and ``kwargs`` the per-rank ``subsample_size``.

    Attributes
    ----------
    world_size : int
        Number of ranks (processes).
    backend : str
        The process group's backend (``"gloo"`` or ``"nccl"``).
    batch_size : int
        Each rank's minibatch size; a step sees ``world_size * batch_size`` data points.
    training_seconds : float
        Wall time of the training loop on rank 0 (from a barrier before the first step to the last step).
    check_times : list of (int, float)
        ``(steps done, seconds since the loop started)`` on rank 0 at every joint check and at the end.
    nonfinite_step : int or None
        First step whose ELBO (on any rank) was not finite; training then stopped and the parameters are those of
        the last check before it.
    """

    def __init__(
        self,
        *args: Any,
        world_size: int,
        backend: str,
        batch_size: int,
        training_seconds: float,
        check_times: list[tuple[int, float]],
        nonfinite_step: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.world_size, self.backend, self.batch_size = world_size, backend, batch_size
        self.training_seconds, self.check_times = training_seconds, list(check_times)
        self.nonfinite_step = nonfinite_step

    @property
    def images_per_second(self) -> float:
        """Data points processed per second by all ranks together, ``world_size * batch_size * steps / seconds``,
        counted from the first joint check on (the first interval holds one-off costs: validation, DDP's bucket
        set-up), or over the whole loop when it had no later check."""
        points_per_step = self.world_size * self.batch_size
        if len(self.check_times) >= 2:
            (first_step, first_time), (last_step, last_time) = self.check_times[0], self.check_times[-1]
            if last_step > first_step and last_time > first_time:
                return points_per_step * (last_step - first_step) / (last_time - first_time)
        return points_per_step * self.steps / self.training_seconds if self.training_seconds > 0 else math.nan

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, world_size={self.world_size}, backend={self.backend!r})"


# -- options ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Options:
    batch_size: int
    steps: int
    learning_rate: float
    elbo: AmortizedELBO
    seed: int
    dtype: torch.dtype
    plate_name: str
    check_interval: int


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if resolved not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be 'float32' or 'float64' (or the torch dtypes), got {dtype!r}")
    return resolved


def _check_positive_integer(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _options(
    model: Callable, guide: nn.Module, data: torch.Tensor, *, batch_size: int, steps: int, learning_rate: float,
    elbo: AmortizedELBO | None, seed: int, dtype: torch.dtype | str, plate_name: str, check_interval: int,
) -> _Options:
    """Check everything that can be checked before any process starts, with messages naming the fix."""
    if not isinstance(guide, nn.Module):
        raise TypeError(
            f"the guide must be a torch.nn.Module holding every trained parameter (DDP averages the gradients of "
            f"module parameters), got {type(guide).__name__}; e.g. a ppvi.models.vae.VAE"
        )
    if not callable(model):
        raise TypeError(f"the model must be callable, got {type(model).__name__}")
    for name, function in (("model", model), ("guide", guide)):
        if not accepts_keyword(function, "subsample_size"):
            raise ValueError(
                f"the {name} takes no 'subsample_size' argument: data-parallel training passes each rank's "
                f"minibatch size as subsample_size=; use it in the data plate, "
                f"`with pyro.plate({plate_name!r}, N, subsample_size=subsample_size):`"
            )
    if not isinstance(data, torch.Tensor) or data.dim() < 1:
        raise ValueError(
            "data must be a tensor with the data points along its first dimension (convert arrays with "
            "torch.as_tensor)"
        )
    _check_positive_integer("batch_size", batch_size)
    _check_positive_integer("steps", steps)
    _check_positive_integer("check_interval", check_interval)
    if not (isinstance(learning_rate, (int, float)) and learning_rate > 0 and math.isfinite(learning_rate)):
        raise ValueError(f"learning_rate must be a positive number, got {learning_rate!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(
            f"seed must be an integer >= 0, got {seed!r}: every rank derives its minibatches and noise from the "
            "same seed, so data-parallel training cannot run unseeded"
        )
    elbo = AmortizedELBO(cuda_graph="off") if elbo is None else elbo
    if not isinstance(elbo, AmortizedELBO):
        raise TypeError(f"elbo must be a ppvi.amortized.AmortizedELBO, got {type(elbo).__name__}")
    if elbo.cuda_graph == "on":
        raise ValueError(
            "data-parallel training sets each step's minibatch from outside the loss, which a captured CUDA graph "
            "would not see: use AmortizedELBO(cuda_graph='off') (or 'auto', which is turned off here)"
        )
    return _Options(batch_size, steps, float(learning_rate), _fresh_elbo(elbo), seed, _resolve_dtype(dtype),
                    plate_name, check_interval)


def _fresh_elbo(elbo: AmortizedELBO) -> AmortizedELBO:
    """A new AmortizedELBO with ``elbo``'s objective, its annealing clock at 0 and CUDA graphs off."""
    return AmortizedELBO(kl_weight=elbo.kl_weight, kl_warmup_steps=elbo.kl_warmup_steps, free_bits=elbo.free_bits,
                         analytic_kl=elbo.analytic_kl, cuda_graph="off")


def _check_world(world_size: int, num_points: int, batch_size: int) -> None:
    _check_positive_integer("world_size", world_size)
    if world_size > num_points:
        raise ValueError(
            f"{world_size} ranks but only {num_points} data points: every rank needs a minibatch of its own each "
            f"step, so use at most {num_points} processes"
        )
    if world_size * batch_size > num_points:
        raise ValueError(
            f"{world_size} ranks x batch_size {batch_size} = {world_size * batch_size} data points per step, but "
            f"the data hold only {num_points}: each step's minibatches are disjoint, so lower batch_size to at most "
            f"{num_points // world_size} (batch_size is per rank) or use fewer processes"
        )


def _check_backend(backend: str, world_size: int) -> str:
    """The backend ``"auto"`` stands for, after checking that it can run ``world_size`` local ranks."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if backend == "auto":
        backend = "nccl" if gpus >= world_size and distributed.is_nccl_available() else "gloo"
    if backend == "gloo" and not distributed.is_gloo_available():
        raise RuntimeError("this PyTorch build has no gloo backend; install a build with torch.distributed support")
    if backend == "nccl":
        if not distributed.is_nccl_available():
            raise RuntimeError("this PyTorch build has no nccl backend (a CPU build?): use backend='gloo'")
        if gpus < world_size:
            raise ValueError(
                f"backend 'nccl' runs one GPU per rank, and {world_size} ranks need {world_size} GPUs where "
                f"{gpus} are visible: use fewer processes or backend='gloo' (CPU)"
            )
    return backend


# -- one rank --------------------------------------------------------------------------------------------------
class _PlateIndices(Messenger):
    """Hands the subsampled plate ``name`` the indices of this rank's minibatch, as ``pyro.plate(...,
    subsample=indices)`` would (the plate then scales by ``N / len(indices)``)."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.indices: torch.Tensor | None = None
        self.used = False

    def _process_message(self, msg) -> None:
        if (msg["type"] == "sample" and msg["name"] == self.name and isinstance(msg["fn"], _Subsample)
                and msg["value"] is None):
            msg["value"] = self.indices
            self.used = True


class _RankLoss(nn.Module):
    """The module DDP wraps: its forward is the negative ELBO of one rank's minibatch, its parameters the guide's
    (and the model's, when the model is a method of another module)."""

    def __init__(self, model: Callable, guide: nn.Module, elbo: AmortizedELBO, plate_name: str, batch_size: int):
        super().__init__()
        self.guide = guide
        owner = getattr(model, "__self__", None)
        self.model_module = owner if isinstance(owner, nn.Module) and owner is not guide else None
        self.model, self.elbo, self.batch_size = model, elbo, batch_size
        self.plate = _PlateIndices(plate_name)

    def forward(self, data: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        self.plate.indices = indices
        with self.plate:
            return self.elbo.differentiable_loss(self.model, self.guide, data, subsample_size=self.batch_size)


def _check_parameters(module: _RankLoss, data: torch.Tensor, indices: torch.Tensor) -> None:
    """One untrained evaluation: the plate must take the indices, and every ``pyro.param`` must be a module's."""
    module.plate.indices, module.plate.used = indices, False
    with random_state_kept(), module.plate, poutine.trace(param_only=True) as parameters:
        # .loss evaluates without gradients, which leaves the annealing clock alone
        module.elbo.loss(module.model, module.guide, data, subsample_size=module.batch_size)
    if not module.plate.used:
        raise ValueError(
            f"the model and guide have no subsampled plate named {module.plate.name!r}: each rank hands its "
            f"minibatch to that plate; name the data plate {module.plate.name!r} or pass plate_name="
        )
    outside = parameters_outside(parameters.trace, module.parameters())
    if outside:
        raise ValueError(
            f"the loss reads pyro.param {outside[0]!r}, which belongs to no torch module of the guide or "
            "model: DDP averages module parameters only; make it an nn.Parameter of the guide module"
        )


def _run_rank(model: Callable, guide: nn.Module, data: torch.Tensor, options: _Options, device: torch.device,
              backend: str, started: float) -> DataParallelFit:
    """Train on this rank inside an initialised process group; every rank returns the same fit."""
    rank, world_size = distributed.get_rank(), distributed.get_world_size()
    _check_world(world_size, data.shape[0], options.batch_size)
    data = data.to(device=device, dtype=options.dtype)
    guide.to(device=device, dtype=options.dtype)
    if isinstance(getattr(model, "__self__", None), nn.Module):
        model.__self__.to(device=device, dtype=options.dtype)
    kwargs = {"subsample_size": options.batch_size}
    with random_state_kept(), torch.no_grad():
        max_plate_nesting = max_plate_nesting_of(structure_trace(model, (data,), kwargs))
    module = _RankLoss(model, guide, options.elbo, options.plate_name, options.batch_size)
    num_points, batch_size, seed = data.shape[0], options.batch_size, options.seed

    def indices_at(step: int) -> torch.Tensor:
        return rank_indices(num_points, batch_size, world_size, rank, step, seed).to(device)

    _check_parameters(module, data, indices_at(0))
    parameters = [parameter for parameter in module.parameters() if parameter.requires_grad]
    # DDP broadcasts rank 0's parameters and buffers here. The buffers (the VAE's prior constants) are not
    # re-broadcast before every forward pass: nothing changes them. (torch >= 2.13 renamed the option.)
    no_buffer_sync = (
        {"forward_sync_buffers": False} if "forward_sync_buffers" in _DDP_OPTIONS else {"broadcast_buffers": False}
    )
    wrapped = DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None, **no_buffer_sync
    )
    optimizer = training.init(parameters, options.learning_rate).optimizer
    steps = options.steps
    averaging_from = steps - min(StoppingRule.window, steps // 2)  # ppvi.training.run's rule for a fixed count
    average: list[torch.Tensor] | None = None
    averaged = 0
    losses = torch.full((steps,), math.nan, dtype=torch.float64, device=device)
    checkpoint = [parameter.detach().clone() for parameter in parameters]
    check_times: list[tuple[int, float]] = []
    last_check, stopped_nonfinite = 0, False
    distributed.barrier()
    start = time.perf_counter()
    step = 0
    while step < steps:
        indices = indices_at(step)
        torch.manual_seed(noise_seed(seed, rank, step))
        optimizer.zero_grad(set_to_none=True)
        loss = wrapped(data, indices)
        loss.backward()
        optimizer.step()
        losses[step] = loss.detach()
        step += 1
        if step > averaging_from:  # the iterates after each of the last steps - averaging_from steps
            with torch.no_grad():
                if average is None:
                    average, averaged = [parameter.detach().clone() for parameter in parameters], 1
                else:
                    averaged += 1
                    torch._foreach_lerp_(average, [parameter.detach() for parameter in parameters], 1.0 / averaged)
        if step - last_check < options.check_interval and step < steps:
            continue
        # A non-finite loss on any rank poisons every rank's averaged gradient: all stop together.
        flag = (~torch.isfinite(losses[last_check:step])).any().to(torch.float64).reshape(1)
        distributed.all_reduce(flag, op=distributed.ReduceOp.MAX)
        check_times.append((step, time.perf_counter() - start))
        if flag.item() > 0:
            with torch.no_grad():
                for parameter, saved in zip(parameters, checkpoint, strict=True):
                    parameter.copy_(saved)
            stopped_nonfinite, average = True, None
            break
        for saved, parameter in zip(checkpoint, parameters, strict=True):
            saved.copy_(parameter.detach())
        last_check = step
    training_seconds = time.perf_counter() - start
    # The ELBO of each step on the concatenated minibatch: the mean of the ranks' estimates.
    distributed.all_reduce(losses, op=distributed.ReduceOp.SUM)
    world_losses = (losses / world_size).cpu().numpy()
    if average is not None:
        with torch.no_grad():
            for parameter, value in zip(parameters, average, strict=True):
                parameter.copy_(value)
    nonfinite_step = None
    if stopped_nonfinite:
        nonfinite_step = last_check + int(np.argmin(np.isfinite(world_losses[last_check:step])))
        message = f"the ELBO was not finite at step {nonfinite_step}; parameters restored to step {last_check}"
        steps_taken = last_check
    else:
        averaged_note = f"; averaged the last {averaged} iterates" if averaged else ""
        message = f"ran the requested {steps} steps on {world_size} ranks ({backend}){averaged_note}"
        steps_taken = steps
    return DataParallelFit(
        model, guide, (data,), kwargs, guide_name=None, guide_options={},
        elbo=-world_losses[:steps_taken].astype(np.float64), steps=steps_taken,
        seconds=time.perf_counter() - started, device=device, dtype=options.dtype, converged=False, laplace=None,
        message=message, max_plate_nesting=max_plate_nesting, engine="ddp", world_size=world_size,
        backend=backend, batch_size=batch_size, training_seconds=training_seconds, check_times=check_times,
        nonfinite_step=nonfinite_step,
    )


def _device(backend: str, local_rank: int) -> torch.device:
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


@contextlib.contextmanager
def _process_group(backend: str, init_method: str, rank: int | None = None,
                   world_size: int | None = None) -> Iterator[None]:
    """Initialise the default process group, and destroy it on the way out, errors included."""
    if rank is None:
        distributed.init_process_group(backend, init_method=init_method, timeout=COLLECTIVE_TIMEOUT)
    else:
        distributed.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                       timeout=COLLECTIVE_TIMEOUT)
    try:
        yield
        # Every rank reaches the teardown before any destroys its group: a rank whose peer had already closed
        # gloo's connections aborted in C++ ("terminate called without an active exception", SIGABRT) in one CI
        # run of tests/test_data_parallel.py. Not on the error path, where a peer may never arrive.
        distributed.barrier()
    finally:
        distributed.destroy_process_group()


def _nonfinite_error(fit: DataParallelFit, learning_rate: float) -> NonFiniteELBOError:
    return NonFiniteELBOError(
        f"{fit.message}. Try a smaller learning_rate (now {learning_rate}), or check the model for values outside "
        "a distribution's support. The fit at the restored parameters is in .fit.",
        fit,
    )


# -- torchrun --------------------------------------------------------------------------------------------------
def is_distributed_rank() -> bool:
    """Whether this process is a rank of a data-parallel job: a ``torch.distributed`` process group is initialised,
    or ``torchrun`` set :data:`TORCHRUN_VARIABLES`. :func:`train` runs in such a process; elsewhere use
    :func:`launch`."""
    if distributed.is_available() and distributed.is_initialized():
        return True
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def world_size_of_job() -> int | None:
    """The number of ranks of the job this process belongs to (see :func:`is_distributed_rank`), else ``None``."""
    if distributed.is_available() and distributed.is_initialized():
        return distributed.get_world_size()
    return int(os.environ["WORLD_SIZE"]) if is_distributed_rank() else None


def train(
    model: Callable,
    guide: nn.Module,
    data: torch.Tensor,
    *,
    batch_size: int,
    steps: int,
    learning_rate: float = 1e-3,
    elbo: AmortizedELBO | None = None,
    seed: int = 0,
    backend: Backend = "auto",
    dtype: torch.dtype | str = torch.float32,
    plate_name: str = "data",
    check_interval: int = DEFAULT_CHECK_INTERVAL,
) -> DataParallelFit:
    """Train as one rank of a data-parallel job started by ``torchrun`` (or of a process group already initialised
    with ``torch.distributed.init_process_group``).

    Run the same script on every rank, e.g. ``torchrun --nproc-per-node=2 train_vae.py``, building the model and
    guide identically (same seed) on each. Without an initialised process group, this one is created from
    ``torchrun``'s environment variables (:data:`TORCHRUN_VARIABLES`) and destroyed when training ends (also on
    error); a group of the caller's is used as it is and left alone.

    Parameters
    ----------
    model : callable
        Pyro model called as ``model(data, subsample_size=b)``, with the data points in a subsampled plate named
        ``plate_name`` (e.g. :meth:`ppvi.models.vae.VAE.model`).
    guide : torch.nn.Module
        The amortized guide, called like the model, holding every trained parameter (e.g. the
        :class:`~ppvi.models.vae.VAE` itself); trained in place.
    data : torch.Tensor
        The whole data set, points along the first dimension, the same on every rank.
    batch_size : int
        Each rank's minibatch size ``b``: a step sees ``world_size * b`` distinct points.
    steps : int
        Adam steps.
    learning_rate : float
        Adam's learning rate.
    elbo : AmortizedELBO, optional
        The objective (KL weight, warm-up, free bits); a fresh copy is used, with CUDA graphs off.
    seed : int
        Seed of the minibatches and noise (see :func:`rank_indices`, :func:`noise_seed`); the same on every rank.
    backend : {"auto", "gloo", "nccl"}
        Of a process group created here: ``"auto"`` is ``nccl`` when every local rank has a GPU, else ``gloo``.
    dtype : {"float32", "float64"} or torch.dtype
        Floating type of the data and parameters.
    plate_name : str
        Name of the subsampled data plate.
    check_interval : int
        Steps between the ranks' joint checks for a non-finite loss.

    Returns
    -------
    DataParallelFit
        The same fit on every rank (identical parameters, the ELBO averaged over ranks).

    Raises
    ------
    RuntimeError
        No process group and no ``torchrun`` environment.
    NonFiniteELBOError
        The ELBO became NaN or infinite (``error.fit`` holds the last finite checkpoint).
    """
    started = time.perf_counter()
    options = _options(model, guide, data, batch_size=batch_size, steps=steps, learning_rate=learning_rate,
                       elbo=elbo, seed=seed, dtype=dtype, plate_name=plate_name, check_interval=check_interval)
    if distributed.is_available() and distributed.is_initialized():
        backend_used = str(distributed.get_backend())
        device = torch.device("cuda", torch.cuda.current_device()) if backend_used == "nccl" else torch.device("cpu")
        group: contextlib.AbstractContextManager = contextlib.nullcontext()
    else:
        missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
        if missing:
            raise RuntimeError(
                f"data-parallel training runs one process per rank, and this process is not one: "
                f"{', '.join(missing)} not set. Launch the script with `torchrun --nproc-per-node=2 script.py` "
                "(which sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT), or spawn the ranks from Python with "
                "ppvi.data_parallel.launch(world_size, model, guide, data, ...)"
            )
        world_size = int(os.environ["WORLD_SIZE"])
        _check_world(world_size, data.shape[0], options.batch_size)
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        backend_used = _check_backend(backend, local_world_size)
        device = _device(backend_used, int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))
        group = _process_group(backend_used, "env://")
    with group, pyro.settings.context(module_local_params=True):
        fit = _run_rank(model, guide, data, options, device, backend_used, started)
    if fit.nonfinite_step is not None:
        raise _nonfinite_error(fit, options.learning_rate)
    return fit


# -- spawned from Python ---------------------------------------------------------------------------------------
def _spawned_rank(rank: int, world_size: int, backend: str, init_method: str, threads: int | None,
                  networks: bytes, data: torch.Tensor, options: _Options, folder: str) -> None:
    """A process started by :func:`launch`: train, and on rank 0 save the fit (or the error) for the parent.

    ``networks`` is the pickled ``(model, guide)``: pickled by value, so that each rank trains its own copy.
    (``torch.multiprocessing`` would hand every process the caller's parameter storage in shared memory, and
    each rank's Adam step would then land on all of them, and on the caller's guide.) ``data`` does come through
    shared memory: it is only read."""
    started = time.perf_counter()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        model, guide = pickle.loads(networks)
        device = _device(backend, rank)
        with _process_group(backend, init_method, rank, world_size), pyro.settings.context(module_local_params=True):
            fit = _run_rank(model, guide, data, options, device, backend, started)
        if rank == 0:
            torch.save(fit, Path(folder, "fit.pt"))
    except BaseException as error:
        with contextlib.suppress(Exception):  # an exception that cannot be pickled reaches the parent as text
            torch.save(error, Path(folder, f"error-{rank}.pt"))
        raise


def launch(
    world_size: int,
    model: Callable,
    guide: nn.Module,
    data: torch.Tensor,
    *,
    batch_size: int,
    steps: int,
    learning_rate: float = 1e-3,
    elbo: AmortizedELBO | None = None,
    seed: int = 0,
    backend: Backend = "auto",
    dtype: torch.dtype | str = torch.float32,
    threads_per_process: int | None = None,
    plate_name: str = "data",
    check_interval: int = DEFAULT_CHECK_INTERVAL,
) -> DataParallelFit:
    """Spawn ``world_size`` processes on this machine, train data-parallel, and return rank 0's fit.

    The processes start with ``torch.multiprocessing``'s ``spawn`` (a script calling this must guard its entry
    point with ``if __name__ == "__main__":``) and meet through a file in a temporary folder. The model, guide
    and data are pickled to every process, so each starts from the same parameters; the guide passed in is left
    untouched, and the trained one is ``fit.guide``.

    Parameters
    ----------
    world_size : int
        Number of processes (ranks).
    model, guide, data, batch_size, steps, learning_rate, elbo, seed, dtype, plate_name, check_interval
        As for :func:`train`; ``model`` and ``guide`` must be picklable (a module and its methods are).
    backend : {"auto", "gloo", "nccl"}
        ``"gloo"``: CPU processes; ``"nccl"``: one GPU per process (needs ``world_size`` GPUs); ``"auto"``:
        ``nccl`` when there are enough GPUs, else ``gloo``.
    threads_per_process : int, optional
        torch's intra-op threads in each process; by default the CPUs available divided among the processes
        (at least one), so that the ranks do not oversubscribe the cores.

    Returns
    -------
    DataParallelFit
        Rank 0's fit; ``seconds`` counts the whole call, process start-up included.

    Raises
    ------
    NonFiniteELBOError
        The ELBO became NaN or infinite (``error.fit`` holds the last finite checkpoint).
    """
    started = time.perf_counter()
    options = _options(model, guide, data, batch_size=batch_size, steps=steps, learning_rate=learning_rate,
                       elbo=elbo, seed=seed, dtype=dtype, plate_name=plate_name, check_interval=check_interval)
    _check_world(world_size, data.shape[0], options.batch_size)
    backend = _check_backend(backend, world_size)
    if threads_per_process is None:
        available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads_per_process = max(1, available // world_size)
    else:
        _check_positive_integer("threads_per_process", threads_per_process)
    from torch.multiprocessing.spawn import ProcessException, start_processes

    try:
        networks = pickle.dumps((model, guide))
    except Exception as error:
        raise TypeError(
            f"the model and guide must be picklable to reach the spawned processes ({error}): define them at module "
            "level (a module and its methods pickle), or train under torchrun with ppvi.data_parallel.train"
        ) from error
    with tempfile.TemporaryDirectory(prefix="ppvi-ddp-") as folder:
        init_method = Path(folder, "rendezvous").as_uri()
        try:
            start_processes(
                _spawned_rank, nprocs=world_size, start_method="spawn",
                args=(world_size, backend, init_method, threads_per_process, networks, data, options, folder),
            )
        except ProcessException as failure:
            error_file = Path(folder, f"error-{failure.error_index}.pt")
            original = None
            if error_file.exists():
                with contextlib.suppress(Exception):
                    original = torch.load(error_file, weights_only=False)
            if isinstance(original, Exception):
                raise original from failure
            raise
        fit = torch.load(Path(folder, "fit.pt"), weights_only=False)
    fit.seconds = time.perf_counter() - started
    if fit.nonfinite_step is not None:
        raise _nonfinite_error(fit, options.learning_rate)
    return fit
