"""Pieces shared by the Gaussian solvers of :mod:`ppvi.solvers`: the Gaussian itself, draws from it, the batched
value and gradient of a log density, robust Cholesky factors, and an adapter from a Pyro model to a batched log
density on its unconstrained coordinates.

Conventions
-----------
* A Gaussian is a :class:`GaussianApproximation` ``(loc, scale_tril)``: mean ``(D,)`` and lower-triangular
  Cholesky factor ``(D, D)`` of the covariance, with a positive diagonal.
* A log density is a callable mapping a batch of points ``(B, D)`` (float64) to ``(B,)`` unnormalised log densities,
  row ``b`` a function of point ``b`` only. It may return ``-inf`` or NaN where a point is outside the support or the
  arithmetic overflows; :func:`value_and_gradient` reports such rows as not finite rather than failing.
* A gradient evaluation is the gradient of ``log p`` at one point: a batch of ``B`` points costs ``B``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer.autoguide.initialization import InitMessenger
from pyro.poutine.util import site_is_subsample

from ppvi.constrain import ConstrainMessenger, support_transform
from ppvi.initialization import init_to_feasible_point
from ppvi.training import is_invalid_value_error

__all__ = [
    "GaussianApproximation",
    "LogDensity",
    "ModelLogDensity",
    "SolverResult",
    "iterate_until_settled",
    "covariance",
    "draw",
    "entropy",
    "gaussian_log_density",
    "jeffreys_divergence",
    "log_density_of",
    "lower_factor_of_product",
    "safe_cholesky",
    "scale_tril_from_covariance",
    "scale_tril_from_precision",
    "value_and_gradient",
]

#: A batched log density: points ``(B, D)`` -> log densities ``(B,)``.
LogDensity = Callable[[torch.Tensor], torch.Tensor]

#: First jitter tried by :func:`safe_cholesky`, as a fraction of each diagonal entry: about 500 times float64's
#: epsilon (2.2e-16), enough to absorb the round-off of a matrix assembled from sums of outer products.
INITIAL_RELATIVE_JITTER = 1e-13
#: Largest jitter :func:`safe_cholesky` adds before it falls back to clipping eigenvalues: each variance grows by at
#: most a millionth, each standard deviation by half a millionth, whatever the scales of the coordinates.
MAXIMUM_RELATIVE_JITTER = 1e-6
#: Eigenvalue floor of the last-resort fallback of :func:`safe_cholesky`, relative to the largest eigenvalue: the
#: condition number is capped at 1e12, where float64 solves still keep four significant digits.
EIGENVALUE_FLOOR = 1e-12


class GaussianApproximation(NamedTuple):
    """A Gaussian ``N(loc, scale_tril scale_tril^T)`` on the unconstrained coordinates.

    Attributes
    ----------
    loc : torch.Tensor
        Mean, shape ``(D,)``.
    scale_tril : torch.Tensor
        Lower-triangular Cholesky factor of the covariance, shape ``(D, D)``, positive diagonal.
    """

    loc: torch.Tensor
    scale_tril: torch.Tensor


def covariance(approximation: GaussianApproximation) -> torch.Tensor:
    """The covariance ``L L^T`` of a :class:`GaussianApproximation`."""
    scale_tril = approximation.scale_tril
    return scale_tril @ scale_tril.T


def entropy(approximation: GaussianApproximation) -> torch.Tensor:
    """Differential entropy ``D/2 log(2 pi e) + sum log diag L`` of a :class:`GaussianApproximation` (a scalar)."""
    dimension = approximation.loc.shape[-1]
    return 0.5 * dimension * (1.0 + math.log(2.0 * math.pi)) + approximation.scale_tril.diagonal().log().sum()


def draw(
    approximation: GaussianApproximation, num_draws: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``num_draws`` points from a Gaussian.

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        The points ``loc + L e``, shape ``(num_draws, D)``, and the standard normal draws ``e`` behind them (the
        points in the Gaussian's own whitened coordinates).
    """
    loc, scale_tril = approximation
    standard = torch.randn(
        num_draws, loc.shape[-1], dtype=loc.dtype, device=loc.device, generator=generator
    )
    return loc + standard @ scale_tril.T, standard


def gaussian_log_density(approximation: GaussianApproximation, points: torch.Tensor) -> torch.Tensor:
    """Log density of a Gaussian at ``points`` ``(B, D)``, shape ``(B,)``."""
    loc, scale_tril = approximation
    whitened = torch.linalg.solve_triangular(scale_tril, (points - loc).T, upper=False).T
    dimension = loc.shape[-1]
    return (
        -0.5 * (whitened**2).sum(-1)
        - scale_tril.diagonal().log().sum()
        - 0.5 * dimension * math.log(2.0 * math.pi)
    )


def jeffreys_divergence(first: GaussianApproximation, second: GaussianApproximation) -> float:
    """Symmetrised KL divergence ``KL(first || second) + KL(second || first)`` between two Gaussians, in nats.

    Invariant under affine maps of the coordinates, so it measures how far a solver's iterate moved in units of the
    iterate's own spread: a shift of the mean by ``s`` standard deviations along one axis gives ``s^2``, a change of
    one standard deviation by the factor ``r`` gives ``(r - 1/r)^2 / 2``.
    """
    dimension = first.loc.shape[-1]
    # Whiten by the first factor: the second Gaussian becomes N(m, A A^T), the first N(0, I).
    whitened_factor = torch.linalg.solve_triangular(first.scale_tril, second.scale_tril, upper=False)
    whitened_shift = torch.linalg.solve_triangular(
        first.scale_tril, (second.loc - first.loc).unsqueeze(-1), upper=False
    ).squeeze(-1)
    inverse_factor = torch.linalg.solve_triangular(
        whitened_factor, torch.eye(dimension, dtype=first.loc.dtype, device=first.loc.device), upper=False
    )
    trace_forward = (whitened_factor**2).sum()  # tr(A A^T): KL(second || first) part
    trace_backward = (inverse_factor**2).sum()  # tr((A A^T)^{-1}): KL(first || second) part
    shift_forward = (whitened_shift**2).sum()
    shift_backward = ((inverse_factor @ whitened_shift) ** 2).sum()
    # The log-determinants cancel in the sum of the two directions.
    return float(0.5 * (trace_forward + trace_backward + shift_forward + shift_backward) - dimension)


def safe_cholesky(matrix: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of a symmetric positive (semi-)definite matrix, robust to round-off.

    The matrix is symmetrised first. If the factorisation fails, each diagonal entry is multiplied by ``1 +
    jitter``, the jitter starting at :data:`INITIAL_RELATIVE_JITTER` and multiplied by 100 until the factorisation
    succeeds or the jitter exceeds :data:`MAXIMUM_RELATIVE_JITTER` (a jitter relative to each entry keeps badly
    scaled coordinates, sds from 1e-3 to 1e3, each within a millionth of its own variance). Past that, the
    eigenvalues are clipped from below at :data:`EIGENVALUE_FLOOR` times the largest: a matrix with negative
    eigenvalues well beyond round-off becomes its nearest positive definite matrix in the Frobenius norm, up to the
    floor.

    Raises
    ------
    ValueError
        If the matrix has non-finite entries or no positive eigenvalue.
    """
    symmetric = 0.5 * (matrix + matrix.transpose(-1, -2))
    if not bool(torch.isfinite(symmetric).all()):
        raise ValueError("cannot factor a matrix with non-finite entries")
    factor, info = torch.linalg.cholesky_ex(symmetric)
    if int(info) == 0:
        return factor
    diagonal = symmetric.diagonal().abs()
    # A zero variance gets the jitter of the mean one, so that the diagonal is positive.
    diagonal = torch.where(diagonal > 0, diagonal, diagonal.mean())
    jitter = INITIAL_RELATIVE_JITTER
    while jitter <= MAXIMUM_RELATIVE_JITTER:
        factor, info = torch.linalg.cholesky_ex(symmetric + torch.diag(jitter * diagonal))
        if int(info) == 0:
            return factor
        jitter *= 100.0
    eigenvalues, eigenvectors = torch.linalg.eigh(symmetric)
    largest = float(eigenvalues.max())
    if not largest > 0.0:
        raise ValueError("cannot factor a matrix without a positive eigenvalue")
    clipped = eigenvalues.clamp(min=EIGENVALUE_FLOOR * largest)
    return lower_factor_of_product(eigenvectors * clipped.sqrt())


def lower_factor_of_product(factor: torch.Tensor) -> torch.Tensor:
    """Lower-triangular ``L`` with positive diagonal and ``L L^T = A A^T`` for ``A`` of shape ``(D, K)``, ``K >= D``.

    From the QR factorisation ``A^T = Q R``: ``A A^T = R^T R``, so ``L = R^T`` with the signs of its columns fixed.
    It never forms ``A A^T``, so it keeps the accuracy a Cholesky factorisation of the product would square away.
    """
    _, upper = torch.linalg.qr(factor.transpose(-1, -2), mode="r")
    signs = torch.sign(upper.diagonal())
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return (upper * signs.unsqueeze(-1)).transpose(-1, -2)


def scale_tril_from_covariance(covariance_matrix: torch.Tensor) -> torch.Tensor:
    """Cholesky factor of a covariance matrix (:func:`safe_cholesky`)."""
    return safe_cholesky(covariance_matrix)


def scale_tril_from_precision(precision: torch.Tensor) -> torch.Tensor:
    """Cholesky factor of the covariance ``precision^{-1}``, e.g. from the Hessian of ppvi's Laplace start.

    ``precision = P P^T`` gives ``precision^{-1} = P^{-T} P^{-1}``, whose lower factor is taken from the product
    ``P^{-T}`` (:func:`lower_factor_of_product`) without forming the inverse.
    """
    precision_factor = safe_cholesky(precision)
    identity = torch.eye(precision.shape[-1], dtype=precision.dtype, device=precision.device)
    inverse_factor = torch.linalg.solve_triangular(precision_factor, identity, upper=False)  # P^{-1}
    return lower_factor_of_product(inverse_factor.transpose(-1, -2))


def _evaluate(log_density: LogDensity, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.enable_grad():
        leaf = points.detach().requires_grad_(True)
        values = log_density(leaf)
        if values.shape != points.shape[:1]:
            raise ValueError(
                f"the log density returned shape {tuple(values.shape)} for {points.shape[0]} points; expected "
                f"({points.shape[0]},)"
            )
        if not values.requires_grad:  # a log density that does not depend on the point: a zero gradient
            return values.detach(), torch.zeros_like(points)
        (gradients,) = torch.autograd.grad(values.sum(), leaf)
    return values.detach(), gradients.detach()


def value_and_gradient(log_density: LogDensity, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Values ``(B,)`` and gradients ``(B, D)`` of a batched log density at ``points`` ``(B, D)``.

    One backward pass of the sum gives every row's gradient, since row ``b`` depends on point ``b`` only: the cost is
    ``B`` gradient evaluations. If Pyro's argument validation rejects the batch (a point overflowing to an infinite
    or NaN parameter), the rows are evaluated one at a time and the rejected ones reported as ``-inf`` with NaN
    gradients; callers treat a row whose value or gradient is not finite as outside the support.
    """
    try:
        return _evaluate(log_density, points)
    except ValueError as error:
        if not is_invalid_value_error(error):
            raise
    values = torch.full(points.shape[:1], -math.inf, dtype=points.dtype, device=points.device)
    gradients = torch.full_like(points, math.nan)
    for row in range(points.shape[0]):
        try:
            value, gradient = _evaluate(log_density, points[row : row + 1])
        except ValueError as error:
            if not is_invalid_value_error(error):
                raise
            continue
        values[row], gradients[row] = value[0], gradient[0]
    return values, gradients


def finite_rows(values: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """``(B,)`` bool: rows whose log density and gradient are all finite."""
    return torch.isfinite(values) & torch.isfinite(gradients).all(-1)


# -- a Pyro model as a batched log density on its unconstrained coordinates -----------------------------------------


class _Site(NamedTuple):
    name: str
    start: int
    stop: int
    unconstrained_shape: torch.Size
    unconstrained_event_dim: int
    shape: torch.Size
    event_dim: int


class ModelLogDensity:
    """The unconstrained log density ``z -> log p(x, T(z)) + log|det J_T(z)|`` of a Pyro model, batched over points.

    Built by :func:`log_density_of`. The flat vector ``z`` lays the latent sites out in the model's order, each
    site's unconstrained value flattened; each site is constrained by ``biject_to`` of its support in the run itself
    (:class:`ppvi.constrain.ConstrainMessenger`), with its log-Jacobian added, as ppvi's own guides do.

    Attributes
    ----------
    dimension : int
        Number of unconstrained coordinates ``D``.
    site_names : tuple of str
        The latent sites, in the order of the flat vector.
    site_shapes : dict of str to torch.Size
        Each latent site's constrained shape.
    vectorized : bool
        Whether a batch is evaluated by one run of the model inside a plate of the draws (the model broadcasts over
        a leading batch dimension), or, if the model does not, by one run per point.
    """

    def __init__(
        self,
        model: Callable,
        args: tuple,
        kwargs: dict,
        sites: Sequence[_Site],
        max_plate_nesting: int,
    ) -> None:
        self.model, self.args, self.kwargs = model, args, kwargs
        self._sites = tuple(sites)
        self.max_plate_nesting = max_plate_nesting
        self.dimension = sites[-1].stop if sites else 0
        self.site_names = tuple(site.name for site in sites)
        self.site_shapes = {site.name: site.shape for site in sites}
        self.vectorized = True

    def _batch(self, count: int | None) -> tuple[int, ...]:
        return () if count is None else (count,) + (1,) * self.max_plate_nesting

    def _pieces(self, points: torch.Tensor, count: int | None) -> dict[str, torch.Tensor]:
        """Split flat points ``(count, D)`` (or ``(D,)`` for ``count=None``) into per-site unconstrained values laid
        out for a run in the draws' plate, as Pyro's ``AutoContinuous._unpack_latent`` does: each site's shape
        broadcast against the draws' batch shape padded to the site's event dimensions."""
        batch = self._batch(count)
        pieces = {}
        for site in self._sites:
            shape = torch.broadcast_shapes(site.unconstrained_shape, batch + (1,) * site.unconstrained_event_dim)
            pieces[site.name] = points[..., site.start : site.stop].reshape(shape)
        return pieces

    def _plate(self, count: int | None):
        if count is None:
            return contextlib.nullcontext()
        return pyro.plate("_ppvi_solver_draws", count, dim=-(self.max_plate_nesting + 1))

    def _run(self, points: torch.Tensor, count: int | None) -> tuple[poutine.Trace, ConstrainMessenger]:
        constrain = ConstrainMessenger(self._pieces(points, count), () if count is None else (count,))
        with self._plate(count), constrain:
            trace = poutine.trace(self.model).get_trace(*self.args, **self.kwargs)
        return trace, constrain

    def _site_log_densities(self, trace: poutine.Trace):
        """Each sample site's scaled and masked log density, as Pyro's ``Trace.compute_log_prob`` computes it but
        without its NaN/inf warnings (a point outside the support is an expected event here, reported as a
        non-finite value) and without the backward hooks that would warn again on the gradient."""
        for site in trace.nodes.values():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            log_prob = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
            yield site["name"], scale_and_mask(log_prob, site["scale"], site["mask"])

    def _batched(self, points: torch.Tensor) -> torch.Tensor:
        count = points.shape[0]
        trace, constrain = self._run(points, count)
        total = constrain.log_abs_det_jacobian + torch.zeros(count, dtype=points.dtype, device=points.device)
        draws_dimension = self.max_plate_nesting + 1
        for name, log_prob in self._site_log_densities(trace):
            if not isinstance(log_prob, torch.Tensor) or log_prob.dim() < draws_dimension:
                total = total + log_prob.sum() if isinstance(log_prob, torch.Tensor) else total + log_prob
            elif log_prob.dim() == draws_dimension:
                total = total + log_prob.reshape(log_prob.shape[0], -1).sum(-1)
            else:
                raise ValueError(f"site {name!r} has batch dimensions left of the draws' plate")
        return total

    def _looped(self, points: torch.Tensor) -> torch.Tensor:
        values = []
        for row in range(points.shape[0]):
            trace, constrain = self._run(points[row], None)
            log_joint = sum(log_prob.sum() for _, log_prob in self._site_log_densities(trace))
            values.append(log_joint + constrain.log_abs_det_jacobian)
        return torch.stack(values)

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        """Log densities ``(B,)`` at unconstrained points ``(B, D)``."""
        if points.dim() != 2 or points.shape[-1] != self.dimension:
            raise ValueError(f"expected points of shape (B, {self.dimension}), got {tuple(points.shape)}")
        return self._batched(points) if self.vectorized else self._looped(points)

    def constrain(self, points: torch.Tensor, deterministic: bool = False) -> dict[str, torch.Tensor]:
        """The latent sites' constrained values at unconstrained points ``(B, D)``: ``{name: (B, *site_shape)}``.

        With ``deterministic=True``, the model's ``pyro.deterministic`` sites too (eight schools' ``theta``, the
        quantities posteriordb's reference draws often hold).
        """
        count = points.shape[0]

        def wanted(site: dict) -> bool:
            return site["name"] in self.site_shapes or (deterministic and site["infer"].get("_deterministic", False))

        with torch.no_grad():
            trace, _ = self._run(points[0], None)
            shapes = {name: site["value"].shape for name, site in trace.nodes.items()
                      if site["type"] == "sample" and wanted(site)}
            if self.vectorized:
                trace, _ = self._run(points, count)
                return {name: trace.nodes[name]["value"].reshape(count, *shape) for name, shape in shapes.items()}
            values: dict[str, list[torch.Tensor]] = {name: [] for name in shapes}
            for row in range(count):
                trace, _ = self._run(points[row], None)
                for name in shapes:
                    values[name].append(trace.nodes[name]["value"])
        return {name: torch.stack(value) for name, value in values.items()}

    def unconstrain(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """Unconstrained points ``(B, D)`` of the latent sites' constrained values ``{name: (B, *site_shape)}``.

        The inverse of :meth:`constrain`: the model runs conditioned on the values, and each site's value is mapped
        back by the inverse of ``biject_to`` of its support in that run (so a support that depends on other sites,
        an ordered vector's, say, is the right one). Useful to compare reference draws with a Gaussian's exact
        moments on the coordinates it lives on.
        """
        count = next(iter(values.values())).shape[0]
        if self.vectorized:
            batch = self._batch(count)
            laid_out = {
                site.name: torch.as_tensor(values[site.name], dtype=torch.float64).reshape(
                    torch.broadcast_shapes(site.shape, batch + (1,) * site.event_dim)
                )
                for site in self._sites
            }
            with torch.no_grad(), self._plate(count):
                trace = poutine.trace(poutine.condition(self.model, laid_out)).get_trace(*self.args, **self.kwargs)
            pieces = []
            for site in self._sites:
                node = trace.nodes[site.name]
                unconstrained = support_transform(node["fn"].support).inv(node["value"])
                pieces.append(unconstrained.reshape(count, -1))
            return torch.cat(pieces, dim=-1)
        rows = []
        for row in range(count):
            conditioned = {name: torch.as_tensor(value[row], dtype=torch.float64) for name, value in values.items()}
            with torch.no_grad():
                trace = poutine.trace(poutine.condition(self.model, conditioned)).get_trace(*self.args, **self.kwargs)
            rows.append(torch.cat([
                support_transform(trace.nodes[site.name]["fn"].support).inv(trace.nodes[site.name]["value"]).reshape(-1)
                for site in self._sites
            ]))
        return torch.stack(rows)


def _as_float64(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.double()
    return value


#: Points at which :func:`log_density_of` checks that the batched evaluation agrees with one run per point.
_CHECK_POINTS = 3
#: Relative agreement required of that check: float64 sums of a few thousand terms in another order.
_CHECK_TOLERANCE = 1e-9


def log_density_of(model: Callable, *args: Any, **kwargs: Any) -> ModelLogDensity:
    """A Pyro model as a batched log density on its unconstrained coordinates, in float64.

    The model is traced once at the point ``T(0)`` of every latent site's support (no draw from the prior, so flat
    ``ImproperUniform`` priors are no obstacle) to find its latent sites, their supports and shapes, and its plate
    nesting. Floating-point tensor arguments are converted to float64.

    A batch of points is evaluated by one run of the model inside a plate of the draws, left of the model's own
    plates, which works when the model broadcasts over a leading batch dimension (ppvi's model library does). At
    construction the batched evaluation is compared with one run per point at a few random points; if it fails or
    disagrees, the returned log density evaluates one point at a time (``vectorized`` is then False).

    Parameters
    ----------
    model : callable
        A Pyro model; its observed sites must be conditioned (``obs=``) by its arguments.
    *args, **kwargs
        The model's arguments.

    Returns
    -------
    ModelLogDensity
    """
    args = tuple(_as_float64(value) for value in args)
    kwargs = {key: _as_float64(value) for key, value in kwargs.items()}
    with torch.no_grad():
        prototype = poutine.trace(InitMessenger(init_to_feasible_point)(model)).get_trace(*args, **kwargs)
    sites, start, max_plate_nesting = [], 0, 0
    for site in prototype.nodes.values():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        frames = [frame for frame in site["cond_indep_stack"] if frame.vectorized and frame.dim is not None]
        if frames:
            max_plate_nesting = max(max_plate_nesting, max(-frame.dim for frame in frames))
        if site["is_observed"]:
            continue
        if site["fn"].support.is_discrete:
            raise ValueError(f"site {site['name']!r} is discrete: the Gaussian solvers need continuous latent sites")
        transform = support_transform(site["fn"].support)
        value = site["value"]
        unconstrained_shape = torch.Size(transform.inv(value).shape)
        unconstrained_event_dim = site["fn"].event_dim + len(unconstrained_shape) - value.dim()
        size = unconstrained_shape.numel()
        sites.append(
            _Site(
                site["name"], start, start + size, unconstrained_shape, unconstrained_event_dim, value.shape,
                site["fn"].event_dim,
            )
        )
        start += size
    if not sites:
        raise ValueError("the model has no continuous latent site")
    density = ModelLogDensity(model, args, kwargs, sites, max_plate_nesting)
    generator = torch.Generator().manual_seed(0)
    points = torch.randn(_CHECK_POINTS, density.dimension, dtype=torch.float64, generator=generator)
    looped = density._looped(points)
    try:
        batched = density._batched(points)
        agrees = bool(torch.allclose(batched, looped, rtol=_CHECK_TOLERANCE, atol=_CHECK_TOLERANCE, equal_nan=True))
    except Exception:  # any failure of the batched run means: evaluate point by point
        agrees = False
    density.vectorized = agrees
    return density


def initial_gaussian(
    loc: torch.Tensor, scale_tril: torch.Tensor | None = None, covariance_matrix: torch.Tensor | None = None
) -> GaussianApproximation:
    """A starting Gaussian from a mean and a Cholesky factor or a covariance (the identity if neither), in float64."""
    if scale_tril is not None and covariance_matrix is not None:
        raise ValueError("give scale_tril or covariance, not both")
    loc = torch.as_tensor(loc, dtype=torch.float64).detach().clone()
    if loc.dim() != 1:
        raise ValueError(f"loc must have shape (D,), got {tuple(loc.shape)}")
    dimension = loc.shape[0]
    if scale_tril is None and covariance_matrix is None:
        return GaussianApproximation(loc, torch.eye(dimension, dtype=loc.dtype, device=loc.device))
    matrix = scale_tril if scale_tril is not None else covariance_matrix
    matrix = torch.as_tensor(matrix, dtype=loc.dtype, device=loc.device).detach().clone()
    if matrix.shape != (dimension, dimension):
        raise ValueError(f"expected a ({dimension}, {dimension}) matrix, got {tuple(matrix.shape)}")
    if scale_tril is None:
        return GaussianApproximation(loc, safe_cholesky(matrix))
    if not bool(torch.equal(matrix, matrix.tril())) or not bool((matrix.diagonal() > 0).all()):
        raise ValueError("scale_tril must be lower triangular with a positive diagonal")
    return GaussianApproximation(loc, matrix)


#: Jeffreys divergence per coordinate below which two iterates are the same up to float64 round-off (relative
#: changes of 1e-5 in a standard deviation): an exactly converged solver (a Gaussian target) moves by this little,
#: and the ratio of two such round-off numbers says nothing about drift.
ROUND_OFF_DIVERGENCE = 1e-10


class MovementRule(NamedTuple):
    """When a stochastic Gaussian solver stops: its iterate has stopped travelling and only jitters.

    Two statistics, both Jeffreys divergences between iterates (:func:`jeffreys_divergence`: no knowledge of the
    answer, invariant under affine maps of the coordinates): the net movement ``J(q_{t-w}, q_t)`` over the last
    ``w = window`` iterations, and the mean single-step movement ``J(q_{s-1}, q_s)`` over them. The rule holds when

    * the net movement is below ``tolerance * D``: per coordinate, 0.01 nats is a mean that moved by 0.1 of its
      standard deviation over the window, or a standard deviation that changed by 7 %; an iterate that jitters
      around its fixed point by ``s`` standard deviations per coordinate gives about ``2 s^2``, so the rule lets
      through jitter of 0.07 sds, and the average of the window's iterates, which the solvers return, has about
      ``1 / sqrt(window)`` of that (0.025 sds for the default window of 8);
    * and the net movement is at most ``drift_ratio`` times the mean single step (or below
      :data:`ROUND_OFF_DIVERGENCE` per coordinate). Iterates that jitter independently around a fixed point are as
      far from each other ``w`` steps apart as one step apart (ratio about 1); a drift of ``v`` per step gives a
      ratio of ``w^2`` (25). A ratio of 4, a net displacement at most twice a typical step, separates the two and
      keeps a slow solver (GSM averaging its single-draw updates creeps by a few hundredths of a standard deviation
      per step) from passing its small steps off as convergence.

    Attributes
    ----------
    tolerance : float
        Net Jeffreys divergence over the window, per coordinate, nats.
    window : int
        Iterations tested, and averaged into the returned Gaussian; also the fewest iterations a run takes. BaM
        from ppvi's Laplace start, 5 seeds (benchmarks/README.md): a window of 5 left kilpisjarvi's worst mean 0.11
        reference sds off (one seed stopped after 5 iterations, 60 gradient evaluations), 8 left it 0.05 and sblrc
        0.07, arK 0.045, with at most 280 evaluations on these (kidiq 108); 10 cost up to 336 on sblrc for no
        better accuracy.
    drift_ratio : float
        Largest ratio of the net movement to the mean single-step movement.
    """

    tolerance: float = 0.01
    window: int = 8
    drift_ratio: float = 4.0

    def holds(self, iterates: Sequence[GaussianApproximation], steps: Sequence[float]) -> bool:
        """Whether the rule holds, given at least the last ``window + 1`` iterates (oldest first) and the
        single-step divergences of the run (refused steps as ``inf``)."""
        if len(iterates) < self.window + 1 or len(steps) < self.window:
            return False
        dimension = iterates[-1].loc.shape[-1]
        net = jeffreys_divergence(iterates[-self.window - 1], iterates[-1])
        if not net < self.tolerance * dimension:
            return False
        if net < ROUND_OFF_DIVERGENCE * dimension:
            return True
        typical = sum(steps[-self.window :]) / self.window
        return net <= self.drift_ratio * typical

    def describe(self, iterations: int) -> str:
        return (
            f"converged after {iterations} iterations: over the last {self.window} the Gaussian moved less than "
            f"{self.tolerance:g} nats per coordinate (Jeffreys divergence), without drift"
        )


def average(approximations: Sequence[GaussianApproximation]) -> GaussianApproximation:
    """Polyak-Ruppert average of a solver's last iterates: the mean of their means and of their covariances (not the
    mixture's covariance, whose spread of means is the solver's noise, not the target's)."""
    loc = torch.stack([approximation.loc for approximation in approximations]).mean(0)
    covariance_matrix = torch.stack([covariance(approximation) for approximation in approximations]).mean(0)
    return GaussianApproximation(loc, safe_cholesky(covariance_matrix))


class SolverResult(NamedTuple):
    """Result of an iterative Gaussian solver's ``run`` (Batch-and-Match, Gaussian score matching).

    Attributes
    ----------
    loc, scale_tril : torch.Tensor
        The fitted Gaussian, in the coordinates of the log density.
    iterations : int
        Iterations taken.
    gradient_evaluations : int
        Points at which the gradient of ``log p`` was evaluated: ``B`` per iteration.
    converged : bool
        Whether the stopping rule held before ``max_iterations``.
    elbo, score_divergence, step_divergence : torch.Tensor
        Per-iteration traces of the solver's ``Info`` fields (float64, length ``iterations``).
    message : str
        How the run ended.
    """

    loc: torch.Tensor
    scale_tril: torch.Tensor
    iterations: int
    gradient_evaluations: int
    converged: bool
    elbo: torch.Tensor
    score_divergence: torch.Tensor
    step_divergence: torch.Tensor
    message: str


def iterate_until_settled(
    state: Any, advance: Callable[[Any], tuple[Any, Any]], max_iterations: int, stopping_rule: MovementRule | None
) -> SolverResult:
    """The loop of an iterative Gaussian solver's ``run`` (Batch-and-Match, Gaussian score matching): ``advance``
    the state until ``stopping_rule`` holds or ``max_iterations`` pass, and return the average of the last
    ``stopping_rule.window`` iterates (:func:`average`) with the traces of each step's ``Info``.

    ``state`` has ``loc``, ``scale_tril``, ``iteration`` and ``gradient_evaluations``; ``advance(state)`` returns the
    next state and an ``Info`` with ``elbo``, ``score_divergence`` and ``step_divergence``.
    """
    rule = MovementRule() if stopping_rule is None else stopping_rule
    elbo, score_divergence, movement = [], [], []
    iterates = [GaussianApproximation(state.loc, state.scale_tril)]
    converged, message = False, f"stopped at max_iterations={max_iterations}"
    for _ in range(max_iterations):
        state, info = advance(state)
        elbo.append(info.elbo)
        score_divergence.append(info.score_divergence)
        movement.append(info.step_divergence)
        iterates = [*iterates[-rule.window :], GaussianApproximation(state.loc, state.scale_tril)]
        if rule.holds(iterates, movement):
            converged, message = True, rule.describe(len(movement))
            break
    final = average(iterates[-rule.window :])

    def as_tensor(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float64)

    return SolverResult(
        final.loc, final.scale_tril, state.iteration, state.gradient_evaluations, converged,
        as_tensor(elbo), as_tensor(score_divergence), as_tensor(movement), message,
    )
