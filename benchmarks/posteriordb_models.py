"""The posteriors of ``benchmarks/vs_nuts.py``, each as a Pyro model and a NumPyro model, with data and references.

Every posterior has one Pyro model (fitted by ppvi and sampled by Pyro's NUTS) and one NumPyro model (sampled by
NumPyro's NUTS), with the same latent site names, so that a draw of one is a draw of the other and both compare
against the same reference draws (posteriordb names vector elements ``theta[1]``, ...; :func:`load_reference`
gathers them into arrays, 0-based, keyed by the Stan parameter's name, which is the site's name here).

Posteriors (posteriordb @ 28f8d3d6; the Stan programs are in ``posterior_database/models/stan/`` there)
--------------------------------------------------------------------------------------------------
``arK-arK``, ``kidiq-kidscore_momiq``, ``sblrc-blr``, ``low_dim_gauss_mix-low_dim_gauss_mix``
    Pyro: the models of :mod:`ppvi.models.posteriordb`. NumPyro: written here term for term (Stan's
    ``ordered[2] mu; mu ~ normal(0, 2)`` as ``ImproperUniform(ordered_vector)`` plus the normal log density, which
    differs from ppvi's ``OrderedNormal`` by the constant log 2).
``eight_schools-eight_schools_noncentered`` and ``eight_schools_centered``
    Pyro: :func:`ppvi.models.eight_schools.noncentered` and ``centered``, on posteriordb's eight-schools data (the
    numbers of ``ppvi.models.eight_schools``). The centred posterior of ``mu``, ``tau``, ``theta`` is the
    non-centred one, so both rows use posteriordb's non-centred reference draws.
``earnings-log10earn_height``
    ``log10_earn ~ normal(beta[1] + beta[2] * height, sigma)``; ``beta`` (2) and ``sigma > 0`` flat. Stan's
    transformed data (``log10(earn)``) are computed in :func:`load_data`.
``garch-garch11``
    ``mu`` flat, ``alpha0 > 0`` flat, ``alpha1`` flat on (0, 1), ``beta1`` flat on (0, 1 - alpha1);
    ``sigma_1 = sigma1`` (data), ``sigma_t^2 = alpha0 + alpha1 (y_{t-1} - mu)^2 + beta1 sigma_{t-1}^2``;
    ``y_t ~ normal(mu, sigma_t)``. The bound of ``beta1`` depends on ``alpha1``, which Pyro's HMC cannot follow
    (it builds each site's transform once, at the initial point), so both models sample ``beta1_unit`` flat on
    (0, 1), set ``beta1 = (1 - alpha1) beta1_unit`` (a deterministic site) and add the Jacobian ``log(1 - alpha1)``:
    the same density on (alpha1, beta1), and exactly Stan's unconstrained coordinates (Stan maps
    ``beta1 = (1 - alpha1) inv_logit(u)``). The variance recursion, a linear one,
    is solved as ``sigma_t^2 = sum_{j <= t} beta1^{t - j} b_j`` (``b_1 = sigma1^2``, ``b_j`` the other terms) by a
    doubling scan: 8 vectorised shift-and-add steps instead of a loop of 200 (the same sums, in both libraries;
    a Python loop would make Pyro's and ppvi's steps 200 operations long, and a 200 x 200 matrix of powers cost
    NumPyro 2.6 ms a gradient).
``gp_pois_regr-gp_pois_regr``
    ``rho ~ gamma(25, 4)`` (shape, rate), ``alpha > 0 ~ normal(0, 2)`` (half-normal), ``f_tilde ~ normal(0, 1)``
    (N = 11), ``f = cholesky(alpha^2 exp(-(x_i - x_j)^2 / (2 rho^2)) + 1e-10 I) f_tilde`` (a deterministic site,
    what the reference draws hold), ``k ~ poisson_log(f)``. The jitter 1e-10 needs float64 (float32's Cholesky
    fails at the posterior's length scales), as Stan has.
``kilpisjarvi_mod-kilpisjarvi``
    ``alpha ~ normal(pmualpha, psalpha)``, ``beta ~ normal(pmubeta, psbeta)`` (hyperparameters from the data),
    ``sigma > 0`` flat; ``y ~ normal(alpha + beta * x, sigma)`` with ``x`` the years (about 4000, not centred:
    ``alpha`` and ``beta`` are almost perfectly correlated a posteriori).
``mesquite-logmesquite``
    ``log_weight ~ normal(X beta, sigma)`` with ``X`` the columns 1, log diam1, log diam2, log canopy_height,
    log total_height, log density, group (Stan's transformed data, computed in :func:`load_data`); ``beta`` (7) and
    ``sigma > 0`` flat.

Other posteriors
----------------
``funnel``: Neal's funnel in 10 dimensions (:mod:`ppvi.models.funnel`); reference its exact moments.
``banana``: the banana of :mod:`ppvi.models.banana` (curvature 1, scale 1, noise 0.5); reference its exact moments.

Conventions
-----------
Stan's flat priors are ``ImproperUniform`` on the parameter's support, in Pyro and NumPyro; a positive parameter
with a ``normal``/``cauchy`` statement is the half distribution. The Pyro models broadcast over leading batch
dimensions of their latent values (ppvi's vectorised particles, ``Predictive(parallel=True)``); data are float64
arrays (the models run in float64 in both libraries, as Stan does). :func:`check_log_densities` compares the two
models of each posterior: their log joint densities must differ by a constant at random points.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
#: The posteriordb posteriors of the shared folder, in the table's order.
POSTERIORDB = (
    "arK-arK",
    "earnings-log10earn_height",
    "eight_schools-eight_schools_noncentered",
    "garch-garch11",
    "gp_pois_regr-gp_pois_regr",
    "kidiq-kidscore_momiq",
    "kilpisjarvi_mod-kilpisjarvi",
    "low_dim_gauss_mix-low_dim_gauss_mix",
    "mesquite-logmesquite",
    "sblrc-blr",
)
#: The other rows: eight schools centred (posteriordb's non-centred reference), the funnel and the banana.
OTHERS = ("eight_schools_centered", "funnel", "banana")
POSTERIORS = POSTERIORDB + OTHERS
#: Neal's choice: v and nine x.
FUNNEL_DIMENSION = 10
#: The banana's constants (those of ppvi.models.banana).
BANANA = {"curvature": 1.0, "scale": 1.0, "noise": 0.5}
#: gp_pois_regr's diagonal jitter, as in its Stan program.
GP_JITTER = 1e-10
#: A reference is either draws {site: (num_draws, *shape)} or exact moments {site: (mean, sd)}.
Reference = dict[str, Any]


def shared_folder() -> Path:
    """``$PPVI_SHARED``, else ``../shared`` beside the repository root (as the tests and benchmarks find it)."""
    candidate = os.environ.get("PPVI_SHARED")
    return Path(candidate) if candidate else REPO_ROOT.parent / "shared"


def posteriordb_folder() -> Path:
    return shared_folder() / "posteriordb"


class Data(NamedTuple):
    """A model's inputs: positional float64 arrays (the observed one last) and keyword constants."""

    arrays: tuple[np.ndarray, ...]
    constants: dict[str, Any]


def _read_json(name: str, file: str) -> Any:
    path = posteriordb_folder() / name / file
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: set PPVI_SHARED to the shared folder holding posteriordb/")
    with open(path) as handle:
        return json.load(handle)


def _array(values: Any) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)


def load_data(name: str) -> Data:
    """The inputs of posterior ``name``'s models, from posteriordb's ``data.json`` (Stan's transformed data done)."""
    if name == "funnel":
        return Data((), {"dimension": FUNNEL_DIMENSION})
    if name == "banana":
        return Data((), dict(BANANA))
    if name == "eight_schools_centered":
        name = "eight_schools-eight_schools_noncentered"
    data = _read_json(name, "data.json")
    if name == "arK-arK":
        return Data((_array(data["y"]),), {"num_lags": int(data["K"])})
    if name == "earnings-log10earn_height":
        return Data((_array(data["height"]), np.log10(_array(data["earn"]))), {})
    if name == "eight_schools-eight_schools_noncentered":
        return Data((_array(data["sigma"]), _array(data["y"])), {})
    if name == "garch-garch11":
        return Data((_array(data["y"]),), {"sigma1": float(data["sigma1"])})
    if name == "gp_pois_regr-gp_pois_regr":
        return Data((_array(data["x"]), _array(data["k"])), {})
    if name == "kidiq-kidscore_momiq":
        return Data((_array(data["mom_iq"]), _array(data["kid_score"])), {})
    if name == "kilpisjarvi_mod-kilpisjarvi":
        constants = {key: float(data[key]) for key in ("pmualpha", "psalpha", "pmubeta", "psbeta")}
        return Data((_array(data["x"]), _array(data["y"])), constants)
    if name == "low_dim_gauss_mix-low_dim_gauss_mix":
        return Data((_array(data["y"]),), {})
    if name == "mesquite-logmesquite":
        columns = ["diam1", "diam2", "canopy_height", "total_height", "density"]
        logs = [np.log(_array(data[column])) for column in columns]
        design = np.stack([np.ones(int(data["N"])), *logs, _array(data["group"])], axis=-1)
        return Data((design, np.log(_array(data["weight"]))), {})
    if name == "sblrc-blr":
        return Data((_array(data["X"]), _array(data["y"])), {})
    raise KeyError(f"unknown posterior {name!r}; known: {', '.join(POSTERIORS)}")


_INDEXED = re.compile(r"^(?P<base>[A-Za-z_][A-Za-z0-9_.]*)\[(?P<index>\d+(?:,\s*\d+)*)\]$")


def assemble_draws(chains: list[dict[str, list[float]]]) -> dict[str, np.ndarray]:
    """Pool posteriordb's chains and gather Stan's 1-based ``theta[1]``, ... into 0-based arrays per parameter."""
    pooled = {key: np.concatenate([_array(chain[key]) for chain in chains]) for key in chains[0]}
    num_draws = len(next(iter(pooled.values())))
    scalars: dict[str, np.ndarray] = {}
    indexed: dict[str, dict[tuple[int, ...], np.ndarray]] = {}
    for key, values in pooled.items():
        match = _INDEXED.match(key)
        if match is None:
            scalars[key] = values
        else:
            index = tuple(int(i) - 1 for i in match["index"].split(","))
            indexed.setdefault(match["base"], {})[index] = values
    for base, entries in indexed.items():
        shape = tuple(max(index[d] for index in entries) + 1 for d in range(len(next(iter(entries)))))
        if len(entries) != math.prod(shape):
            raise ValueError(f"reference parameter {base!r}: {len(entries)} entries do not fill the shape {shape}")
        array = np.empty((num_draws, *shape))
        for index, values in entries.items():
            array[(slice(None), *index)] = values
        scalars[base] = array
    return scalars


def load_reference(name: str) -> tuple[Reference, str]:
    """The reference of posterior ``name`` and a line saying what it is."""
    if name == "funnel":
        from ppvi.models import funnel

        return funnel.exact_moments(FUNNEL_DIMENSION), f"exact moments, dimension {FUNNEL_DIMENSION}"
    if name == "banana":
        from ppvi.models import banana

        return banana.exact_moments(**BANANA), "exact moments (curvature 1, scale 1, noise 0.5)"
    source = "eight_schools-eight_schools_noncentered" if name == "eight_schools_centered" else name
    chains = _read_json(source, "reference_draws.json")
    draws = assemble_draws(chains)
    return draws, f"posteriordb {source}: {len(chains)} chains, {len(next(iter(draws.values())))} draws"


# --------------------------------------------------------------------------------------------------------------
# Pyro models
# --------------------------------------------------------------------------------------------------------------


@functools.cache
def pyro_models() -> dict[str, Callable]:
    """Posterior name -> Pyro model, called as ``model(*data.arrays, **data.constants)`` with torch tensors."""
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro.distributions import constraints

    from ppvi.models import banana, eight_schools, funnel
    from ppvi.models import posteriordb as pdb

    def constant(value: float, like: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(value, dtype=like.dtype, device=like.device)

    def flat(support, event_shape=()) -> dist.ImproperUniform:
        return dist.ImproperUniform(support, (), event_shape)

    def log10earn_height(height, log10_earn=None):
        beta = pyro.sample("beta", flat(constraints.real, (2,)))
        sigma = pyro.sample("sigma", flat(constraints.positive))
        with pyro.plate("data", height.shape[-1]):
            return pyro.sample("log10_earn", dist.Normal(beta[..., 0] + beta[..., 1] * height, sigma), obs=log10_earn)

    def garch11(y, sigma1):
        length = y.shape[-1]
        mu = pyro.sample("mu", flat(constraints.real))
        alpha0 = pyro.sample("alpha0", flat(constraints.positive))
        alpha1 = pyro.sample("alpha1", flat(constraints.unit_interval))
        beta1_unit = pyro.sample("beta1_unit", flat(constraints.unit_interval))
        beta1 = pyro.deterministic("beta1", (1.0 - alpha1) * beta1_unit)
        pyro.factor("beta1_jacobian", torch.log1p(-alpha1))  # d beta1 / d beta1_unit
        # b_1 = sigma1^2, b_t = alpha0 + alpha1 (y_{t-1} - mu)^2; sigma_t^2 = sum_{j <= t} beta1^(t - j) b_j.
        shocks = alpha0 + alpha1 * (y[..., :-1] - mu) ** 2
        variance = torch.cat([torch.full_like(shocks[..., :1], sigma1**2), shocks], dim=-1)
        power, shift = beta1, 1
        while shift < length:  # doubling scan: afterwards each sum covers the last 2 * shift terms
            shifted = torch.cat([torch.zeros_like(variance[..., :shift]), variance[..., :-shift]], dim=-1)
            variance, power, shift = variance + power * shifted, power * power, 2 * shift
        with pyro.plate("data", length):
            return pyro.sample("y", dist.Normal(mu, variance.sqrt()), obs=y)

    def gp_pois_regr(x, k=None):
        rho = pyro.sample("rho", dist.Gamma(constant(25.0, x), constant(4.0, x)))
        alpha = pyro.sample("alpha", dist.HalfNormal(constant(2.0, x)))
        size = x.shape[-1]
        with pyro.plate("data", size):
            f_tilde = pyro.sample("f_tilde", dist.Normal(constant(0.0, x), constant(1.0, x)))
            distance = (x[:, None] - x[None, :]) ** 2
            covariance = alpha[..., None] ** 2 * torch.exp(-distance / (2.0 * rho[..., None] ** 2))
            covariance = covariance + GP_JITTER * torch.eye(size, dtype=x.dtype, device=x.device)
            factor = torch.linalg.cholesky(covariance)
            f = pyro.deterministic("f", (factor @ f_tilde[..., None])[..., 0])
            return pyro.sample("k", dist.Poisson(f.exp()), obs=k)

    def kilpisjarvi(x, y=None, *, pmualpha, psalpha, pmubeta, psbeta):
        alpha = pyro.sample("alpha", dist.Normal(constant(pmualpha, x), constant(psalpha, x)))
        beta = pyro.sample("beta", dist.Normal(constant(pmubeta, x), constant(psbeta, x)))
        sigma = pyro.sample("sigma", flat(constraints.positive))
        with pyro.plate("data", x.shape[-1]):
            return pyro.sample("y", dist.Normal(alpha + beta * x, sigma), obs=y)

    def logmesquite(X, log_weight=None):
        beta = pyro.sample("beta", flat(constraints.real, (X.shape[-1],)))
        sigma = pyro.sample("sigma", flat(constraints.positive))
        with pyro.plate("data", X.shape[-2]):
            return pyro.sample("log_weight", dist.Normal((beta * X).sum(-1), sigma), obs=log_weight)

    return {
        "arK-arK": pdb.autoregressive,
        "earnings-log10earn_height": log10earn_height,
        "eight_schools-eight_schools_noncentered": eight_schools.noncentered,
        "garch-garch11": garch11,
        "gp_pois_regr-gp_pois_regr": gp_pois_regr,
        "kidiq-kidscore_momiq": pdb.kidscore_momiq,
        "kilpisjarvi_mod-kilpisjarvi": kilpisjarvi,
        "low_dim_gauss_mix-low_dim_gauss_mix": pdb.gaussian_mixture,
        "mesquite-logmesquite": logmesquite,
        "sblrc-blr": pdb.bayesian_linear_regression,
        "eight_schools_centered": eight_schools.centered,
        "funnel": funnel.model,
        "banana": banana.model,
    }


def pyro_model(name: str) -> tuple[Callable, tuple]:
    """Posterior ``name``'s Pyro model with its constants bound, and its data as float64 tensors."""
    import torch

    data = load_data(name)
    model = pyro_models()[name]
    if data.constants:
        model = functools.update_wrapper(functools.partial(model, **data.constants), model)
    return model, tuple(torch.as_tensor(array, dtype=torch.float64) for array in data.arrays)


# --------------------------------------------------------------------------------------------------------------
# NumPyro models
# --------------------------------------------------------------------------------------------------------------


@functools.cache
def numpyro_models() -> dict[str, Callable]:
    """Posterior name -> NumPyro model, with the Pyro model's signature and site names (JAX arrays in)."""
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as nd
    from jax.scipy.linalg import cholesky
    from numpyro.distributions import constraints

    def flat(support, event_shape=()) -> nd.ImproperUniform:
        return nd.ImproperUniform(support, (), event_shape)

    def autoregressive(y, num_lags):
        length = y.shape[-1]
        alpha = numpyro.sample("alpha", nd.Normal(0.0, 10.0))
        beta = numpyro.sample("beta", nd.Normal(0.0, 10.0).expand([num_lags]).to_event(1))
        sigma = numpyro.sample("sigma", nd.HalfCauchy(2.5))
        lagged = jnp.stack([y[num_lags - k - 1 : length - k - 1] for k in range(num_lags)], axis=-1)
        with numpyro.plate("data", length - num_lags):
            numpyro.sample("y", nd.Normal(alpha + lagged @ beta, sigma), obs=y[num_lags:])

    def log10earn_height(height, log10_earn=None):
        beta = numpyro.sample("beta", flat(constraints.real, (2,)))
        sigma = numpyro.sample("sigma", flat(constraints.positive))
        with numpyro.plate("data", height.shape[-1]):
            numpyro.sample("log10_earn", nd.Normal(beta[0] + beta[1] * height, sigma), obs=log10_earn)

    def eight_schools_noncentered(sigma, y=None):
        mu = numpyro.sample("mu", nd.Normal(0.0, 5.0))
        tau = numpyro.sample("tau", nd.HalfCauchy(5.0))
        with numpyro.plate("schools", sigma.shape[-1]):
            theta_trans = numpyro.sample("theta_trans", nd.Normal(0.0, 1.0))
            theta = numpyro.deterministic("theta", mu + tau * theta_trans)
            numpyro.sample("y", nd.Normal(theta, sigma), obs=y)

    def eight_schools_centered(sigma, y=None):
        mu = numpyro.sample("mu", nd.Normal(0.0, 5.0))
        tau = numpyro.sample("tau", nd.HalfCauchy(5.0))
        with numpyro.plate("schools", sigma.shape[-1]):
            theta = numpyro.sample("theta", nd.Normal(mu, tau))
            numpyro.sample("y", nd.Normal(theta, sigma), obs=y)

    def garch11(y, sigma1):
        length = y.shape[-1]
        mu = numpyro.sample("mu", flat(constraints.real))
        alpha0 = numpyro.sample("alpha0", flat(constraints.positive))
        alpha1 = numpyro.sample("alpha1", flat(constraints.unit_interval))
        beta1_unit = numpyro.sample("beta1_unit", flat(constraints.unit_interval))
        beta1 = numpyro.deterministic("beta1", (1.0 - alpha1) * beta1_unit)
        numpyro.factor("beta1_jacobian", jnp.log1p(-alpha1))
        shocks = alpha0 + alpha1 * (y[:-1] - mu) ** 2
        variance = jnp.concatenate([jnp.full((1,), sigma1**2), shocks])
        power, shift = beta1, 1
        while shift < length:
            shifted = jnp.concatenate([jnp.zeros(shift), variance[:-shift]])
            variance, power, shift = variance + power * shifted, power * power, 2 * shift
        with numpyro.plate("data", length):
            numpyro.sample("y", nd.Normal(mu, jnp.sqrt(variance)), obs=y)

    def gp_pois_regr(x, k=None):
        rho = numpyro.sample("rho", nd.Gamma(25.0, 4.0))
        alpha = numpyro.sample("alpha", nd.HalfNormal(2.0))
        size = x.shape[-1]
        with numpyro.plate("data", size):
            f_tilde = numpyro.sample("f_tilde", nd.Normal(0.0, 1.0))
            covariance = alpha**2 * jnp.exp(-((x[:, None] - x[None, :]) ** 2) / (2.0 * rho**2))
            factor = cholesky(covariance + GP_JITTER * jnp.eye(size), lower=True)
            f = numpyro.deterministic("f", factor @ f_tilde)
            numpyro.sample("k", nd.Poisson(jnp.exp(f)), obs=k)

    def kidscore_momiq(mom_iq, kid_score=None):
        beta = numpyro.sample("beta", flat(constraints.real, (2,)))
        sigma = numpyro.sample("sigma", nd.HalfCauchy(2.5))
        with numpyro.plate("data", mom_iq.shape[-1]):
            numpyro.sample("kid_score", nd.Normal(beta[0] + beta[1] * mom_iq, sigma), obs=kid_score)

    def kilpisjarvi(x, y=None, *, pmualpha, psalpha, pmubeta, psbeta):
        alpha = numpyro.sample("alpha", nd.Normal(pmualpha, psalpha))
        beta = numpyro.sample("beta", nd.Normal(pmubeta, psbeta))
        sigma = numpyro.sample("sigma", flat(constraints.positive))
        with numpyro.plate("data", x.shape[-1]):
            numpyro.sample("y", nd.Normal(alpha + beta * x, sigma), obs=y)

    def gaussian_mixture(y):
        # Stan: ordered[2] mu; mu ~ normal(0, 2);
        mu = numpyro.sample("mu", flat(constraints.ordered_vector, (2,)))
        numpyro.factor("mu_prior", nd.Normal(0.0, 2.0).log_prob(mu).sum(-1))
        sigma = numpyro.sample("sigma", nd.HalfNormal(2.0).expand([2]).to_event(1))
        theta = numpyro.sample("theta", nd.Beta(5.0, 5.0))
        weights = jnp.stack([theta, 1.0 - theta], axis=-1)
        with numpyro.plate("data", y.shape[-1]):
            numpyro.sample("y", nd.MixtureSameFamily(nd.Categorical(probs=weights), nd.Normal(mu, sigma)), obs=y)

    def logmesquite(X, log_weight=None):
        beta = numpyro.sample("beta", flat(constraints.real, (X.shape[-1],)))
        sigma = numpyro.sample("sigma", flat(constraints.positive))
        with numpyro.plate("data", X.shape[-2]):
            numpyro.sample("log_weight", nd.Normal(X @ beta, sigma), obs=log_weight)

    def bayesian_linear_regression(X, y=None):
        beta = numpyro.sample("beta", nd.Normal(0.0, 10.0).expand([X.shape[-1]]).to_event(1))
        sigma = numpyro.sample("sigma", nd.HalfNormal(10.0))
        with numpyro.plate("data", X.shape[-2]):
            numpyro.sample("y", nd.Normal(X @ beta, sigma), obs=y)

    def neal_funnel(dimension):
        v = numpyro.sample("v", nd.Normal(0.0, 3.0))
        numpyro.sample("x", nd.Normal(jnp.zeros(dimension - 1), jnp.exp(v / 2)).to_event(1))

    def twisted_gaussian(curvature, scale, noise):
        x1 = numpyro.sample("x1", nd.Normal(0.0, scale))
        numpyro.sample("x2", nd.Normal(curvature * (x1**2 - scale**2), noise))

    return {
        "arK-arK": autoregressive,
        "earnings-log10earn_height": log10earn_height,
        "eight_schools-eight_schools_noncentered": eight_schools_noncentered,
        "garch-garch11": garch11,
        "gp_pois_regr-gp_pois_regr": gp_pois_regr,
        "kidiq-kidscore_momiq": kidscore_momiq,
        "kilpisjarvi_mod-kilpisjarvi": kilpisjarvi,
        "low_dim_gauss_mix-low_dim_gauss_mix": gaussian_mixture,
        "mesquite-logmesquite": logmesquite,
        "sblrc-blr": bayesian_linear_regression,
        "eight_schools_centered": eight_schools_centered,
        "funnel": neal_funnel,
        "banana": twisted_gaussian,
    }


def numpyro_model(name: str) -> tuple[Callable, tuple]:
    """Posterior ``name``'s NumPyro model with its constants bound, and its data as float64 JAX arrays (call
    ``numpyro.enable_x64()`` first)."""
    import jax.numpy as jnp

    data = load_data(name)
    model = numpyro_models()[name]
    if data.constants:
        model = functools.partial(model, **data.constants)
    return model, tuple(jnp.asarray(array, dtype=jnp.float64) for array in data.arrays)


# --------------------------------------------------------------------------------------------------------------
# The two models of a posterior agree
# --------------------------------------------------------------------------------------------------------------


def check_log_densities(name: str, num_points: int = 20, seed: int = 0) -> tuple[float, float]:
    """Log joint density of the Pyro and of the NumPyro model at ``num_points`` random points: the spread
    (max - min) of their difference, which is 0 up to rounding when the models agree up to a constant, and the
    mean difference (the constant: 0, or log 2 for the Gaussian mixture's ordered prior).

    Each point draws every latent site of the Pyro model uniformly on (-2, 2) in unconstrained coordinates
    (NUTS's initialisation) and maps it onto the site's support; both models are then conditioned on the values.
    """
    import jax
    import numpyro
    import pyro
    import torch
    from numpyro.infer.util import log_density
    from pyro import poutine
    from pyro.infer.autoguide.initialization import InitMessenger
    from torch.distributions import biject_to

    jax.config.update("jax_enable_x64", True)
    torch.set_default_dtype(torch.float64)  # the funnel and the banana make their constants in the default dtype
    torch_model, torch_args = pyro_model(name)
    jax_model, jax_args = numpyro_model(name)
    generator = torch.Generator().manual_seed(seed)
    differences = []
    with numpyro.validation_enabled(False):
        for _ in range(num_points):

            def uniform_init(site):
                fn = site["fn"]
                transform = biject_to(fn.support)
                shape = transform.inverse_shape(fn.batch_shape + fn.event_shape)
                return transform(4.0 * torch.rand(shape, generator=generator, dtype=torch.float64) - 2.0)

            with torch.no_grad(), pyro.validation_enabled(False):
                trace = poutine.trace(InitMessenger(uniform_init)(torch_model)).get_trace(*torch_args)
                values = {
                    site_name: site["value"]
                    for site_name, site in trace.nodes.items()
                    if site["type"] == "sample" and not site["is_observed"]
                }
                torch_log_density = float(trace.log_prob_sum())
            params = {key: jax.numpy.asarray(value.numpy()) for key, value in values.items()}
            jax_log_density = float(log_density(jax_model, jax_args, {}, params)[0])
            differences.append(torch_log_density - jax_log_density)
    spread = float(np.max(differences) - np.min(differences)) if all(np.isfinite(differences)) else math.inf
    return spread, float(np.mean(differences))
