"""Time to a stated accuracy: ``ppvi.fit`` against plain Pyro SVI, PyMC's ADVI and NumPyro's SVI, in one run.

Usage::

    python benchmarks/fit_speed.py --quick                      # about 5 minutes on 2 cores
    python benchmarks/fit_speed.py                              # the full protocol, about 20 minutes
    python benchmarks/fit_speed.py --problems kidiq --methods ppvi numpyro
    python benchmarks/fit_speed.py --time-cap 300               # let plain Pyro climb to 50k steps (slow)

Problems
--------
``fake_gaussian``
    ``models.fake_gaussian`` on ``fake_gaussian.simulate()`` (100 points): ``mu ~ N(0, 1)``,
    ``sd ~ HalfNormal(1)``, ``y ~ N(mu, sd)``. Reference moments by quadrature on a fine 2-D grid
    (:func:`fake_gaussian_reference`). Accuracy: every posterior mean within 0.1 reference sd and every posterior
    sd within 10 %.
``kidiq``
    posteriordb ``kidiq-kidscore_momiq`` (N = 434): ``beta`` flat on R^2, ``sigma ~ HalfCauchy(2.5)``,
    ``kid_score ~ N(beta1 + beta2 * mom_iq, sigma)``. Reference moments from posteriordb's reference draws
    (10 chains x 1000 NUTS draws). Accuracy: means within 0.2 reference sd, sds within 20 %. The predictor is not
    centred, so ``beta`` is strongly correlated a posteriori and mean-field families cannot meet the sd criterion
    (they underestimate the marginal sds by construction): their rows read "no" and the means-only table says
    how fast they get the means. The data are found under ``$PPVI_SHARED/posteriordb``, else
    ``../shared/posteriordb`` beside the repository root; without them the problem is skipped with a message.

Accuracy is judged on moments of 10,000 draws of each fitted approximation (Monte Carlo error of a mean about
0.01 posterior sd). "mean err" is the largest ``|mean - reference mean| / reference sd`` over all scalar
components, "sd rel err" the largest ``|sd / reference sd - 1|``.

Methods
-------
``ppvi meanfield`` / ``ppvi fullrank``
    ``ppvi.fit(model, *data, guide=..., seed=r)`` with default options; it stops on its own rule, so the
    whole call is timed (structure trace, Laplace start, training, iterate averaging). Repeated with seeds
    ``0 .. R-1``; the row gives the median seconds and steps. ``start-up s`` is the median time of
    ``ppvi.fit(..., guide="laplace")`` (everything before the first stochastic step), and ms/step is
    ``(median seconds - start-up) / median steps``. ppvi picks float64 on the CPU.
``pyro AutoNormal`` / ``pyro AutoMultivariateNormal``
    Plain Pyro: ``SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())`` and ``svi.step`` in a loop,
    the guide's own default initialisation, torch's default dtype (float32). The model is the same Pyro model
    ppvi gets, except that an ``ImproperUniform`` prior is swapped for the density-identical
    ``Normal(0, 1).mask(False)`` (Pyro's autoguides cannot initialise an ImproperUniform site; Pyro's docs
    suggest exactly this form).
``pymc advi`` / ``pymc fullrank_advi``
    ``pm.fit(n, method=..., random_seed=r)`` with PyMC's defaults (``adagrad_window``, learning rate 1e-3,
    window 10; float64). The timed call builds the model and runs ``pm.fit``, whose PyTensor compilation
    is part of it; ``start-up s`` is the median time of the same call with ``n=1`` (compile and set-up).
``numpyro AutoNormal`` / ``numpyro AutoMultivariateNormal``
    ``SVI(model, guide, numpyro.optim.Adam(0.01), Trace_ELBO()).run(key, n, *data, progress_bar=False)``
    (the whole loop is one XLA program), the guide's default ``init_to_uniform``, JAX's default float32. The
    timed call includes tracing and XLA compilation; ``start-up s`` is the median time with ``n=1``.

Peers run only when installed (``pip install -e .[bench]``); ``ppvi`` never imports them.

Protocol for the fixed-step peers: a ladder of step counts (full: 500, 1k, 2k, 5k, 10k, 20k, 50k; quick: 1k, 5k,
20k), climbed in order with one fresh fit (seed 0) per rung. At the first rung where that fit meets the
criterion, ``R - 1`` more fresh fits (seeds ``1 .. R-1``) are run at the same rung; the rung is reached when a
majority of the ``R`` fits meet the criterion, and the row reports the median wall time of those fits. Otherwise
the climb goes on. The means-only table follows the same protocol with the sd criterion dropped (the two share
their fits where they fall on one rung).

A rung whose predicted wall time (from the fits so far) exceeds ``--time-cap`` seconds is not run, and the row
reads "capped at N" (N the last rung run); a ladder that ends without success reads "not reached at N". Rows
that were not reached show the errors and wall time (``>``) of the largest rung run (medians, with the count that
met the criterion, when its seed-0 fit met it and the other seeds were run). The time cap (60 s per fit, 20 s
with ``--quick``) is what keeps a full run near 20 minutes: plain Pyro costs milliseconds per step, so its 50k
rung alone would take minutes.

``start-up s`` is the median of three fresh fits of one step (for PyMC that is the compilation, reported apart as
asked; for NumPyro tracing and XLA compilation). ms/step is ``(median wall time of the fits with the most steps -
start-up) / steps``; when those fits spent under 1 s stepping (NumPyro, whose whole loop is one XLA program),
one more fit at ten times the steps (at most 200k; 100k quick) is run for this column alone, so that the per-step
cost is not lost in the start-up's noise.

Every timed fit is fresh (a new model, guide and optimiser, and for PyMC and NumPyro a new compilation) and
includes the library's own start-up; drawing the 10,000 evaluation draws is not timed. One untimed warm-up fit
per library comes first, so that imports, JAX's backend start and PyTensor's on-disk C cache are not charged to
the first method; its time is printed as "first fit in process". The machine may be shared with other work, so
all times are medians; the per-call numbers of different libraries are best compared within one run.

torch runs on one intra-op thread by default (``--torch-threads 1``; ``0`` keeps torch's choice, one per core).
These posteriors have 2 and 3 parameters: a second thread only adds synchronisation, and on a busy 2-core
machine torch's default makes tiny kernels pathologically slow (a 2x2 ``tril`` measured 0.8 ms with two threads
against 2 us with one), which inflated the full-rank guides of Pyro (and of ppvi, before ``ppvi.fit`` learned to
take one thread for small data itself) four- to five-fold. The flag gives plain Pyro the same treatment; JAX
and PyTensor run these kernels on one thread anyway.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import pyro.distributions as pdist
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

import ppvi
from ppvi.models import fake_gaussian

REPO_ROOT = Path(__file__).resolve().parents[1]
KIDIQ = "kidiq-kidscore_momiq"
#: Draws of each fitted approximation behind the moments that are judged.
NUM_EVALUATION_DRAWS = 10_000
FULL_LADDER = (500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000)
QUICK_LADDER = (1_000, 5_000, 20_000)
#: Rungs at or below this many steps are always run (their cost is what the time cap extrapolates from).
ALWAYS_RUN_STEPS = 1_000
#: Below this many seconds of stepping in the largest rung run, the per-step cost is drowned in the start-up's
#: noise (NumPyro's whole loop is one XLA program): one more fit at ``COST_PROBE_FACTOR`` times as many steps
#: (at most the cap below, and only if the time cap allows) measures it.
COST_PROBE_SECONDS = 1.0
COST_PROBE_FACTOR = 10
COST_PROBE_MAX_STEPS = {"full": 200_000, "quick": 100_000}
PYRO_LEARNING_RATE = 0.01
NUMPYRO_LEARNING_RATE = 0.01
LIBRARIES = ("ppvi", "pyro", "pymc", "numpyro")


# --------------------------------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Problem:
    """One posterior: its models in every library, its reference moments and its accuracy criterion.

    ``reference_mean`` and ``reference_sd`` are keyed by scalar component (``"mu"``, ``"beta[0]"``);
    ``sites`` maps each latent site to its shape. The model builders are called lazily, so a peer's import
    happens only when that peer runs.
    """

    name: str
    sites: dict[str, tuple[int, ...]]
    reference_mean: dict[str, float]
    reference_sd: dict[str, float]
    mean_tolerance: float
    sd_tolerance: float
    ppvi_model: Callable
    pyro_model: Callable
    torch_args: tuple
    numpyro_model: Callable[[], tuple[Callable, tuple]]
    pymc_model: Callable[[], Any]
    notes: list[str] = field(default_factory=list)


def fake_gaussian_reference(y: np.ndarray, grid_points: int = 1601) -> tuple[dict[str, float], dict[str, float]]:
    """Exact posterior mean and sd of ``mu`` and ``sd`` in the fake-Gaussian model, by quadrature.

    The unnormalised log posterior is evaluated from the sufficient statistics on a uniform grid spanning 12
    standard errors either side of the sample mean and sample sd (the normalised mass at the grid's edges is
    checked to be negligible); the moments are grid sums, whose error on a smooth, light-tailed density is far
    below the Monte Carlo error of the draws they are compared with.
    """
    y = np.asarray(y, dtype=np.float64)
    n, total, total_sq = y.size, y.sum(), (y**2).sum()
    centre, spread = y.mean(), y.std(ddof=1)
    mu = np.linspace(centre - 12 * spread / math.sqrt(n), centre + 12 * spread / math.sqrt(n), grid_points)
    half_width = 12 * spread / math.sqrt(2 * n)
    sd = np.linspace(max(spread - half_width, 1e-3 * spread), spread + half_width, grid_points)
    m, s = np.meshgrid(mu, sd, indexing="ij")
    squares = total_sq - 2 * m * total + n * m**2
    log_density = -0.5 * m**2 - 0.5 * s**2 - n * np.log(s) - squares / (2 * s**2)
    weights = np.exp(log_density - log_density.max())
    weights /= weights.sum()
    edge = max(weights[0].sum(), weights[-1].sum(), weights[:, 0].sum(), weights[:, -1].sum())
    if edge > 1e-10:
        raise RuntimeError(f"quadrature grid too narrow: {edge:.2g} of the mass on its edge")
    means, sds = {}, {}
    for name, values in (("mu", m), ("sd", s)):
        mean = float((weights * values).sum())
        means[name], sds[name] = mean, float(math.sqrt((weights * (values - mean) ** 2).sum()))
    return means, sds


def make_fake_gaussian() -> Problem:
    y = fake_gaussian.simulate()
    means, sds = fake_gaussian_reference(y.numpy())
    y_numpy = y.numpy().astype(np.float64)

    def numpyro_model():
        import jax.numpy as jnp
        import numpyro
        import numpyro.distributions as ndist

        def model(y):
            mu = numpyro.sample("mu", ndist.Normal(0.0, 1.0))
            sd = numpyro.sample("sd", ndist.HalfNormal(1.0))
            with numpyro.plate("data", y.shape[0]):
                numpyro.sample("y", ndist.Normal(mu, sd), obs=y)

        return model, (jnp.asarray(y_numpy),)

    def pymc_model():
        import pymc as pm

        with pm.Model() as model:
            mu = pm.Normal("mu", 0.0, 1.0)
            sd = pm.HalfNormal("sd", 1.0)
            pm.Normal("y", mu, sd, observed=y_numpy)
        return model

    return Problem(
        name="fake_gaussian",
        sites={"mu": (), "sd": ()},
        reference_mean=means,
        reference_sd=sds,
        mean_tolerance=0.1,
        sd_tolerance=0.1,
        ppvi_model=fake_gaussian.model,
        pyro_model=fake_gaussian.model,
        torch_args=(y,),
        numpyro_model=numpyro_model,
        pymc_model=pymc_model,
    )


def shared_folder() -> Path:
    """``$PPVI_SHARED``, else ``../shared`` beside the repository root (as the tests find it)."""
    candidate = os.environ.get("PPVI_SHARED")
    return Path(candidate) if candidate else REPO_ROOT.parent / "shared"


def kidiq_pyro_model(mom_iq: torch.Tensor, kid_score: torch.Tensor | None = None) -> torch.Tensor:
    """posteriordb ``kidscore_momiq`` in Pyro, used when ``models.posteriordb`` is not available."""
    beta = pyro.sample("beta", pdist.ImproperUniform(pdist.constraints.real, (), (2,)))
    sigma = pyro.sample("sigma", pdist.HalfCauchy(torch.tensor(2.5, dtype=mom_iq.dtype)))
    with pyro.plate("data", mom_iq.shape[-1]):
        return pyro.sample("kid_score", pdist.Normal(beta[..., 0] + beta[..., 1] * mom_iq, sigma), obs=kid_score)


class _SampleableFlatPriors(poutine.messenger.Messenger):
    """Replace each real-valued ``ImproperUniform`` prior by ``Normal(0, 1).mask(False)``: the same (zero) log
    density, but a distribution Pyro's initialisers can draw from (see the ``ImproperUniform`` docstring)."""

    def _pyro_sample(self, msg):
        fn = msg["fn"]
        if isinstance(fn, pdist.ImproperUniform) and fn.support is pdist.constraints.real:
            shape = fn.batch_shape + fn.event_shape
            zero = torch.zeros((), dtype=torch.get_default_dtype())
            msg["fn"] = pdist.Normal(zero, 1.0).expand(shape).to_event(len(fn.event_shape)).mask(False)


def _sampleable(model: Callable) -> Callable:
    return _SampleableFlatPriors()(model)


def _ppvi_accepts(model: Callable, args: tuple) -> str | None:
    """None when ``ppvi.fit`` can start on the model, else the error it raises."""
    try:
        ppvi.fit(model, *args, guide="laplace")
    except NotImplementedError as error:
        return f"{type(error).__name__}: {error}"
    return None


def make_kidiq() -> Problem | str:
    """The kidiq problem, or the reason it is skipped."""
    folder = shared_folder() / "posteriordb" / KIDIQ
    if not (folder / "data.json").is_file() or not (folder / "reference_draws.json").is_file():
        return f"skipped: {folder} holds no data.json and reference_draws.json (set PPVI_SHARED)"
    with open(folder / "data.json") as file:
        data = json.load(file)
    mom_iq_numpy = np.asarray(data["mom_iq"], dtype=np.float64)
    kid_score_numpy = np.asarray(data["kid_score"], dtype=np.float64)
    notes = []
    model, args = None, None
    try:
        from ppvi.models.posteriordb import load_posterior
    except ImportError:
        load_posterior = None
    if load_posterior is not None:
        loaded = load_posterior(KIDIQ, folder.parent)
        if isinstance(loaded, tuple):
            model, args, draws = loaded
        else:
            model, args, draws = loaded.model, loaded.args, loaded.reference_draws
        notes.append("Pyro model and reference draws from ppvi.models.posteriordb.load_posterior")
    else:
        with open(folder / "reference_draws.json") as file:
            chains = json.load(file)
        draws = {
            "beta": np.stack([np.concatenate([c[f"beta[{k}]"] for c in chains]) for k in (1, 2)], axis=-1),
            "sigma": np.concatenate([c["sigma"] for c in chains]),
        }
        model = kidiq_pyro_model
        args = (torch.tensor(mom_iq_numpy, dtype=torch.float32), torch.tensor(kid_score_numpy, dtype=torch.float32))
        notes.append("ppvi.models.posteriordb not found: Pyro model written inline")
    beta, sigma = np.asarray(draws["beta"], dtype=np.float64), np.asarray(draws["sigma"], dtype=np.float64)
    reference = {"beta[0]": beta[:, 0], "beta[1]": beta[:, 1], "sigma": sigma}
    means = {key: float(value.mean()) for key, value in reference.items()}
    sds = {key: float(value.std(ddof=1)) for key, value in reference.items()}

    ppvi_model = model
    failure = _ppvi_accepts(model, args)
    if failure is not None:
        ppvi_model = _sampleable(model)
        notes.append(
            f"ppvi.fit fails on the ImproperUniform prior ({failure}); ppvi gets the density-identical "
            "Normal(0, 1).mask(False) prior instead"
        )

    def numpyro_model():
        import jax.numpy as jnp
        import numpyro
        import numpyro.distributions as ndist

        def model(mom_iq, kid_score):
            beta = numpyro.sample("beta", ndist.ImproperUniform(ndist.constraints.real, (), (2,)))
            sigma = numpyro.sample("sigma", ndist.HalfCauchy(2.5))
            with numpyro.plate("data", mom_iq.shape[0]):
                numpyro.sample("kid_score", ndist.Normal(beta[..., 0] + beta[..., 1] * mom_iq, sigma), obs=kid_score)

        return model, (jnp.asarray(mom_iq_numpy), jnp.asarray(kid_score_numpy))

    def pymc_model():
        import pymc as pm

        with pm.Model() as model:
            beta = pm.Flat("beta", shape=2)
            sigma = pm.HalfCauchy("sigma", 2.5)
            pm.Normal("kid_score", beta[0] + beta[1] * mom_iq_numpy, sigma, observed=kid_score_numpy)
        return model

    return Problem(
        name="kidiq",
        sites={"beta": (2,), "sigma": ()},
        reference_mean=means,
        reference_sd=sds,
        mean_tolerance=0.2,
        sd_tolerance=0.2,
        ppvi_model=ppvi_model,
        pyro_model=_sampleable(model),
        torch_args=tuple(args),
        numpyro_model=numpyro_model,
        pymc_model=pymc_model,
        notes=notes,
    )


PROBLEMS: dict[str, Callable[[], Problem | str]] = {"fake_gaussian": make_fake_gaussian, "kidiq": make_kidiq}


# --------------------------------------------------------------------------------------------------------------
# Accuracy
# --------------------------------------------------------------------------------------------------------------


def components(draws: dict[str, np.ndarray], sites: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Scalar components (``"beta[0]"``) of draws keyed by site, each of shape ``(num_draws,)``."""
    result = {}
    for name, shape in sites.items():
        values = np.asarray(draws[name], dtype=np.float64).reshape(-1, math.prod(shape))
        if not shape:
            result[name] = values[:, 0]
        else:
            for index in range(values.shape[1]):
                label = ", ".join(map(str, np.unravel_index(index, shape)))
                result[f"{name}[{label}]"] = values[:, index]
    return result


@dataclass(frozen=True)
class Accuracy:
    mean_error: float  # largest |mean - reference| / reference sd
    sd_error: float  # largest |sd / reference sd - 1|
    means_ok: bool
    sds_ok: bool

    @property
    def ok(self) -> bool:
        return self.means_ok and self.sds_ok


def accuracy(problem: Problem, draws: dict[str, np.ndarray]) -> Accuracy:
    scalars = components(draws, problem.sites)
    mean_error = sd_error = 0.0
    for label, reference in problem.reference_mean.items():
        values = scalars[label]
        if not np.isfinite(values).all():
            return Accuracy(math.inf, math.inf, False, False)
        scale = problem.reference_sd[label]
        mean_error = max(mean_error, abs(values.mean() - reference) / scale)
        sd_error = max(sd_error, abs(values.std(ddof=1) / scale - 1.0))
    mean_error, sd_error = float(mean_error), float(sd_error)
    return Accuracy(mean_error, sd_error, mean_error <= problem.mean_tolerance, sd_error <= problem.sd_tolerance)


# --------------------------------------------------------------------------------------------------------------
# Methods: each fits in a fresh state and returns the timed wall seconds, the steps and evaluation draws
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    seconds: float
    steps: int
    draws: dict[str, np.ndarray] | None
    note: str = ""


def fit_ppvi(problem: Problem, guide: str, steps: int | None, seed: int, evaluate: bool = True) -> Run:
    started = time.perf_counter()
    result = ppvi.fit(problem.ppvi_model, *problem.torch_args, guide=guide, seed=seed)
    seconds = time.perf_counter() - started
    draws = None
    if evaluate:
        draws = {k: v.numpy() for k, v in result.sample(NUM_EVALUATION_DRAWS, seed=seed + 1000).items()}
    note = "" if result.converged else f"not converged: {result.message}"
    return Run(seconds, result.steps, draws, note)


def fit_pyro(problem: Problem, guide: str, steps: int, seed: int, evaluate: bool = True) -> Run:
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    started = time.perf_counter()
    model = problem.pyro_model
    autoguide = AutoNormal(model) if guide == "AutoNormal" else AutoMultivariateNormal(model)
    svi = SVI(model, autoguide, pyro.optim.Adam({"lr": PYRO_LEARNING_RATE}), Trace_ELBO())
    for _ in range(steps):
        svi.step(*problem.torch_args)
    seconds = time.perf_counter() - started
    draws = None
    if evaluate:
        with torch.no_grad(), pyro.plate("_draws", NUM_EVALUATION_DRAWS, dim=-2):
            trace = poutine.trace(autoguide).get_trace(*problem.torch_args)
        draws = {
            name: trace.nodes[name]["value"].detach().reshape(NUM_EVALUATION_DRAWS, *shape).numpy()
            for name, shape in problem.sites.items()
        }
    return Run(seconds, steps, draws)


def fit_pymc(problem: Problem, method: str, steps: int, seed: int, evaluate: bool = True) -> Run:
    import pymc as pm

    started = time.perf_counter()
    with problem.pymc_model():
        approximation = pm.fit(steps, method=method, random_seed=seed, progressbar=False)
    seconds = time.perf_counter() - started
    draws = None
    if evaluate:
        posterior = approximation.sample(NUM_EVALUATION_DRAWS, random_seed=seed + 1000).posterior
        draws = {
            name: posterior[name].values.reshape(NUM_EVALUATION_DRAWS, *shape) for name, shape in problem.sites.items()
        }
    return Run(seconds, steps, draws)


def fit_numpyro(problem: Problem, guide: str, steps: int, seed: int, evaluate: bool = True) -> Run:
    import jax
    import numpyro
    from numpyro.infer import SVI as NumPyroSVI
    from numpyro.infer import Trace_ELBO as NumPyroTraceELBO
    from numpyro.infer.autoguide import AutoMultivariateNormal as NumPyroMVN
    from numpyro.infer.autoguide import AutoNormal as NumPyroNormal

    model, args = problem.numpyro_model()
    started = time.perf_counter()
    autoguide = NumPyroNormal(model) if guide == "AutoNormal" else NumPyroMVN(model)
    svi = NumPyroSVI(model, autoguide, numpyro.optim.Adam(NUMPYRO_LEARNING_RATE), NumPyroTraceELBO())
    result = svi.run(jax.random.PRNGKey(seed), steps, *args, progress_bar=False)
    jax.block_until_ready(result.params)
    seconds = time.perf_counter() - started
    draws = None
    if evaluate:
        sampled = autoguide.sample_posterior(
            jax.random.PRNGKey(seed + 1000), result.params, sample_shape=(NUM_EVALUATION_DRAWS,)
        )
        draws = {name: np.asarray(sampled[name]) for name in problem.sites}
    return Run(seconds, steps, draws)


@dataclass(frozen=True)
class Method:
    label: str
    library: str
    variant: str
    fit: Callable[..., Run]
    fixed_steps: bool
    mean_field: bool


METHODS = (
    Method("ppvi meanfield", "ppvi", "meanfield", fit_ppvi, False, True),
    Method("ppvi fullrank", "ppvi", "fullrank", fit_ppvi, False, False),
    Method("pyro AutoNormal", "pyro", "AutoNormal", fit_pyro, True, True),
    Method("pyro AutoMVN", "pyro", "AutoMultivariateNormal", fit_pyro, True, False),
    Method("pymc advi", "pymc", "advi", fit_pymc, True, True),
    Method("pymc fullrank_advi", "pymc", "fullrank_advi", fit_pymc, True, False),
    Method("numpyro AutoNormal", "numpyro", "AutoNormal", fit_numpyro, True, True),
    Method("numpyro AutoMVN", "numpyro", "AutoMultivariateNormal", fit_numpyro, True, False),
)


def installed(library: str) -> bool:
    needed = {"ppvi": (), "pyro": (), "pymc": ("pymc",), "numpyro": ("numpyro", "jax")}[library]
    return all(importlib.util.find_spec(name) is not None for name in needed)


def library_version(library: str) -> str:
    names = {
        "ppvi": ("ppvi", "torch", "pyro"),
        "pyro": ("pyro", "torch"),
        "pymc": ("pymc", "pytensor"),
        "numpyro": ("numpyro", "jax"),
    }[library]
    versions = []
    for name in names:
        distribution = {"pyro": "pyro-ppl"}.get(name, name)
        try:
            versions.append(f"{name} {importlib.metadata.version(distribution)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name} ?")
    return ", ".join(versions)


# --------------------------------------------------------------------------------------------------------------
# Protocol
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Cell:
    """The outcome of one method on one problem."""

    method: Method
    problem: Problem
    status: str = ""
    reached: bool = False
    seconds: float = math.nan
    steps: float = math.nan
    ms_per_step: float = math.nan
    startup: float = math.nan
    accuracy: Accuracy | None = None
    means_status: str = ""
    means_seconds: float = math.nan
    means_steps: float = math.nan
    notes: list[str] = field(default_factory=list)


def _median_accuracy(results: list[Accuracy], problem: Problem) -> Accuracy:
    mean_error = statistics.median(a.mean_error for a in results)
    sd_error = statistics.median(a.sd_error for a in results)
    return Accuracy(mean_error, sd_error, mean_error <= problem.mean_tolerance, sd_error <= problem.sd_tolerance)


def run_ppvi(method: Method, problem: Problem, repeats: int, log: Callable[[str], None]) -> Cell:
    cell = Cell(method, problem)
    runs, results = [], []
    for seed in range(repeats):
        run = method.fit(problem, method.variant, None, seed)
        runs.append(run)
        results.append(accuracy(problem, run.draws))
        log(
            f"  seed {seed}: {run.seconds:.2f} s, {run.steps} steps, mean err {results[-1].mean_error:.3f}, "
            f"sd err {results[-1].sd_error:.3f} {run.note}"
        )
        if run.note:
            cell.notes.append(f"seed {seed}: {run.note}")
    startups = []
    for seed in range(repeats):
        started = time.perf_counter()
        ppvi.fit(problem.ppvi_model, *problem.torch_args, guide="laplace", seed=seed)
        startups.append(time.perf_counter() - started)
    accurate = sum(result.ok for result in results)
    means_accurate = sum(result.means_ok for result in results)
    cell.reached = 2 * accurate > repeats
    cell.status = f"{'yes' if cell.reached else 'no'} {accurate}/{repeats}"
    cell.seconds = statistics.median(run.seconds for run in runs)
    cell.steps = statistics.median(run.steps for run in runs)
    cell.startup = statistics.median(startups)
    cell.ms_per_step = 1e3 * (cell.seconds - cell.startup) / cell.steps if cell.steps else math.nan
    cell.accuracy = _median_accuracy(results, problem)
    means_reached = 2 * means_accurate > repeats
    cell.means_status = f"{'yes' if means_reached else 'no'} {means_accurate}/{repeats}"
    if means_reached:
        cell.means_seconds, cell.means_steps = cell.seconds, cell.steps
    return cell


def _per_step(points: list[tuple[int, float]], startup: float) -> float:
    """Seconds per step: (median wall time of the fits with the most steps - start-up) / those steps.

    Medians and the largest step count rather than a least-squares line, so that one slow fit (another process
    taking the core) does not tilt the estimate.
    """
    top = max(steps for steps, _ in points)
    if top <= 1:
        return math.nan
    return (statistics.median(seconds for steps, seconds in points if steps == top) - startup) / top


def run_ladder(
    method: Method,
    problem: Problem,
    repeats: int,
    ladder: tuple[int, ...],
    time_cap: float,
    cost_probe_max_steps: int,
    log: Callable[[str], None],
) -> Cell:
    cell = Cell(method, problem)
    startups = [method.fit(problem, method.variant, 1, seed, evaluate=False).seconds for seed in range(3)]
    cell.startup = statistics.median(startups)
    log(f"  start-up (1 step): {', '.join(f'{s:.2f}' for s in startups)} s")
    timings: list[tuple[int, float]] = [(1, seconds) for seconds in startups]
    # The largest rung run: its step count, its fits (one, or R when seed 0 met the criterion) and their accuracy.
    last: tuple[int, list[Run], list[Accuracy]] | None = None
    capped = False

    def fit(rung: int, seed: int) -> tuple[Run, Accuracy]:
        run = method.fit(problem, method.variant, rung, seed)
        result = accuracy(problem, run.draws)
        timings.append((rung, run.seconds))
        log(
            f"  {rung} steps, seed {seed}: {run.seconds:.2f} s, mean err {result.mean_error:.3f}, "
            f"sd err {result.sd_error:.3f}"
        )
        return run, result

    def confirm(rung: int, runs: list[Run], results: list[Accuracy]) -> None:
        """Complete the fits at ``rung`` to all R seeds (once)."""
        for seed in range(len(runs), repeats):
            run, result = fit(rung, seed)
            runs.append(run)
            results.append(result)

    means_reached = False
    for rung in ladder:
        if rung > ALWAYS_RUN_STEPS and last is not None:
            previous_steps, previous_seconds = last[0], last[1][0].seconds
            predicted = cell.startup + max(previous_seconds - cell.startup, 0.0) / previous_steps * rung
            if predicted > time_cap:
                log(f"  {rung} steps: predicted {predicted:.0f} s > time cap {time_cap:.0f} s, not run")
                capped = True
                break
        run, result = fit(rung, 0)
        runs, results = [run], [result]
        last = (rung, runs, results)
        if not means_reached and result.means_ok:
            confirm(rung, runs, results)
            accurate = sum(r.means_ok for r in results)
            if 2 * accurate > repeats:
                means_reached = True
                cell.means_status = f"yes {accurate}/{repeats}"
                cell.means_seconds, cell.means_steps = statistics.median(r.seconds for r in runs), rung
        if not result.ok:
            continue
        confirm(rung, runs, results)
        accurate = sum(r.ok for r in results)
        if 2 * accurate > repeats:
            cell.reached = True
            cell.status = f"yes {accurate}/{repeats}"
            cell.seconds = statistics.median(r.seconds for r in runs)
            cell.steps = rung
            cell.accuracy = _median_accuracy(results, problem)
            break
        log(f"  {rung} steps: only {accurate}/{repeats} accurate, climbing on")
    top_steps = max(steps for steps, _ in timings)
    top_seconds = statistics.median(seconds for steps, seconds in timings if steps == top_steps)
    if top_seconds - cell.startup < COST_PROBE_SECONDS and top_steps > 1:
        probe = min(top_steps * COST_PROBE_FACTOR, cost_probe_max_steps)
        predicted = cell.startup + max(top_seconds - cell.startup, 0.0) / top_steps * probe
        if probe > top_steps and predicted <= time_cap:
            seconds = method.fit(problem, method.variant, probe, 0, evaluate=False).seconds
            timings.append((probe, seconds))
            log(f"  cost probe, {probe} steps: {seconds:.2f} s")
    cell.ms_per_step = 1e3 * _per_step(timings, cell.startup)
    if last is None:
        cell.status = "not run"
        return cell
    if not cell.reached:
        rung, runs, results = last
        cell.status = f"{'capped' if capped else 'not reached'} at {_steps(rung)}"
        if len(runs) > 1:
            cell.status += f" ({sum(r.ok for r in results)}/{len(runs)})"
        cell.seconds = statistics.median(r.seconds for r in runs)
        cell.steps, cell.accuracy = rung, _median_accuracy(results, problem)
    if not cell.means_status:
        cell.means_status = cell.status.split(" (")[0]
    return cell


# --------------------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------------------


def _steps(steps: float) -> str:
    if math.isnan(steps):
        return "-"
    steps = int(round(steps))
    return f"{steps // 1000}k" if steps >= 1000 and steps % 1000 == 0 else str(steps)


def _number(value: float, digits: int = 2, prefix: str = "") -> str:
    return "-" if value is None or math.isnan(value) else f"{prefix}{value:.{digits}f}"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = [" | ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def report(cells: list[Cell], repeats: int) -> str:
    header = [
        "method",
        "problem",
        "reached?",
        f"seconds to accuracy (median of {repeats})",
        "steps",
        "ms/step",
        "start-up s",
        "mean err (ref-sd)",
        "sd rel err",
    ]
    rows = []
    for cell in cells:
        shown = _number(cell.seconds, prefix="" if cell.reached else ">")
        error = cell.accuracy
        rows.append(
            [
                cell.method.label,
                cell.problem.name,
                cell.status,
                shown,
                _steps(cell.steps),
                _number(cell.ms_per_step, 3),
                _number(cell.startup),
                _number(error.mean_error if error else math.nan, 3),
                _number(error.sd_error if error else math.nan, 3),
            ]
        )
    means_header = ["method", "problem", "means reached?", f"seconds to the means (median of {repeats})", "steps"]
    means_rows = [
        [c.method.label, c.problem.name, c.means_status, _number(c.means_seconds), _steps(c.means_steps)] for c in cells
    ]
    return (
        table(rows, header)
        + "\n\nMeans only (every posterior mean within tolerance, sds not judged; same protocol):\n"
        + table(means_rows, means_header)
    )


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------


def _quiet() -> None:
    """Silence the peers' progress logs and warnings (PyMC adds its own INFO handler unless the root has one)."""
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    for name in ("pymc", "pytensor", "pytensor.tensor.blas", "jax", "absl"):
        logging.getLogger(name).setLevel(logging.ERROR)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"3 repeats, ladder {'/'.join(map(_steps, QUICK_LADDER))}, 20 s time cap per fit",
    )
    parser.add_argument(
        "--problems", nargs="+", choices=sorted(PROBLEMS), default=list(PROBLEMS), help="problems to run (default: all)"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=LIBRARIES,
        default=list(LIBRARIES),
        help="libraries to run (default: all that are installed)",
    )
    parser.add_argument("--repeats", type=int, help="fits per median (default 5; 3 with --quick)")
    parser.add_argument(
        "--time-cap",
        type=float,
        help="skip ladder rungs predicted to take longer than this many seconds (default 60; 20 quick)",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch.set_num_threads for ppvi and Pyro (default 1; 0 keeps torch's own choice, one per core)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    repeats = arguments.repeats or (3 if arguments.quick else 5)
    time_cap = arguments.time_cap or (20.0 if arguments.quick else 60.0)
    ladder = QUICK_LADDER if arguments.quick else FULL_LADDER
    probe_steps = COST_PROBE_MAX_STEPS["quick" if arguments.quick else "full"]
    if arguments.torch_threads > 0:
        torch.set_num_threads(arguments.torch_threads)
    _quiet()

    def log(message: str) -> None:
        print(message, flush=True)

    began = time.perf_counter()
    log(
        f"fit_speed: {'quick' if arguments.quick else 'full'} run, {repeats} repeats, ladder "
        f"{', '.join(map(_steps, ladder))}, time cap {time_cap:.0f} s per fit, "
        f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs"
    )
    libraries = []
    for library in arguments.methods:
        if installed(library):
            libraries.append(library)
        else:
            log(f"{library}: not installed, skipped (pip install -e .[bench])")
    problems = []
    for name in arguments.problems:
        made = PROBLEMS[name]()
        if isinstance(made, str):
            log(f"{name}: {made}")
            continue
        problems.append(made)
        moments = ", ".join(
            f"{k} {made.reference_mean[k]:.4g} (sd {made.reference_sd[k]:.4g})" for k in made.reference_mean
        )
        log(f"{name}: reference {moments}; tolerance means {made.mean_tolerance} sd, sds {made.sd_tolerance:.0%}")
        for note in made.notes:
            log(f"  note: {note}")
    if not problems:
        log("no problem to run")
        return 1

    for library in libraries:
        method = next(m for m in METHODS if m.library == library)
        started = time.perf_counter()
        method.fit(problems[0], method.variant, None if library == "ppvi" else 1, 0, evaluate=False)
        log(
            f"{library} ({library_version(library)}): first fit in process {time.perf_counter() - started:.1f} s "
            "(untimed warm-up)"
        )

    cells = []
    for problem in problems:
        for method in METHODS:
            if method.library not in libraries:
                continue
            log(f"{method.label} on {problem.name}:")
            if method.fixed_steps:
                cell = run_ladder(method, problem, repeats, ladder, time_cap, probe_steps, log)
            else:
                cell = run_ppvi(method, problem, repeats, log)
            cells.append(cell)
    log(f"\nTotal wall time {time.perf_counter() - began:.0f} s.\n")
    log(report(cells, repeats))
    for cell in cells:
        for note in cell.notes:
            log(f"note: {cell.method.label} on {cell.problem.name}, {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
