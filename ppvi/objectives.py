"""``ppvi.objectives``: the losses :func:`ppvi.fit` trains on, and the log densities behind them.

Pyro's ELBOs chosen by name (:func:`make_elbo`, :func:`analytic_kl_everywhere`); for ppvi's registry guides, the
path-derivative ELBO (:func:`path_derivative_loss`) over the negative log density of the unconstrained coordinates
(:func:`traced_negative_log_density`, or :func:`point_mass_negative_log_density` through Pyro's own ELBO when sites
are enumerated); the parameters a loss trains (:func:`trainable_parameters`); the ELBO estimate with its standard
error that ``converged`` compares (:func:`elbo_estimate`); and the refusal of a posterior flat everywhere
(:func:`check_not_flat`). :func:`build_loss` chooses the loss a fit trains on.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO, Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO

from ppvi import training
from ppvi.constrain import ConstrainMessenger
from ppvi.guides import PreconditionedGuide
from ppvi.inputs import random_state_kept
from ppvi.vectorize import Strategy, Vectorization, batched_log_density

__all__ = [
    "ELBO_CHECK_EVALUATIONS",
    "analytic_kl_everywhere",
    "build_loss",
    "check_not_flat",
    "elbo_estimate",
    "make_elbo",
    "path_derivative_loss",
    "point_mass_negative_log_density",
    "trainable_parameters",
    "traced_negative_log_density",
    "vectorization_note",
]

#: Loss evaluations (of ``num_particles`` draws each, no gradients) behind the ELBO estimates at the start and
#: the end of training that ``converged`` compares: 16 x 8 draws put the standard error near a tenth of the
#: per-draw spread of the log ratios, at the cost of about five training steps each.
ELBO_CHECK_EVALUATIONS = 16


def analytic_kl_everywhere(model, guide, args, kwargs) -> bool:
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


def make_elbo(
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


def build_loss(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    *,
    elbo: str | ELBO,
    own_guide: bool,
    enumerated: bool,
    point_elbo_class: type[ELBO],
    num_particles: int,
    particles_defaulted: bool,
    max_plate_nesting: int,
    vectorization: Vectorization | None = None,
) -> tuple[Callable[[], torch.Tensor], list[str]]:
    """The negative ELBO :func:`ppvi.fit` trains, and notes for the fit's message on how it was built.

    With ``elbo="auto"`` and a registry guide, :func:`path_derivative_loss`, its particles evaluated as
    ``vectorization`` says (:mod:`ppvi.vectorize`: broadcast, vmapped, or one at a time). Without a
    ``vectorization`` (enumerated sites, minibatches), on the broadcast; when the model does not broadcast over
    ``num_particles`` particles, one particle per step if the number was ppvi's default (``particles_defaulted``),
    else a ``ValueError`` saying how to write the model for a batch. Otherwise Pyro's ELBO chosen by
    :func:`make_elbo` (the analytic KL only for a guide of the user's, ``own_guide``, without enumerated sites).
    """
    notes: list[str] = []
    if elbo == "auto" and isinstance(guide, PreconditionedGuide) and vectorization is not None:
        strategy = vectorization.strategy
        if strategy != "broadcast":
            notes.append(vectorization_note(vectorization))
        loss_function = path_derivative_loss(
            model, guide, args, kwargs, point_elbo_class, num_particles, max_plate_nesting, strategy
        )
    elif elbo == "auto" and isinstance(guide, PreconditionedGuide):
        loss_function = path_derivative_loss(
            model, guide, args, kwargs, point_elbo_class, num_particles, max_plate_nesting
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
                notes.append("the model does not broadcast over particles: used 1 particle per step")
                loss_function = path_derivative_loss(model, guide, args, kwargs, point_elbo_class, 1, max_plate_nesting)
    else:
        analytic_kl = own_guide and not enumerated and analytic_kl_everywhere(model, guide, args, kwargs)
        elbo_object = make_elbo(elbo, enumerated, max_plate_nesting, num_particles, analytic_kl)

        def loss_function() -> torch.Tensor:
            return elbo_object.differentiable_loss(model, guide, *args, **kwargs)

    return loss_function, notes


def vectorization_note(vectorization: Vectorization) -> str:
    """What :attr:`ppvi.Fit.message` says of a model that does not run on the broadcast."""
    if vectorization.strategy == "vmap":
        return f"the model's draws are batched by torch.func.vmap: {vectorization.reason}"
    return (
        f"the model is evaluated one draw at a time: {vectorization.reason}. Every step, summary, diagnosis and "
        "conversion costs one run of the model per draw (8 per step, 4,000 per diagnosis), tens to hundreds of "
        "times a batched evaluation: replace Python control flow on sampled values (if z > 0: ...) by tensor "
        "operations (torch.where(z > 0, ...)) so that torch.func.vmap can batch the model"
    )


def path_derivative_loss(
    model, guide: PreconditionedGuide, args, kwargs, point_elbo_class, num_particles: int, max_plate_nesting: int,
    strategy: Strategy = "broadcast",
) -> Callable[[], torch.Tensor]:
    """Negative ELBO with the path-derivative gradient of Roeder, Wu & Duvenaud (2017, "Sticking the landing").

    ``z ~ q`` by reparameterisation; the model term ``-log p(x, T(z)) - log|det J|`` comes from Pyro's own ELBO
    on a point-mass guide (plates, subsampling scales, masks and enumeration handled as Pyro does); ``log q(z)``
    is evaluated with the variational parameters detached, which removes the score term whose expectation is zero
    but whose variance does not vanish at the optimum. Flows keep the ordinary estimator. ``strategy`` says how the
    particles are evaluated (:mod:`ppvi.vectorize`); enumerated sites always run on the broadcast.
    """
    path_derivative = guide.supports_path_derivative
    if point_elbo_class is not TraceEnum_ELBO and strategy != "broadcast":
        batched = batched_log_density(model, guide, args, kwargs, max_plate_nesting, strategy)

        def negative_log_density(latent: torch.Tensor) -> torch.Tensor:
            return -batched(latent)[0].mean()
    elif point_elbo_class is TraceEnum_ELBO:
        negative_log_density = point_mass_negative_log_density(
            model, guide, args, kwargs, point_elbo_class, max_plate_nesting, num_particles
        )
    else:
        negative_log_density = traced_negative_log_density(model, guide, args, kwargs, num_particles, max_plate_nesting)

    def loss_function() -> torch.Tensor:
        posterior = guide.posterior()
        latent = posterior.rsample((num_particles,))
        log_q = (guide.posterior(detach=True) if path_derivative else posterior).log_prob(latent)
        return negative_log_density(latent) + log_q.mean()

    return loss_function


def traced_negative_log_density(
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


def point_mass_negative_log_density(
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


def trainable_parameters(loss_function: Callable[[], torch.Tensor], guide: Callable) -> list[torch.Tensor]:
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


def elbo_estimate(loss_function: Callable[[], torch.Tensor]) -> tuple[float, float]:
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


def check_not_flat(
    model, guide: PreconditionedGuide, args, kwargs, point_elbo_class, max_plate_nesting: int, latent: list[str]
) -> None:
    """Refuse a posterior whose unconstrained log density does not change at all with the latent coordinates:
    flat everywhere, hence improper (it has no mode, no Hessian and no gradient for the ELBO to follow)."""
    negative_log_density = point_mass_negative_log_density(
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
