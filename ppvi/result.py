"""``ppvi.result``: :class:`Fit`, what :func:`ppvi.fit` returns, and the records and errors that go with it.

A fit draws from the guide (vectorized when the model broadcasts over a batch of draws, draw by draw otherwise),
weighs the draws by their importance ratios (with enumerated sites summed out by :mod:`ppvi.enumeration`),
summarises, converts to ArviZ, diagnoses with PSIS and saves (:mod:`ppvi.saving`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO
from torch.distributions import biject_to

from ppvi.constrain import constrained_trace
from ppvi.diagnostics.diagnosis import Diagnosis, diagnose, resample
from ppvi.enumeration import batched_marginal_log_density, per_draw_log_prob
from ppvi.guides import PreconditionedGuide
from ppvi.initialization import LaplaceStart
from ppvi.inputs import computation, random_state_kept, threads_for
from ppvi.objectives import point_mass_negative_log_density
from ppvi.options import OptionTypeError, validate
from ppvi.saving import save_fit
from ppvi.summary import summarize
from ppvi.tracing import ModelParameters, is_reported, seeded, structure_trace
from ppvi.vectorize import DRAWS_PER_CALL, Strategy, Vectorization, batched_log_density, choose_strategy

if TYPE_CHECKING:  # pandas is imported by ppvi.summary.summarize, when a summary is made
    import pandas as pd

__all__ = [
    "FINAL_ELBO_FRACTION",
    "MINIBATCH_LAPLACE_MESSAGE",
    "SUMMARY_DRAWS",
    "Expectation",
    "Fit",
    "FitWarning",
    "GuideAttempt",
    "NonFiniteELBOError",
]

#: Draws behind ``summary()`` and ``to_arviz()``: Monte Carlo error of a mean about 1.6 % of a posterior sd.
SUMMARY_DRAWS = 4000
#: The Laplace start is not attempted on minibatches, whose log density is random: not a failure.
MINIBATCH_LAPLACE_MESSAGE = "minibatches make the log density random"
#: ``Fit.final_elbo`` averages the last ``1 / FINAL_ELBO_FRACTION`` of the ELBO trace (at least its last value).
FINAL_ELBO_FRACTION = 10


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


class NonFiniteELBOError(RuntimeError):
    """The ELBO became NaN or infinite. ``error.fit`` holds the fit at the last finite parameters."""

    def __init__(self, message: str, fit: Fit):
        super().__init__(message)
        self.fit = fit


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


class Fit:
    """The result of :func:`ppvi.fit`.

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
    final_elbo : float
        The ELBO at the end of training: the mean of the last tenth of ``elbo`` (NaN when it is empty).
    engine : str
        Which training path ran (:mod:`ppvi.engine`): ``"traced"`` (one traced graph of the whole step),
        ``"compiled"`` (that graph compiled by TorchInductor), ``"pyro"`` (Pyro's tracing at every step, for
        models and guides that do not trace; ``message`` says why when ``engine="auto"`` fell back) or ``"ddp"``
        (data-parallel over several processes, :class:`ppvi.data_parallel.DataParallelFit`).
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
        engine: str = "pyro",
        vectorization: Vectorization | None = None,
    ):
        self.model, self.guide, self.args, self.kwargs = model, guide, args, kwargs
        self.guide_name, self.guide_options = guide_name, guide_options
        self.elbo, self.steps, self.seconds = elbo, steps, seconds
        self.device, self.dtype, self.converged = device, dtype, converged
        self.laplace, self.message = laplace, message
        self.max_plate_nesting = max_plate_nesting
        self.history = list(history or [])
        self.interrupted = interrupted
        self.engine = engine
        self._vectorization = vectorization
        self._vectorizable = True

    @property
    def params(self) -> dict[str, torch.Tensor]:
        """The model's own ``pyro.param`` values (constrained), trained with the guide's parameters."""
        if isinstance(self.model, ModelParameters):
            return self.model.values()
        return {}

    @property
    def final_elbo(self) -> float:
        """The ELBO at the end of training, the one definition ppvi uses: the mean of the last tenth of the trace
        :attr:`elbo`, i.e. of its last ``max(1, len(elbo) // FINAL_ELBO_FRACTION)`` values (at least the last
        one), which averages out the step-to-step Monte Carlo noise; NaN when no ELBO was recorded (a Laplace
        fit). ``repr(fit)`` and the ``elbo`` column of :func:`ppvi.compare` show this value."""
        if not self.elbo.size:
            return math.nan
        return float(np.mean(self.elbo[-max(1, self.elbo.size // FINAL_ELBO_FRACTION) :]))

    def __repr__(self) -> str:
        name = self.guide_name or type(self.guide).__name__
        final = f"{self.final_elbo:.6g}" if self.elbo.size else "n/a"
        laplace = "" if self.laplace_failure is None else f", laplace='failed: {self.laplace_failure}'"
        return (
            f"Fit(guide={name!r}, steps={self.steps}, converged={self.converged}, final ELBO={final}, "
            f"seconds={self.seconds:.3g}, device={self.device}{laplace})"
        )

    def _repr_html_(self) -> str:
        """Jupyter's view: the fit's fields and a posterior summary of 1,000 draws (:func:`ppvi.html.fit_html`)."""
        from ppvi.html import fit_html

        return fit_html(self)

    @property
    def laplace_failure(self) -> str | None:
        """Why the Laplace start failed, or ``None`` when it succeeded or was not attempted."""
        if self.laplace is None or self.laplace.succeeded or self.laplace.message == MINIBATCH_LAPLACE_MESSAGE:
            return None
        return self.laplace.message

    def _computation(self, batch: int = 1):
        """The fit's device and dtype as torch's defaults, and its thread rule (:func:`ppvi.inputs.threads_for`) for
        ``batch`` draws evaluated together: a small model stays on one thread, which a busy machine slows only in
        proportion to its load."""
        return computation(self.device, self.dtype, threads_for(self.args, self.kwargs, self.device, batch))

    # -- draws ---------------------------------------------------------------------------------------------------
    @property
    def vectorization(self) -> Vectorization | None:
        """How the model is evaluated over a batch of draws (:mod:`ppvi.vectorize`): on Pyro's broadcast, batched
        by ``torch.func.vmap``, or one draw at a time, and why; ``None`` for guides of your own, enumerated sites
        and minibatches, whose draws run on the broadcast where the model allows it."""
        if self._vectorization is None and self._checks_vectorization():
            with self._computation(), random_state_kept():
                self._vectorization = choose_strategy(
                    self.model, self.guide, self.args, self.kwargs, self.max_plate_nesting
                )
        return self._vectorization

    def _checks_vectorization(self) -> bool:
        return (
            isinstance(self.guide, PreconditionedGuide) and "subsample_size" not in self.kwargs
            and not self._enumerated()
        )

    def _draw(self, num_samples: int, seed: int | None, weights: bool):
        """Draws of every reported site, and with ``weights`` their log importance ratios.

        For ppvi's registry guides, all draws in batched calls of the model as :attr:`vectorization` says. For
        other guides, all draws in one vectorized pair of guide and model traces (a plate left of the model's own)
        when the model broadcasts over it; otherwise, for models written for one draw at a time (``locs[z]``
        rather than ``Vindex(locs)[..., z]``), one pair of traces per draw.
        """
        num_samples, seed = _check_draws(num_samples, seed)
        shapes = self.site_shapes()
        vectorization = self.vectorization
        # The fit's thread rule: a batch of draws of a small model is still small work, which a second thread slows
        # down tenfold when the cores are busy.
        with self._computation(min(num_samples, DRAWS_PER_CALL)), torch.no_grad(), seeded(seed):
            if vectorization is not None:
                return self._batched_draws(num_samples, shapes, weights, vectorization.strategy)
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

    def _batched_draws(self, num_samples: int, shapes: dict, weights: bool, strategy: Strategy):
        """For ppvi's registry guides: ``z ~ q`` and the model's log density and reported values at every draw."""
        posterior = self.guide.posterior()
        latent = posterior.sample((num_samples,))
        log_q = posterior.log_prob(latent)  # before any other draw: a flow reads its own draws from its cache
        evaluate = batched_log_density(
            self.model, self.guide, self.args, self.kwargs, self.max_plate_nesting, strategy, shapes
        )
        log_density, values = evaluate(latent)
        draws = {name: values[name].detach().reshape(num_samples, *shape) for name, shape in shapes.items()}
        if not weights:
            return draws, None
        return draws, log_density.double() - log_q.double()

    def _vectorized_draws(self, num_samples: int, shapes: dict, weights: bool):
        if isinstance(self.guide, PreconditionedGuide):
            model_trace, guide_log_density = self._constrained_draws(num_samples)
        else:
            with pyro.plate("_ppvi_draws", num_samples, dim=-(self.max_plate_nesting + 1)):
                guide_trace, model_trace = self._pair_of_traces()
            guide_log_density = per_draw_log_prob(guide_trace, self.max_plate_nesting, num_samples)
        draws = {
            name: model_trace.nodes[name]["value"].detach().reshape(num_samples, *shape)
            for name, shape in shapes.items()
        }
        if not weights:
            return draws, None
        log_weights = per_draw_log_prob(model_trace, self.max_plate_nesting, num_samples) - guide_log_density
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
        draws, log_weights = self.weighted_draws(proposals, seed)
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
            with self._computation(), random_state_kept():
                reference = structure_trace(self.model, self.args, self.kwargs)
            self._site_shapes = {
                name: tuple(site["value"].shape) for name, site in reference.nodes.items() if is_reported(site)
            }
        return self._site_shapes

    def summary(self, num_samples: int = SUMMARY_DRAWS, seed: int = 0, corrected: bool = False) -> pd.DataFrame:
        """Posterior summary per scalar component: mean, sd and the 5 %, 50 % and 95 % quantiles.

        Rows are named as in ``arviz.summary`` (``theta[0]``, ``W[1, 2]``); computed from ``num_samples`` draws,
        PSIS-resampled with ``corrected`` (see :meth:`sample`).
        """
        return summarize(self.sample(num_samples, seed=seed, corrected=corrected))

    def to_arviz(self, num_samples: int = SUMMARY_DRAWS, seed: int = 0):
        """The draws as an ``arviz.InferenceData`` (one chain), with their importance weights and the observed data.

        The ``posterior`` group holds ``num_samples`` guide draws (those of ``fit.sample(num_samples, seed=seed)``),
        ``observed_data`` the model's observed sites. ``sample_stats`` holds ``log_weight``, the log importance ratio
        ``log p(x, theta_s) - log q(theta_s)`` of the same draws (:meth:`log_weights`, not negated; shape
        ``(chain=1, draw)``), for ``arviz.psislw`` and ArviZ's plots, and in its attributes ``khat`` (PSIS k-hat of
        those weights, as :meth:`diagnose` gives it for the same ``num_samples`` and ``seed``) and
        ``khat_threshold``. A fit without weights (a point-mass ``"map"`` guide has no density) has no
        ``sample_stats`` group (ArviZ keeps no empty group); the ``posterior`` group's attribute
        ``log_weight_missing`` says why.
        """
        import arviz as az

        from ppvi.diagnostics.psis import MINIMUM_TAIL_LENGTH, khat_threshold, psis, tail_length

        num_samples, seed = _check_draws(num_samples, seed)
        draws, log_weights, missing = None, None, ""
        if self.guide_name == "map":
            missing = "a point-mass (MAP) guide has no density, so its draws have no importance weights"
        else:
            try:
                draws, log_weights = self.weighted_draws(num_samples, seed)
            except ValueError as error:  # enumerated sites with a guide that is not ppvi's
                missing = str(error)
        if draws is None or list(draws) != list(self.site_shapes()):
            # Enumerated models' weighted draws lack the deterministic sites: the same seed gives the same latent
            # draws to sample(), which has every site.
            sampled = self.sample(num_samples, seed=seed)
            if draws is not None and not all(
                torch.allclose(value, sampled[name], rtol=1e-5, atol=1e-8) for name, value in draws.items()
            ):
                log_weights, missing = None, "the weighted draws and the posterior draws differ"
            draws = sampled
        posterior = {name: value.double().cpu().numpy()[None] for name, value in draws.items()}
        with self._computation(), random_state_kept():
            reference = structure_trace(self.model, self.args, self.kwargs)
        observed = {
            name: site["value"].detach().cpu().numpy()
            for name, site in reference.nodes.items()
            if site["type"] == "sample" and site["is_observed"] and isinstance(site["value"], torch.Tensor)
        }
        sample_stats = None if log_weights is None else {"log_weight": log_weights.double().cpu().numpy()[None]}
        data = az.from_dict(posterior=posterior, sample_stats=sample_stats, observed_data=observed or None)
        if log_weights is None:  # ArviZ drops an empty group: the posterior's attributes say why it is absent
            data.posterior.attrs["log_weight_missing"] = missing
            return data
        attributes = {"log_weight_definition": "log p(x, theta) - log q(theta) of the posterior draws (not negated)"}
        if tail_length(num_samples) >= MINIMUM_TAIL_LENGTH:
            attributes.update(khat=float(psis(log_weights)[1]), khat_threshold=khat_threshold(num_samples))
        else:
            attributes.update(khat=math.inf, khat_missing=f"{num_samples} draws are too few for a Pareto fit")
        data.sample_stats.attrs.update(attributes)
        return data

    # -- diagnostics --------------------------------------------------------------------------------------------
    def weighted_draws(
        self, num_samples: int = 4000, seed: int | None = 0
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Guide draws of every reported site and their log importance ratios, from one set of draws.

        Returns
        -------
        draws : dict of str to torch.Tensor
            As :meth:`sample` returns them: ``(num_samples, *site_shape)`` per site.
        log_weights : torch.Tensor
            ``log p(x, theta_s) - log q(theta_s)`` per draw, as :meth:`log_weights` (shape ``(num_samples,)``,
            float64).

        Raises
        ------
        ValueError
            A point-mass (``"map"``) guide, which has no density, or enumerated sites with a guide that is not
            ppvi's.
        """
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
        with self._computation(), random_state_kept():
            structure = structure_trace(self.model, self.args, self.kwargs)
        return any(site["type"] == "sample" and site["infer"].get("enumerate") for site in structure.nodes.values())

    def _marginal_weighted_draws(self, num_samples: int, seed: int | None):
        """Weights for models with enumerated discrete sites: ``log p(x, theta)`` with the discrete sites summed
        out, minus ``log q(theta)``.

        When the model broadcasts over a batch of draws left of its plates (as for vectorized particles), the
        marginal log joint of many draws comes from one enumerated trace per pass
        (:func:`ppvi.enumeration.marginal_log_density`); otherwise from TraceEnum_ELBO on a point-mass guide, one
        draw at a time.
        """
        if not isinstance(self.guide, PreconditionedGuide):
            raise ValueError(
                "importance weights of a model with enumerated sites need the marginal likelihood, available for "
                "ppvi's registry guides; this guide is a different kind"
            )
        shapes = self.site_shapes()
        # The fit's thread rule: one batch of draws of a small model is still small work, which a second thread
        # slows down when the cores are busy.
        with self._computation(min(num_samples, DRAWS_PER_CALL)), torch.no_grad(), seeded(seed):
            posterior = self.guide.posterior()
            latent = posterior.sample((num_samples,))
            log_joint = None
            if self._vectorizable:
                try:
                    log_joint = batched_marginal_log_density(
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
        negative_log_density = point_mass_negative_log_density(
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
        return self.weighted_draws(num_samples, seed)[1]

    def diagnose(self, num_samples: int = 4000, seed: int | None = 0) -> Diagnosis:
        """PSIS diagnostic of the guide: k-hat with its bootstrap interval, the size of the mismatch (ESS, spread
        of the log weights, how far PSIS moves the means and sds), a verdict and its explanation, which also
        reports a failed Laplace start or an unconverged run (see :class:`ppvi.diagnostics.diagnosis.Diagnosis`).
        """
        draws, log_weights = self.weighted_draws(num_samples, seed)
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
        draws, log_weights = self.weighted_draws(num_samples, seed)
        values = torch.as_tensor(function(draws)).double()
        if values.shape[:1] != (num_samples,):
            raise ValueError(f"function must return one value per draw (first dimension {num_samples}), got "
                             f"shape {tuple(values.shape)}")
        diagnosis, smoothed = diagnose(log_weights)
        weights = smoothed.exp().reshape(-1, *(1,) * (values.dim() - 1))
        return Expectation((weights * values).sum(0), values.mean(0), diagnosis.khat)

    def save(self, path) -> None:
        """Save the trained parameters (no pickle: plain tensors and strings, loadable with ``weights_only=True``)."""
        save_fit(self, path)


def _check_draws(num_samples: Any, seed: Any) -> tuple[int, int | None]:
    """``num_samples`` and ``seed`` of the draws, checked before anything runs (a bad value must not be taken for
    a model that cannot draw in a batch)."""
    checked = validate({"num_samples": num_samples, "seed": seed}, optional=("seed",))
    return checked["num_samples"], checked["seed"]
