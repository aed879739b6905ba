"""The guide registry and the guide families behind it.

Every registered family except ``"map"`` is an ADVI-style guide (Kucukelbir et al. 2017, "Automatic
differentiation variational inference", JMLR 18): all latent sites are mapped to one flat unconstrained vector
``z`` and a distribution is placed on ``z``. Pyro's :class:`~pyro.infer.autoguide.AutoContinuous` owns the
flattening and the constraints; :class:`PreconditionedGuide` adds one thing to it, a fixed affine
*preconditioner*

.. math::

    z = m_0 + S_0 w, \\qquad w \\sim q_\\phi(w),

where ``m_0`` and ``S_0`` come from a Laplace approximation at the posterior mode (see
:mod:`ppvi.initialization`) and each family supplies only ``q_phi``, initialised at the identity (``w ~ N(0, I)``).
The optimiser then works in coordinates where the posterior is close to a standard normal, so one learning rate
suits every model however badly scaled or correlated its parameters are (an un-centred regression predictor, say).
Mean-field and low-rank families take the diagonal of the preconditioner only, so they stay what their name says.

The registry :data:`GUIDES` maps a name to a :class:`GuideSpec`; add your own with ``GUIDES["name"] = GuideSpec(...)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.transforms import AffineAutoregressive, BlockAutoregressive
from pyro.infer.autoguide import AutoContinuous, AutoDelta, AutoGuide
from pyro.infer.autoguide.guides import prototype_hide_fn
from pyro.nn import AutoRegressiveNN, PyroParam
from torch import nn

from ppvi.initialization import init_to_median_or_feasible

PreconditionerStructure = Literal["full", "diagonal"]

#: Initial scale of every unconstrained coordinate when no Laplace start is available; Pyro's own default,
#: small enough that the first steps do not sample absurd values from a poorly initialised guide.
DEFAULT_INIT_SCALE = 0.1


def _hide_enumerated(message: dict) -> bool:
    """Hide enumerated discrete sites from the prototype too: the ELBO sums them out, the guide never sees them."""
    return prototype_hide_fn(message) or message.get("infer", {}).get("enumerate") is not None


class PreconditionedGuide(AutoContinuous):
    """Base class: an ADVI guide over the flat unconstrained latent vector with a fixed affine preconditioner.

    Subclasses set :attr:`preconditioner_structure` and implement :meth:`_setup_family` (create the family's
    parameters so that ``q_phi`` starts at ``N(0, I)``) and :meth:`get_posterior` (the distribution of ``z``).

    Parameters
    ----------
    model : callable
        The Pyro model.
    init_loc_fn : callable
        Per-site initialisation used before any Laplace start (the prior median, or a feasible point for priors
        that cannot be sampled: :func:`ppvi.initialization.init_to_median_or_feasible`).
    init_scale : float
        Scale of every unconstrained coordinate until :meth:`set_preconditioner` is called.
    """

    preconditioner_structure: PreconditionerStructure = "full"
    _prototype_hide_fn = staticmethod(_hide_enumerated)

    def __init__(
        self,
        model: Callable,
        *,
        init_loc_fn: Callable = init_to_median_or_feasible,
        init_scale: float = DEFAULT_INIT_SCALE,
    ):
        if not init_scale > 0:
            raise ValueError(f"init_scale must be positive, got {init_scale}")
        self._init_scale = float(init_scale)
        self._fixed_latent: torch.Tensor | None = None
        super().__init__(model, init_loc_fn=init_loc_fn)

    # -- prototype and preconditioner ---------------------------------------------------------------------------
    def _setup_prototype(self, *args, **kwargs) -> None:
        super()._setup_prototype(*args, **kwargs)
        loc = self._init_loc()
        self.register_buffer("preconditioner_loc", loc)
        if self.preconditioner_structure == "full":
            self.register_buffer("preconditioner_scale", torch.eye(self.latent_dim).to(loc) * self._init_scale)
        else:
            self.register_buffer("preconditioner_scale", torch.full_like(loc, self._init_scale))
        self._setup_family(loc)

    def _setup_family(self, prototype: torch.Tensor) -> None:
        raise NotImplementedError

    def set_preconditioner(self, loc: torch.Tensor, precision: torch.Tensor) -> None:
        """Centre the guide on ``loc`` with the Gaussian of precision matrix ``precision`` as its starting shape.

        A ``"full"`` preconditioner is the Cholesky factor of ``precision^{-1}``; a ``"diagonal"`` one is
        ``1 / sqrt(diag(precision))``, which is the mean-field optimum of KL(q || p) for a Gaussian target
        (Bishop 2006, PRML, section 10.1.2), not the marginal standard deviation.
        """
        with torch.no_grad():
            self.preconditioner_loc.copy_(loc)
            if self.preconditioner_structure == "full":
                covariance = torch.cholesky_inverse(torch.linalg.cholesky(precision))
                self.preconditioner_scale.copy_(torch.linalg.cholesky(covariance))
            else:
                self.preconditioner_scale.copy_(precision.diagonal().rsqrt())

    def set_gaussian(self, loc: torch.Tensor, scale_tril: torch.Tensor) -> None:
        """Centre a ``"full"`` preconditioner on the Gaussian ``N(loc, scale_tril scale_tril^T)``: how a guide
        starts from another guide's answer (a flow from the full-rank fit)."""
        if self.preconditioner_structure != "full":
            raise ValueError("set_gaussian needs a full preconditioner; use set_preconditioner for this guide")
        with torch.no_grad():
            self.preconditioner_loc.copy_(loc)
            self.preconditioner_scale.copy_(scale_tril)

    def _precondition(self, loc: torch.Tensor, scale_tril: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map a whitened location and (diagonal or lower-triangular) scale to the unconstrained space."""
        if self.preconditioner_structure == "full":
            return self.preconditioner_loc + self.preconditioner_scale @ loc, self.preconditioner_scale @ scale_tril
        shifted = self.preconditioner_loc + self.preconditioner_scale * loc
        if scale_tril.dim() == 1:
            return shifted, self.preconditioner_scale * scale_tril
        return shifted, self.preconditioner_scale[:, None] * scale_tril

    # -- evaluating the model at a point ------------------------------------------------------------------------
    @contextlib.contextmanager
    def fixed_latent(self, latent: torch.Tensor, max_plate_nesting: int = 0) -> Iterator[None]:
        """Within the block, the guide is a point mass at the unconstrained ``latent``.

        The ELBO of a point-mass guide is the unconstrained log density ``log p(x, T(z)) + log|det J_T(z)|``:
        this is how ppvi evaluates the model at given points, enumerated sites summed out by the same ELBO.
        ``latent`` of shape ``(S, D)`` holds one point per particle of an ELBO with ``num_particles=S`` and
        ``vectorize_particles=True``, whose particle plate sits left of the model's ``max_plate_nesting`` plates.
        """
        if latent.dim() == 2:
            latent = latent.reshape(latent.shape[0], *(1,) * max_plate_nesting, latent.shape[1])
        self._fixed_latent = latent
        try:
            yield
        finally:
            self._fixed_latent = None

    def sample_latent(self, *args, **kwargs) -> torch.Tensor:
        if self._fixed_latent is not None:
            posterior = dist.Delta(self._fixed_latent).to_event(1)
            return pyro.sample(f"_{self._pyro_name}_latent", posterior, infer={"is_auxiliary": True})
        return super().sample_latent(*args, **kwargs)

    #: Whether ``posterior(detach=True)`` gives the path-derivative ("sticking the landing") ELBO estimator of
    #: Roeder, Wu & Duvenaud (2017): the score term of log q is dropped, so at an exact fit the gradient has zero
    #: variance. Families whose ``log_prob`` needs an expensive inverse (flows) use the ordinary estimator.
    supports_path_derivative = True

    def posterior(self, detach: bool = False) -> dist.Distribution:
        """The distribution of the flat unconstrained latent; with ``detach``, its parameters cut from the graph."""
        raise NotImplementedError

    def get_posterior(self, *args, **kwargs) -> dist.Distribution:
        return self.posterior()


def _detached(detach: bool, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.detach() for t in tensors) if detach else tensors


class MeanFieldGuide(PreconditionedGuide):
    """Independent normals on every unconstrained coordinate (mean-field ADVI)."""

    preconditioner_structure: PreconditionerStructure = "diagonal"

    def _setup_family(self, prototype: torch.Tensor) -> None:
        self.loc = nn.Parameter(torch.zeros_like(prototype))
        self.scale = PyroParam(torch.ones_like(prototype), constraints.softplus_positive)

    def posterior(self, detach: bool = False) -> dist.Distribution:
        loc, scale = self._precondition(*_detached(detach, self.loc, self.scale))
        return dist.Normal(loc, scale, validate_args=False).to_event(1)

    def _loc_scale(self, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        return self._precondition(self.loc, self.scale)


#: Largest full-rank guide whose factor is trained unscaled (see :class:`FullRankGuide`). Measured at the default
#: rate (0.1 in whitened coordinates): unscaled guides of 10 and 20 coordinates fit stably, those of 40 and more
#: random-walk into an ill-conditioned factor. Small guides (eight schools, the posteriordb regressions) keep the
#: parametrisation every figure so far was measured with.
UNSCALED_MAX_DIMENSION = 20


def factor_row_scale(dimension: int) -> torch.Tensor:
    """Per row ``i`` of a full-rank factor of ``dimension`` coordinates: ``1 / sqrt(max(i, 1))`` above
    :data:`UNSCALED_MAX_DIMENSION` coordinates, else 1."""
    rows = torch.arange(dimension, dtype=torch.float64).clamp(min=1)
    return rows.rsqrt() if dimension > UNSCALED_MAX_DIMENSION else torch.ones(dimension, dtype=torch.float64)


class FullRankGuide(PreconditionedGuide):
    """A multivariate normal with a dense covariance on the unconstrained coordinates (full-rank ADVI).

    The whitened Cholesky factor is ``diag(scale) (I + diag(c) V)``, ``V`` the strictly lower part of the
    ``scale_tril`` parameter and ``c`` the buffer ``factor_row_scale`` (:func:`factor_row_scale`): for a guide of
    more than :data:`UNSCALED_MAX_DIMENSION` coordinates, ``c_i = 1 / sqrt(max(i, 1))`` for row ``i`` (counted from
    0), which has ``i`` entries; for smaller guides ``c = 1``. Adam moves every entry by about the learning rate per
    step whatever its gradient, so without ``c`` row ``i`` of the factor moves by ``sqrt(i)`` times the learning
    rate, in directions set mostly by Monte Carlo noise (the gradient of the factor is an outer product of two
    ``d``-vectors, ``sqrt(d)`` times noisier than its signal). From about 40 coordinates at the default rate the
    factor then random-walks away from any start, the exact one included, grows ill-conditioned, and its ELBO
    estimates break down (probabilistic PCA with 100 coordinates: estimates of 1e16 within 100 steps). With ``c``
    each row moves by about the learning rate, as each coordinate of ``loc`` does, and the same fit reaches the
    exact posterior at 100 and 200 coordinates, in float32 too. In small guides the scaling would only slow the
    factor's adaptation (sblrc-blr's k-hat rose from about 0.69 to 0.72 at 400 steps), so they keep ``c = 1``.
    """

    def _setup_family(self, prototype: torch.Tensor) -> None:
        self.loc = nn.Parameter(torch.zeros_like(prototype))
        self.scale = PyroParam(torch.ones_like(prototype), constraints.softplus_positive)
        self.scale_tril = PyroParam(torch.eye(self.latent_dim).to(prototype), constraints.unit_lower_cholesky)
        self.register_buffer("factor_row_scale", factor_row_scale(self.latent_dim).to(prototype))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A fit saved before the rows were scaled has no factor_row_scale: its entries are the factor's own.
        key = prefix + "factor_row_scale"
        if key not in state_dict and getattr(self, "factor_row_scale", None) is not None:
            state_dict[key] = torch.ones_like(self.factor_row_scale)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _loc_scale_tril(self, detach: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        loc, scale, unit_tril = _detached(detach, self.loc, self.scale, self.scale_tril)
        # unit_tril has a unit diagonal: scaling its rows by c and adding diag(1 - c) scales the strict lower part.
        row_scale = self.factor_row_scale
        factor = unit_tril * row_scale[:, None] + torch.diag_embed(1.0 - row_scale)
        return self._precondition(loc, scale[..., None] * factor)

    def posterior(self, detach: bool = False) -> dist.Distribution:
        loc, scale_tril = self._loc_scale_tril(detach)
        # Lower triangular with a positive diagonal by construction: skip the (costly) validation.
        return dist.MultivariateNormal(loc, scale_tril=scale_tril, validate_args=False)

    def _loc_scale(self, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        loc, scale_tril = self._loc_scale_tril()
        return loc, scale_tril.pow(2).sum(-1).sqrt()


class LowRankGuide(PreconditionedGuide):
    """A normal whose covariance is diagonal plus rank ``rank`` (Rezende et al. 2014; Ong et al. 2018).

    Parameters
    ----------
    rank : int, optional
        Rank of the low-rank part; by default about ``sqrt(latent dimension)``, as in Pyro.
    """

    preconditioner_structure: PreconditionerStructure = "diagonal"
    #: Initial size of the low-rank factor relative to the diagonal: non-zero, because a zero factor is a
    #: stationary point of the ELBO, and small, so the guide starts at the Laplace start's diagonal.
    initial_factor_scale = 0.1

    def __init__(self, model: Callable, *, rank: int | None = None, **options):
        if rank is not None and (not isinstance(rank, int) or rank < 1):
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        self.rank = rank
        super().__init__(model, **options)

    def _setup_family(self, prototype: torch.Tensor) -> None:
        if self.rank is None:
            self.rank = max(1, round(self.latent_dim**0.5))
        self.loc = nn.Parameter(torch.zeros_like(prototype))
        self.scale = PyroParam(torch.ones_like(prototype), constraints.softplus_positive)
        factor = torch.randn(self.latent_dim, self.rank).to(prototype) * self.initial_factor_scale / self.rank**0.5
        self.cov_factor = nn.Parameter(factor)

    def posterior(self, detach: bool = False) -> dist.Distribution:
        loc, scale, factor = _detached(detach, self.loc, self.scale, self.cov_factor)
        loc, scale = self._precondition(loc, scale)
        factor = self.preconditioner_scale[:, None] * factor
        return dist.LowRankMultivariateNormal(loc, factor, scale.pow(2), validate_args=False)

    def _loc_scale(self, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        loc, scale = self._precondition(self.loc, self.scale)
        factor = self.preconditioner_scale[:, None] * self.cov_factor
        return loc, (scale.pow(2) + factor.pow(2).sum(-1)).sqrt()


#: Flow families of :class:`FlowGuide`: ``"affine"`` is the inverse autoregressive flow (Kingma et al. 2016),
#: ``"block"`` the block neural autoregressive flow (De Cao, Aziz & Titov 2019).
FlowKind = Literal["affine", "block"]
#: Bound on each affine flow's log scale: a layer can stretch or shrink a coordinate by at most e^5 = 148 around
#: the full-rank start, enough for a funnel's neck and mouth (the 10-D funnel spans e^-7..e^7 in x's scale)
#: across two layers, and a bound that keeps a single noisy gradient from sending a scale to 1e30 (the bounded
#: scales Agrawal, Sheldon & Domke 2020 found necessary).
FLOW_LOG_SCALE_BOUND = 5.0
#: Initial logit of the gated residual of a block flow: ``y = sigmoid(gate) x + (1 - sigmoid(gate)) f(x)``
#: starts 0.99 of the way to the identity, so the flow begins at the full-rank fit and still gets a gradient.
BLOCK_FLOW_INITIAL_GATE = 4.6


def _autoregressive_order(dimension: int, layer: int, num_layers: int) -> torch.Tensor:
    """Order of the coordinates in one layer: the natural (model) order in the last layer, reversed in the one
    before, and so on. The full-rank start's Cholesky factor is lower triangular in the model order, so the last
    layer's conditionals read the model's sites in the order the model draws them (a hierarchical scale before
    the effects it scales, as the non-centred parameterisation would write them)."""
    natural = torch.arange(dimension)
    return natural if (num_layers - 1 - layer) % 2 == 0 else natural.flip(0)


class FlowGuide(PreconditionedGuide):
    """A normalizing flow started at a Gaussian fit: ``z = m + L f(w)``, ``w ~ N(0, I)``.

    ``m`` and ``L`` are the mean and Cholesky factor of the Gaussian the flow starts from (``ppvi.fit`` trains a
    full-rank guide first and passes its answer, :meth:`PreconditionedGuide.set_gaussian`; before that, the Laplace
    start or the default), and ``f`` a stack of autoregressive transforms, each initialised at the identity. The
    flow therefore begins exactly at the full-rank answer and training can only add to it; Agrawal, Sheldon &
    Domke (2020, "Advances in black-box VI: normalizing flows are capable variational models", NeurIPS) found
    real-NVP/IAF-type flows with such a start, bounded scales, gradient clipping and many particles reliable.

    Parameters
    ----------
    num_transforms : int
        Number of autoregressive transforms.
    hidden_dims : list of int, optional
        Hidden layer sizes of each affine transform's autoregressive network (default two layers of
        ``max(64, 4 D)`` units for ``D`` coordinates, :data:`FLOW_MINIMUM_HIDDEN_UNITS`), or the hidden factors of
        each block transform (default ``[8, 8]``, De Cao et al.).
    kind : {"affine", "block"}
        ``"affine"``: inverse autoregressive flows with log scales bounded by :data:`FLOW_LOG_SCALE_BOUND`;
        ``"block"``: block neural autoregressive flows with a gated residual (no analytic inverse: its densities
        are those of its own draws, which is all that ``ppvi`` asks of a guide).
    """

    supports_path_derivative = False

    def __init__(
        self,
        model: Callable,
        *,
        num_transforms: int = 2,
        hidden_dims: list[int] | None = None,
        kind: FlowKind = "affine",
        **options,
    ):
        if not isinstance(num_transforms, int) or isinstance(num_transforms, bool) or num_transforms < 1:
            raise ValueError(f"num_transforms must be a positive integer, got {num_transforms!r}")
        if hidden_dims is not None and (
            not isinstance(hidden_dims, list | tuple)
            or not hidden_dims
            or not all(isinstance(size, int) and size > 0 for size in hidden_dims)
        ):
            raise ValueError(f"hidden_dims must be a non-empty list of positive integers, got {hidden_dims!r}")
        if kind not in ("affine", "block"):
            raise ValueError(f"kind must be 'affine' or 'block', got {kind!r}")
        self.num_transforms, self.hidden_dims, self.kind = num_transforms, hidden_dims, kind
        super().__init__(model, **options)

    def _setup_family(self, prototype: torch.Tensor) -> None:
        if self.latent_dim < 2:
            raise ValueError(
                "the 'flow' guide needs at least two latent coordinates (an autoregressive flow on one coordinate "
                "is only an affine map): use guide='fullrank' for this model"
            )
        dimension = self.latent_dim
        flows = []
        for layer in range(self.num_transforms):
            if self.kind == "affine":
                network = AutoRegressiveNN(
                    dimension,
                    list(self.hidden_dims or [max(FLOW_MINIMUM_HIDDEN_UNITS, 4 * dimension)] * 2),
                    permutation=_autoregressive_order(dimension, layer, self.num_transforms),
                )
                nn.init.zeros_(network.layers[-1].weight)  # zero shift, zero log scale: the identity
                nn.init.zeros_(network.layers[-1].bias)
                flow = AffineAutoregressive(
                    network, log_scale_min_clip=-FLOW_LOG_SCALE_BOUND, log_scale_max_clip=FLOW_LOG_SCALE_BOUND
                )
            else:
                flow = BlockAutoregressive(dimension, list(self.hidden_dims or [8, 8]), residual="gated")
                nn.init.constant_(flow.gate, BLOCK_FLOW_INITIAL_GATE)
            flows.append(flow.to(prototype))
        self.flows = nn.ModuleList(flows)

    def posterior(self, detach: bool = False) -> dist.Distribution:
        if detach:
            raise NotImplementedError("flows use the ordinary ELBO estimator")
        base = dist.Normal(torch.zeros_like(self.preconditioner_loc), 1.0).to_event(1)
        # Cached, so the density of the distribution's own draws needs no inverse (block flows have none).
        affine = dist.transforms.LowerCholeskyAffine(self.preconditioner_loc, self.preconditioner_scale, cache_size=1)
        return dist.TransformedDistribution(base, [*self.flows, affine])


class LaplaceGuide(PreconditionedGuide):
    """The Laplace approximation: ``N(mode, H^{-1})`` in the unconstrained space, nothing left to train.

    The same approximation as Pyro's :class:`~pyro.infer.autoguide.AutoLaplaceApproximation` after its
    ``laplace_approximation()`` call, computed by :func:`ppvi.initialization.laplace_start` (L-BFGS, exact Hessian).
    """

    def _setup_family(self, prototype: torch.Tensor) -> None:
        pass

    def posterior(self, detach: bool = False) -> dist.Distribution:
        loc, scale_tril = self.preconditioner_loc, self.preconditioner_scale
        return dist.MultivariateNormal(loc, scale_tril=scale_tril, validate_args=False)

    def _loc_scale(self, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        return self.preconditioner_loc, self.preconditioner_scale.pow(2).sum(-1).sqrt()


#: Adam's learning rate for the flows' network weights. Started at the identity, the flows move the full-rank
#: answer; 0.1 (the Gaussian families' rate in whitened coordinates) throws the networks' weights about, 0.01
#: reached the centred eight-schools posterior (mu, tau within 0.1 NUTS sd) in about 1,000 steps.
FLOW_LEARNING_RATE = 0.01
#: Monte Carlo draws per flow step: a flow's gradient has the score term (no path-derivative estimator without
#: an inverse), so it needs more draws than the Gaussians' 8; with 16 the stopping rule read the noise as
#: stationarity while the banana's flow was still 0.16 sd off (32: 0.05).
FLOW_NUM_PARTICLES = 32
#: Hidden units of each of the two hidden layers of an affine flow's network: at least this many, and 4 per
#: coordinate. One layer of 4 D units (Pyro's default is 3 D + 1) left the banana's curve half learnt.
FLOW_MINIMUM_HIDDEN_UNITS = 64
#: Steps per stationarity window of flow training: flows gain their last few tenths of a nat slowly, under the
#: 100-step window's noise; 200-step windows kept training until the eight-schools and banana moments were within
#: 0.06 sd, at twice the steps.
FLOW_STOPPING_WINDOW = 200
#: Gradient clipping norm of flow training; Adam normalises each coordinate, so this bounds only the rare steps
#: whose gradient is dominated by one draw far in a tail.
FLOW_MAX_GRADIENT_NORM = 10.0
#: Name accepted by :func:`ppvi.fit` besides the registry's: escalate from cheap to rich families (``fit``).
AUTO = "auto"


@dataclass(frozen=True)
class GuideSpec:
    """How :func:`ppvi.fit` builds and trains one guide family.

    Attributes
    ----------
    factory : callable
        ``factory(model, **guide_options) -> AutoGuide``.
    description : str
        One line for listings and errors.
    laplace_start : bool
        Start from a Laplace approximation at the mode (requires a :class:`PreconditionedGuide`).
    objective : {"stochastic", "deterministic", "none"}
        ``"stochastic"``: maximise the ELBO by stochastic gradients; ``"deterministic"``: the ELBO of a point-mass
        guide has no noise, so it is maximised by L-BFGS; ``"none"``: the Laplace start is the whole fit.
    start_from : str, optional
        Registry name of a Gaussian family fitted first; this guide starts at its answer
        (:meth:`PreconditionedGuide.set_gaussian`) instead of at the Laplace start.
    learning_rate, num_particles, max_gradient_norm, stopping_window : optional
        The family's training defaults, where they differ from :func:`ppvi.fit`'s (``stopping_window``: steps per
        window of the stopping rule when the user gives no ``stopping_rule``).
    """

    factory: Callable[..., AutoGuide]
    description: str
    laplace_start: bool = True
    objective: Literal["stochastic", "deterministic", "none"] = "stochastic"
    start_from: str | None = None
    learning_rate: float | None = None
    num_particles: int | None = None
    max_gradient_norm: float | None = None
    stopping_window: int | None = None


def _map_guide(model: Callable, **options) -> AutoGuide:
    options.setdefault("init_loc_fn", init_to_median_or_feasible)
    return AutoDelta(poutine_block_enumerated(model), **options)


def poutine_block_enumerated(model: Callable) -> Callable:
    """Hide enumerated discrete sites from a guide that is not a :class:`PreconditionedGuide`."""
    return pyro.poutine.block(model, hide_fn=lambda message: message.get("infer", {}).get("enumerate") is not None)


#: The guide registry: name -> :class:`GuideSpec`.
GUIDES: dict[str, GuideSpec] = {
    "map": GuideSpec(
        _map_guide, "point mass at the posterior mode in the constrained space (AutoDelta)", False, "deterministic"
    ),
    "laplace": GuideSpec(LaplaceGuide, "normal at the unconstrained mode with the inverse Hessian", True, "none"),
    "meanfield": GuideSpec(MeanFieldGuide, "independent normals, unconstrained space (mean-field ADVI)"),
    "fullrank": GuideSpec(FullRankGuide, "multivariate normal, dense covariance (full-rank ADVI)"),
    "lowrank": GuideSpec(LowRankGuide, "multivariate normal, diagonal plus low-rank covariance (option: rank)"),
    "flow": GuideSpec(
        FlowGuide,
        "the full-rank fit pushed through autoregressive flows (options: num_transforms, hidden_dims, kind)",
        laplace_start=False,
        start_from="fullrank",
        learning_rate=FLOW_LEARNING_RATE,
        num_particles=FLOW_NUM_PARTICLES,
        max_gradient_norm=FLOW_MAX_GRADIENT_NORM,
        stopping_window=FLOW_STOPPING_WINDOW,
    ),
}


def resolve_guide(name: str) -> GuideSpec:
    """Look a guide family up by name, with an error that lists the known names."""
    try:
        return GUIDES[name]
    except KeyError:
        known = "\n".join(f"  {key!r}: {spec.description}" for key, spec in GUIDES.items())
        raise ValueError(
            f"unknown guide {name!r}. Known guides:\n{known}\n  {AUTO!r}: mean-field, escalating to full-rank and "
            "flow while PSIS k-hat says the fit cannot be trusted\n"
            "or pass a callable / torch.nn.Module guide (an amortized guide, say)."
        ) from None
