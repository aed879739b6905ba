"""The stochastic-gradient training loop, functional in the style of NumPyro's ``infer/svi.py``.

``init`` builds a :class:`TrainingState`, ``update`` takes one step and returns the new state with the loss, and
``run`` loops with the stopping rule of :mod:`ppvi.convergence` and returns a :class:`TrainingResult`. The loss is
any callable returning a differentiable scalar tensor (``ppvi.fit`` passes the negative ELBO of Pyro's ELBO
classes). Losses are written into a tensor on the parameters' device and read back once per check, so a GPU run
does not wait on the host every step.
"""

from __future__ import annotations

import math
import numbers
import sys
import time
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import numpy as np
import torch

from ppvi.convergence import StoppingRule, is_stationary

Schedule = Literal["constant", "exponential", "cosine"]
#: Final learning rate of the decaying schedules, as a fraction of the initial one.
FINAL_LEARNING_RATE_FRACTION = 0.1
#: Learning-rate multipliers of the successive stages when stopping on the rule: a large step travels far from a
#: poor start, a five-times smaller one then settles with a fifth of the iterate noise (the adaptive decrease of
#: Welandawe, Andersen, Vehtari & Huggins 2022, "Robust, automated, and accurate black-box variational inference",
#: cut to two stages).
STAGES = (1.0, 0.2)
#: A run has diverged when the median loss of a check interval exceeds the best median so far by more than
#: ``max(DIVERGENCE_MINIMUM_NATS, DIVERGENCE_NOISE_MULTIPLE * sd)``, ``sd`` the per-step spread of the losses in
#: the best interval. A converging run wanders around its optimum by a few noise sds at most (the stopping rule
#: needs the trend to vanish within two standard errors); ten sds, and never less than 50 nats, is a fall that
#: only a run leaving its optimum makes: the flows' failure mode, an ELBO dropping by orders of magnitude.
DIVERGENCE_NOISE_MULTIPLE = 10.0
DIVERGENCE_MINIMUM_NATS = 50.0
#: The ELBO estimates have broken down numerically when one of them exceeds the median of the first check interval
#: by more than ``BREAKDOWN_FACTOR * max(BREAKDOWN_MINIMUM_NATS, |that median|)``. No fit can make such a rise: an
#: ELBO never exceeds ``log p(x)``, so the most it can gain over its start is ``KL(q_start || p)``, and a gain a
#: thousand times the start's own magnitude would need ``log p(x)`` and that KL to cancel to a thousandth. A log
#: density that has lost its precision does it at once: a full-rank guide whose Cholesky factor has random-walked
#: into an ill-conditioned matrix (the condition number of a random triangular matrix grows exponentially with its
#: size, Viswanath & Trefethen 1998) evaluates ``log q`` of its own draws through a triangular solve that amplifies
#: round-off by that condition number, and its ELBO estimates jump from -1e3 to +1e16 within a few steps (full-rank
#: ADVI on probabilistic PCA with 100 coordinates did so before :class:`ppvi.guides.FullRankGuide` scaled its rows;
#: a learning rate far too large still does). Three orders of magnitude, and never less than a million nats in all,
#: leave any real gain alone. A slower breakdown (float32 reaches +1e4 nats over log p(x) before +1e6) is caught
#: only once it passes the bound: without an upper bound on log p(x), a tighter one would flag real gains.
BREAKDOWN_FACTOR = 1e3
BREAKDOWN_MINIMUM_NATS = 1e3


def advance_stages(stage: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The stage rule at a stationary point, for one run or a batch of replications: move to the next of
    :data:`STAGES`, or finish after the last.

    Parameters
    ----------
    stage : numpy.ndarray of int
        Index into :data:`STAGES` of each run that has just become stationary.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        The new stage index of each (unchanged where finished) and whether it has finished (was in the last
        stage), after which it averages its iterates and stops.
    """
    stage = np.asarray(stage, dtype=int)
    finished = stage + 1 >= len(STAGES)
    return np.where(finished, stage, stage + 1), finished


def is_invalid_value_error(error: Exception) -> bool:
    """Whether ``error`` is torch/Pyro argument validation rejecting a NaN or out-of-support value.

    With validation on (Pyro's default), a NaN reaching a distribution raises this ``ValueError`` before any NaN
    loss is seen; ppvi treats it exactly as a non-finite loss.
    """
    return isinstance(error, ValueError) and "found invalid values" in str(error)


#: The loss :func:`update` returns when validation rejected a value: a NaN the loop recognises by identity, so
#: that it can check at once without reading every step's loss back from the device.
INVALID_LOSS = torch.tensor(math.nan, dtype=torch.float64)


class TrainingState(NamedTuple):
    """State of the loop between steps.

    Attributes
    ----------
    step : int
        Steps taken.
    parameters : tuple of torch.Tensor
        The (unconstrained) leaf tensors being optimised, updated in place.
    optimizer : torch.optim.Optimizer
        Adam over ``parameters`` (its moment estimates are the mutable part of the state).
    scheduler : torch.optim.lr_scheduler.LRScheduler or None
        Learning-rate schedule; ``None`` for a constant rate (stepping a constant scheduler cost ~10 % of a small
        model's step).
    average : tuple of torch.Tensor or None
        Running Polyak average of ``parameters`` once averaging has started.
    averaged_steps : int
        Number of iterates in ``average``.
    """

    step: int
    parameters: tuple[torch.Tensor, ...]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    average: tuple[torch.Tensor, ...] | None
    averaged_steps: int


class TrainingResult(NamedTuple):
    """What :func:`run` returns.

    Attributes
    ----------
    losses : numpy.ndarray
        Loss (negative ELBO estimate) at every step taken.
    steps : int
        Steps taken.
    converged : bool
        Whether the stopping rule was met (always False for a fixed number of steps, which applies no rule).
    seconds : float
        Wall time of the loop.
    message : str
        Why the loop stopped.
    nonfinite_step : int or None
        First step whose loss was not finite (the parameters are then those of the last finite checkpoint).
    diverged_step : int or None
        Step at which the loss was found to diverge (see :data:`DIVERGENCE_NOISE_MULTIPLE`), or its estimates to
        break down numerically (see :data:`BREAKDOWN_FACTOR`); the parameters are then those of the best check
        interval seen.
    interrupted_step : int or None
        Step at which ``KeyboardInterrupt`` (Ctrl-C) stopped the loop: the steps completed by then are kept (and
        the run is not ``converged``).
    breakdown_step : int or None
        First step whose ELBO estimate was impossibly high (see :data:`BREAKDOWN_FACTOR`): the log densities lost
        their precision. ``diverged_step`` is then set too, the parameters are those of the best check interval,
        and ``losses`` stop before the interval holding the broken estimates, which estimate nothing.
    """

    losses: np.ndarray
    steps: int
    converged: bool
    seconds: float
    message: str
    nonfinite_step: int | None
    diverged_step: int | None = None
    interrupted_step: int | None = None
    breakdown_step: int | None = None


def _schedule_factor(schedule: Schedule | Callable[[int], float], horizon: int) -> Callable[[int], float]:
    if callable(schedule):
        return schedule
    if schedule == "constant":
        return lambda step: 1.0
    if schedule == "exponential":
        return lambda step: FINAL_LEARNING_RATE_FRACTION ** min(step / horizon, 1.0)
    if schedule == "cosine":
        fraction = FINAL_LEARNING_RATE_FRACTION
        return lambda step: fraction + (1 - fraction) * 0.5 * (1 + math.cos(math.pi * min(step / horizon, 1.0)))
    raise ValueError(f"unknown schedule {schedule!r}: use 'constant', 'exponential', 'cosine' or a callable")


def init(
    parameters: Sequence[torch.Tensor],
    learning_rate: float,
    schedule: Schedule | Callable[[int], float] = "constant",
    horizon: int = 10_000,
    epsilon: float = 1e-8,
) -> TrainingState:
    """Create the state: Adam (Kingma & Ba 2015) over ``parameters`` with a learning-rate schedule.

    Parameters
    ----------
    parameters : sequence of torch.Tensor
        Leaf tensors with ``requires_grad=True``.
    learning_rate : float
        Initial learning rate.
    schedule : {"constant", "exponential", "cosine"} or callable
        Multiplier of the learning rate as a function of the step; the decaying ones reach
        ``FINAL_LEARNING_RATE_FRACTION`` at ``horizon`` steps.
    horizon : int
        Steps over which a decaying schedule decays.
    epsilon : float
        Adam's epsilon: gradients much smaller than it get plain gradient steps of ``learning_rate / epsilon``
        times the gradient instead of Adam's normalised steps of size ``learning_rate``.
    """
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate}")
    parameters = tuple(parameters)
    if not parameters:
        raise ValueError("nothing to optimise: the model and guide have no parameters")
    # Adam's fused kernel (one pass for all parameters instead of a dozen ops per tensor): 2.4 -> 0.5 ms per step
    # for the 784-400-20 VAE on one CPU thread. It needs floating tensors all on the CPU or all on CUDA.
    devices = {parameter.device.type for parameter in parameters}
    fused = len(devices) == 1 and devices <= {"cpu", "cuda"} and all(p.is_floating_point() for p in parameters)
    optimizer = torch.optim.Adam(parameters, lr=learning_rate, eps=epsilon, fused=fused or None)
    factor = _schedule_factor(schedule, horizon)
    scheduler = None if schedule == "constant" else torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return TrainingState(0, parameters, optimizer, scheduler, None, 0)


def update(
    state: TrainingState,
    loss_function: Callable[[], torch.Tensor],
    average: bool = False,
    max_gradient_norm: float | None = None,
    step_function: Callable[[float], torch.Tensor] | None = None,
):
    """Take one Adam step on ``loss_function``; with ``average``, fold the new iterate into the Polyak average.

    With ``max_gradient_norm``, the gradient is rescaled to at most that Euclidean norm before the step (gradient
    clipping, Pascanu, Mikolov & Bengio 2013): one heavy-tailed Monte Carlo gradient then cannot throw a flow's
    network far from where it was.

    With ``step_function`` (a :class:`ppvi.engine.TracedStep`: loss, gradient, clipping and Adam as one traced
    graph, updating the parameters in place), the step is that function's at the optimizer's current learning
    rate, and ``loss_function`` and ``max_gradient_norm`` are not used: the traced step carries both.

    Returns
    -------
    (TrainingState, torch.Tensor)
        The new state and the (detached) loss before the step; NaN (and no step) when validation rejected a
        value (:func:`is_invalid_value_error`).
    """
    if step_function is not None:
        loss = step_function(state.optimizer.param_groups[0]["lr"])
        if state.scheduler is not None:
            state.scheduler.step()
        return _averaged(state, average), loss
    state.optimizer.zero_grad(set_to_none=True)
    try:
        loss = loss_function()
    except ValueError as error:
        if not is_invalid_value_error(error):
            raise
        return state._replace(step=state.step + 1), INVALID_LOSS
    if not loss.requires_grad:
        raise ValueError(
            "the loss does not depend on the parameters being trained (it has no gradient): the posterior may be flat "
            "everywhere (improper priors that no observed data inform: give them proper priors), or the guide's "
            "parameters do not enter its sample sites (check that the guide's pyro.sample statements use them)"
        )
    loss.backward()
    if max_gradient_norm is not None:
        torch.nn.utils.clip_grad_norm_(state.parameters, max_gradient_norm)
    state.optimizer.step()
    if state.scheduler is not None:
        state.scheduler.step()
    return _averaged(state, average), loss.detach()


def _averaged(state: TrainingState, average: bool) -> TrainingState:
    """The state one step on, with the new iterate folded into the Polyak average when ``average``."""
    running, count = state.average, state.averaged_steps
    if average:
        with torch.no_grad():
            if running is None:
                running, count = tuple(p.detach().clone() for p in state.parameters), 1
            else:
                count += 1
                torch._foreach_lerp_(list(running), [p.detach() for p in state.parameters], 1.0 / count)
    return state._replace(step=state.step + 1, average=running, averaged_steps=count)


def _progress_bar(enabled: bool | None, total: int):
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="step", leave=False)


def run(
    loss_function: Callable[[], torch.Tensor],
    parameters: Sequence[torch.Tensor],
    *,
    learning_rate: float,
    steps: int | None = None,
    rule: StoppingRule | None = None,
    schedule: Schedule | Callable[[int], float] = "constant",
    check_interval: int = 50,
    progress: bool | None = None,
    epsilon: float = 1e-8,
    max_gradient_norm: float | None = None,
    step_function: Callable[[float], torch.Tensor] | None = None,
    stationary_from: int = 0,
) -> TrainingResult:
    """Minimise ``loss_function`` with Adam until the stopping rule holds (or for exactly ``steps`` steps).

    With ``steps=None`` the loop checks every ``check_interval`` steps whether the losses are stationary
    (:func:`ppvi.convergence.is_stationary`); at each stationary point it moves to the next of :data:`STAGES`
    (multiplying the learning rate), and after the last it averages the iterates over another ``rule.window``
    steps and stops. With a fixed ``steps`` it applies the ``schedule`` alone and averages over the last
    ``min(rule.window, steps // 2)`` steps. The parameters end as the average. A non-finite loss stops the loop
    and restores the parameters of the last checkpoint whose losses were all finite; a diverging loss (see
    :data:`DIVERGENCE_NOISE_MULTIPLE`) stops it and restores the parameters of the best check interval, and so does
    an ELBO estimate too high for any fit (see :data:`BREAKDOWN_FACTOR`): the numerical breakdown of a log density,
    whose absurd estimates would otherwise pass for progress and then for stationarity.

    ``KeyboardInterrupt`` (Ctrl-C) during the loop stops it cleanly, as PyMC's ``pm.fit`` does: the parameters of
    the last completed step are kept (the last checkpoint's if a loss since then was not finite), the result is
    not ``converged``, and its ``message`` and ``interrupted_step`` say where it stopped.

    Parameters
    ----------
    loss_function : callable
        Returns the scalar loss (negative ELBO) as a differentiable tensor.
    parameters : sequence of torch.Tensor
        Leaf tensors optimised in place.
    learning_rate : float
        Adam's learning rate.
    steps : int, optional
        Fixed number of steps; ``None`` stops on the rule, capped at ``rule.max_steps``.
    rule : StoppingRule, optional
        The stopping rule (defaults to :class:`~ppvi.convergence.StoppingRule()`).
    schedule : str or callable
        Learning-rate schedule (see :func:`init`).
    check_interval : int
        Steps between reads of the loss buffer (progress bar, stationarity, non-finite checks).
    progress : bool, optional
        Show a tqdm progress bar with the ELBO; by default only when stderr is a terminal.
    epsilon : float
        Adam's epsilon (see :func:`init`).
    max_gradient_norm : float, optional
        Clip each step's gradient to this norm (see :func:`update`).
    step_function : callable, optional
        The whole step as one traced graph (:func:`ppvi.engine.trace_step`), used instead of ``loss_function``'s
        Pyro trace, backward pass and optimizer at every step (see :func:`update`).
    stationary_from : int
        First step at which the objective stops changing with the step (the end of a KL warm-up, whose weight grows
        with the step, Bowman et al. 2016). Losses before it measure a different objective, so the divergence
        check compares only the check intervals that start at or after it.
    """
    rule = rule or StoppingRule()
    if steps is not None and (not isinstance(steps, numbers.Integral) or steps < 1):
        raise ValueError(f"steps must be a positive integer or None, got {steps!r}")
    steps = None if steps is None else int(steps)
    total = steps if steps is not None else rule.max_steps
    averaging_steps = min(rule.window, total // 2) if steps is not None else rule.window
    state = init(parameters, learning_rate, schedule, horizon=total, epsilon=epsilon)
    device = state.parameters[0].device
    losses = torch.empty(total, dtype=torch.float64, device=device)
    checkpoint = [p.detach().clone() for p in state.parameters]
    best = [p.detach().clone() for p in state.parameters]
    best_median, best_spread, best_step, diverged_step = math.inf, math.inf, 0, None
    start_median, breakdown_step = None, None
    averaging_from = total - averaging_steps if steps is not None else None
    converged, message, nonfinite_step = False, "", None
    bar = _progress_bar(progress, total)
    start = time.perf_counter()
    last_check, stage, stage_start = 0, 0, 0
    interrupted_step = None
    try:
        while state.step < total:
            averaging = averaging_from is not None and state.step >= averaging_from
            state, loss = update(
                state, loss_function, average=averaging, max_gradient_norm=max_gradient_norm,
                step_function=step_function,
            )
            losses[state.step - 1] = loss
            if state.step - last_check < check_interval and state.step < total and loss is not INVALID_LOSS:
                continue
            recent = losses[last_check : state.step].cpu().numpy()
            if bar is not None:
                bar.update(state.step - last_check)
                bar.set_postfix(elbo=f"{-recent.mean():.4g}")
            if not np.isfinite(recent).all():
                nonfinite_step = last_check + int(np.argmin(np.isfinite(recent)))
                with torch.no_grad():
                    for parameter, saved in zip(state.parameters, checkpoint, strict=True):
                        parameter.copy_(saved)
                message = f"the ELBO was not finite at step {nonfinite_step}; parameters restored to step {last_check}"
                state = state._replace(average=None)
                converged = False
                break
            median = float(np.median(recent))
            comparable = last_check >= stationary_from  # the objective no longer changes with the step
            if comparable and start_median is None:
                start_median = median
            impossible = comparable and start_median - recent > breakdown_allowance(start_median)
            if np.any(impossible):
                breakdown_step, diverged_step = last_check + int(np.argmax(impossible)), state.step
                # No best interval yet (the breakdown is in the first): the parameters at this interval's start.
                restored, restored_step = (best, best_step) if math.isfinite(best_median) else (checkpoint, last_check)
                with torch.no_grad():
                    for parameter, saved in zip(state.parameters, restored, strict=True):
                        parameter.copy_(saved)
                message = breakdown_message(
                    breakdown_step, -float(recent.min()), -start_median, restored_step, learning_rate
                )
                state = state._replace(average=None)
                converged = False
                break
            allowance = max(DIVERGENCE_MINIMUM_NATS, DIVERGENCE_NOISE_MULTIPLE * best_spread)
            if comparable and median > best_median + allowance:
                diverged_step = state.step
                with torch.no_grad():
                    for parameter, saved in zip(state.parameters, best, strict=True):
                        parameter.copy_(saved)
                message = (
                    f"the ELBO diverged at step {diverged_step} (median {-median:.4g} against a best of "
                    f"{-best_median:.4g}); parameters restored to the best interval"
                )
                state = state._replace(average=None)
                converged = False
                break
            if comparable and median < best_median and recent.shape[0] > 1:
                best_median, best_spread, best_step = median, float(recent.std(ddof=1)), state.step
                for saved, parameter in zip(best, state.parameters, strict=True):
                    saved.copy_(parameter.detach())
            for saved, parameter in zip(checkpoint, state.parameters, strict=True):
                saved.copy_(parameter.detach())
            last_check = state.step
            if averaging_from is not None or state.step - stage_start < rule.window:
                continue
            if is_stationary(losses[max(0, state.step - 2 * rule.window) : state.step].cpu().numpy(), rule):
                advanced, finished = advance_stages(np.array([stage]))
                if not finished[0]:
                    stage, stage_start = int(advanced[0]), state.step
                    for group in state.optimizer.param_groups:
                        group["lr"] = learning_rate * STAGES[stage]
                    if state.scheduler is not None:
                        state.scheduler.base_lrs = [learning_rate * STAGES[stage]] * len(state.scheduler.base_lrs)
                else:
                    averaging_from = state.step
                    total = min(total, state.step + averaging_steps)
                    converged = True
    except KeyboardInterrupt:
        interrupted_step = state.step
        recent = losses[last_check : state.step].cpu().numpy()
        if not (np.isfinite(recent).all() and all(bool(torch.isfinite(p).all()) for p in state.parameters)):
            with torch.no_grad():
                for parameter, saved in zip(state.parameters, checkpoint, strict=True):
                    parameter.copy_(saved)
            state = state._replace(step=last_check, average=None)
        converged, nonfinite_step, diverged_step = False, None, None
        message = (
            f"interrupted (KeyboardInterrupt) at step {interrupted_step}; kept the parameters of step {state.step}"
        )
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    if state.average is not None:
        with torch.no_grad():
            for parameter, averaged in zip(state.parameters, state.average, strict=True):
                parameter.copy_(averaged)
    if not message:
        if steps is not None:
            message = f"ran the requested {steps} steps"
        elif converged:
            message = f"stationary at step {averaging_from}; averaged the last {state.averaged_steps} iterates"
        else:
            message = f"reached max_steps={rule.max_steps} before the ELBO became stationary"
    # The estimates of a non-finite or broken-down interval estimate nothing: the trace stops before it.
    steps_taken = state.step if nonfinite_step is None and breakdown_step is None else last_check
    return TrainingResult(
        losses[:steps_taken].cpu().numpy(), steps_taken, converged, seconds, message, nonfinite_step, diverged_step,
        interrupted_step, breakdown_step,
    )


def breakdown_allowance(start_median: float) -> float:
    """How far (nats) a loss may fall below the median loss of the first check interval before the ELBO estimates
    count as broken down: ``BREAKDOWN_FACTOR * max(BREAKDOWN_MINIMUM_NATS, |start_median|)``.

    Parameters
    ----------
    start_median : float
        Median loss (negative ELBO) of the first check interval whose objective no longer changes with the step.
    """
    return BREAKDOWN_FACTOR * max(BREAKDOWN_MINIMUM_NATS, abs(start_median))


def breakdown_message(step: int, estimate: float, start: float, restored_step: int, learning_rate: float) -> str:
    """Why :func:`run` stopped on an impossibly high ELBO estimate (see :data:`BREAKDOWN_FACTOR`), and what to do.

    Parameters
    ----------
    step : int
        First step whose estimate was impossibly high.
    estimate : float
        The highest ELBO estimate of the check interval.
    start : float
        Median ELBO of the first check interval.
    restored_step : int
        Step of the parameters restored (the end of the best check interval).
    learning_rate : float
        The run's learning rate, to suggest a smaller one.
    """
    return (
        f"the ELBO diverged upward at step {step}: an estimate of {estimate:.4g} against a start of {start:.4g} is "
        f"more than {BREAKDOWN_FACTOR:g} times the start's magnitude above it, a rise no fit can make (an ELBO never "
        "exceeds log p(x)), so the log densities broke down numerically (for a full-rank guide, a Cholesky factor "
        f"grown ill-conditioned in many dimensions); parameters restored to the best interval (step {restored_step}). "
        f"Try a smaller learning_rate (now {learning_rate:g}), or guide='meanfield' or 'lowrank'"
    )
