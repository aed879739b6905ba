"""Deterministic optimisation: the Laplace start of the Gaussian guides and the MAP fit.

The Laplace start (Laplace 1774; Kass, Tierney & Kadane 1991; the ADVI/Stan practice of starting from the mode)
maximises the unconstrained log density ``log p(x, T(z)) + log|det J_T(z)|`` with L-BFGS (Liu & Nocedal 1989,
strong-Wolfe line search) and takes the exact Hessian there. It needs no draw from the prior, so improper flat
priors (``dist.ImproperUniform``) are no obstacle, and it gives the preconditioner of
:class:`ppvi.guides.PreconditionedGuide`. When the mode does not exist (a funnel whose density grows without
bound, say) or the Hessian there is not positive definite, the start reports failure and the guide keeps its
default initialisation: the stochastic optimisation does the rest.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import torch
from pyro.infer.autoguide.initialization import init_to_median
from torch.distributions import biject_to

from ppvi.training import is_invalid_value_error

#: L-BFGS iterations for a mode; small models converge in tens, and the cap bounds the cost of a failure.
MAXIMUM_ITERATIONS = 500
#: Largest latent dimension for which the exact Hessian (one backward pass per coordinate) is formed.
MAXIMUM_HESSIAN_DIMENSION = 2000
#: A mode is accepted when the gradient's largest entry is below this, relative to ``1 + |log density|``.
GRADIENT_TOLERANCE = 1e-4
#: A Hessian whose smallest eigenvalue is below this fraction of its largest (in absolute value) is singular in
#: float64 terms: 1e-10 is a million times float64's epsilon, far below the curvature ratio of any proper
#: posterior ppvi meets (kidiq's un-centred regression, the worst conditioned, has about 1e-7).
SINGULAR_EIGENVALUE_RATIO = 1e-10
#: How the Laplace start reports a singular Hessian at a stationary point: the posterior is flat along some
#: direction (a flat prior the data do not inform, a non-identified sum of parameters), improper or nearly so.
SINGULAR_HESSIAN_MESSAGE = "the Hessian at the mode is singular"


def init_to_feasible_point(site: dict | None = None):
    """The point ``T(0)`` of a site's support, where ``T`` maps the real space onto it; no draw from the prior.

    Pyro's own ``init_to_feasible`` draws once from the prior to learn the site's shape, which fails for priors
    that cannot be sampled, such as Stan's flat priors written as ``dist.ImproperUniform``.
    """
    if site is None:
        return init_to_feasible_point
    distribution = site["fn"]
    shape = distribution.batch_shape + distribution.event_shape
    transform = biject_to(distribution.support)
    return transform(torch.zeros(transform.inverse_shape(shape)))


def init_to_median_or_feasible(site: dict | None = None):
    """Pyro's ``init_to_median`` (the median of 15 prior draws) where the prior can be sampled, else
    :func:`init_to_feasible_point`. The default initialisation of every ppvi guide."""
    if site is None:
        return init_to_median_or_feasible
    if site["fn"].support.is_discrete:
        # A data site run without its data (VSBC and SBC simulate it): no real space maps onto a discrete support,
        # and Pyro's median refuses multivariate sites (a multinomial's counts); one draw from it is a value of it.
        return site["fn"].sample()
    try:
        return init_to_median(site, fallback=init_to_feasible_point)
    except NotImplementedError:  # Pyro sends multivariate sites straight to its sampling init_to_feasible
        return init_to_feasible_point(site)


class LaplaceStart(NamedTuple):
    """Result of :func:`laplace_start`.

    Attributes
    ----------
    succeeded : bool
        Whether a mode with a positive-definite Hessian was found.
    loc : torch.Tensor or None
        The unconstrained mode.
    precision : torch.Tensor or None
        The Hessian of the negative log density at the mode.
    log_density : float
        The unconstrained log density at the last point reached.
    iterations : int
        L-BFGS iterations used.
    message : str
        Why it failed, or ``"ok"``.
    """

    succeeded: bool
    loc: torch.Tensor | None
    precision: torch.Tensor | None
    log_density: float
    iterations: int
    message: str


def minimize(
    loss_function: Callable[[], torch.Tensor],
    parameters: Sequence[torch.Tensor],
    maximum_iterations: int = MAXIMUM_ITERATIONS,
) -> tuple[float, int]:
    """Minimise a deterministic scalar function of ``parameters`` in place with L-BFGS.

    Parameters
    ----------
    loss_function : callable
        Returns the loss as a scalar tensor that depends on ``parameters``.
    parameters : sequence of torch.Tensor
        Leaf tensors with ``requires_grad=True``, updated in place.
    maximum_iterations : int
        Cap on L-BFGS iterations.

    Returns
    -------
    (float, int)
        The final loss (``inf`` if it is not finite; the parameters are then restored to their starting values)
        and the number of iterations.
    """
    optimizer = torch.optim.LBFGS(
        parameters,
        lr=1.0,
        max_iter=maximum_iterations,
        # Tolerances at the level of float64 round-off of a log density of order 1e3; the line search stops
        # far earlier on a well-posed problem.
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )
    last_finite = [parameter.detach().clone() for parameter in parameters]

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        try:
            loss = loss_function()
        except ValueError as error:  # validation rejecting a NaN parameter: as good as an infinite loss
            if not is_invalid_value_error(error):
                raise
            loss = torch.tensor(math.inf, dtype=parameters[0].dtype)
        if torch.isfinite(loss):
            loss.backward()
        else:
            # An infinite loss stops the line search: report a huge loss and no gradient.
            loss = torch.full_like(loss, torch.finfo(loss.dtype).max)
        return loss

    optimizer.step(closure)
    iterations = optimizer.state[optimizer._params[0]].get("n_iter", 0)
    try:  # with gradients on: Pyro's TraceEnum_ELBO refuses to compute a loss that cannot be differentiated
        final = loss_function().detach()
    except ValueError as error:
        if not is_invalid_value_error(error):
            raise
        final = torch.tensor(math.inf)
    with torch.no_grad():
        if not torch.isfinite(final) or not all(torch.isfinite(p).all() for p in parameters):
            for parameter, saved in zip(parameters, last_finite, strict=True):
                parameter.copy_(saved)
            return math.inf, iterations
    return float(final), iterations


def laplace_start(
    negative_log_density: Callable[[torch.Tensor], torch.Tensor],
    initial: torch.Tensor,
    maximum_iterations: int = MAXIMUM_ITERATIONS,
    maximum_dimension: int = MAXIMUM_HESSIAN_DIMENSION,
) -> LaplaceStart:
    """Find the mode of an unconstrained density and the Hessian there.

    Parameters
    ----------
    negative_log_density : callable
        ``z -> -log density(z)`` for a flat unconstrained vector ``z``; deterministic.
    initial : torch.Tensor
        Starting point, shape ``(D,)``.
    maximum_iterations : int
        Cap on L-BFGS iterations.
    maximum_dimension : int
        Above this dimension the Hessian is not formed and the start fails (cost: one backward pass a coordinate).

    Returns
    -------
    LaplaceStart
    """
    if initial.numel() > maximum_dimension:
        return LaplaceStart(False, None, None, math.nan, 0, f"latent dimension {initial.numel()} > {maximum_dimension}")
    point = initial.detach().clone().requires_grad_(True)
    loss, iterations = minimize(lambda: negative_log_density(point), [point], maximum_iterations)
    if not math.isfinite(loss):
        return LaplaceStart(False, None, None, -loss, iterations, "the log density was not finite along the path")
    point = point.detach().requires_grad_(True)
    (gradient,) = torch.autograd.grad(negative_log_density(point), point)
    point = point.detach()
    if not torch.isfinite(gradient).all():
        return LaplaceStart(False, None, None, -loss, iterations, "the gradient at the last point is not finite")
    # The relative part of the tolerance is capped: a runaway point (L-BFGS extrapolating a density without a
    # mode to 1e300) has a huge loss that must not excuse a gradient of order one.
    if gradient.abs().max() > GRADIENT_TOLERANCE * (1.0 + min(abs(loss), 100.0)):
        return LaplaceStart(
            False, None, None, -loss, iterations,
            f"no mode found in {iterations} L-BFGS iterations (largest gradient {float(gradient.abs().max()):.3g}):"
            " the density may grow without bound, as in a hierarchical funnel",
        )
    hessian = torch.autograd.functional.hessian(negative_log_density, point)
    hessian = 0.5 * (hessian + hessian.T)
    if not torch.isfinite(hessian).all():
        return LaplaceStart(False, None, None, -loss, iterations, "the Hessian at the mode is not finite")
    if torch.linalg.cholesky_ex(hessian).info != 0:
        eigenvalues = torch.linalg.eigvalsh(hessian)
        scale = float(eigenvalues.abs().max())
        if float(eigenvalues.min()) > -SINGULAR_EIGENVALUE_RATIO * scale:
            flat = int((eigenvalues.abs() <= SINGULAR_EIGENVALUE_RATIO * scale).sum())
            return LaplaceStart(
                False, None, None, -loss, iterations,
                f"{SINGULAR_HESSIAN_MESSAGE} ({flat} flat direction(s)): the posterior does not curve along them, "
                "so it may be improper (a flat prior that the data do not inform, or parameters identified only "
                "through their sum); give those parameters a proper prior",
            )
        return LaplaceStart(
            False, None, None, -loss, iterations,
            "the Hessian at the stationary point is not positive definite (a saddle point, or a mode at the "
            "boundary of the support)",
        )
    return LaplaceStart(True, point, hessian, -loss, iterations, "ok")


# -- the batched Laplace start of the calibration engine -----------------------------------------------------------
#: Newton iterations of :func:`batched_laplace_start` (eight schools needs ~15 from the prior median).
BATCHED_NEWTON_MAX_ITERATIONS = 100
#: Levenberg-Marquardt damping at the first Newton step, in units of the Hessian (nats per unconstrained unit^2).
BATCHED_NEWTON_INITIAL_DAMPING = 1e-3
#: Newton decrement (predicted decrease of the negative log density, nats) below which a mode is accepted.
BATCHED_NEWTON_DECREMENT_TOLERANCE = 1e-9


class BatchedLaplaceStart(NamedTuple):
    """Result of :func:`batched_laplace_start`, one row per replication.

    Attributes
    ----------
    center : torch.Tensor
        ``(M, D)``: the mode where one was found, else the initial point.
    factor : torch.Tensor
        The whitening map: ``(M, D)`` conditional sds ``1 / sqrt(H_dd)`` (``"diagonal"``, the mean-field optimum
        for a Gaussian target) or ``(M, D, D)`` Cholesky factors of ``H^{-1}`` (``"full"``); ones / the identity
        where no mode was found.
    succeeded : torch.Tensor
        ``(M,)`` bool: the Newton decrement criterion met at a finite point with a positive definite Hessian.
    """

    center: torch.Tensor
    factor: torch.Tensor
    succeeded: torch.Tensor


def batched_derivatives(
    negative_log_density: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    point: torch.Tensor,
    rows: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Value ``(K,)``, gradient ``(K, D)`` and Hessian ``(K, D, D)`` of ``K`` independent densities at ``point``.

    ``negative_log_density(z, rows)`` maps ``z`` ``(K, D)`` at the replications ``rows`` ``(K,)`` to ``(K,)``,
    with row ``k`` depending on ``z[k]`` only, so the Hessian of the *sum* is block diagonal and ``D``
    Hessian-vector products (one per coordinate, all replications at once) give every block. The ``D`` products
    are one backward pass vectorised by ``torch.func.vmap`` (``is_grads_batched``): measured on eight schools at
    ``K = 1000``, 8 against 10 ms for ten separate passes.
    """
    point = point.detach().requires_grad_(True)
    count, dimension = point.shape
    with torch.enable_grad():
        value = negative_log_density(point, rows)
        (gradient,) = torch.autograd.grad(value.sum(), point, create_graph=True)
        basis = torch.eye(dimension, dtype=point.dtype, device=point.device).unsqueeze(1).expand(
            dimension, count, dimension
        )
        (hessian,) = torch.autograd.grad(gradient, point, grad_outputs=basis, is_grads_batched=True)
    return value.detach(), gradient.detach(), hessian.transpose(0, 1).detach()


def batched_laplace_start(
    negative_log_density: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    initial: torch.Tensor,
    structure: Literal["full", "diagonal"],
) -> BatchedLaplaceStart:
    """Every replication's mode in unconstrained coordinates by damped Newton, all at once, and its whitening map.

    Damped Newton (Levenberg 1944, Marquardt 1963): solve ``(H + lambda I) step = -g``, shrinking ``lambda``
    after a decrease of the objective and growing it after a failed one; a replication stops when its Newton
    decrement falls below :data:`BATCHED_NEWTON_DECREMENT_TOLERANCE`, and one whose density or derivatives are
    not finite is marked failed. The L-BFGS start of :func:`laplace_start` serves one model; this one serves the
    ``M`` simulated data sets of VSBC/SBC, where one Newton step for all replications costs ``D`` batched
    Hessian-vector products. Each iteration evaluates only the replications still searching: a few without a
    mode (eight schools' ``tau -> 0``) run to the iteration cap, and they alone pay for it.

    Parameters
    ----------
    negative_log_density : callable
        ``(z, rows) -> (K,)`` for points ``z`` ``(K, D)`` of the replications at positions ``rows`` ``(K,)``
        (in ``0..M-1``); row ``k`` a function of ``z[k]`` only; non-finite where a point is out of support.
    initial : torch.Tensor
        ``(M, D)`` starting points.
    structure : {"full", "diagonal"}
        The whitening map to return (see :class:`BatchedLaplaceStart`).
    """
    M, D = initial.shape
    z = initial.clone()
    damping = torch.full((M,), BATCHED_NEWTON_INITIAL_DAMPING, dtype=initial.dtype, device=initial.device)
    identity = torch.eye(D, dtype=initial.dtype, device=initial.device)
    done = torch.zeros(M, dtype=torch.bool, device=initial.device)
    failed = torch.zeros_like(done)
    value, gradient, hessian = batched_derivatives(
        negative_log_density, z, torch.arange(M, device=initial.device)
    )
    for _ in range(BATCHED_NEWTON_MAX_ITERATIONS):
        failed = failed | ~(torch.isfinite(value) & torch.isfinite(hessian).flatten(1).all(-1))
        failed = failed | ~torch.isfinite(gradient).all(-1)
        done = done | failed
        hessian = torch.where(failed[:, None, None], identity, hessian)
        gradient = torch.where(failed[:, None], torch.zeros_like(gradient), gradient)
        searching = (~done).nonzero().squeeze(-1)
        open_hessian, open_gradient, open_damping = hessian[searching], gradient[searching], damping[searching]
        factor, info = torch.linalg.cholesky_ex(open_hessian + open_damping[:, None, None] * identity)
        while bool((info > 0).any()):  # not positive definite: more damping, until a descent direction
            open_damping = torch.where(info > 0, open_damping * 10.0, open_damping)
            factor, info = torch.linalg.cholesky_ex(open_hessian + open_damping[:, None, None] * identity)
        step = -torch.cholesky_solve(open_gradient.unsqueeze(-1), factor).squeeze(-1)
        # Newton decrement: half the predicted decrease of the objective along the step.
        decrement = -(open_gradient * step).sum(-1)
        stopped = torch.isfinite(value[searching]) & (decrement < BATCHED_NEWTON_DECREMENT_TOLERANCE)
        done[searching[stopped]] = True
        if bool(done.all()):
            break
        moving, step, open_damping = searching[~stopped], step[~stopped], open_damping[~stopped]
        candidate = z[moving] + step
        with torch.no_grad():
            candidate_value = negative_log_density(candidate, moving)
        improved = torch.isfinite(candidate_value) & (candidate_value < value[moving])
        damping[moving] = torch.where(improved, (open_damping / 3.0).clamp_min(1e-12), open_damping * 10.0)
        if bool(improved.any()):
            better = moving[improved]
            z[better] = candidate[improved]
            value[better], gradient[better], hessian[better] = batched_derivatives(
                negative_log_density, z[better], better
            )
    hessian = 0.5 * (hessian + hessian.transpose(-1, -2))
    cholesky, info = torch.linalg.cholesky_ex(hessian)
    succeeded = done & ~failed & (info == 0) & torch.isfinite(z).all(-1)
    center = torch.where(succeeded[:, None], z, initial)
    if structure == "diagonal":
        diagonal = torch.diagonal(hessian, dim1=-2, dim2=-1).clamp_min(1e-300)
        factor = torch.where(succeeded[:, None], diagonal.rsqrt(), torch.ones_like(center))
    else:
        safe = torch.where(succeeded[:, None, None], cholesky, identity.expand(M, D, D))
        # A lower-triangular square root of H^{-1}: the Cholesky factor of the covariance.
        covariance_factor = torch.linalg.cholesky(torch.cholesky_inverse(safe))
        factor = torch.where(succeeded[:, None, None], covariance_factor, identity.expand(M, D, D))
    return BatchedLaplaceStart(center, factor, succeeded)
