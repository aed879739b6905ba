"""The training loop: one loop for one fit and for a batch of replications, in the functional style of NumPyro's
``infer/svi.py`` and blackjax's ``vi/`` modules.

:func:`run_batch` is the loop. It trains ``M`` independent replications behind a :class:`Stepper` (pure
``update``/``iterate``/``keep`` functions of an opaque state, batched over a leading replication dimension) with, per
replication, its own learning rate, stage (:data:`STAGES`), stopping rule (:mod:`ppvi.convergence`), iterate
averaging, and non-finite, divergence and breakdown checks; replications that stop leave the batch. Two steppers
use it:

- :func:`run`, one fit (``ppvi.fit``, ``ppvi.compare``): ``M = 1``, whose state is Adam over the model's and
  guide's parameters (:func:`init`, :func:`update`), the step taken by Pyro or by one traced graph
  (:class:`ppvi.engine.TracedStep`);
- :func:`ppvi.batched.run`, the ``M`` Gaussian fits of VSBC and SBC (``ppvi.vsbc``, ``ppvi.sbc``), whose state is a
  :class:`ppvi.batched.BatchedState` and whose step is one batched graph.

Losses are written into a tensor on the parameters' device and read back once per check, so a GPU run does not
wait on the host every step.
"""

from __future__ import annotations

import math
import numbers
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

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
#: A check interval is no candidate for the best interval (whose parameters a divergence or a breakdown restores)
#: when its highest ELBO estimate rises above the interval's median by more than
#: ``max(IMPLAUSIBLE_RISE_MINIMUM_NATS, IMPLAUSIBLE_RISE_SPREAD_MULTIPLE * IQR)``, the IQR being the interquartile
#: range of its estimates. A healthy interval's estimates are a trend plus Monte Carlo noise whose upper tail is
#: light (``log w`` is bounded above by ``log sup p(z | x) / q(z)``; a chi-square-like tail for a Gaussian guide on
#: a heavier-tailed posterior puts its largest of 50 averaged estimates about 4 IQRs above the median), and a
#: steady rise keeps the highest estimate within one interval's trend of the median. A lone estimate thousands of
#: IQRs above the rest is the first sign of log densities losing their precision (an ELBO above log p(x), which no
#: fit can reach), though not yet the thousandfold rise of :data:`BREAKDOWN_FACTOR`: the parameters at the end of
#: such an interval are not the ones to come back to. A real jump late in an interval is only delayed by one
#: interval (the next one is clean).
IMPLAUSIBLE_RISE_SPREAD_MULTIPLE = 10.0
IMPLAUSIBLE_RISE_MINIMUM_NATS = 50.0


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


def implausible_rise(losses: np.ndarray) -> np.ndarray:
    """Whether each replication's check interval holds an ELBO estimate implausibly far above the rest (see
    :data:`IMPLAUSIBLE_RISE_SPREAD_MULTIPLE`).

    Parameters
    ----------
    losses : numpy.ndarray
        ``(steps, A)`` losses (negative ELBO estimates) of one check interval, finite.

    Returns
    -------
    numpy.ndarray of bool
        ``(A,)``.
    """
    if len(losses) < 2:
        return np.zeros(losses.shape[1:], dtype=bool)
    lower, median, upper = np.quantile(losses, [0.25, 0.5, 0.75], axis=0)
    allowance = np.maximum(IMPLAUSIBLE_RISE_MINIMUM_NATS, IMPLAUSIBLE_RISE_SPREAD_MULTIPLE * (upper - lower))
    return median - losses.min(axis=0) > allowance


def is_invalid_value_error(error: Exception) -> bool:
    """Whether ``error`` is torch/Pyro argument validation rejecting a NaN or out-of-support value.

    With validation on (Pyro's default), a NaN reaching a distribution raises this ``ValueError`` before any NaN
    loss is seen; ppvi treats it exactly as a non-finite loss.
    """
    return isinstance(error, ValueError) and "found invalid values" in str(error)


#: The loss :func:`update` returns when validation rejected a value: a NaN the loop recognises by identity, so
#: that it can check at once without reading every step's loss back from the device.
INVALID_LOSS = torch.tensor(math.nan, dtype=torch.float64)


def schedule_factor(schedule: Schedule | Callable[[int], float], horizon: int) -> Callable[[int], float]:
    """The learning-rate multiplier as a function of the step (steps taken before it).

    Parameters
    ----------
    schedule : {"constant", "exponential", "cosine"} or callable
        ``"exponential"`` and ``"cosine"`` decay to :data:`FINAL_LEARNING_RATE_FRACTION` at ``horizon`` steps and
        stay there (the rates of torch's ``ExponentialLR`` and ``CosineAnnealingLR`` with those end points); a
        callable is the multiplier itself.
    horizon : int
        Steps over which a decaying schedule decays.
    """
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


# -- the loop, over a batch of replications --------------------------------------------------------------------------


class Stepper(NamedTuple):
    """What :func:`run_batch` trains: the parameters of ``A`` independent replications, behind pure functions of
    an opaque state (one fit is the case ``A = 1``).

    Attributes
    ----------
    update : callable
        ``(state, learning_rates) -> (state, losses)``: one step of every replication in the batch, each at its own
        learning rate (``learning_rates``, a numpy array ``(A,)``); ``losses`` ``(A,)`` (a 0-dim tensor or a Python
        float when ``A = 1``) are the losses before the step, on the parameters' device, a tensor the stepper does
        not write again (the loop keeps each step's until its next check). :data:`INVALID_LOSS` (by identity) asks
        the loop to check the losses at once.
    iterate : callable
        ``state -> tuple of torch.Tensor``, each ``(A, ...)``: the current iterate, in the coordinates the loop
        averages, saves and restores (a view of live parameters is allowed: the loop copies what it keeps).
    keep : callable
        ``(state, rows) -> state``: the state of the replications where the boolean tensor ``rows`` ``(A,)`` is
        true, the others having stopped.
    """

    update: Callable[[Any, np.ndarray], tuple[Any, torch.Tensor]]
    iterate: Callable[[Any], tuple[torch.Tensor, ...]]
    keep: Callable[[Any, torch.Tensor], Any]


class BatchResult(NamedTuple):
    """What :func:`run_batch` returns, per replication (``M`` of them).

    Attributes
    ----------
    iterates : tuple of torch.Tensor
        Each ``(M, ...)``: where each replication ended. The average of its iterates over its averaging phase; the
        saved iterate of the last finite check (a non-finite loss), of the best check interval (a divergence or a
        breakdown); the last iterate otherwise.
    losses : numpy.ndarray
        ``(steps run, M)``; NaN once a replication has stopped.
    steps : numpy.ndarray of int
        Steps of each replication's trace that count (to the check before a non-finite or broken-down interval).
    converged : numpy.ndarray of bool
        Stopped on the rule (and averaged).
    stationary_step, averaged_steps : numpy.ndarray of int
        Step at which the last stage became stationary (-1 if never), and the iterates averaged.
    nonfinite_step, diverged_step, breakdown_step : numpy.ndarray of int
        As :class:`TrainingResult`'s, -1 where none.
    events : dict of int to str
        Why a replication stopped early (non-finite loss, divergence, breakdown, interruption), by replication.
    interrupted_step : int or None
        Step at which ``KeyboardInterrupt`` stopped the loop (every replication then keeps its last finite iterate).
    seconds : float
        Wall time of the loop.
    """

    iterates: tuple[torch.Tensor, ...]
    losses: np.ndarray
    steps: np.ndarray
    converged: np.ndarray
    stationary_step: np.ndarray
    averaged_steps: np.ndarray
    nonfinite_step: np.ndarray
    diverged_step: np.ndarray
    breakdown_step: np.ndarray
    events: dict[int, str]
    interrupted_step: int | None
    seconds: float


def _read_losses(recorded: list[torch.Tensor | float], count: int, device: torch.device) -> np.ndarray:
    """The losses of ``count`` replications recorded at each step since the last check, ``(steps, count)`` float64
    on the host: one stack and one copy for the interval (a write into a preallocated tensor at every step cost
    3 us a step, as much as the rest of the loop's bookkeeping for one fit). Losses a stepper returned as Python
    floats (one fit's C kernel, :class:`ppvi.engine.TracedStep`) need no copy at all."""
    if not recorded:
        return np.zeros((0, count))
    if count == 1 and all(type(value) is float for value in recorded):
        return np.asarray(recorded, dtype=np.float64).reshape(len(recorded), 1)
    recorded = [torch.tensor(value, dtype=torch.float64) if type(value) is float else value for value in recorded]
    if any(value is INVALID_LOSS for value in recorded):  # a step that validation rejected took no step
        recorded = [
            torch.full((count,), math.nan, dtype=torch.float64, device=device) if value is INVALID_LOSS
            else value.reshape(count) for value in recorded
        ]
    return torch.stack(recorded).reshape(len(recorded), count).to(torch.float64).cpu().numpy()


def _copy(values: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(value.detach().clone() for value in values)


def _put(target: tuple[torch.Tensor, ...], rows, source: tuple[torch.Tensor, ...], positions) -> None:
    """``target[k][rows] = source[k][positions]`` for every k (rows and positions as index tensors)."""
    with torch.no_grad():
        for destination, values in zip(target, source, strict=True):
            destination[rows] = values[positions].to(destination.dtype)


def run_batch(
    stepper: Stepper,
    state: Any,
    replications: int,
    *,
    learning_rate: float,
    steps: int | None = None,
    rule: StoppingRule | None = None,
    schedule: Schedule | Callable[[int], float] = "constant",
    check_interval: int = 50,
    progress: bool | None = None,
    stationary_from: int = 0,
) -> BatchResult:
    """The training loop: train ``replications`` independent problems until each stops.

    Every ``check_interval`` steps the loop reads the losses back (once, for the whole batch) and, for each
    replication still training:

    - a non-finite loss stops it at the iterate of the last check (all of whose losses were finite);
    - an ELBO estimate impossibly high (:data:`BREAKDOWN_FACTOR`) stops it at the best check interval seen, and so
      does a median loss above the best by more than the noise allows (:data:`DIVERGENCE_NOISE_MULTIPLE`);
    - without a fixed number of ``steps``, once a stage has run ``rule.window`` steps, stationary losses
      (:func:`ppvi.convergence.is_stationary` on the last two windows) move it to the next of :data:`STAGES`
      (:func:`advance_stages`), and after the last stage it averages its iterates over another ``rule.window``
      steps (Polyak & Juditsky 1992; the detect-then-average rule of Dhaka et al. 2020) and stops.

    With a fixed number of ``steps`` every replication takes them all, at the learning rate times ``schedule``, and
    averages its last ``min(rule.window, steps // 2)`` iterates. Replications that stop leave the batch
    (``stepper.keep``), so the others' steps get cheaper. ``KeyboardInterrupt`` (Ctrl-C) stops the loop cleanly,
    as PyMC's ``pm.fit`` does: each replication keeps its last completed iterate (its last check's if a loss since
    was not finite) and the result says where it stopped.

    Parameters
    ----------
    stepper : Stepper
        The replications' update, iterate and selection.
    state : object
        The stepper's state before the first step.
    replications : int
        ``M``, the batch size at the start.
    learning_rate : float
        The learning rate of the first stage (times :data:`STAGES` and ``schedule``).
    steps : int, optional
        Fixed number of steps; ``None`` stops each replication on the rule, capped at ``rule.max_steps``.
    rule : StoppingRule, optional
        Defaults to :class:`~ppvi.convergence.StoppingRule()`.
    schedule : str or callable
        Learning-rate multiplier by step (:func:`schedule_factor`), over the horizon of ``steps`` or
        ``rule.max_steps``.
    check_interval : int
        Steps between reads of the losses (progress bar, stationarity, non-finite and divergence checks).
    progress : bool, optional
        A tqdm progress bar with the mean ELBO; by default only when stderr is a terminal.
    stationary_from : int
        First step at which the objective stops changing with the step (the end of a KL warm-up, whose weight grows
        with the step, Bowman et al. 2016): the divergence and breakdown checks compare only later intervals.
    """
    rule = rule or StoppingRule()
    if steps is not None and (not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or steps < 1):
        raise ValueError(f"steps must be a positive integer or None, got {steps!r}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate}")
    if not (isinstance(check_interval, numbers.Integral) and check_interval >= 1):
        raise ValueError(f"check_interval must be a positive integer, got {check_interval!r}")
    fixed = steps is not None
    total = int(steps) if fixed else rule.max_steps
    factor = schedule_factor(schedule, total)
    constant_rate = schedule == "constant"
    averaging_steps = min(rule.window, total // 2) if fixed else rule.window
    M = int(replications)

    # Per replication (global position 0..M-1).
    stage = np.zeros(M, dtype=int)
    stage_start = np.zeros(M, dtype=int)
    averaging_since = np.full(M, -1)
    end_step = np.full(M, total)
    converged = np.zeros(M, dtype=bool)
    stationary_step = np.full(M, -1)
    averaged_steps = np.zeros(M, dtype=int)
    trace_steps = np.zeros(M, dtype=int)
    nonfinite_step, diverged_step, breakdown_step = np.full(M, -1), np.full(M, -1), np.full(M, -1)
    best_median, best_spread, start_median = np.full(M, math.inf), np.full(M, math.inf), np.full(M, math.nan)
    best_step = np.zeros(M, dtype=int)
    events: dict[int, str] = {}
    losses = np.full((total, M), np.nan)

    # Per replication in the batch (position 0..A-1 of ``active``).
    active = np.arange(M)
    iterate = stepper.iterate(state)
    device = iterate[0].device
    checkpoint, best = _copy(iterate), _copy(iterate)
    final = tuple(torch.zeros((M, *value.shape[1:]), dtype=value.dtype, device=device) for value in iterate)
    sums: tuple[torch.Tensor, ...] | None = None  # iterate sums of the replications averaging
    recorded: list[torch.Tensor] = []  # the losses since the last check, read back (stacked) at the check
    rates: np.ndarray | None = None
    next_end, any_averaging = total, False  # the earliest end of a replication in the batch; whether one averages

    step = last_check = 0
    fixed_averaging_from = total - averaging_steps if fixed else None
    bar = _progress_bar(progress, total)
    started = time.perf_counter()

    def stop(positions: np.ndarray, source: tuple[torch.Tensor, ...] | None, counted: int) -> None:
        """Stop the replications at ``positions`` of the batch, ending at ``source``'s rows (their average when
        ``None``), their traces counting ``counted`` steps."""
        rows = torch.as_tensor(active[positions], device=device)
        where = torch.as_tensor(positions, device=device)
        if source is None:
            count = torch.as_tensor(step - averaging_since[active[positions]], device=device)
            averaged = tuple(total_[where] / count.reshape(-1, *([1] * (total_.dim() - 1))) for total_ in sums)
            _put(final, rows, averaged, torch.arange(len(positions), device=device))
            averaged_steps[active[positions]] = step - averaging_since[active[positions]]
        else:
            _put(final, rows, source, where)
        trace_steps[active[positions]] = counted
        end_step[active[positions]] = -1  # stopped

    def start_averaging(positions: np.ndarray) -> None:
        nonlocal sums, any_averaging
        averaging_since[active[positions]] = step
        any_averaging = True
        if sums is None:
            sums = tuple(torch.zeros_like(value) for value in stepper.iterate(state))
        else:
            where = torch.as_tensor(positions, device=device)
            with torch.no_grad():
                for value in sums:
                    value[where] = 0

    interrupted_step = None
    try:
        while len(active):
            if fixed_averaging_from is not None and step == fixed_averaging_from:
                start_averaging(np.arange(len(active)))
            if rates is None or not constant_rate:
                rates = learning_rate * np.asarray(STAGES)[stage[active]] * factor(step)
            state, loss = stepper.update(state, rates)
            recorded.append(loss)
            step += 1
            if any_averaging:  # no detach: no_grad records nothing, and a stepper's iterate is usually detached
                with torch.no_grad():
                    torch._foreach_add_(sums, stepper.iterate(state))
            due = len(recorded) == check_interval or step == next_end
            if not due and loss is not INVALID_LOSS:
                continue

            # -- a check --------------------------------------------------------------------------------------------
            recent = _read_losses(recorded, len(active), device)
            losses[last_check:step, active] = recent
            recorded = []
            if bar is not None:
                bar.update(step - last_check)
                with np.errstate(all="ignore"):
                    bar.set_postfix(elbo=f"{-np.nanmean(recent):.4g}")
            iterate = stepper.iterate(state)
            stopping = np.zeros(len(active), dtype=bool)

            finite = np.isfinite(recent).all(axis=0)
            for i in np.flatnonzero(~finite):
                m = active[i]
                nonfinite_step[m] = last_check + int(np.argmin(np.isfinite(recent[:, i])))
                events[m] = (
                    f"the ELBO was not finite at step {nonfinite_step[m]}; parameters restored to step {last_check}"
                )
            if (~finite).any():
                stop(np.flatnonzero(~finite), checkpoint, last_check)
                stopping |= ~finite

            comparable = last_check >= stationary_from  # the objective no longer changes with the step
            medians = np.median(recent, axis=0)
            if comparable:
                unset = np.isnan(start_median[active]) & finite
                start_median[active[unset]] = medians[unset]
                allowance = BREAKDOWN_FACTOR * np.maximum(BREAKDOWN_MINIMUM_NATS, np.abs(start_median[active]))
                impossible = (start_median[active] - recent > allowance) & finite
                broken = np.flatnonzero(impossible.any(axis=0) & ~stopping)
                # The best interval's parameters come back, and the trace ends there: what follows it is no part of
                # the fit returned. Before any clean interval, ``best`` still holds the start.
                for i in broken:
                    m = active[i]
                    breakdown_step[m] = last_check + int(np.argmax(impossible[:, i]))
                    diverged_step[m] = step
                    events[m] = breakdown_message(
                        int(breakdown_step[m]), -float(recent[:, i].min()), -float(start_median[m]),
                        int(best_step[m]), learning_rate,
                    )
                for restored_step in np.unique(best_step[active[broken]]):
                    group = broken[best_step[active[broken]] == restored_step]
                    stop(group, best, int(restored_step))
                stopping[broken] = True

                allowed = np.maximum(DIVERGENCE_MINIMUM_NATS, DIVERGENCE_NOISE_MULTIPLE * best_spread[active])
                diverging = np.flatnonzero((medians > best_median[active] + allowed) & ~stopping)
                for i in diverging:
                    m = active[i]
                    diverged_step[m] = step
                    events[m] = (
                        f"the ELBO diverged at step {step} (median {-medians[i]:.4g} against a best of "
                        f"{-best_median[m]:.4g}); parameters restored to the best interval"
                    )
                if len(diverging):
                    stop(diverging, best, step)
                    stopping[diverging] = True

                clean = ~implausible_rise(np.where(np.isfinite(recent), recent, 0.0))
                improved = (
                    np.flatnonzero((medians < best_median[active]) & clean & ~stopping) if len(recent) > 1 else []
                )
                if len(improved):
                    best_median[active[improved]] = medians[improved]
                    best_spread[active[improved]] = recent[:, improved].std(axis=0, ddof=1)
                    best_step[active[improved]] = step
                    where = torch.as_tensor(improved, device=device)
                    _put(best, where, iterate, where)
            checkpoint = _copy(iterate)
            last_check = step

            if not fixed:
                candidates = np.flatnonzero(
                    ~stopping & (averaging_since[active] < 0) & (step - stage_start[active] >= rule.window)
                )
                stationary = np.asarray([
                    i for i in candidates
                    if is_stationary(losses[max(0, step - 2 * rule.window) : step, active[i]], rule)
                ], dtype=int)
                if len(stationary):
                    advanced, finished = advance_stages(stage[active[stationary]])
                    moving = stationary[~finished]
                    stage[active[moving]] = advanced[~finished]
                    stage_start[active[moving]] = step
                    done = stationary[finished]
                    converged[active[done]] = True
                    stationary_step[active[done]] = step
                    end_step[active[done]] = np.minimum(total, step + averaging_steps)
                    if len(done):
                        start_averaging(done)
                    rates = None

            ending = np.flatnonzero(~stopping & ((end_step[active] == step) | (step == total)))
            if len(ending):
                averaging = averaging_since[active[ending]] >= 0
                if averaging.any():
                    stop(ending[averaging], None, step)
                if (~averaging).any():
                    stop(ending[~averaging], iterate, step)
                stopping[ending] = True
            if stopping.any():
                keep = ~stopping
                active = active[keep]
                if len(active):
                    rows = torch.as_tensor(keep, device=device)
                    state = stepper.keep(state, rows)
                    checkpoint = tuple(value[rows] for value in checkpoint)
                    best = tuple(value[rows] for value in best)
                    if sums is not None:
                        sums = tuple(value[rows] for value in sums)
                    rates = None
            if len(active):
                next_end = int(end_step[active].min())
                any_averaging = bool((averaging_since[active] >= 0).any())
    except KeyboardInterrupt:
        interrupted_step = step
        if len(active):
            recent = _read_losses(recorded, len(active), device)
            losses[last_check:step, active] = recent
            iterate = stepper.iterate(state)
            finite_iterate = torch.stack([
                torch.isfinite(value.reshape(len(active), -1)).all(dim=1) for value in iterate
            ]).all(dim=0).cpu().numpy()
            usable = np.isfinite(recent).all(axis=0) & finite_iterate
            averaging = averaging_since[active] >= 0
            for group, source, counted in (
                (np.flatnonzero(usable & averaging & (averaging_since[active] < step)), None, step),
                (np.flatnonzero(usable & ~(averaging & (averaging_since[active] < step))), iterate, step),
                (np.flatnonzero(~usable), checkpoint, last_check),
            ):
                if len(group):
                    stop(group, source, counted)
            for m in active:
                events[m] = (
                    f"interrupted (KeyboardInterrupt) at step {interrupted_step}; kept the parameters of step "
                    f"{trace_steps[m]}"
                )
            converged[active] = False
    seconds = time.perf_counter() - started
    if bar is not None:
        bar.close()
    return BatchResult(
        final, losses[:step], trace_steps, converged, stationary_step, averaged_steps, nonfinite_step, diverged_step,
        breakdown_step, events, interrupted_step, seconds,
    )


def _progress_bar(enabled: bool | None, total: int):
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="step", leave=False)


# -- one fit: Adam over a model's parameters, the loop's case A = 1 -------------------------------------------------


class OptimizerState(NamedTuple):
    """One fit's state between steps: Adam (Kingma & Ba 2015) over leaf tensors updated in place.

    Attributes
    ----------
    step : int
        Steps taken.
    parameters : tuple of torch.Tensor
        The (unconstrained) leaf tensors being optimised.
    optimizer : torch.optim.Optimizer
        Adam over ``parameters`` (its moment estimates are the mutable part of the state).
    """

    step: int
    parameters: tuple[torch.Tensor, ...]
    optimizer: torch.optim.Optimizer


def init(parameters: Sequence[torch.Tensor], learning_rate: float, epsilon: float = 1e-8) -> OptimizerState:
    """Adam over ``parameters``.

    Parameters
    ----------
    parameters : sequence of torch.Tensor
        Leaf tensors with ``requires_grad=True``.
    learning_rate : float
        Initial learning rate (:func:`update` sets each step's).
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
    return OptimizerState(0, parameters, optimizer)


def update(
    state: OptimizerState,
    loss_function: Callable[[], torch.Tensor],
    learning_rate: float,
    max_gradient_norm: float | None = None,
    step_function: Callable[[float], torch.Tensor] | None = None,
) -> tuple[OptimizerState, torch.Tensor]:
    """Take one Adam step on ``loss_function`` at ``learning_rate``.

    With ``max_gradient_norm``, the gradient is rescaled to at most that Euclidean norm before the step (gradient
    clipping, Pascanu, Mikolov & Bengio 2013): one heavy-tailed Monte Carlo gradient then cannot throw a flow's
    network far from where it was.

    With ``step_function`` (a :class:`ppvi.engine.TracedStep`: loss, gradient, clipping and Adam as one traced
    graph, updating the parameters in place), the step is that function's, and ``loss_function`` and
    ``max_gradient_norm`` are not used: the traced step carries both.

    Returns
    -------
    (OptimizerState, torch.Tensor)
        The new state and the (detached) loss before the step; :data:`INVALID_LOSS` (and no step) when validation
        rejected a value (:func:`is_invalid_value_error`).
    """
    if step_function is not None:  # the state built directly: NamedTuple._replace costs a microsecond a step
        return OptimizerState(state.step + 1, state.parameters, state.optimizer), step_function(learning_rate)
    for group in state.optimizer.param_groups:
        group["lr"] = learning_rate
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
    return state._replace(step=state.step + 1), loss.detach()


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
    """Minimise ``loss_function`` with Adam: :func:`run_batch` for one replication, whose iterate is the
    parameters themselves. They end as the loop's answer (the averaged iterate, or the one restored).

    Parameters
    ----------
    loss_function : callable
        Returns the scalar loss (negative ELBO) as a differentiable tensor.
    parameters : sequence of torch.Tensor
        Leaf tensors optimised in place.
    learning_rate, steps, rule, schedule, check_interval, progress, stationary_from
        As :func:`run_batch`'s.
    epsilon : float
        Adam's epsilon (see :func:`init`).
    max_gradient_norm : float, optional
        Clip each step's gradient to this norm (see :func:`update`).
    step_function : callable, optional
        The whole step as one traced graph (:func:`ppvi.engine.trace_step`), used instead of ``loss_function``'s
        Pyro trace, backward pass and optimizer at every step (see :func:`update`).
    """
    rule = rule or StoppingRule()
    schedule_factor(schedule, 1)  # an unknown schedule is refused before anything is built
    state = init(parameters, learning_rate, epsilon)
    # A traced step decides, now that the number of steps is known, whether compiling it pays (and says so).
    plan = getattr(step_function, "plan", None)
    planned = int(steps) if isinstance(steps, numbers.Integral) and not isinstance(steps, bool) else None
    step_note = plan(planned) if callable(plan) else ""

    def one_update(state: OptimizerState, rates: np.ndarray) -> tuple[OptimizerState, torch.Tensor]:
        # Looked up at each call (not bound once), so that a test can stand in for it.
        return update(state, loss_function, float(rates[0]), max_gradient_norm, step_function)

    # The parameters are updated in place, so views of them made once are the iterate at every step (the loop
    # copies what it keeps): none of the per-step view-building that cost 1-2 us a parameter.
    views = tuple(parameter.detach().unsqueeze(0) for parameter in state.parameters)

    def iterate(state: OptimizerState) -> tuple[torch.Tensor, ...]:
        return views

    result = run_batch(
        Stepper(one_update, iterate, lambda state, rows: state), state, 1, learning_rate=learning_rate, steps=steps,
        rule=rule, schedule=schedule, check_interval=check_interval, progress=progress,
        stationary_from=stationary_from,
    )
    with torch.no_grad():
        for parameter, final in zip(state.parameters, result.iterates, strict=True):
            parameter.copy_(final[0])

    def first(values: np.ndarray) -> int | None:
        return None if values[0] < 0 else int(values[0])

    if 0 in result.events:
        message = result.events[0]
    elif steps is not None:
        message = f"ran the requested {steps} steps"
    elif result.converged[0]:
        message = (
            f"stationary at step {result.stationary_step[0]}; averaged the last {result.averaged_steps[0]} iterates"
        )
    else:
        message = f"reached max_steps={rule.max_steps} before the ELBO became stationary"
    if step_note:
        message = f"{message}; {step_note}"
    steps_taken = int(result.steps[0])
    return TrainingResult(
        result.losses[:steps_taken, 0].copy(), steps_taken, bool(result.converged[0]), result.seconds, message,
        first(result.nonfinite_step), first(result.diverged_step), result.interrupted_step,
        first(result.breakdown_step),
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
        "grown ill-conditioned in many dimensions); parameters restored to "
        + (f"the best interval (step {restored_step}). " if restored_step else "the start (step 0). ")
        + f"Try a smaller learning_rate (now {learning_rate:g}), or guide='meanfield' or 'lowrank'"
    )
