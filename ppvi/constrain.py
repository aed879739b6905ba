"""The latent sites of a model from a flat unconstrained vector, each constrained by its support in this very run.

ADVI (Kucukelbir et al. 2017) places its guide on unconstrained coordinates ``z`` and maps each site to its support
with a bijection ``T`` (``torch.distributions.biject_to``), adding ``log|det J_T(z)|`` to the log density. Pyro's
:class:`~pyro.infer.autoguide.AutoContinuous`, and NumPyro's autoguides and ``potential_energy`` likewise, build
``T`` once, from a prototype trace of the model, and keep it. A support that depends on another parameter,
``beta ~ Uniform(0, 1 - alpha)`` as volatility and ordered models write, then keeps the bound of the prototype's
``alpha``: draws break ``beta < 1 - alpha`` and the density is that of the wrong space.

:class:`ConstrainMessenger` does what Stan does: the model runs, and at each latent site the unconstrained value
is mapped by ``biject_to`` of the distribution the model builds *in this run*, whose support may depend on the
values already drawn. The Jacobian of the whole map is triangular in the model's order (a site's value depends on
its own coordinates and on earlier sites), so its log-determinant is the sum of the sites' own, which the
messenger accumulates per draw.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from torch.distributions import biject_to
from torch.distributions.transforms import CorrCholeskyTransform, StickBreakingTransform, Transform

from ppvi.engine import multivariate_normal_log_density, symbolic_triangular_solve

__all__ = [
    "ConstrainMessenger",
    "SymbolicBatchMessenger",
    "SymbolicCorrCholeskyTransform",
    "SymbolicLowRankMultivariateNormal",
    "SymbolicMultivariateNormal",
    "SymbolicMultivariateStudentT",
    "SymbolicStickBreakingTransform",
    "constrained_trace",
    "support_transform",
]


class SymbolicStickBreakingTransform(StickBreakingTransform):
    """torch's stick-breaking map onto the simplex (:class:`~torch.distributions.transforms.StickBreakingTransform`),
    the same arithmetic with its two paddings by a column of ones written as concatenations.

    ``torch.nn.functional.pad`` tests the size of every dimension of its input while a graph is traced with a
    symbolic batch size (``Eq(A, 40)`` for 40 replications), which ties the traced step to that one size and sends
    calibration of any model with a Dirichlet site back to the Pyro path. A concatenation holds for every size.
    """

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        offset = x.shape[-1] + 1 - x.new_ones(x.shape[-1]).cumsum(-1)
        finfo = torch.finfo(x.dtype)  # torch's _clipped_sigmoid: the sigmoid kept inside (0, 1)
        z = torch.clamp(torch.sigmoid(x - offset.log()), min=finfo.tiny, max=1.0 - finfo.eps)
        z_cumprod = (1 - z).cumprod(-1)
        ones = z.new_ones(*z.shape[:-1], 1)
        return torch.cat([z, ones], dim=-1) * torch.cat([ones, z_cumprod], dim=-1)


def _strictly_lower_matrix(vector: torch.Tensor) -> torch.Tensor:
    """``(..., n (n - 1) / 2) -> (..., n, n)``: the entries below the diagonal filled in row order, as
    ``torch.distributions.utils.vec_to_tril_matrix(vector, diag=-1)`` does, by gathering from the vector with one
    zero put in front. torch's boolean-mask assignment needs the number of entries as a concrete integer, which a
    graph traced with a symbolic batch size does not have."""
    count = vector.shape[-1]
    size = round((1 + math.sqrt(1 + 8 * count)) / 2)  # the positive root of n^2 - n - 2 count = 0
    rows, columns = torch.tril_indices(size, size, offset=-1)
    source = torch.zeros(size * size, dtype=torch.long)  # 0: the zero in front; k + 1: the vector's entry k
    source[rows * size + columns] = torch.arange(1, count + 1)
    padded = torch.cat([vector.new_zeros(*vector.shape[:-1], 1), vector], dim=-1)
    return padded.index_select(-1, source.to(vector.device)).reshape(*vector.shape[:-1], size, size)


class SymbolicCorrCholeskyTransform(CorrCholeskyTransform):
    """torch's map onto Cholesky factors of correlation matrices (LKJ sites,
    :class:`~torch.distributions.transforms.CorrCholeskyTransform`) with its padding by a column of ones written as a
    concatenation, for the reason :class:`SymbolicStickBreakingTransform` gives, and the vector laid out below the
    diagonal by :func:`_strictly_lower_matrix`."""

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(x)
        eps = torch.finfo(x.dtype).eps
        x = x.clamp(min=-1 + eps, max=1 - eps)
        r = _strictly_lower_matrix(x)
        z1m_cumprod_sqrt = (1 - r**2).sqrt().cumprod(-1)  # stick-breaking on the squared values, as torch
        r = r + torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
        ones = z1m_cumprod_sqrt.new_ones(*z1m_cumprod_sqrt.shape[:-1], 1)
        return r * torch.cat([ones, z1m_cumprod_sqrt[..., :-1]], dim=-1)


#: torch's transforms that pad, and ppvi's versions of them that concatenate instead.
_SYMBOLIC_TRANSFORMS = {
    StickBreakingTransform: SymbolicStickBreakingTransform, CorrCholeskyTransform: SymbolicCorrCholeskyTransform,
}


def support_transform(support: torch.distributions.constraints.Constraint) -> Transform:
    """``biject_to(support)``, with :class:`SymbolicStickBreakingTransform` for a simplex and
    :class:`SymbolicCorrCholeskyTransform` for Cholesky factors of correlation matrices: the maps from unconstrained
    coordinates that hold in a graph traced for any number of replications."""
    transform = biject_to(support)
    replacement = _SYMBOLIC_TRANSFORMS.get(type(transform))
    return transform if replacement is None else replacement(cache_size=transform._cache_size)


class SymbolicMultivariateNormal(dist.MultivariateNormal):
    """Pyro's multivariate normal with its density written for a graph traced with a symbolic batch size.

    torch's ``MultivariateNormal.log_prob`` reshapes the draws by a batch shape it computes in Python
    (``_batch_mahalanobis``), which fails on symbolic sizes (torch 2.13: "SymIntArrayRef expected to contain only
    concrete integers"), so a model with a multivariate normal likelihood could not calibrate on the traced step.
    Here the density is :func:`ppvi.engine.multivariate_normal_log_density`: one broadcast triangular solve.
    """

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return multivariate_normal_log_density(value - self.loc, self._unbroadcasted_scale_tril)


class SymbolicLowRankMultivariateNormal(dist.LowRankMultivariateNormal):
    """Pyro's low-rank multivariate normal, ``N(loc, W W^T + diag(d))``, with its density written for a graph traced
    with a symbolic batch size (torch's reshapes by batch shapes computed in Python, as the full-rank one does; see
    :class:`SymbolicMultivariateNormal`).

    The same Woodbury identities as torch's (``log|Sigma| = log|C| + sum log d`` and the Mahalanobis term through the
    capacitance ``C = I + W^T D^-1 W``, whose Cholesky factor torch computed when the distribution was built), with
    one broadcast triangular solve of the rank's size.
    """

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        difference = value - self.loc
        factor, diagonal = self._unbroadcasted_cov_factor, self._unbroadcasted_cov_diag
        projected = (factor * (difference / diagonal).unsqueeze(-1)).sum(-2)  # W^T D^-1 (x - loc)
        capacitance = self._capacitance_tril
        solved = symbolic_triangular_solve(capacitance, projected.unsqueeze(-1), upper=False).squeeze(-1)
        mahalanobis = (difference.pow(2) / diagonal).sum(-1) - solved.pow(2).sum(-1)
        log_determinant = 2 * torch.diagonal(capacitance, dim1=-2, dim2=-1).log().sum(-1) + diagonal.log().sum(-1)
        return -0.5 * (difference.shape[-1] * math.log(2 * math.pi) + log_determinant + mahalanobis)


class SymbolicMultivariateStudentT(dist.MultivariateStudentT):
    """Pyro's multivariate Student t with its density written for a graph traced with a symbolic batch size: the
    same formula as Pyro's, with its ``torch.linalg.solve_triangular`` (which does not trace with a symbolic batch
    in torch 2.13) replaced by :func:`ppvi.engine.symbolic_triangular_solve`."""

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        size = self.loc.shape[-1]
        whitened = symbolic_triangular_solve(self.scale_tril, (value - self.loc).unsqueeze(-1), upper=False)
        normalizer = (
            torch.diagonal(self.scale_tril, dim1=-2, dim2=-1).log().sum(-1) + 0.5 * size * self.df.log()
            + 0.5 * size * math.log(math.pi) + torch.lgamma(0.5 * self.df) - torch.lgamma(0.5 * (self.df + size))
        )
        return -0.5 * (self.df + size) * torch.log1p(whitened.squeeze(-1).pow(2).sum(-1) / self.df) - normalizer


#: The distributions whose torch or Pyro density does not trace with a symbolic batch size, and their replacements.
_SYMBOLIC_REPLACEMENTS: dict[type, type] = {
    dist.MultivariateNormal: SymbolicMultivariateNormal,
    torch.distributions.MultivariateNormal: SymbolicMultivariateNormal,
    dist.LowRankMultivariateNormal: SymbolicLowRankMultivariateNormal,
    torch.distributions.LowRankMultivariateNormal: SymbolicLowRankMultivariateNormal,
    dist.MultivariateStudentT: SymbolicMultivariateStudentT,
}


def _symbolic_distribution(distribution: torch.distributions.Distribution) -> torch.distributions.Distribution:
    """``distribution`` with each distribution of :data:`_SYMBOLIC_REPLACEMENTS` in it (also under ``to_event``) as
    its replacement, with the same parameters; any other as it is."""
    replacement = _SYMBOLIC_REPLACEMENTS.get(type(distribution))
    if replacement is not None:
        symbolic = object.__new__(replacement)
        symbolic.__dict__.update(distribution.__dict__)  # the same parameters, shapes and cached properties
        return symbolic
    if isinstance(distribution, torch.distributions.Independent):
        base = _symbolic_distribution(distribution.base_dist)
        if base is not distribution.base_dist:
            return type(distribution)(base, distribution.reinterpreted_batch_ndims, validate_args=False)
    return distribution


class SymbolicBatchMessenger(Messenger):
    """Give every sample site of a model the densities that hold in a graph traced for any number of replications
    (:data:`_SYMBOLIC_REPLACEMENTS`), as the batched calibration step traces it."""

    def _pyro_sample(self, msg: dict) -> None:
        msg["fn"] = _symbolic_distribution(msg["fn"])


class ConstrainMessenger(Messenger):
    """Condition a model's latent sites on unconstrained values, constraining each with its support in this run.

    Parameters
    ----------
    unconstrained : mapping of str to torch.Tensor
        For each latent site, its unconstrained value: ``(*batch, *unconstrained_shape)`` with ``batch`` the
        draws' dimensions (none for one point, ``(S,) + (1,) * max_plate_nesting`` for ``S`` draws in a plate
        left of the model's), as :meth:`pyro.infer.autoguide.AutoContinuous._unpack_latent` splits them.
    batch_shape : tuple of int
        The draws' leading dimensions in every value (``(S,)`` for ``S`` draws, ``(S, M)`` for draws of ``M``
        replications, ``()`` for one point).

    Attributes
    ----------
    log_abs_det_jacobian : torch.Tensor
        After the run: ``log|det J_T(z)|`` of every draw, of shape ``batch_shape``.
    values : dict of str to torch.Tensor
        After the run: the constrained value of every site.
    """

    def __init__(self, unconstrained: Mapping[str, torch.Tensor], batch_shape: tuple[int, ...] = ()):
        super().__init__()
        self.unconstrained = dict(unconstrained)
        self.batch_shape = tuple(batch_shape)
        self.values: dict[str, torch.Tensor] = {}
        self.log_abs_det_jacobian: torch.Tensor | float = 0.0

    def _pyro_sample(self, msg: dict) -> None:
        name = msg["name"]
        if msg["is_observed"] or name not in self.unconstrained:
            return
        unconstrained = self.unconstrained[name]
        transform = support_transform(msg["fn"].support)
        value = transform(unconstrained)
        jacobian = transform.log_abs_det_jacobian(unconstrained, value)
        # Every dimension but the draws' (the leftmost of every value in a batch) belongs to the site.
        per_draw = jacobian.reshape(*self.batch_shape, -1).sum(-1)
        self.log_abs_det_jacobian = self.log_abs_det_jacobian + per_draw
        self.values[name] = value
        msg["value"] = value
        msg["is_observed"] = True


def constrained_trace(
    model: Callable, args: tuple, kwargs: dict, unconstrained: Mapping[str, torch.Tensor], num_draws: int | None,
    max_plate_nesting: int,
) -> tuple[poutine.Trace, ConstrainMessenger]:
    """Run ``model`` once on unconstrained values (a batch of ``num_draws`` in a plate left of the model's own
    ``max_plate_nesting`` plates, or one point) and return its trace and the messenger, which holds the constrained
    values and the log-Jacobian per draw."""
    messenger = ConstrainMessenger(unconstrained, () if num_draws is None else (num_draws,))
    constrained = messenger(model)
    if num_draws is not None:
        constrained = pyro.plate("_ppvi_draws", num_draws, dim=-(max_plate_nesting + 1))(constrained)
    trace = poutine.trace(constrained).get_trace(*args, **kwargs)
    return trace, messenger
