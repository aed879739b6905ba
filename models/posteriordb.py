"""Five posteriors of posteriordb (stan-dev/posteriordb) as Pyro models, with a loader for reference draws.

Each model is the Stan program of posteriordb written in Pyro, term for term, with the latent sites named as
the Stan parameters so that the reference draws (rstan NUTS, 10 chains of 1000) compare site by site:

* ``eight_schools-eight_schools_noncentered``: :func:`eight_schools_noncentered`; latent ``mu`` (),
  ``tau`` (), ``theta_trans`` (8,); deterministic ``theta`` (8,), which the reference draws hold.
* ``kidiq-kidscore_momiq``: :func:`kidscore_momiq`; latent ``beta`` (2,), ``sigma`` ().
* ``arK-arK``: :func:`autoregressive`; latent ``alpha`` (), ``beta`` (5,), ``sigma`` ().
* ``sblrc-blr``: :func:`bayesian_linear_regression`; latent ``beta`` (5,), ``sigma`` ().
* ``low_dim_gauss_mix-low_dim_gauss_mix``: :func:`gaussian_mixture`; latent ``mu`` (2,; ordered),
  ``sigma`` (2,), ``theta`` ().

Conventions, as in the other modules of :mod:`models`:

* The data are positional tensor arguments, the observed one last; the data points sit in a ``pyro.plate``.
* Stan's flat priors ("no prior statement") are improper uniform priors on the parameter's support,
  ``dist.ImproperUniform``; a positive parameter with a ``cauchy``/``normal`` statement is the truncated
  (half) distribution. ``ImproperUniform`` cannot be sampled, and Pyro's own initialisation strategies
  (``init_to_*``) all call ``.sample()``: a model with a flat prior (kidiq) needs an initialisation that does
  not sample, and it cannot simulate from its prior; under a guide (posterior predictive) it simulates like
  any other.
* Constants are made with the data's dtype and device, so a model runs in whatever precision and on whatever
  device its data are.
* Every model broadcasts over leading batch dimensions of its latent values (vectorised particles,
  ``pyro.plate`` to the left of the data plate, ``Predictive(parallel=True)``).

:func:`load_posterior` reads one posterior's ``data.json`` and ``reference_draws.json`` from a posteriordb
folder given by path (nothing here knows where a copy lives) and returns a :class:`PosteriorCase`.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch.distributions.utils import broadcast_all

#: Files a posterior's folder must hold for :func:`load_posterior`.
REQUIRED_FILES = ("data.json", "reference_draws.json")


# --- a distribution for Stan's ``ordered[K] mu; mu ~ normal(loc, scale);`` ---


class OrderedNormal(dist.TorchDistribution):
    """The sorted vector of ``size`` independent ``Normal(loc, scale)`` draws.

    Its density on the ordered vectors is ``size! * prod_k Normal(x_k | loc, scale)``, so it is Stan's
    ``ordered[size] x; x ~ normal(loc, scale);`` (whose density is that product restricted to the ordered
    vectors, up to a constant), made proper: it can be sampled, and its support ``constraints.ordered_vector``
    has a bijection (``OrderedTransform``) for autoguides and HMC.

    Parameters
    ----------
    loc, scale : torch.Tensor or float
        Location and scale shared by the components; their broadcast shape is the batch shape.
    size : int
        Length of the ordered vector (the event shape is ``(size,)``).
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.ordered_vector
    has_rsample = True

    def __init__(
        self,
        loc: torch.Tensor | float,
        scale: torch.Tensor | float,
        size: int,
        validate_args: bool | None = None,
    ) -> None:
        self.loc, self.scale = broadcast_all(loc, scale)
        self.size = int(size)
        super().__init__(self.loc.shape, torch.Size([self.size]), validate_args=validate_args)

    def expand(self, batch_shape: torch.Size, _instance: OrderedNormal | None = None) -> OrderedNormal:
        new = self._get_checked_instance(OrderedNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape)
        new.scale = self.scale.expand(batch_shape)
        new.size = self.size
        super(OrderedNormal, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        noise = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        return (self.loc.unsqueeze(-1) + self.scale.unsqueeze(-1) * noise).sort(dim=-1).values

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        components = dist.Normal(self.loc.unsqueeze(-1), self.scale.unsqueeze(-1)).log_prob(value)
        return components.sum(-1) + math.lgamma(self.size + 1)


def _constant(value: float, like: torch.Tensor | None) -> torch.Tensor:
    """``value`` as a tensor with the dtype and device of ``like`` (the defaults when ``like`` is None)."""
    if like is None:
        return torch.tensor(value, dtype=torch.get_default_dtype())
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


# --- the five models ---


def eight_schools_noncentered(sigma: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """posteriordb ``eight_schools_noncentered``: the non-centred hierarchical model of Rubin's eight schools.

    .. math::

        \\mu \\sim \\mathcal{N}(0, 5), \\quad \\tau \\sim \\mathrm{HalfCauchy}(5), \\quad
        \\tilde\\theta_j \\sim \\mathcal{N}(0, 1), \\quad \\theta_j = \\mu + \\tau \\tilde\\theta_j, \\quad
        y_j \\sim \\mathcal{N}(\\theta_j, \\sigma_j).

    Latent sites ``mu``, ``tau`` and ``theta_trans`` (in the plate ``schools``); deterministic site ``theta``
    (what the reference draws hold); observed site ``y``. All priors are proper, so ``y=None`` simulates.

    Parameters
    ----------
    sigma : torch.Tensor
        Known standard errors of the schools' estimates, shape ``(J,)``.
    y : torch.Tensor, optional
        Estimated treatment effects, shape ``(J,)``.

    Returns
    -------
    torch.Tensor
        The observed (or simulated) ``y``.
    """
    mu = pyro.sample("mu", dist.Normal(_constant(0.0, sigma), _constant(5.0, sigma)))
    tau = pyro.sample("tau", dist.HalfCauchy(_constant(5.0, sigma)))
    with pyro.plate("schools", sigma.shape[-1]):
        theta_trans = pyro.sample("theta_trans", dist.Normal(_constant(0.0, sigma), _constant(1.0, sigma)))
        theta = pyro.deterministic("theta", mu + tau * theta_trans)
        return pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def kidscore_momiq(mom_iq: torch.Tensor, kid_score: torch.Tensor | None = None) -> torch.Tensor:
    """posteriordb ``kidscore_momiq`` (ARM, ch. 3): a child's test score regressed on the mother's IQ.

    .. math::

        \\beta \\sim \\text{flat on } \\mathbb{R}^2, \\quad \\sigma \\sim \\mathrm{HalfCauchy}(2.5), \\quad
        \\text{kid\\_score}_n \\sim \\mathcal{N}(\\beta_1 + \\beta_2\\, \\text{mom\\_iq}_n, \\sigma).

    The predictor is not centred (mom_iq is about 100), so intercept and slope are strongly correlated a
    posteriori. Latent sites ``beta`` (2,) and ``sigma``; observed site ``kid_score``. The flat prior on
    ``beta`` is improper: ``kid_score=None`` simulates only when ``beta`` comes from a guide or is
    conditioned.

    Parameters
    ----------
    mom_iq : torch.Tensor
        Mothers' IQ scores, shape ``(N,)``.
    kid_score : torch.Tensor, optional
        Children's test scores, shape ``(N,)``.

    Returns
    -------
    torch.Tensor
        The observed (or simulated) ``kid_score``.
    """
    beta = pyro.sample("beta", dist.ImproperUniform(constraints.real, (), (2,)))
    sigma = pyro.sample("sigma", dist.HalfCauchy(_constant(2.5, mom_iq)))
    mean = beta[..., 0] + beta[..., 1] * mom_iq
    with pyro.plate("data", mom_iq.shape[-1]):
        return pyro.sample("kid_score", dist.Normal(mean, sigma), obs=kid_score)


def autoregressive(y: torch.Tensor, num_lags: int = 5) -> torch.Tensor:
    """posteriordb ``arK``: an autoregressive model of order ``num_lags`` (K) with intercept.

    .. math::

        \\alpha \\sim \\mathcal{N}(0, 10), \\quad \\beta_k \\sim \\mathcal{N}(0, 10), \\quad
        \\sigma \\sim \\mathrm{HalfCauchy}(2.5), \\quad
        y_t \\sim \\mathcal{N}\\Big(\\alpha + \\sum_{k=1}^K \\beta_k y_{t-k}, \\sigma\\Big),
        \\quad t = K+1, \\dots, T.

    Latent sites ``alpha``, ``beta`` (K,) and ``sigma``; observed site ``y`` (the last ``T - K`` values, in
    the plate ``data``). The series is both regressor and response, so it is required.

    Parameters
    ----------
    y : torch.Tensor
        The series, shape ``(T,)``.
    num_lags : int
        The order K (posteriordb's data: 5).

    Returns
    -------
    torch.Tensor
        ``y[K:]``, the modelled part of the series.
    """
    length = y.shape[-1]
    if not 0 < num_lags < length:
        raise ValueError(
            f"num_lags must lie in 1..{length - 1} for a series of length {length}, got {num_lags}"
        )
    alpha = pyro.sample("alpha", dist.Normal(_constant(0.0, y), _constant(10.0, y)))
    beta = pyro.sample(
        "beta", dist.Normal(_constant(0.0, y), _constant(10.0, y)).expand([num_lags]).to_event(1)
    )
    sigma = pyro.sample("sigma", dist.HalfCauchy(_constant(2.5, y)))
    # lagged[t, k] = y[t - k - 1] for the responses y[K], ..., y[T - 1] (0-based): Stan's y_{t-k}.
    lagged = torch.stack([y[..., num_lags - k - 1 : length - k - 1] for k in range(num_lags)], dim=-1)
    mean = alpha + (beta * lagged).sum(-1)
    with pyro.plate("data", length - num_lags):
        return pyro.sample("y", dist.Normal(mean, sigma), obs=y[..., num_lags:])


def bayesian_linear_regression(X: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """posteriordb ``blr``: Bayesian linear regression without intercept and with vague priors.

    .. math::

        \\beta_d \\sim \\mathcal{N}(0, 10), \\quad \\sigma \\sim \\mathrm{HalfNormal}(10), \\quad
        y \\sim \\mathcal{N}(X \\beta, \\sigma).

    Latent sites ``beta`` (D,) and ``sigma``; observed site ``y``. All priors are proper, so ``y=None``
    simulates.

    Parameters
    ----------
    X : torch.Tensor
        Design matrix, shape ``(N, D)``.
    y : torch.Tensor, optional
        Responses, shape ``(N,)``.

    Returns
    -------
    torch.Tensor
        The observed (or simulated) ``y``.
    """
    beta = pyro.sample(
        "beta", dist.Normal(_constant(0.0, X), _constant(10.0, X)).expand([X.shape[-1]]).to_event(1)
    )
    sigma = pyro.sample("sigma", dist.HalfNormal(_constant(10.0, X)))
    # (beta * X).sum(-1) is X @ beta, and broadcasts over leading batch dimensions of beta.
    mean = (beta * X).sum(-1)
    with pyro.plate("data", X.shape[-2]):
        return pyro.sample("y", dist.Normal(mean, sigma), obs=y)


#: posteriordb's low_dim_gauss_mix data have 1000 points.
DEFAULT_NUM_MIXTURE_POINTS = 1000


def gaussian_mixture(
    y: torch.Tensor | None = None, num_points: int = DEFAULT_NUM_MIXTURE_POINTS
) -> torch.Tensor:
    """posteriordb ``low_dim_gauss_mix``: a two-component Gaussian mixture with ordered means.

    .. math::

        \\mu \\in \\{\\mu_1 < \\mu_2\\},\\ \\mu_k \\sim \\mathcal{N}(0, 2), \\quad
        \\sigma_k \\sim \\mathrm{HalfNormal}(2), \\quad \\theta \\sim \\mathrm{Beta}(5, 5), \\quad
        y_n \\sim \\theta\\, \\mathcal{N}(\\mu_1, \\sigma_1)
        + (1 - \\theta)\\, \\mathcal{N}(\\mu_2, \\sigma_2).

    Latent sites ``mu`` (2,) with support ``ordered_vector`` (prior :class:`OrderedNormal`, the sorted pair of
    ``N(0, 2)`` draws: Stan's density up to the constant 2), ``sigma`` (2,) and ``theta``; observed site ``y``
    (a ``MixtureSameFamily``; its log density is Stan's ``log_mix``). All priors are proper, so ``y=None``
    simulates ``num_points`` points.

    Parameters
    ----------
    y : torch.Tensor, optional
        Observations, shape ``(N,)``.
    num_points : int
        Number of points simulated when ``y`` is None.

    Returns
    -------
    torch.Tensor
        The observed (or simulated) ``y``.
    """
    mu = pyro.sample("mu", OrderedNormal(_constant(0.0, y), _constant(2.0, y), 2))
    sigma = pyro.sample("sigma", dist.HalfNormal(_constant(2.0, y)).expand([2]).to_event(1))
    theta = pyro.sample("theta", dist.Beta(_constant(5.0, y), _constant(5.0, y)))
    weights = torch.stack([theta, 1.0 - theta], dim=-1)
    mixture = dist.MixtureSameFamily(dist.Categorical(probs=weights), dist.Normal(mu, sigma))
    with pyro.plate("data", num_points if y is None else y.shape[-1]):
        return pyro.sample("y", mixture, obs=y)


# --- registry and loader ---


def _tensor(values: Any) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.get_default_dtype())


def _no_keyword_arguments(data: dict[str, Any]) -> dict[str, Any]:
    return {}


def _identity_draws(draws: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return dict(draws)


def _eight_schools_latent_draws(draws: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # Invert the transformed parameter: theta = mu + tau * theta_trans.
    theta_trans = (draws["theta"] - draws["mu"][:, None]) / draws["tau"][:, None]
    return {"mu": draws["mu"], "tau": draws["tau"], "theta_trans": theta_trans}


class PosteriorSpecification(NamedTuple):
    """How one posteriordb posterior maps onto its Pyro model.

    Attributes
    ----------
    model : callable
        The Pyro model.
    make_arguments : callable
        ``data.json`` contents -> the model's positional arguments (tensors of the default dtype).
    make_keyword_arguments : callable
        ``data.json`` contents -> the model's non-tensor keyword arguments (e.g. the number of lags).
    latent_from_draws : callable
        Reference draws keyed by Stan parameter -> the values of the model's latent sample sites (identity
        except where the draws hold transformed parameters).
    """

    model: Callable[..., torch.Tensor]
    make_arguments: Callable[[dict[str, Any]], tuple[torch.Tensor, ...]]
    make_keyword_arguments: Callable[[dict[str, Any]], dict[str, Any]] = _no_keyword_arguments
    latent_from_draws: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] = _identity_draws


#: posteriordb posterior name -> its Pyro model and data conversion.
POSTERIORS: dict[str, PosteriorSpecification] = {
    "eight_schools-eight_schools_noncentered": PosteriorSpecification(
        eight_schools_noncentered,
        lambda data: (_tensor(data["sigma"]), _tensor(data["y"])),
        latent_from_draws=_eight_schools_latent_draws,
    ),
    "kidiq-kidscore_momiq": PosteriorSpecification(
        kidscore_momiq, lambda data: (_tensor(data["mom_iq"]), _tensor(data["kid_score"]))
    ),
    "arK-arK": PosteriorSpecification(
        autoregressive,
        lambda data: (_tensor(data["y"]),),
        make_keyword_arguments=lambda data: {"num_lags": int(data["K"])},
    ),
    "sblrc-blr": PosteriorSpecification(
        bayesian_linear_regression, lambda data: (_tensor(data["X"]), _tensor(data["y"]))
    ),
    "low_dim_gauss_mix-low_dim_gauss_mix": PosteriorSpecification(
        gaussian_mixture, lambda data: (_tensor(data["y"]),)
    ),
}


@dataclass(frozen=True)
class PosteriorCase:
    """One posteriordb posterior, ready to fit and to compare.

    Attributes
    ----------
    name : str
        The posteriordb name, e.g. ``"kidiq-kidscore_momiq"``.
    model : callable
        The Pyro model, with any non-tensor data (the number of lags of arK) bound: call ``model(*args)``.
    args : tuple of torch.Tensor
        The data as the model's positional arguments, in the default dtype at load time.
    reference_draws : dict of str to numpy.ndarray
        The reference posterior draws (chains concatenated in order), keyed by Pyro site name (the Stan
        parameter name), shape ``(num_draws, *site_shape)``; for eight schools ``theta`` is the deterministic
        site.
    latent_draws : dict of str to numpy.ndarray
        The same draws as values of the model's latent sample sites (for eight schools ``mu``, ``tau`` and
        ``theta_trans = (theta - mu) / tau``; elsewhere the reference draws themselves).
    num_chains : int
        Number of reference chains; ``reference_draws[k].reshape(num_chains, -1, ...)`` splits them.
    reference_mean, reference_sd : dict of str to numpy.ndarray
        Mean and standard deviation (``ddof=1``) of the reference draws, shape ``site_shape``.
    """

    name: str
    model: Callable[..., torch.Tensor]
    args: tuple[torch.Tensor, ...]
    reference_draws: dict[str, np.ndarray]
    latent_draws: dict[str, np.ndarray]
    num_chains: int
    reference_mean: dict[str, np.ndarray] = field(default_factory=dict)
    reference_sd: dict[str, np.ndarray] = field(default_factory=dict)


_INDEXED_NAME = re.compile(r"^(?P<base>[A-Za-z_][A-Za-z0-9_.]*)\[(?P<index>\d+(?:,\s*\d+)*)\]$")


def assemble_draws(chains: list[dict[str, list[float]]]) -> dict[str, np.ndarray]:
    """Pool posteriordb's per-chain draws and gather indexed scalars (``theta[1]``, ...) into arrays.

    Parameters
    ----------
    chains : list of dict
        posteriordb's ``reference_draws.json``: one ``{parameter: [draws]}`` per chain, Stan's 1-based
        names such as ``"beta[2]"`` or ``"Sigma[1,2]"``.

    Returns
    -------
    dict of str to numpy.ndarray
        Per parameter, the chains concatenated in order, shape ``(num_draws, *shape)`` with ``shape`` given by
        the largest index (``()`` for a scalar).
    """
    if not chains:
        raise ValueError("reference draws hold no chain")
    pooled = {
        name: np.concatenate([np.asarray(chain[name], dtype=np.float64) for chain in chains])
        for name in chains[0]
    }
    num_draws = len(next(iter(pooled.values())))
    # Per parameter, in order of first appearance: the draws of a scalar, or {0-based index: draws}.
    gathered: dict[str, np.ndarray | dict[tuple[int, ...], np.ndarray]] = {}
    for name, values in pooled.items():
        match = _INDEXED_NAME.match(name)
        base = name if match is None else match["base"]
        if match is None:
            if base in gathered:
                raise ValueError(f"parameter {base!r} appears both as a scalar and indexed")
            gathered[base] = values
            continue
        entries = gathered.setdefault(base, {})
        if not isinstance(entries, dict):
            raise ValueError(f"parameter {base!r} appears both as a scalar and indexed")
        entries[tuple(int(i) - 1 for i in match["index"].split(","))] = values
    assembled: dict[str, np.ndarray] = {}
    for base, entries in gathered.items():
        if isinstance(entries, np.ndarray):
            assembled[base] = entries
            continue
        rank = len(next(iter(entries)))
        if any(len(index) != rank for index in entries):
            raise ValueError(f"parameter {base!r} is indexed with different numbers of indices")
        shape = tuple(max(index[d] for index in entries) + 1 for d in range(rank))
        if len(entries) != math.prod(shape):
            raise ValueError(f"parameter {base!r}: {len(entries)} entries do not fill the shape {shape}")
        array = np.empty((num_draws, *shape))
        for index, values in entries.items():
            array[(slice(None), *index)] = values
        assembled[base] = array
    return assembled


def load_posterior(name: str, root: str | Path) -> PosteriorCase:
    """Load one posteriordb posterior: its Pyro model, its data as tensors and its reference draws.

    Parameters
    ----------
    name : str
        A key of :data:`POSTERIORS`, e.g. ``"eight_schools-eight_schools_noncentered"``.
    root : str or pathlib.Path
        Folder holding one sub-folder per posterior, each with ``data.json`` and ``reference_draws.json``.

    Returns
    -------
    PosteriorCase

    Raises
    ------
    KeyError
        If ``name`` is not one of the posteriors with a Pyro model here.
    FileNotFoundError
        If the posterior's folder or one of its files is missing.
    """
    if name not in POSTERIORS:
        raise KeyError(f"no Pyro model for posterior {name!r}; known: {', '.join(sorted(POSTERIORS))}")
    folder = Path(root) / name
    for file_name in REQUIRED_FILES:
        path = folder / file_name
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: the folder {folder} must hold {' and '.join(REQUIRED_FILES)} for "
                f"posterior {name!r}, unzipped from github.com/stan-dev/posteriordb "
                "(posterior_database/data/data/ and posterior_database/reference_posteriors/draws/draws/)"
            )
    with open(folder / "data.json") as file:
        data = json.load(file)
    with open(folder / "reference_draws.json") as file:
        chains = json.load(file)
    specification = POSTERIORS[name]
    keyword_arguments = specification.make_keyword_arguments(data)
    model = specification.model
    if keyword_arguments:
        model = functools.update_wrapper(functools.partial(model, **keyword_arguments), model)
    draws = assemble_draws(chains)
    return PosteriorCase(
        name=name,
        model=model,
        args=specification.make_arguments(data),
        reference_draws=draws,
        latent_draws=specification.latent_from_draws(draws),
        num_chains=len(chains),
        reference_mean={key: value.mean(axis=0) for key, value in draws.items()},
        reference_sd={key: value.std(axis=0, ddof=1) for key, value in draws.items()},
    )
