"""``ppvi.fit``: one call from a Pyro model and its data to a posterior approximation you can question.

The shell is thin: check the inputs (:mod:`ppvi.inputs`), build the guide from the registry (:mod:`ppvi.guides`),
start Gaussian guides from a Laplace approximation (:mod:`ppvi.initialization`), run the training loop
(:mod:`ppvi.training`) under the stopping rule (:mod:`ppvi.convergence`), and wrap the outcome in a :class:`Fit`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import pandas as pd
import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO, Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoGuide
from pyro.infer.autoguide.initialization import InitMessenger
from pyro.nn import PyroModule
from torch.distributions import biject_to

from ppvi import training
from ppvi.constrain import ConstrainMessenger, constrained_trace
from ppvi.convergence import StoppingRule
from ppvi.diagnostics.diagnosis import Diagnosis, diagnose, resample
from ppvi.guides import AUTO, GUIDES, GuideSpec, PreconditionedGuide, resolve_guide
from ppvi.initialization import (
    SINGULAR_HESSIAN_MESSAGE,
    LaplaceStart,
    init_to_median_or_feasible,
    laplace_start,
    minimize,
)
from ppvi.inputs import (
    accepts_keyword,
    computation,
    explain_data_failure,
    prepare_arguments,
    random_state_kept,
    resolve_device,
    resolve_dtype,
    threads_for,
)
from ppvi.options import OptionTypeError, check_model, validate
from ppvi.summary import summarize

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
#: Draws behind ``summary()`` and ``to_arviz()``: Monte Carlo error of a mean about 1.6 % of a posterior sd.
SUMMARY_DRAWS = 4000
#: The Laplace start is not attempted on minibatches, whose log density is random: not a failure.
MINIBATCH_LAPLACE_MESSAGE = "minibatches make the log density random"
#: Loss evaluations (of ``num_particles`` draws each, no gradients) behind the ELBO estimates at the start and
#: the end of training that ``converged`` compares: 16 x 8 draws put the standard error near a tenth of the
#: per-draw spread of the log ratios, at the cost of about five training steps each.
ELBO_CHECK_EVALUATIONS = 16
#: Standard errors (of the difference) by which the final ELBO may fall below the start's, plus the stopping
#: rule's tolerance, before the fit is reported unconverged: a one-sided test at about 0.1 %.
ELBO_CHECK_SIGNIFICANCE = 3.0
#: Unconstrained coordinates up to which ``guide="auto"`` escalates to full rank (D (D + 1) / 2 scale
#: parameters, 20,100 at 200) rather than low rank, and goes on to a flow.
AUTO_FULL_RANK_MAX_DIMENSION = 200


class Expectation(NamedTuple):
    """A posterior expectation: PSIS-corrected, and as the guide alone gives it.

    Attributes
    ----------
    corrected : torch.Tensor
        Self-normalised importance-sampling estimate with Pareto-smoothed weights.
    raw : torch.Tensor
        Plain Monte Carlo average under the guide.
    khat : float
        k-hat of the weights: trust ``corrected`` when it is below ``diagnosis.threshold`` (at most 0.7).
    """

    corrected: torch.Tensor
    raw: torch.Tensor
    khat: float


class FitWarning(UserWarning):
    """Something about a fit the user should know and may act on: a failed Laplace start, a diverged run, a flow
    that could not improve on its start."""


def _user_stack_level() -> int:
    """``stacklevel`` of a warning raised here that points at the first caller outside ppvi."""
    package = str(Path(__file__).resolve().parent)
    frame, level = sys._getframe(1), 1
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


class NonFiniteELBOError(RuntimeError):
    """The ELBO became NaN or infinite. ``error.fit`` holds the fit at the last finite parameters."""

    def __init__(self, message: str, fit: Fit):
        super().__init__(message)
        self.fit = fit


class Fit:
    """The result of :func:`fit`.

    Attributes
    ----------
    model : callable
        The Pyro model.
    guide : callable
        The trained guide (a Pyro autoguide or the user's guide).
    guide_name : str or None
        The registry name of the guide, if it came from :data:`ppvi.GUIDES`.
    elbo : numpy.ndarray
        The ELBO estimate at every training step (empty when the fit needed no stochastic steps).
    steps : int
        Stochastic-gradient steps taken.
    seconds : float
        Wall time of the whole fit, start-up included.
    device : torch.device
        Where the fit ran.
    dtype : torch.dtype
        Floating dtype of the data and guide.
    converged : bool
        Whether training stopped on the stopping rule (or, for ``"map"``/``"laplace"``, found the mode).
    laplace : LaplaceStart or None
        The Laplace start, when one was attempted.
    message : str
        How training ended.
    history : list of GuideAttempt
        For ``guide="auto"``, every family tried, in order (empty otherwise).
    interrupted : bool
        Whether training was stopped by ``KeyboardInterrupt`` (Ctrl-C): the fit holds the parameters reached by
        then, ``converged`` is False and ``message`` says at which step.
    params : dict of str to torch.Tensor
        The model's own ``pyro.param`` values, trained with the guide's parameters (empty for a model without any).
    """

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        args: tuple,
        kwargs: dict,
        *,
        guide_name: str | None,
        guide_options: dict,
        elbo: np.ndarray,
        steps: int,
        seconds: float,
        device: torch.device,
        dtype: torch.dtype,
        converged: bool,
        laplace: LaplaceStart | None,
        message: str,
        max_plate_nesting: int,
        history: list[GuideAttempt] | None = None,
        interrupted: bool = False,
    ):
        self.model, self.guide, self.args, self.kwargs = model, guide, args, kwargs
        self.guide_name, self.guide_options = guide_name, guide_options
        self.elbo, self.steps, self.seconds = elbo, steps, seconds
        self.device, self.dtype, self.converged = device, dtype, converged
        self.laplace, self.message = laplace, message
        self.max_plate_nesting = max_plate_nesting
        self.history = list(history or [])
        self.interrupted = interrupted
        self._vectorizable = True

    @property
    def params(self) -> dict[str, torch.Tensor]:
        """The model's own ``pyro.param`` values (constrained), trained with the guide's parameters."""
        if isinstance(self.model, _ModelParameters):
            return self.model.values()
        return {}

    def __repr__(self) -> str:
        name = self.guide_name or type(self.guide).__name__
        final = f"{self.elbo[-self.elbo.shape[0] // 10 - 1 :].mean():.6g}" if self.elbo.size else "n/a"
        laplace = "" if self.laplace_failure is None else f", laplace='failed: {self.laplace_failure}'"
        return (
            f"Fit(guide={name!r}, steps={self.steps}, converged={self.converged}, final ELBO={final}, "
            f"seconds={self.seconds:.3g}, device={self.device}{laplace})"
        )

    @property
    def laplace_failure(self) -> str | None:
        """Why the Laplace start failed, or ``None`` when it succeeded or was not attempted."""
        if self.laplace is None or self.laplace.succeeded or self.laplace.message == MINIBATCH_LAPLACE_MESSAGE:
            return None
        return self.laplace.message

    # -- draws ---------------------------------------------------------------------------------------------------
    def _draw(self, num_samples: int, seed: int | None, weights: bool):
        """Draws of every reported site, and with ``weights`` their log importance ratios.

        All draws in one vectorized pair of guide and model traces (a plate left of the model's own) when the
        model broadcasts over it; otherwise, for models written for one draw at a time (``locs[z]`` rather than
        ``Vindex(locs)[..., z]``), one pair of traces per draw.
        """
        num_samples, seed = _check_draws(num_samples, seed)
        shapes = self.site_shapes()
        with computation(self.device, self.dtype), torch.no_grad(), _seeded(seed):
            if self._vectorizable:
                try:
                    return self._vectorized_draws(num_samples, shapes, weights)
                except (ValueError, RuntimeError, IndexError):
                    # Draw by draw from now on only when that works: an error that is not about broadcasting
                    # raises again below, and leaves the fit vectorized.
                    draws = self._sequential_draws(num_samples, shapes, weights)
                    self._vectorizable = False
                    return draws
            return self._sequential_draws(num_samples, shapes, weights)

    def _pair_of_traces(self):
        guide_trace = poutine.trace(self.guide).get_trace(*self.args, **self.kwargs)
        model_trace = poutine.trace(poutine.replay(self.model, trace=guide_trace)).get_trace(*self.args, **self.kwargs)
        return guide_trace, model_trace

    def _constrained_draws(self, num_draws: int | None):
        """For ppvi's registry guides: ``z ~ q`` and the model run on it, each site constrained by the support of
        its own run (:mod:`ppvi.constrain`). Returns the model trace and ``log q(z) - log|det J_T(z)|``, the
        guide's log density of the constrained draws, per draw."""
        posterior = self.guide.posterior()
        latent = posterior.sample(() if num_draws is None else (num_draws,))
        log_q = posterior.log_prob(latent)  # before any other draw: a flow reads its own draws from its cache
        batch = () if num_draws is None else (num_draws,) + (1,) * self.max_plate_nesting
        pieces = {site["name"]: value for site, value in self.guide._unpack_latent(latent.reshape(*batch, -1))}
        trace, messenger = constrained_trace(
            self.model, self.args, self.kwargs, pieces, num_draws, self.max_plate_nesting
        )
        return trace, log_q - messenger.log_abs_det_jacobian

    def _vectorized_draws(self, num_samples: int, shapes: dict, weights: bool):
        if isinstance(self.guide, PreconditionedGuide):
            model_trace, guide_log_density = self._constrained_draws(num_samples)
        else:
            with pyro.plate("_ppvi_draws", num_samples, dim=-(self.max_plate_nesting + 1)):
                guide_trace, model_trace = self._pair_of_traces()
            guide_log_density = _per_draw_log_prob(guide_trace, self.max_plate_nesting, num_samples)
        draws = {
            name: model_trace.nodes[name]["value"].detach().reshape(num_samples, *shape)
            for name, shape in shapes.items()
        }
        if not weights:
            return draws, None
        log_weights = _per_draw_log_prob(model_trace, self.max_plate_nesting, num_samples) - guide_log_density
        return draws, log_weights.double()

    def _sequential_draws(self, num_samples: int, shapes: dict, weights: bool):
        values: dict[str, list[torch.Tensor]] = {name: [] for name in shapes}
        log_weights = []
        for _ in range(num_samples):
            if isinstance(self.guide, PreconditionedGuide):
                model_trace, guide_log_density = self._constrained_draws(None)
            else:
                guide_trace, model_trace = self._pair_of_traces()
                guide_log_density = guide_trace.log_prob_sum()
            for name, shape in shapes.items():
                values[name].append(model_trace.nodes[name]["value"].detach().reshape(shape))
            if weights:
                log_weights.append(model_trace.log_prob_sum().double() - guide_log_density.double())
        draws = {name: torch.stack(parts) for name, parts in values.items()}
        return draws, torch.stack(log_weights) if weights else None

    def sample(
        self, num_samples: int = 1000, seed: int | None = None, corrected: bool = False
    ) -> dict[str, torch.Tensor]:
        """Draw from the fitted posterior approximation, or with ``corrected`` from its PSIS correction.

        Parameters
        ----------
        num_samples : int
            Number of draws.
        seed : int, optional
            Seed for the draws (the global Pyro seed is left as it was); by default the global RNG is used.
        corrected : bool
            Importance-resample the guide's draws with their Pareto-smoothed weights (Yao et al. 2018, section
            2.3; the PSIS resampling of Stan's Pathfinder): ``max(num_samples, 4000)`` guide draws are weighted
            and ``num_samples`` of them drawn with replacement, so the draws follow the posterior more closely
            than the guide does. Refused when k-hat exceeds its threshold, where the weights cannot be trusted.

        Returns
        -------
        dict of str to torch.Tensor
            For every latent site (and every ``pyro.deterministic`` site), constrained draws of shape
            ``(num_samples, *site_shape)``.

        Raises
        ------
        ValueError
            ``corrected=True`` and k-hat above the threshold (the message says which k-hat and what to do).
        """
        num_samples, seed = _check_draws(num_samples, seed)
        if not isinstance(corrected, bool):
            raise OptionTypeError(f"corrected must be True or False, got {corrected!r}")
        if not corrected:
            return self._draw(num_samples, seed, weights=False)[0]
        proposals = max(num_samples, SUMMARY_DRAWS)
        draws, log_weights = self._weighted_draws(proposals, seed)
        diagnosis, smoothed = diagnose(log_weights, notes=self._notes())
        if diagnosis.verdict not in ("good", "ok"):
            raise ValueError(
                f"PSIS-corrected draws need k-hat <= {diagnosis.threshold:.2f}, and this fit's is "
                f"{diagnosis.khat:.2f}: its importance weights cannot be trusted, so resampling with them would "
                "not make the draws closer to the posterior. Fit a richer guide (guide='fullrank', 'flow' or "
                "'auto') or use the guide's own draws, fit.sample(corrected=False), knowing they are approximate."
            )
        generator = torch.Generator()
        generator.manual_seed(seed if seed is not None else int(torch.randint(2**62, ()).item()))
        indices = resample(smoothed, num_samples, generator).to(next(iter(draws.values())).device)
        return {name: value[indices] for name, value in draws.items()}

    def site_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of one draw of every latent (and deterministic) site, in model order."""
        if not hasattr(self, "_site_shapes"):
            with computation(self.device, self.dtype), random_state_kept():
                reference = _structure_trace(self.model, self.args, self.kwargs)
            self._site_shapes = {
                name: tuple(site["value"].shape) for name, site in reference.nodes.items() if _is_reported(site)
            }
        return self._site_shapes

    def summary(self, num_samples: int = SUMMARY_DRAWS, seed: int = 0, corrected: bool = False) -> pd.DataFrame:
        """Posterior summary per scalar component: mean, sd and the 5 %, 50 % and 95 % quantiles.

        Rows are named as in ``arviz.summary`` (``theta[0]``, ``W[1, 2]``); computed from ``num_samples`` draws,
        PSIS-resampled with ``corrected`` (see :meth:`sample`).
        """
        return summarize(self.sample(num_samples, seed=seed, corrected=corrected))

    def to_arviz(self, num_samples: int = SUMMARY_DRAWS, seed: int = 0):
        """The draws as an ``arviz.InferenceData`` (one chain), with the observed data when the model has any."""
        import arviz as az

        draws = self.sample(num_samples, seed=seed)
        posterior = {name: value.double().cpu().numpy()[None] for name, value in draws.items()}
        with computation(self.device, self.dtype), random_state_kept():
            reference = _structure_trace(self.model, self.args, self.kwargs)
        observed = {
            name: site["value"].detach().cpu().numpy()
            for name, site in reference.nodes.items()
            if site["type"] == "sample" and site["is_observed"] and isinstance(site["value"], torch.Tensor)
        }
        return az.from_dict(posterior=posterior, observed_data=observed or None)

    # -- diagnostics --------------------------------------------------------------------------------------------
    def _weighted_draws(self, num_samples: int, seed: int | None):
        num_samples, seed = _check_draws(num_samples, seed)
        if self.guide_name == "map":
            raise ValueError(
                "a point-mass (MAP) guide has no density, so it has no importance weights: diagnose a 'laplace', "
                "'meanfield', 'fullrank', 'lowrank' or 'flow' fit instead"
            )
        if self._enumerated():
            return self._marginal_weighted_draws(num_samples, seed)
        return self._draw(num_samples, seed, weights=True)

    def _enumerated(self) -> bool:
        with computation(self.device, self.dtype), random_state_kept():
            structure = _structure_trace(self.model, self.args, self.kwargs)
        return any(site["type"] == "sample" and site["infer"].get("enumerate") for site in structure.nodes.values())

    def _marginal_weighted_draws(self, num_samples: int, seed: int | None):
        """Weights for models with enumerated discrete sites: ``log p(x, theta)`` with the discrete sites summed
        out, minus ``log q(theta)``.

        When the model broadcasts over a batch of draws left of its plates (as for vectorized particles), the
        marginal log joint of many draws comes from one enumerated trace per pass (:func:`_marginal_log_density`);
        otherwise from TraceEnum_ELBO on a point-mass guide, one draw at a time.
        """
        if not isinstance(self.guide, PreconditionedGuide):
            raise ValueError(
                "importance weights of a model with enumerated sites need the marginal likelihood, available for "
                "ppvi's registry guides; this guide is a different kind"
            )
        shapes = self.site_shapes()
        # The fit's thread rule: one batch of draws of a small model is still small work, which a second thread
        # slows down when the cores are busy.
        threads = threads_for(self.args, self.kwargs, self.device)
        with computation(self.device, self.dtype, threads), torch.no_grad(), _seeded(seed):
            posterior = self.guide.posterior()
            latent = posterior.sample((num_samples,))
            log_joint = None
            if self._vectorizable:
                try:
                    log_joint = _batched_marginal_log_density(
                        self.model, self.guide, self.args, self.kwargs, latent, self.max_plate_nesting
                    )
                except (ValueError, RuntimeError, IndexError):
                    log_joint = self._sequential_marginal_log_density(latent)  # raises again if not broadcasting
                    self._vectorizable = False
            if log_joint is None:
                log_joint = self._sequential_marginal_log_density(latent)
            log_weights = log_joint.double() - posterior.log_prob(latent).double()
            # One batch dimension per draw, left of the model's plates: sites inside plates unpack to their shape.
            batched = latent.reshape(num_samples, *(1,) * self.max_plate_nesting, latent.shape[-1])
            draws = {
                site["name"]: biject_to(site["fn"].support)(unconstrained).reshape(num_samples, *shapes[site["name"]])
                for site, unconstrained in self.guide._unpack_latent(batched)
                if site["name"] in shapes
            }
        return draws, log_weights

    def _sequential_marginal_log_density(self, latent: torch.Tensor) -> torch.Tensor:
        """``log p(x, T(z)) + log|det J_T(z)|`` of every row of ``latent``, one TraceEnum_ELBO per draw: for models
        that do not broadcast over a batch of draws."""
        negative_log_density = _point_mass_negative_log_density(
            self.model, self.guide, self.args, self.kwargs, TraceEnum_ELBO, self.max_plate_nesting
        )
        # TraceEnum_ELBO insists on a differentiable loss: let it differentiate with respect to each point.
        with torch.enable_grad():
            return torch.stack([-negative_log_density(point.clone().requires_grad_(True)).detach() for point in latent])

    def log_weights(self, num_samples: int = 4000, seed: int | None = 0) -> torch.Tensor:
        """Log importance ratios ``log p(x, theta_s) - log q(theta_s)`` of ``num_samples`` guide draws.

        Every latent site contributes, with the Jacobians of the maps to the constrained spaces (the guide's
        density is that of the constrained draws). Shape ``(num_samples,)``, float64. The convention of
        :func:`ppvi.diagnostics.psis` (not negated).
        """
        return self._weighted_draws(num_samples, seed)[1]

    def diagnose(self, num_samples: int = 4000, seed: int | None = 0) -> Diagnosis:
        """PSIS diagnostic of the guide: k-hat with its bootstrap interval, the size of the mismatch (ESS, spread
        of the log weights, how far PSIS moves the means and sds), a verdict and its explanation, which also
        reports a failed Laplace start or an unconverged run (see :class:`ppvi.diagnostics.diagnosis.Diagnosis`).
        """
        draws, log_weights = self._weighted_draws(num_samples, seed)
        return diagnose(log_weights, draws, notes=self._notes(), seed=seed or 0)[0]

    def _notes(self) -> list[str]:
        """What the diagnosis should say besides the weights: how the fit's start and training went."""
        notes = []
        if self.laplace_failure is not None:
            notes.append(f"The Laplace start failed ({self.laplace_failure}).")
        if not self.converged:
            notes.append(f"Training did not converge: {self.message}.")
        return notes

    def expectation(
        self, function: Callable[[dict[str, torch.Tensor]], torch.Tensor], num_samples: int = 4000, seed: int | None = 0
    ) -> Expectation:
        """PSIS-corrected posterior expectation of ``function`` (Yao et al. 2018, section 2.3), and the raw one.

        Parameters
        ----------
        function : callable
            Maps the draws (``{site: tensor of shape (num_samples, *site_shape)}``) to a tensor whose first
            dimension is the draw, e.g. ``lambda draws: draws["tau"]``.
        num_samples : int
            Draws from the guide.
        seed : int, optional
            Seed of the draws.
        """
        if not callable(function):
            raise OptionTypeError(
                f"function must be callable, mapping the draws to values, e.g. lambda draws: draws['mu'], "
                f"got {function!r}"
            )
        draws, log_weights = self._weighted_draws(num_samples, seed)
        values = torch.as_tensor(function(draws)).double()
        if values.shape[:1] != (num_samples,):
            raise ValueError(f"function must return one value per draw (first dimension {num_samples}), got "
                             f"shape {tuple(values.shape)}")
        diagnosis, smoothed = diagnose(log_weights)
        weights = smoothed.exp().reshape(-1, *(1,) * (values.dim() - 1))
        return Expectation((weights * values).sum(0), values.mean(0), diagnosis.khat)

    def save(self, path) -> None:
        """Save the trained parameters (no pickle: plain tensors and strings, loadable with ``weights_only=True``)."""
        from ppvi.serialization import save_fit

        save_fit(self, path)


def _check_draws(num_samples: Any, seed: Any) -> tuple[int, int | None]:
    """``num_samples`` and ``seed`` of the draws, checked before anything runs (a bad value must not be taken for
    a model that cannot draw in a batch)."""
    checked = validate({"num_samples": num_samples, "seed": seed}, optional=("seed",))
    return checked["num_samples"], checked["seed"]


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Run a block with a fixed Pyro seed and restore the global random state afterwards (nothing, for ``None``)."""
    if seed is None:
        yield
        return
    with random_state_kept():
        pyro.set_rng_seed(seed)
        yield


def _is_reported(site: dict) -> bool:
    if site["type"] != "sample":
        return False
    if site["infer"].get("_deterministic"):
        return True
    return not site["is_observed"] and site["infer"].get("enumerate") is None and not site["infer"].get(
        "is_auxiliary"
    ) and not pyro.poutine.util.site_is_subsample(site)


def _per_draw_log_prob(trace: poutine.Trace, max_plate_nesting: int, num_samples: int) -> torch.Tensor:
    """Sum of every sample site's (scaled, masked) log density, per draw of the draws plate."""
    trace.compute_log_prob()
    total = torch.zeros(num_samples, dtype=torch.float64)
    for site in trace.nodes.values():
        if site["type"] != "sample":
            continue
        log_prob = site["log_prob"]
        if max_plate_nesting and log_prob.dim() >= max_plate_nesting:
            log_prob = log_prob.sum(dim=tuple(range(-max_plate_nesting, 0)))
        log_prob = log_prob.double().reshape(-1)  # one value per draw, or one shared by all
        total = total + (log_prob if log_prob.numel() == num_samples else log_prob.sum())
    return total


#: Numbers (log-probability entries, summed over the sites) that one pass of :func:`_batched_marginal_log_density`
#: may hold: 2^22 float64 entries are 32 MiB, a few times that with the intermediates, whatever the data size.
_MARGINAL_PASS_ENTRIES = 2**22
#: Draws in the first pass, which measures the entries per draw and sizes the later passes: small, in case one
#: draw already has many (an enumerated site over a large data plate).
_MARGINAL_FIRST_PASS_DRAWS = 16


def _batched_marginal_log_density(
    model: Callable, guide: PreconditionedGuide, args: tuple, kwargs: dict, latent: torch.Tensor, max_plate_nesting: int
) -> torch.Tensor:
    """``log p(x, T(z_s)) + log|det J_T(z_s)|`` for every row ``z_s`` of ``latent`` (shape ``(S, D)``), the
    enumerated sites summed out, in a few vectorized passes of :func:`_marginal_log_density`.

    Raises ``ValueError`` (or the model's own ``RuntimeError`` / ``IndexError``) when the model does not broadcast
    over a batch of draws: the draw-by-draw result of the first pass's last draw, an unbatched run of the model,
    must equal the batched one, so a model that mixes the draws up without an error is caught too.
    """
    num_samples = latent.shape[0]
    first = latent[:_MARGINAL_FIRST_PASS_DRAWS]
    log_density, entries = _marginal_log_density(model, guide, args, kwargs, first, max_plate_nesting)
    single, _ = _marginal_log_density(model, guide, args, kwargs, first[-1], max_plate_nesting)
    # Round-off of summing the same terms in another order: a few ulps of the terms' magnitude, far below the
    # O(1) errors of a model that mixes up draws.
    tolerance = torch.finfo(latent.dtype).eps ** 0.5 * max(1.0, abs(float(single)))
    if not abs(float(log_density[-1]) - float(single)) <= tolerance:
        raise ValueError(
            f"the model does not broadcast over a batch of draws: the batched log density of a draw is "
            f"{float(log_density[-1])!r}, the unbatched one {float(single)!r}"
        )
    per_pass = max(1, _MARGINAL_PASS_ENTRIES * first.shape[0] // max(entries, 1))
    parts = [log_density]
    for start in range(first.shape[0], num_samples, per_pass):
        chunk = latent[start : start + per_pass]
        parts.append(_marginal_log_density(model, guide, args, kwargs, chunk, max_plate_nesting)[0])
    return torch.cat(parts)


def _marginal_log_density(
    model: Callable, guide: PreconditionedGuide, args: tuple, kwargs: dict, latent: torch.Tensor, max_plate_nesting: int
) -> tuple[torch.Tensor, int]:
    """``log p(x, T(z)) + log|det J_T(z)|`` with the model's enumerated sites summed out, for a batch of points
    ``latent`` of shape ``(S, D)`` in one trace (or one point of shape ``(D,)``, the model run unbatched).

    The value TraceEnum_ELBO gives on a point-mass guide, draw by draw: the model is conditioned on the constrained
    values inside a plate of draws left of its own plates, enumerated in parallel left of that plate (Pyro's
    ``poutine.enum``), and its factors are contracted by tensor variable elimination (Obermeyer et al. 2019,
    "Tensor variable elimination for plated factor graphs", ICML) with ``pyro.ops.contract.contract_to_tensor``:
    log-sum-exp over the enumerated dimensions, sum over the plates, the draws plate kept. As in TraceEnum_ELBO,
    masks apply inside and the (common) subsampling scale of the enumerated factors outside the log-sum-exp; the
    other sites contribute their scaled, masked log densities.

    Returns
    -------
    log_density : torch.Tensor
        Shape ``(S,)``, or ``()`` for one unbatched point.
    entries : int
        Log-probability entries the trace held (the memory a pass needs grows with it).
    """
    from collections import OrderedDict

    from opt_einsum import shared_intermediates
    from pyro.ops import packed
    from pyro.ops.contract import contract_to_tensor
    from pyro.ops.rings import LogRing
    from pyro.poutine.util import prune_subsample_sites
    from pyro.util import check_site_shape

    batched = latent.dim() == 2
    num_draws = latent.shape[0] if batched else 1
    batch = (num_draws,) + (1,) * max_plate_nesting if batched else ()
    pieces = {site["name"]: value for site, value in guide._unpack_latent(latent.reshape(*batch, latent.shape[-1]))}
    # Each site constrained by the support of this run (ppvi.constrain); the enumerated sites are left to poutine.enum.
    messenger = ConstrainMessenger(pieces, batch[:1])
    conditioned = messenger(model)
    if batched:
        conditioned = pyro.plate("_ppvi_draws", num_draws, dim=-(max_plate_nesting + 1))(conditioned)
    nesting = max_plate_nesting + int(batched)
    enumerated = poutine.enum(conditioned, first_available_dim=-(nesting + 1))
    trace = prune_subsample_sites(poutine.trace(enumerated).get_trace(*args, **kwargs))
    trace.compute_log_prob()
    sites = [site for site in trace.nodes.values() if site["type"] == "sample"]
    for site in sites:
        check_site_shape(site, nesting)
    trace.pack_tensors()
    draws_symbol = trace.plate_to_symbol.get("_ppvi_draws")

    def ordinal(site) -> frozenset:
        return frozenset(trace.plate_to_symbol[frame.name] for frame in site["cond_indep_stack"] if frame.vectorized)

    enumerated_dims = set()
    for site in sites:
        if site["infer"].get("_enumerate_dim") is not None:
            enumerated_dims.update(site["packed"]["log_prob"]._pyro_dims)
    enumerated_dims -= {symbol for site in sites for symbol in ordinal(site)}

    costs, factors, scales = [], OrderedDict(), []
    for site in sites:
        log_prob = site["packed"]["log_prob"]
        if site["infer"].get("_enumerate_dim") is not None:
            factors.setdefault(ordinal(site), []).append(site["packed"]["unscaled_log_prob"])
            scales.append(site["scale"])
        elif enumerated_dims.isdisjoint(log_prob._pyro_dims):
            costs.append(log_prob)
        else:
            masked = packed.scale_and_mask(site["packed"]["unscaled_log_prob"], mask=site["packed"]["mask"])
            factors.setdefault(ordinal(site), []).append(masked)
            scales.append(site["scale"])

    if factors:
        if any(torch.is_tensor(scale) and scale.dim() for scale in scales):
            raise ValueError("enumeration supports only a scalar poutine.scale, as in TraceEnum_ELBO")
        scale_values = {float(scale) for scale in scales}
        if len(scale_values) != 1:
            raise ValueError("enumerated sites need one common poutine.scale, as in TraceEnum_ELBO")
        dim_to_size = {}
        for terms in factors.values():
            for term in terms:
                dim_to_size.update(zip(term._pyro_dims, term.shape, strict=True))
        target = frozenset({draws_symbol}) if batched else frozenset()
        with shared_intermediates() as cache:
            contracted = contract_to_tensor(
                factors, enumerated_dims, target_ordinal=target, ring=LogRing(cache, dim_to_size=dim_to_size)
            )
        costs.append(packed.scale_and_mask(contracted, scale=scale_values.pop()))

    total = messenger.log_abs_det_jacobian
    for cost in costs:
        # Sum every dimension but the draws' (an empty list would make torch.sum reduce them all).
        summed_dims = [dim for dim, symbol in enumerate(cost._pyro_dims) if not (batched and symbol == draws_symbol)]
        total = total + (cost.sum(summed_dims) if summed_dims else cost)
    entries = sum(site["log_prob"].numel() for site in sites)
    return total, entries


class _ModelParameters:
    """A model whose own ``pyro.param`` statements read and write a parameter store of its own (Pyro's
    ``ParamStoreDict.scope``): inside the guide (a module with module-local parameters, which Pyro's check refuses to
    share with a model) and outside it alike, so the fit trains the model's parameters with the guide's and two fits
    of one model never share them."""

    def __init__(self, model: Callable):
        self.model = model
        self.state: dict = {"params": {}, "constraints": {}}
        functools.update_wrapper(self, model, updated=())  # the model's name and signature

    def __call__(self, *args, **kwargs):
        with pyro.get_param_store().scope(state=self.state):
            return self.model(*args, **kwargs)

    def values(self) -> dict[str, torch.Tensor]:
        """The parameters' current (constrained) values."""
        with pyro.get_param_store().scope(state=self.state) as state:
            store = pyro.get_param_store()
            return {name: store[name].detach() for name in list(state["params"])}


def _adopt_pyro_module(guide: Any) -> None:
    """Let a Pyro module made outside ppvi (``pyro.infer.autoguide.AutoNormal(model)``, built where module-local
    parameters were off) run inside :func:`ppvi.inputs.computation`, where they are on: give each of its modules
    the parameter state Pyro gives modules made in that mode."""
    if not isinstance(guide, PyroModule):
        return
    for module in guide.modules():
        context = getattr(module, "_pyro_context", None)
        if context is not None and not hasattr(context, "param_state"):
            context.param_state = {"params": {}, "constraints": {}}


def _check_observed_values(structure: poutine.Trace, model: Callable, args: tuple) -> None:
    """Refuse observed values Pyro's distributions cannot score, saying how to convert them."""
    for name, site in structure.nodes.items():
        if site["type"] != "sample" or not site["is_observed"] or site["infer"].get("_deterministic"):
            continue
        value = site["value"]
        if isinstance(value, (str, bytes, list, tuple, np.ndarray)):
            problem = TypeError(f"the observed site {name!r} was given a {type(value).__name__}, not a tensor")
            explained = explain_data_failure(model, args, problem)
            raise explained or ValueError(
                f"{problem}: Pyro's distributions score tensors of numbers; pass the data as numbers (a tensor, "
                "a numpy array of numbers, a list of numbers or a pandas Series)"
            )
        if isinstance(value, torch.Tensor) and value.dtype == torch.bool:
            raise ValueError(
                f"the observed site {name!r} holds a bool tensor, which Pyro's distributions cannot score: convert "
                "the data to numbers first, e.g. y.double() (or y.float()) for 0/1 outcomes of a Bernoulli, "
                "y.long() for counts or categories (a bool tensor is fine as a mask, poutine.mask(mask=...))"
            )


def _check_not_flat(
    model, guide: PreconditionedGuide, args, kwargs, point_elbo_class, max_plate_nesting: int, latent: list[str]
) -> None:
    """Refuse a posterior whose unconstrained log density does not change at all with the latent coordinates:
    flat everywhere, hence improper (it has no mode, no Hessian and no gradient for the ELBO to follow)."""
    negative_log_density = _point_mass_negative_log_density(
        model, guide, args, kwargs, point_elbo_class, max_plate_nesting
    )
    point = guide.preconditioner_loc.detach().clone().requires_grad_(True)
    with torch.enable_grad(), random_state_kept():
        try:
            value = negative_log_density(point)
        except (ValueError, RuntimeError, IndexError):
            return  # the Laplace start and training report what is wrong
    if not value.requires_grad:
        raise ValueError(
            f"the model's log density does not change with any of its latent sites {latent}: the posterior is flat "
            "everywhere, hence improper (improper priors, such as dist.ImproperUniform, that no observed data "
            "inform), and there is nothing to fit. Give those sites proper priors (e.g. dist.Normal(0.0, 10.0)) or "
            "observe data that depend on them."
        )


def _structure_trace(model: Callable, args: tuple, kwargs: dict) -> poutine.Trace:
    """One run of the model with every latent site at a feasible point: no sampling from (possibly improper) priors."""
    with poutine.block(), torch.no_grad():
        return poutine.trace(InitMessenger(init_to_median_or_feasible)(model)).get_trace(*args, **kwargs)


def _max_plate_nesting(trace: poutine.Trace) -> int:
    dims = [-frame.dim for site in trace.nodes.values() if site["type"] == "sample"
            for frame in site["cond_indep_stack"] if frame.vectorized]
    return max(dims, default=0)


def _analytic_kl_everywhere(model, guide, args, kwargs) -> bool:
    """Whether every latent site has a closed-form KL between guide and prior (then TraceMeanField_ELBO applies)."""
    from torch.distributions.kl import _dispatch_kl

    try:
        with poutine.block(), torch.no_grad():
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    except Exception:  # noqa: BLE001 - any failure here only means "use the general ELBO"
        return False
    latent = [s for s in model_trace.nodes.values() if s["type"] == "sample" and not s["is_observed"]]
    for site in latent:
        guide_site = guide_trace.nodes.get(site["name"])
        if guide_site is None:
            return False
        guide_fn, model_fn = guide_site["fn"], site["fn"]
        while hasattr(guide_fn, "base_dist") and isinstance(guide_fn, pyro.distributions.Independent):
            guide_fn = guide_fn.base_dist
        while hasattr(model_fn, "base_dist") and isinstance(model_fn, pyro.distributions.Independent):
            model_fn = model_fn.base_dist
        if isinstance(guide_fn, pyro.distributions.Delta):
            return False
        if _dispatch_kl(type(guide_fn), type(model_fn)) is NotImplemented:
            return False
    return bool(latent)


def _make_elbo(
    choice: str | ELBO, enumerated: bool, max_plate_nesting: int, num_particles: int, analytic_kl: bool
) -> ELBO:
    if isinstance(choice, ELBO):
        return choice
    options = dict(
        num_particles=num_particles, vectorize_particles=num_particles > 1, max_plate_nesting=max_plate_nesting
    )
    if choice == "auto":
        choice = "enumerate" if enumerated else ("meanfield" if analytic_kl else "trace")
    if choice == "trace":
        return Trace_ELBO(**options)
    if choice == "meanfield":
        return TraceMeanField_ELBO(**options)
    if choice == "enumerate":
        return TraceEnum_ELBO(**options)
    if choice == "amortized":
        from ppvi.amortized import AmortizedELBO

        return AmortizedELBO()
    raise ValueError(
        f"unknown elbo {choice!r}: use 'auto', 'trace', 'meanfield', 'enumerate', 'amortized' or a pyro ELBO instance"
    )


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
        model_kwargs=model_kwargs,
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
                                          "stopping_rule"}
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
    rule = checked.get("stopping_rule")
    if rule is not None and not isinstance(rule, StoppingRule):
        raise OptionTypeError(f"stopping_rule must be a ppvi.StoppingRule or None, got {rule!r}")
    return checked


def _fit_start(model: Callable, args: tuple, options: dict, family: str) -> Fit:
    """The Gaussian fit a richer family starts from: the family's own defaults, the run's shared settings."""
    shared = dict(options, guide_options=None, steps=None, learning_rate=None, schedule="constant", num_particles=None)
    return _fit_one(model, args, family, None, **shared)


class GuideAttempt(NamedTuple):
    """One family tried by ``guide="auto"``.

    Attributes
    ----------
    guide : str
        Registry name.
    elbo : float
        ELBO estimated from the diagnosis's draws (mean log importance ratio); comparable across families.
    khat : float
        PSIS k-hat.
    verdict : str
        The diagnosis's verdict (``"failed"`` when the fit raised).
    converged : bool
        The fit's ``converged``.
    seconds : float
        Wall time of the fit and its diagnosis.
    outcome : str
        Why ``"auto"`` stopped here or moved on.
    """

    guide: str
    elbo: float
    khat: float
    verdict: str
    converged: bool
    seconds: float
    outcome: str


def _next_family(family: str, latent_dim: int) -> str | None:
    """The family ``guide="auto"`` tries after ``family`` for ``latent_dim`` unconstrained coordinates."""
    gaussian = "fullrank" if latent_dim <= AUTO_FULL_RANK_MAX_DIMENSION else "lowrank"
    if family == "meanfield":
        return gaussian
    if family == "fullrank" and latent_dim >= 2:
        return "flow"
    return None


def _fit_auto(model: Callable, args: tuple, options: dict) -> Fit:
    """``guide="auto"``: escalate from mean-field while PSIS says the fit cannot be trusted."""
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
    while family is not None:
        attempt_started = time.perf_counter()
        spec = resolve_guide(family)
        start = fits.get(spec.start_from) if spec.start_from else None
        try:
            result = _fit_one(model, args, family, start, **options)
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


def _elbo_estimate(loss_function: Callable[[], torch.Tensor]) -> tuple[float, float]:
    """ELBO and its standard error from :data:`ELBO_CHECK_EVALUATIONS` evaluations of the loss."""
    values = []
    # The check observes the fit without changing it: the random state is restored afterwards, so training draws
    # what it would have drawn without the check. Gradients stay on: Pyro's TraceEnum_ELBO refuses to compute a
    # loss it cannot differentiate.
    with random_state_kept():
        for _ in range(ELBO_CHECK_EVALUATIONS):
            try:
                values.append(-float(loss_function().detach()))
            except ValueError as error:
                if not training.is_invalid_value_error(error):
                    raise
                values.append(math.nan)
    estimates = np.asarray(values)
    if not np.isfinite(estimates).all():
        return -math.inf, math.inf
    return float(estimates.mean()), float(estimates.std(ddof=1) / np.sqrt(estimates.size))


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
) -> Fit:
    """One family's fit (see :func:`fit`); ``start`` is the fit a family with ``start_from`` begins at."""
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

    with computation(resolved_device, resolved_dtype, threads_for(args, kwargs, resolved_device)):
        args, kwargs = prepare_arguments(model, args, kwargs, resolved_device, resolved_dtype)
        if seed is not None:
            pyro.set_rng_seed(seed)
        # A model's own pyro.param values live in a store of this fit's (module-local parameters would otherwise
        # put them inside the guide, which Pyro refuses), and are trained with the guide's.
        with_parameters = _ModelParameters(model)
        try:
            structure = _structure_trace(with_parameters, args, kwargs)
        except Exception as error:
            explained = explain_data_failure(model, args, error)
            if explained is None:
                raise
            raise explained from error
        if any(site["type"] == "param" for site in structure.nodes.values()):
            model = with_parameters
        latent = [
            name for name, site in structure.nodes.items()
            if site["type"] == "sample" and not site["is_observed"] and not poutine.util.site_is_subsample(site)
        ]
        if not latent:
            raise ValueError(
                "the model has no latent sample sites, so there is no posterior to approximate: every pyro.sample "
                "site is observed. Leave an unknown quantity unobserved (obs=None); for point estimates of every "
                "unknown, declare them with pyro.param and use Pyro's SVI (maximum likelihood) instead."
            )
        _check_observed_values(structure, model, args)
        enumerated = any(structure.nodes[name]["infer"].get("enumerate") is not None for name in latent)
        max_plate_nesting = _max_plate_nesting(structure)
        guide_object = spec.factory(model, **guide_options) if spec is not None else guide
        _adopt_pyro_module(guide_object)
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
            _check_not_flat(model, guide_object, args, kwargs, point_elbo_class, max_plate_nesting, latent)
        laplace = None
        wants_laplace = spec is not None and spec.laplace_start and isinstance(guide_object, PreconditionedGuide)
        if wants_laplace and (initialization == "laplace" or spec.objective == "none"):
            if subsample_size is not None:
                laplace = LaplaceStart(False, None, None, math.nan, 0, MINIBATCH_LAPLACE_MESSAGE)
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

        notes = []
        if elbo == "auto" and isinstance(guide_object, PreconditionedGuide):
            loss_function = _path_derivative_loss(
                model, guide_object, args, kwargs, point_elbo_class, num_particles, max_plate_nesting
            )
            if num_particles > 1:
                try:  # with gradients on: TraceEnum_ELBO refuses a loss it cannot differentiate
                    loss_function()
                except (ValueError, RuntimeError, IndexError) as error:
                    if not particles_defaulted:
                        raise ValueError(
                            f"the model does not broadcast over a batch of {num_particles} particles ({error}). "
                            "Write it for a batch (Vindex(locs)[..., z] rather than locs[z], sums over dims counted "
                            "from the right) or use num_particles=1."
                        ) from error
                    num_particles = 1
                    notes.append("the model does not broadcast over particles: used 1 particle per step")
                    loss_function = _path_derivative_loss(
                        model, guide_object, args, kwargs, point_elbo_class, 1, max_plate_nesting
                    )
        else:
            analytic_kl = spec is None and not enumerated and _analytic_kl_everywhere(model, guide_object, args, kwargs)
            elbo_object = _make_elbo(elbo, enumerated, max_plate_nesting, num_particles, analytic_kl)

            def loss_function() -> torch.Tensor:
                return elbo_object.differentiable_loss(model, guide_object, *args, **kwargs)

        def result(elbo_trace, steps_taken, converged, message, interrupted=False) -> Fit:
            return Fit(
                model, guide_object, args, kwargs, guide_name=guide if spec else None, guide_options=guide_options,
                elbo=-np.asarray(elbo_trace, dtype=np.float64), steps=steps_taken,
                seconds=time.perf_counter() - started, device=resolved_device, dtype=resolved_dtype,
                converged=converged, laplace=laplace, message=message, max_plate_nesting=max_plate_nesting,
                interrupted=interrupted,
            )

        if spec is not None and spec.objective == "none":
            if not laplace.succeeded:
                raise ValueError(
                    f"the Laplace approximation needs a posterior mode, and none was found: {laplace.message}. "
                    "Use guide='fullrank' (stochastic VI needs no mode)."
                )
            return result([], 0, True, "Laplace approximation at the mode")
        parameters = _parameters(loss_function, guide_object)
        if spec is not None and spec.objective == "deterministic":
            loss, iterations = minimize(loss_function, parameters)
            converged = math.isfinite(loss)
            message = f"L-BFGS, {iterations} iterations" if converged else "the log density was not finite"
            return result([loss], 0, converged, message)
        preconditioned = laplace is not None and laplace.succeeded
        checked = isinstance(guide_object, PreconditionedGuide)
        if checked:
            initial_state = {name: value.detach().clone() for name, value in guide_object.state_dict().items()}
            start_elbo = _elbo_estimate(loss_function)
        run = training.run(
            loss_function, parameters, learning_rate=learning_rate, steps=steps, rule=rule, schedule=schedule,
            progress=progress, epsilon=PRECONDITIONED_ADAM_EPSILON if preconditioned else 1e-8,
            max_gradient_norm=spec.max_gradient_norm if spec is not None else None,
        )
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
            end_elbo = _elbo_estimate(loss_function)
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


def _point_mass_negative_log_density(
    model, guide: PreconditionedGuide, args, kwargs, elbo_class, max_plate_nesting: int, num_particles: int = 1
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``z -> -(log p(x, T(z)) + log|det J_T(z)|)`` by Pyro's own ELBO on a point-mass guide, so that plates,
    scales, masks and enumerated sites (``TraceEnum_ELBO``) are handled as Pyro handles them.

    ``z`` has shape ``(D,)``, or ``(num_particles, D)`` for the mean over a vectorized batch of points.
    """
    vectorized = num_particles > 1
    point_elbo = elbo_class(
        num_particles=num_particles, vectorize_particles=vectorized, max_plate_nesting=max_plate_nesting
    )

    def negative_log_density(latent: torch.Tensor) -> torch.Tensor:
        point = latent if vectorized or latent.dim() == 1 else latent[0]
        with guide.fixed_latent(point, max_plate_nesting):
            return point_elbo.differentiable_loss(model, guide, *args, **kwargs)

    return negative_log_density


def _laplace(model, guide: PreconditionedGuide, args, kwargs, point_elbo_class, max_plate_nesting: int):
    """Laplace start on the unconstrained log density, each site constrained by the support of its own run
    (:mod:`ppvi.constrain`); with enumerated sites, the point-mass ELBO of the guide (TraceEnum_ELBO sums them out)."""
    if point_elbo_class is TraceEnum_ELBO:
        negative_log_density = _point_mass_negative_log_density(
            model, guide, args, kwargs, point_elbo_class, max_plate_nesting
        )
    else:
        negative_log_density = _negative_log_density(model, guide, args, kwargs, 1, max_plate_nesting)
    return laplace_start(negative_log_density, guide.preconditioner_loc)


def _path_derivative_loss(
    model, guide: PreconditionedGuide, args, kwargs, point_elbo_class, num_particles: int, max_plate_nesting: int
) -> Callable[[], torch.Tensor]:
    """Negative ELBO with the path-derivative gradient of Roeder, Wu & Duvenaud (2017, "Sticking the landing").

    ``z ~ q`` by reparameterisation; the model term ``-log p(x, T(z)) - log|det J|`` comes from Pyro's own ELBO
    on a point-mass guide (plates, subsampling scales, masks and enumeration handled as Pyro does); ``log q(z)``
    is evaluated with the variational parameters detached, which removes the score term whose expectation is zero
    but whose variance does not vanish at the optimum. Flows keep the ordinary estimator.
    """
    path_derivative = guide.supports_path_derivative
    if point_elbo_class is TraceEnum_ELBO:
        negative_log_density = _point_mass_negative_log_density(
            model, guide, args, kwargs, point_elbo_class, max_plate_nesting, num_particles
        )
    else:
        negative_log_density = _negative_log_density(model, guide, args, kwargs, num_particles, max_plate_nesting)

    def loss_function() -> torch.Tensor:
        posterior = guide.posterior()
        latent = posterior.rsample((num_particles,))
        log_q = (guide.posterior(detach=True) if path_derivative else posterior).log_prob(latent)
        return negative_log_density(latent) + log_q.mean()

    return loss_function


def _negative_log_density(
    model, guide: PreconditionedGuide, args, kwargs, num_particles: int, max_plate_nesting: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``z -> -mean over particles of [log p(x, T(z)) + log|det J_T(z)|]`` for ``z`` of shape ``(S, D)``.

    One trace of the model conditioned on the constrained values, inside a particle plate: the same number as
    Pyro's ``Trace_ELBO`` on a point-mass guide (subsampling scales and masks included), without tracing the
    guide or running the ELBO's bookkeeping, which took a third of a small model's step.
    """
    # One particle runs the model unbatched, so models written for a single draw work too. The plate is built once:
    # building one per step cost a sixth of a small model's step.
    particles = (
        pyro.plate("_ppvi_particles", num_particles, dim=-(max_plate_nesting + 1))
        if num_particles > 1
        else contextlib.nullcontext()
    )
    batch = (num_particles,) + (1,) * max_plate_nesting if num_particles > 1 else ()

    def negative_log_density(latent: torch.Tensor) -> torch.Tensor:
        pieces = {site["name"]: value for site, value in guide._unpack_latent(latent.reshape(*batch, latent.shape[-1]))}
        constrain = ConstrainMessenger(pieces, batch[:1])
        with particles, constrain:
            trace = poutine.trace(model).get_trace(*args, **kwargs)
        return -(trace.log_prob_sum() + constrain.log_abs_det_jacobian.sum()) / num_particles

    return negative_log_density


def _parameters(loss_function: Callable[[], torch.Tensor], guide: Callable) -> list[torch.Tensor]:
    """The unconstrained leaf tensors the loss depends on: the guide module's, and every ``pyro.param`` the loss
    touches (found as Pyro's SVI finds them)."""
    with poutine.trace(param_only=True) as capture:
        loss_function()
    values = (site["value"] for site in capture.trace.nodes.values())
    # pyro.param values know their unconstrained leaf; module-local PyroModule parameters are leaves themselves.
    captured = (value.unconstrained() if hasattr(value, "unconstrained") else value for value in values)
    own = guide.parameters() if isinstance(guide, torch.nn.Module) else ()
    parameters = {id(p): p for p in (*own, *captured)}
    return [p for p in parameters.values() if p.requires_grad]
