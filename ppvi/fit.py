"""``ppvi.fit``: one call from a Pyro model and its data to a posterior approximation you can question.

The shell is thin: check the inputs (:mod:`ppvi.inputs`) and the model's structure (:mod:`ppvi.tracing`), build
the guide from the registry (:mod:`ppvi.guides`), start Gaussian guides from a Laplace approximation
(:mod:`ppvi.initialization`), build the loss (:mod:`ppvi.objectives`), run the training loop (:mod:`ppvi.training`)
under the stopping rule (:mod:`ppvi.convergence`), and wrap the outcome in a :class:`ppvi.result.Fit`.
:class:`Fit`, :class:`FitWarning`, :class:`NonFiniteELBOError`, :class:`Expectation` and :class:`GuideAttempt` live
in :mod:`ppvi.result` and are re-exported here.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO, Trace_ELBO, TraceEnum_ELBO
from pyro.infer.autoguide import AutoGuide

from ppvi import engine as engines
from ppvi import objectives, tracing, training, vectorize
from ppvi.convergence import StoppingRule
from ppvi.diagnostics.diagnosis import Diagnosis
from ppvi.guides import AUTO, GUIDES, GuideSpec, PreconditionedGuide, resolve_guide
from ppvi.initialization import SINGULAR_HESSIAN_MESSAGE, LaplaceStart, laplace_start, minimize
from ppvi.inputs import accepts_keyword, computation, prepare_arguments, resolve_device, resolve_dtype, threads_for
from ppvi.objectives import ELBO_CHECK_EVALUATIONS
from ppvi.options import OptionTypeError, check_model, validate
from ppvi.result import (
    MINIBATCH_LAPLACE_MESSAGE,
    SUMMARY_DRAWS,
    Expectation,
    Fit,
    FitWarning,
    GuideAttempt,
    NonFiniteELBOError,
)

__all__ = [
    "AUTO_FULL_RANK_MAX_DIMENSION",
    "AUTO_SKIP_MEAN_FIELD_KHAT",
    "DEFAULT_LEARNING_RATE",
    "ELBO_CHECK_EVALUATIONS",
    "ELBO_CHECK_SIGNIFICANCE",
    "MINIBATCH_LAPLACE_MESSAGE",
    "PRECONDITIONED_ADAM_EPSILON",
    "PRECONDITIONED_LEARNING_RATE",
    "PRECONDITIONED_NUM_PARTICLES",
    "SUMMARY_DRAWS",
    "Expectation",
    "Fit",
    "FitWarning",
    "GuideAttempt",
    "NonFiniteELBOError",
    "check_fit_options",
    "fit",
    "predicted_mean_field_khat",
]

#: Learning rate of Adam in the preconditioned coordinates, where the posterior is about N(0, I): a tenth of a
#: posterior sd per step crosses a poor start (eight schools' mode is five sds from its mean) in tens of steps;
#: the second stage of the training loop divides it by five, and the iterates are averaged at the end.
PRECONDITIONED_LEARNING_RATE = 0.1
#: Monte Carlo draws per step for the registry's guides: evaluated as one vectorized batch, eight cost little
#: more than one on models of this size and cut the ELBO noise, hence the steps the stopping rule needs, by ~3.
PRECONDITIONED_NUM_PARTICLES = 8
#: Adam's epsilon in whitened coordinates, where gradients are of order one nat per posterior sd: a gradient far
#: below 0.1 is round-off or Monte Carlo noise, which Adam's default 1e-8 would inflate into full steps of size
#: learning_rate (at an exact fit the path-derivative gradient is ~1e-8, and those steps are a random walk away
#: from it); below epsilon the update becomes a gradient step of learning_rate / epsilon = 1, a Newton step here.
PRECONDITIONED_ADAM_EPSILON = 0.1
#: Learning rate for guides of your own: Pyro's usual choice.
DEFAULT_LEARNING_RATE = 0.01
#: Standard errors (of the difference) by which the final ELBO may fall below the start's, plus the stopping
#: rule's tolerance, before the fit is reported unconverged: a one-sided test at about 0.1 %.
ELBO_CHECK_SIGNIFICANCE = 3.0
#: Unconstrained coordinates up to which ``guide="auto"`` escalates to full rank (D (D + 1) / 2 scale
#: parameters, 20,100 at 200) rather than low rank, and goes on to a flow.
AUTO_FULL_RANK_MAX_DIMENSION = 200
#: ``guide="auto"`` starts at the full-rank family, skipping mean-field, when the Laplace start predicts a mean-field
#: k-hat above this (the PSIS threshold of "bad" for the 4,000 draws a diagnosis uses). For a Gaussian posterior of
#: precision ``L``, mean-field's optimum has precision ``diag(L)`` and its variance, relative to the posterior's, is
#: ``s^2 = lambda_min(C)`` in the worst direction, ``C = diag(L)^-1/2 L diag(L)^-1/2``; importance weights of a
#: normal proposal of variance ``s^2 < 1`` against a unit normal target have Pareto tail shape ``1 - s^2``
#: (their moment ``E[w^r]`` is finite for ``r < 1 / (1 - s^2)``). So mean-field's k-hat is about ``1 - lambda_min(C)``:
#: a correlation of 0.6 between two coordinates predicts 0.6 (mean-field is tried), kidiq's intercept and slope
#: (correlation -0.99) predict 0.99, and the mean-field attempt, a third of auto's time, is saved.
AUTO_SKIP_MEAN_FIELD_KHAT = 0.7


def _user_stack_level() -> int:
    """``stacklevel`` of a warning raised here that points at the first caller outside ppvi."""
    package = str(Path(__file__).resolve().parent)
    frame, level = sys._getframe(1), 1
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def fit(
    model: Callable,
    *args: Any,
    guide: str | Callable = "meanfield",
    guide_options: dict | None = None,
    steps: int | None = None,
    max_steps: int = 20_000,
    learning_rate: float | None = None,
    schedule: training.Schedule | Callable[[int], float] = "constant",
    num_particles: int | None = None,
    elbo: Literal["auto", "trace", "meanfield", "enumerate", "amortized"] | ELBO = "auto",
    subsample_size: int | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    seed: int | None = 0,
    progress: bool | None = None,
    initialization: Literal["laplace", "prior"] = "laplace",
    stopping_rule: StoppingRule | None = None,
    model_kwargs: dict | None = None,
    engine: engines.Engine = "auto",
    solver: Literal["advi", "batch_and_match"] = "advi",
) -> Fit:
    """Fit a variational approximation to the posterior of a Pyro model in one call.

    Parameters
    ----------
    model : callable
        A Pyro model; ``model(*args, **model_kwargs)``.
    *args
        The data, passed to the model positionally (tensors, numpy arrays, lists of numbers, numbers, or pandas
        objects: a Series becomes a 1-d tensor, a DataFrame of numbers a 2-d one, rows by columns). Tensors are
        detached (a tensor with ``requires_grad=True`` gets no ``.grad`` from the fit) and never modified.
    guide : str or callable
        A name from :data:`ppvi.GUIDES` (``"map"``, ``"laplace"``, ``"meanfield"``, ``"fullrank"``, ``"lowrank"``,
        ``"flow"``), ``"auto"``, or a guide of your own (a callable or ``torch.nn.Module``, e.g. an amortized
        encoder, or a Pyro autoguide such as ``pyro.infer.autoguide.AutoNormal(model)``). A model's own
        ``pyro.param`` values are trained with the guide's parameters (``fit.params``). ``"flow"`` fits
        ``"fullrank"`` first and starts its flows, initialised at the identity, from that answer.
        ``"auto"`` fits mean-field, diagnoses it with PSIS, and escalates (full-rank, or low-rank above
        :data:`AUTO_FULL_RANK_MAX_DIMENSION` coordinates, then flow) until a converged fit's own draws can stand
        for the posterior (``Diagnosis.guide_draws_usable``: k-hat good or ok with a small mismatch, or
        "caution"); it returns that fit, or else the one with the highest ELBO, with every attempt in
        ``fit.history``.
    guide_options : dict, optional
        Options of the guide family (``{"rank": 3}`` for ``"lowrank"``, ``{"num_transforms": 3}`` for ``"flow"``).
    steps : int, optional
        Train for exactly this many steps; by default train until the stopping rule holds.
    max_steps : int
        Cap on steps when stopping on the rule.
    learning_rate : float, optional
        Adam's learning rate; by default 0.1 for guides started at a Laplace approximation (in its whitened
        coordinates) and 0.01 otherwise. Stopping on the rule, the rate drops five-fold at the first stationary
        point (:data:`ppvi.training.STAGES`).
    schedule : {"constant", "exponential", "cosine"} or callable
        Learning-rate schedule (the iterates are averaged at the end in every case).
    num_particles : int, optional
        Monte Carlo draws per ELBO estimate, vectorized; by default 8 for registry guides and 1 for your own
        (an amortized guide averages over a minibatch already).
    elbo : {"auto", "trace", "meanfield", "enumerate", "amortized"} or pyro.infer.ELBO
        ``"auto"``: for the registry's Gaussian guides, the path-derivative estimator of Roeder et al. (2017) on
        top of ``Trace_ELBO`` (``TraceEnum_ELBO`` when the model marks sites for enumeration); for other guides,
        ``TraceEnum_ELBO`` with enumerated sites, ``TraceMeanField_ELBO`` when every latent site has a closed-form
        KL against its prior, else ``Trace_ELBO``. A name or an ELBO instance forces Pyro's estimator;
        ``"amortized"`` is :class:`ppvi.amortized.AmortizedELBO`, the fast estimator for amortized guides (VAEs).
    subsample_size : int, optional
        Minibatch size, passed to the model as ``subsample_size=`` (write ``pyro.plate(..., subsample_size=...)``).
    device : {"auto", "cpu", "cuda"}
        Where to compute; ``"auto"`` takes a GPU when one is available.
    dtype : {"auto", "float32", "float64"}
        Floating dtype of data and guide; ``"auto"`` is float64 on the CPU and float32 on a GPU.
    seed : int, optional
        Seeds Pyro's random state at the start (``None`` leaves it alone).
    progress : bool, optional
        tqdm progress bar with the ELBO; by default only when stderr is a terminal.
    initialization : {"laplace", "prior"}
        ``"laplace"`` starts Gaussian guides at the Laplace approximation (falling back to ``"prior"`` when the
        mode cannot be found); ``"prior"`` starts at Pyro's prior-median initialisation with scale 0.1.
    stopping_rule : StoppingRule, optional
        Window and R-hat threshold of the stopping rule (``max_steps`` above overrides its cap).
    model_kwargs : dict, optional
        Keyword arguments for the model.
    engine : {"auto", "traced", "compiled", "pyro"}
        How each training step runs (:mod:`ppvi.engine`). ``"traced"`` traces the whole step (model, guide,
        gradient, Adam) once into one graph of tensor operations and replays it, with no Pyro machinery per step;
        it takes exactly the steps the Pyro path takes (same random numbers, same arithmetic). ``"compiled"``
        compiles that graph with TorchInductor: fastest per step, but compiling costs tens of seconds on a small
        CPU, so it pays on long runs only. ``"pyro"`` runs Pyro's tracing at every step. ``"auto"`` traces when
        the fit can be traced (a registry guide with the default objective, no enumerated sites, no minibatches,
        no control flow on sampled values) and otherwise trains through Pyro, saying why in ``fit.message``;
        ``fit.engine`` says which ran. As with NumPyro's ``jit``, a traced step runs the model's Python code
        once: a model whose Python state changes from call to call (a counter, a global, a file read inside it)
        needs ``engine="pyro"``.
    solver : {"advi", "batch_and_match"}
        How a full-rank Gaussian (``guide="fullrank"``, and the full-rank stage of ``"flow"`` and ``"auto"``) is
        fitted. ``"advi"`` (default): Adam on the ELBO. ``"batch_and_match"``: Batch-and-Match (Cai et al. 2024,
        :mod:`ppvi.solvers.batch_and_match`) from the Laplace start, closed-form steps on a score-based
        divergence: 3-8 % of ADVI's gradient evaluations at ADVI's accuracy on near-Gaussian posteriors, but it
        settles 0.1 sd from ADVI's answer on skewed ones and does not settle on funnels (``benchmarks/README.md``),
        hence not the default. Where the Laplace start fails or BaM does not settle, ADVI trains instead and
        ``fit.message`` says so.

    Returns
    -------
    Fit

    Raises
    ------
    ValueError
        Unknown guide or option, an option out of range (checked by :func:`ppvi.options.validate` before any work;
        a value of the wrong kind raises :class:`ppvi.options.OptionTypeError`, also a ``TypeError``), data
        holding NaN/inf or None, empty data, bool observations, a posterior flat everywhere (improper), a model
        without latent sites.
    RuntimeError
        CUDA asked for but not available.
    NonFiniteELBOError
        The ELBO became NaN/inf during training; ``error.fit`` holds the fit at the last finite parameters.

    Warns
    -----
    FitWarning
        The Laplace start failed (no mode, a Hessian that is not positive definite: a funnel, or an improper
        posterior), training diverged (stopped, the best iterate kept), or the final ELBO is below the start's.

    Notes
    -----
    ``converged=True`` means: the stopping rule found the ELBO stationary, the final ELBO (re-estimated from
    fresh draws) is finite and no worse than where training started (the Laplace start, or the full-rank answer
    for a flow) beyond Monte Carlo noise, and the Laplace start did not find the posterior flat in some
    direction (improper). ``fit.message`` says which of these failed.

    ``KeyboardInterrupt`` (Ctrl-C) during training stops it cleanly, as PyMC's ``pm.fit`` does: ``fit`` returns
    the fit so far, with the parameters of the last completed step, ``converged=False``, ``fit.interrupted=True``
    and ``fit.message`` saying at which step it was interrupted (no ELBO check at the end, and ``guide="auto"`` or
    ``"flow"`` go no further). An interrupt before training starts (during the Laplace start) propagates.
    """
    options = dict(
        guide_options=guide_options, steps=steps, max_steps=max_steps, learning_rate=learning_rate,
        schedule=schedule, num_particles=num_particles, elbo=elbo, subsample_size=subsample_size, device=device,
        dtype=dtype, seed=seed, progress=progress, initialization=initialization, stopping_rule=stopping_rule,
        model_kwargs=model_kwargs, engine=engine, solver=solver,
    )
    options = check_fit_options(model, guide, options)
    if isinstance(guide, str) and guide == AUTO:
        return _fit_auto(model, args, options)
    spec = resolve_guide(guide) if isinstance(guide, str) else None
    start = _fit_start(model, args, options, spec.start_from) if spec is not None and spec.start_from else None
    if start is not None and start.interrupted:
        start.message += f"; the {guide!r} fit that was to start from it did not run"
        return start
    return _fit_one(model, args, guide, start, **options)


#: ``solver=`` names: full-rank ADVI (Adam on the ELBO), or Batch-and-Match (:mod:`ppvi.solvers.batch_and_match`).
SOLVERS = ("advi", "batch_and_match")
#: The guides whose Gaussian (or Gaussian stage) a solver other than ADVI fits.
SOLVER_GUIDES = ("fullrank", "flow", AUTO)
#: Options of :func:`fit` that may be ``None`` (ppvi's default).
_OPTIONAL_FIT_OPTIONS = (
    "guide_options", "steps", "learning_rate", "num_particles", "subsample_size", "seed", "progress", "model_kwargs",
)
#: The ``elbo=`` names.
_ELBO_NAMES = ("auto", "trace", "meanfield", "enumerate", "amortized")


def check_fit_options(model: Any, guide: Any, options: dict[str, Any], function: str = "ppvi.fit") -> dict[str, Any]:
    """Check :func:`fit`'s model, guide and options (all or some of them) before any work
    (:func:`ppvi.options.validate` for the shared ones); return the options normalised.

    Raises ``ValueError`` (:class:`ppvi.options.OptionTypeError` for a value of the wrong kind) naming the option
    and the fix.
    """
    check_model(model, function)
    if isinstance(guide, str):
        if guide != AUTO:
            resolve_guide(guide)  # an unknown name lists the known ones
    elif not callable(guide):
        raise OptionTypeError(
            f"guide must be a registry name ({', '.join(map(repr, GUIDES))} or 'auto') or a guide of your own (a "
            f"callable or torch.nn.Module, e.g. pyro.infer.autoguide.AutoNormal(model)), got {guide!r}"
        )
    known = set(_OPTIONAL_FIT_OPTIONS) | {"max_steps", "schedule", "elbo", "device", "dtype", "initialization",
                                          "stopping_rule", "engine", "solver"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise OptionTypeError(f"unknown option(s) {unknown} of ppvi.fit: the options are {sorted(known)}")
    checked = validate(options, optional=_OPTIONAL_FIT_OPTIONS)
    schedule = checked.get("schedule", "constant")
    if not callable(schedule) and schedule not in ("constant", "exponential", "cosine"):
        raise ValueError(f"unknown schedule {schedule!r}: use 'constant', 'exponential', 'cosine' or a callable")
    elbo = checked.get("elbo", "auto")
    if not isinstance(elbo, ELBO) and elbo not in _ELBO_NAMES:
        raise ValueError(f"unknown elbo {elbo!r}: use one of {_ELBO_NAMES} or a pyro.infer.ELBO instance")
    initialization = checked.get("initialization", "laplace")
    if initialization not in ("laplace", "prior"):
        raise ValueError(f"initialization must be 'laplace' or 'prior', got {initialization!r}")
    engine = checked.get("engine", "auto")
    if not isinstance(engine, str) or engine not in engines.ENGINES:
        raise ValueError(f"unknown engine {engine!r}: use one of {engines.ENGINES} (see ppvi.fit's docstring)")
    solver = checked.get("solver", "advi")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}: use one of {SOLVERS}")
    if solver != "advi" and guide not in SOLVER_GUIDES:
        raise ValueError(
            f"solver={solver!r} fits a full-rank Gaussian: use it with guide='fullrank' (or 'flow' and 'auto', whose "
            f"full-rank stage it fits), not guide={guide!r}"
        )
    rule = checked.get("stopping_rule")
    if rule is not None and not isinstance(rule, StoppingRule):
        raise OptionTypeError(f"stopping_rule must be a ppvi.StoppingRule or None, got {rule!r}")
    return checked


def _fit_start(model: Callable, args: tuple, options: dict, family: str) -> Fit:
    """The Gaussian fit a richer family starts from: the family's own defaults, the run's shared settings."""
    shared = dict(options, guide_options=None, steps=None, learning_rate=None, schedule="constant", num_particles=None)
    return _fit_one(model, args, family, None, **shared)


def _next_family(family: str, latent_dim: int) -> str | None:
    """The family ``guide="auto"`` tries after ``family`` for ``latent_dim`` unconstrained coordinates."""
    gaussian = "fullrank" if latent_dim <= AUTO_FULL_RANK_MAX_DIMENSION else "lowrank"
    if family == "meanfield":
        return gaussian
    if family == "fullrank" and latent_dim >= 2:
        return "flow"
    return None


def predicted_mean_field_khat(precision: torch.Tensor) -> float:
    """Mean-field's PSIS k-hat on a Gaussian posterior of this precision, ``1 - lambda_min(C)`` (see
    :data:`AUTO_SKIP_MEAN_FIELD_KHAT`), clipped to ``[0, 1]``."""
    scale = precision.diagonal().rsqrt()
    correlation = precision * scale[:, None] * scale[None, :]
    smallest = float(torch.linalg.eigvalsh(0.5 * (correlation + correlation.T)).min())
    return min(1.0, max(0.0, 1.0 - smallest))


def _shared_laplace(model: Callable, args: tuple, options: dict) -> LaplaceStart | None:
    """The Laplace start every Gaussian family of ``guide="auto"`` begins from, computed once (``None`` where the
    families would not use one, or it failed: each family then starts as it would alone)."""
    if options["initialization"] != "laplace" or options["subsample_size"] is not None:
        return None
    try:
        laplace = _fit_one(model, args, "laplace", None, **options).laplace
    except (ValueError, RuntimeError):  # no mode: every family reports its own start
        return None
    return laplace if laplace is not None and laplace.succeeded else None


def _fit_auto(model: Callable, args: tuple, options: dict) -> Fit:
    """``guide="auto"``: escalate from mean-field while PSIS says the fit cannot be trusted.

    The Laplace start is computed once for every Gaussian family; where it predicts that mean-field cannot be
    trusted (:data:`AUTO_SKIP_MEAN_FIELD_KHAT`), auto starts at the full-rank family and says so in the history.
    """
    if options["guide_options"]:
        raise ValueError(
            "guide_options does not apply to guide='auto', which tries several families: fit the family you want "
            "to configure by name, e.g. guide='flow', guide_options={'num_transforms': 3}"
        )
    started = time.perf_counter()
    history: list[GuideAttempt] = []
    candidates: list[tuple[Fit, Diagnosis]] = []
    fits: dict[str, Fit] = {}
    family: str | None = "meanfield"
    laplace = _shared_laplace(model, args, options)
    if laplace is not None:
        predicted = predicted_mean_field_khat(laplace.precision)
        if predicted > AUTO_SKIP_MEAN_FIELD_KHAT:
            family = _next_family("meanfield", laplace.loc.numel())
            history.append(GuideAttempt(
                "meanfield", math.nan, predicted, "skipped", False, time.perf_counter() - started,
                f"skipped: the Laplace start's correlations predict a mean-field k-hat of {predicted:.2f} (above "
                f"{AUTO_SKIP_MEAN_FIELD_KHAT}): started at {family!r}",
            ))
    while family is not None:
        attempt_started = time.perf_counter()
        spec = resolve_guide(family)
        start = fits.get(spec.start_from) if spec.start_from else None
        try:
            result = _fit_one(model, args, family, start, **options, precomputed_laplace=laplace)
        except NonFiniteELBOError as error:
            history.append(GuideAttempt(
                family, math.nan, math.nan, "failed", False, time.perf_counter() - attempt_started,
                f"the ELBO was not finite ({error.fit.message})",
            ))
            family = _next_family(family, error.fit.guide.latent_dim)
            continue
        if result.interrupted:  # Ctrl-C: the user wants a fit now, not the next family
            history.append(GuideAttempt(
                family, math.nan, math.nan, "interrupted", False, time.perf_counter() - attempt_started,
                f"{result.message}: stopped here",
            ))
            result.history, result.seconds = history, time.perf_counter() - started
            return result
        fits[family] = result
        diagnosis = result.diagnose()
        following = _next_family(family, result.guide.latent_dim)
        trusted = result.converged and diagnosis.guide_draws_usable
        if trusted:
            outcome = f"trusted (verdict {diagnosis.verdict!r}): stopped here"
        else:
            reason = f"verdict {diagnosis.verdict!r}, k-hat {diagnosis.khat:.2f}" + (
                "" if diagnosis.verdict == "bad" or diagnosis.guide_draws_usable
                else f", PSIS moves a mean by {diagnosis.mean_shift:.2g} sd"
            ) + ("" if result.converged else f", not converged: {result.message}")
            outcome = f"{reason}: moved on to {following!r}" if following else f"{reason}: no richer family left"
        history.append(GuideAttempt(
            family, diagnosis.elbo, diagnosis.khat, diagnosis.verdict, result.converged,
            time.perf_counter() - attempt_started, outcome,
        ))
        candidates.append((result, diagnosis))
        if trusted:
            break
        family = following
    if not candidates:
        raise ValueError(
            "guide='auto' found no family whose ELBO stayed finite: "
            + "; ".join(f"{attempt.guide}: {attempt.outcome}" for attempt in history)
        )
    trusted = [fit for fit, diagnosis in candidates if fit.converged and diagnosis.guide_draws_usable]
    best = trusted[-1] if trusted else max(
        candidates, key=lambda pair: pair[1].elbo if math.isfinite(pair[1].elbo) else -math.inf
    )[0]
    best.history = history
    best.seconds = time.perf_counter() - started
    return best


def _gaussian_of(guide: PreconditionedGuide) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and Cholesky factor of a Gaussian guide's distribution on the unconstrained coordinates."""
    posterior = guide.posterior()
    if hasattr(posterior, "scale_tril"):
        return posterior.loc.detach(), posterior.scale_tril.detach()
    return posterior.mean.detach(), torch.diag_embed(posterior.stddev.detach())


def _fit_one(
    model: Callable,
    args: tuple,
    guide: str | Callable,
    start: Fit | None,
    *,
    guide_options: dict | None,
    steps: int | None,
    max_steps: int,
    learning_rate: float | None,
    schedule: training.Schedule | Callable[[int], float],
    num_particles: int | None,
    elbo: str | ELBO,
    subsample_size: int | None,
    device: str | torch.device,
    dtype: str | torch.dtype,
    seed: int | None,
    progress: bool | None,
    initialization: str,
    stopping_rule: StoppingRule | None,
    model_kwargs: dict | None,
    engine: engines.Engine = "auto",
    precomputed_laplace: LaplaceStart | None = None,
    solver: str = "advi",
) -> Fit:
    """One family's fit (see :func:`fit`); ``start`` is the fit a family with ``start_from`` begins at, and
    ``precomputed_laplace`` a Laplace start already found for this model and data (``guide="auto"``)."""
    started = time.perf_counter()
    if initialization not in ("laplace", "prior"):
        raise ValueError(f"initialization must be 'laplace' or 'prior', got {initialization!r}")
    particles_defaulted = num_particles is None
    spec: GuideSpec | None = resolve_guide(guide) if isinstance(guide, str) else None
    if num_particles is None:
        num_particles = (spec.num_particles or PRECONDITIONED_NUM_PARTICLES) if spec is not None else 1
    if not isinstance(num_particles, int) or num_particles < 1:
        raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
    guide_options = dict(guide_options or {})
    if spec is None and guide_options:
        raise ValueError("guide_options applies to registry guides only; configure your own guide directly")
    resolved_device = resolve_device(device)
    resolved_dtype = resolve_dtype(dtype, resolved_device)
    kwargs = dict(model_kwargs or {})
    if subsample_size is not None:
        if not accepts_keyword(model, "subsample_size"):
            raise ValueError(
                "subsample_size was given but the model takes no 'subsample_size' argument: add one and use it "
                "in the data plate, `with pyro.plate('data', N, subsample_size=subsample_size):`"
            )
        kwargs["subsample_size"] = subsample_size
    window = spec.stopping_window if spec is not None and spec.stopping_window else StoppingRule.window
    rule = stopping_rule or StoppingRule(window=window, max_steps=max_steps)
    if stopping_rule is not None and max_steps != 20_000:
        rule = dataclasses.replace(rule, max_steps=max_steps)

    with computation(resolved_device, resolved_dtype, threads_for(args, kwargs, resolved_device, num_particles)):
        args, kwargs = prepare_arguments(model, args, kwargs, resolved_device, resolved_dtype)
        if seed is not None:
            pyro.set_rng_seed(seed)
        model, latent, enumerated, max_plate_nesting = tracing.inspect_model(model, args, kwargs)
        guide_object = spec.factory(model, **guide_options) if spec is not None else guide
        tracing.adopt_pyro_module(guide_object)
        if isinstance(guide_object, torch.nn.Module):
            guide_object.to(device=resolved_device)
            if not isinstance(guide_object, AutoGuide):
                guide_object.to(dtype=resolved_dtype)
        with poutine.block(), torch.no_grad():
            guide_object(*args, **kwargs)  # builds an autoguide's prototype and parameters
        if start is not None:
            guide_object.set_gaussian(*_gaussian_of(start.guide))
        point_elbo_class = TraceEnum_ELBO if enumerated else Trace_ELBO
        if isinstance(guide_object, PreconditionedGuide):
            objectives.check_not_flat(model, guide_object, args, kwargs, point_elbo_class, max_plate_nesting, latent)
        laplace = None
        wants_laplace = spec is not None and spec.laplace_start and isinstance(guide_object, PreconditionedGuide)
        if wants_laplace and (initialization == "laplace" or spec.objective == "none"):
            if subsample_size is not None:
                laplace = LaplaceStart(False, None, None, math.nan, 0, MINIBATCH_LAPLACE_MESSAGE)
            elif precomputed_laplace is not None:
                laplace = precomputed_laplace
            else:
                laplace = _laplace(model, guide_object, args, kwargs, point_elbo_class, max_plate_nesting)
            if laplace.succeeded:
                guide_object.set_preconditioner(laplace.loc, laplace.precision)
            elif laplace.message != MINIBATCH_LAPLACE_MESSAGE and spec.objective != "none":  # "none" raises below
                warnings.warn(
                    f"the Laplace start of guide {guide!r} failed: {laplace.message}. The guide starts from the "
                    "prior's median instead; check fit.converged and fit.diagnose() before trusting it",
                    FitWarning,
                    stacklevel=_user_stack_level(),
                )
        if learning_rate is None:
            # Registry guides work in whitened coordinates (of the Laplace start, or of the default N(init, 0.1^2),
            # where 0.1 whitened is Pyro's usual 0.01 in unconstrained units); other guides in their own.
            whitened = isinstance(guide_object, PreconditionedGuide)
            if spec is not None and spec.learning_rate is not None:
                learning_rate = spec.learning_rate
            else:
                learning_rate = PRECONDITIONED_LEARNING_RATE if whitened else DEFAULT_LEARNING_RATE

        vectorization = None
        if isinstance(guide_object, PreconditionedGuide) and not enumerated and subsample_size is None:
            vectorization = vectorize.choose_strategy(model, guide_object, args, kwargs, max_plate_nesting)
            if vectorization.strategy == "sequential":
                warnings.warn(
                    objectives.vectorization_note(vectorization), FitWarning, stacklevel=_user_stack_level()
                )
        loss_function, notes = objectives.build_loss(
            model, guide_object, args, kwargs, elbo=elbo, own_guide=spec is None, enumerated=enumerated,
            point_elbo_class=point_elbo_class, num_particles=num_particles, particles_defaulted=particles_defaulted,
            max_plate_nesting=max_plate_nesting, vectorization=vectorization,
        )

        def result(elbo_trace, steps_taken, converged, message, interrupted=False) -> Fit:
            return Fit(
                model, guide_object, args, kwargs, guide_name=guide if spec else None, guide_options=guide_options,
                elbo=-np.asarray(elbo_trace, dtype=np.float64), steps=steps_taken,
                seconds=time.perf_counter() - started, device=resolved_device, dtype=resolved_dtype,
                converged=converged, laplace=laplace, message=message, max_plate_nesting=max_plate_nesting,
                interrupted=interrupted, engine=engine_used, vectorization=vectorization,
            )

        engine_used = "pyro"
        if spec is not None and spec.objective == "none":
            if not laplace.succeeded:
                raise ValueError(
                    f"the Laplace approximation needs a posterior mode, and none was found: {laplace.message}. "
                    "Use guide='fullrank' (stochastic VI needs no mode)."
                )
            return result([], 0, True, "Laplace approximation at the mode")
        parameters = objectives.trainable_parameters(loss_function, guide_object)
        if spec is not None and spec.objective == "deterministic":
            loss, iterations = minimize(loss_function, parameters)
            converged = math.isfinite(loss)
            message = f"L-BFGS, {iterations} iterations" if converged else "the log density was not finite"
            return result([loss], 0, converged, message)
        if solver == "batch_and_match" and guide == "fullrank":
            solved = _batch_and_match(
                model, guide_object, args, kwargs, laplace, vectorization, max_plate_nesting, seed
            )
            if isinstance(solved, str):
                notes.append(solved)  # why ADVI trains instead
            else:
                iterations, losses, message = solved
                return result(losses, iterations, True, "; ".join([message, *notes]))
        preconditioned = laplace is not None and laplace.succeeded
        checked = isinstance(guide_object, PreconditionedGuide)
        if checked:
            initial_state = {name: value.detach().clone() for name, value in guide_object.state_dict().items()}
            start_elbo = objectives.elbo_estimate(loss_function)
        epsilon = PRECONDITIONED_ADAM_EPSILON if preconditioned else 1e-8
        max_gradient_norm = spec.max_gradient_norm if spec is not None else None
        step_function, reason = _traced_step(
            engine, loss_function, guide_object, parameters, epsilon=epsilon, max_gradient_norm=max_gradient_norm,
            elbo=elbo, enumerated=enumerated, subsample_size=subsample_size,
        )
        if step_function is None and reason is not None and isinstance(guide, str):  # a guide of the user's: Pyro's
            notes.append(f"trained through Pyro (engine 'pyro'): {reason}")
        run = training.run(
            loss_function, parameters, learning_rate=learning_rate, steps=steps, rule=rule, schedule=schedule,
            progress=progress, epsilon=epsilon, max_gradient_norm=max_gradient_norm, step_function=step_function,
            stationary_from=getattr(elbo, "kl_warmup_steps", 0),  # a KL warm-up changes the objective until then
        )
        if step_function is not None:  # after the run: the step's plan may have compiled it for the run's length
            engine_used = step_function.engine
        converged = run.converged
        interrupted = run.interrupted_step is not None
        if run.diverged_step is not None:
            warnings.warn(
                f"training of guide {guide!r} diverged: {run.message}", FitWarning, stacklevel=_user_stack_level()
            )
        if laplace is not None and laplace.message.startswith(SINGULAR_HESSIAN_MESSAGE):
            converged = False
            notes.append("the Laplace start found the posterior flat along some direction: it may be improper")
        if checked and run.nonfinite_step is None and not interrupted:  # Ctrl-C asks for the fit now: no check
            end_elbo = objectives.elbo_estimate(loss_function)
            allowance = ELBO_CHECK_SIGNIFICANCE * math.hypot(start_elbo[1], end_elbo[1]) + rule.tolerance
            if not end_elbo[0] >= start_elbo[0] - allowance:
                converged = False
                change = (
                    f"the final ELBO ({end_elbo[0]:.6g} +- {end_elbo[1]:.2g}) is below the start's "
                    f"({start_elbo[0]:.6g} +- {start_elbo[1]:.2g})"
                )
                if start is not None:  # the start is a fit in its own right: go back to it
                    guide_object.load_state_dict(initial_state)
                    change += f"; returned the {start.guide_name!r} start, where the flows are the identity"
                notes.append(change)
                warnings.warn(f"guide {guide!r}: {change}", FitWarning, stacklevel=_user_stack_level())
        if start is not None:
            notes.append(f"started from the {start.guide_name!r} fit ({start.steps} steps, {start.seconds:.3g} s)")
        outcome = result(run.losses, run.steps, converged, "; ".join([run.message, *notes]), interrupted)
        if start is not None:
            outcome.seconds += start.seconds
        if run.nonfinite_step is not None:
            raise NonFiniteELBOError(
                f"{run.message}. Try a smaller learning_rate (now {learning_rate}), more num_particles, or check the "
                "model for values outside a distribution's support. The fit at the restored parameters is in .fit.",
                outcome,
            )
        return outcome


def _batch_and_match(
    model: Callable, guide: PreconditionedGuide, args: tuple, kwargs: dict, laplace: LaplaceStart | None,
    vectorization: vectorize.Vectorization | None, max_plate_nesting: int, seed: int | None,
) -> tuple[int, list[float], str] | str:
    """Fit ``guide``'s full-rank Gaussian by Batch-and-Match (Cai et al. 2024) from the Laplace start; returns the
    iterations, the negative ELBO trace and the fit's message, or why ADVI must train instead (no Laplace start,
    which BaM needs within a few posterior sds; or BaM did not settle)."""
    from ppvi.solvers import batch_and_match, scale_tril_from_precision

    if laplace is None or not laplace.succeeded:
        return "Batch-and-Match needs the Laplace start, which failed: trained by ADVI instead"
    strategy = vectorization.strategy if vectorization is not None else "broadcast"
    evaluate = vectorize.batched_log_density(model, guide, args, kwargs, max_plate_nesting, strategy)
    generator = torch.Generator(device=laplace.loc.device)
    generator.manual_seed(0 if seed is None else seed)
    outcome = batch_and_match.run(
        lambda latent: evaluate(latent)[0], laplace.loc, scale_tril_from_precision(laplace.precision),
        generator=generator,
    )
    if not outcome.converged:
        return (
            f"Batch-and-Match did not settle in {outcome.iterations} iterations ({outcome.message}): trained by "
            "ADVI instead"
        )
    guide.set_gaussian(outcome.loc.detach(), outcome.scale_tril.detach())
    message = (
        f"Batch-and-Match (Cai et al. 2024): {outcome.iterations} iterations, {outcome.gradient_evaluations} "
        f"gradient evaluations; {outcome.message}"
    )
    return outcome.iterations, (-outcome.elbo).tolist(), message


def _traced_step(
    engine: engines.Engine,
    loss_function: Callable[[], torch.Tensor],
    guide: Callable,
    parameters: list[torch.Tensor],
    *,
    epsilon: float,
    max_gradient_norm: float | None,
    elbo: str | ELBO,
    enumerated: bool,
    subsample_size: int | None,
) -> tuple[engines.TracedStep | None, str | None]:
    """The traced (or compiled) training step for ``engine``, or ``None`` and the reason the fit trains through
    Pyro. ``engine="traced"``/``"compiled"`` on a fit that cannot be traced raises ``ValueError``."""
    if engine == "pyro":
        return None, None
    if not isinstance(guide, PreconditionedGuide):
        reason = "the guide is not one of the registry's ADVI guides"
    elif elbo != "auto":
        reason = f"elbo={elbo!r} runs Pyro's own ELBO class"
    elif enumerated:
        reason = "enumerated discrete sites are summed out by Pyro's TraceEnum_ELBO at every step"
    elif subsample_size is not None:
        reason = "minibatches draw fresh indices at every step"
    else:
        try:
            step = engines.trace_step(  # "auto" compiles where the run's steps pay it back (TracedStep.plan)
                loss_function, guide, parameters, epsilon=epsilon, max_gradient_norm=max_gradient_norm,
                compile="auto" if engine == "auto" else engine == "compiled",
            )
            return step, None
        except engines.NotTraceableError as error:
            reason = str(error)
    if engine != "auto":
        raise ValueError(f"engine={engine!r} cannot train this fit: {reason}. Use engine='pyro' (or 'auto').")
    return None, reason


def _laplace(model, guide: PreconditionedGuide, args, kwargs, point_elbo_class, max_plate_nesting: int):
    """Laplace start on the unconstrained log density, each site constrained by the support of its own run
    (:mod:`ppvi.constrain`); with enumerated sites, the point-mass ELBO of the guide (TraceEnum_ELBO sums them out)."""
    if point_elbo_class is TraceEnum_ELBO:
        negative_log_density = objectives.point_mass_negative_log_density(
            model, guide, args, kwargs, point_elbo_class, max_plate_nesting
        )
    else:
        negative_log_density = objectives.traced_negative_log_density(model, guide, args, kwargs, 1, max_plate_nesting)
    return laplace_start(negative_log_density, guide.preconditioner_loc)
