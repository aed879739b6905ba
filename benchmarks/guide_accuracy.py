"""How accurate is each guide family, and do its diagnostics say so? One table over posteriors and families.

Usage::

    python benchmarks/guide_accuracy.py --quick                          # four posteriors, 1k peer steps: ~3 min
    python benchmarks/guide_accuracy.py                                  # everything, 10k peer steps
    python benchmarks/guide_accuracy.py --quick --families meanfield fullrank
    python benchmarks/guide_accuracy.py --posteriors funnel banana --csv accuracy.csv

Rows (posteriors) and their references
--------------------------------------
``eight_schools_noncentered``, ``kidiq``, ``arK``, ``blr``, ``gauss_mix``
    The five posteriordb posteriors of :mod:`models.posteriordb` (``load_posterior``), against posteriordb's
    reference draws (rstan NUTS, 10 chains of 1000). Found under ``$PPVI_SHARED/posteriordb``, else
    ``../shared/posteriordb`` beside the repository; without them these rows are skipped, saying why.
``eight_schools_centered``
    :func:`models.eight_schools.centered` (Yao, Vehtari, Simpson & Gelman 2018: the funnel that defeats Gaussian
    guides). Its posterior over ``mu``, ``tau``, ``theta`` is that of the non-centred parameterisation, so the
    reference is NumPyro NUTS on the non-centred model (4 chains of 2000 after 1000 warm-up, with ``--quick``
    1000 after 500; target acceptance 0.99; kept in memory only), reporting ``theta``. Without NumPyro,
    posteriordb's draws of the same posterior (same data) are the reference.
``funnel``
    Neal's funnel in 10 dimensions (:mod:`models.funnel`; Neal 2003) against its exact moments: ``sd(v) = 3``,
    ``sd(x_i) = exp(9/4) = 9.49``.
``banana``
    The banana of :mod:`models.banana` (Haario, Saksman & Tamminen 1999; curvature 1, scale 1, noise 0.5)
    against its exact moments: ``sd(x1) = 1``, ``sd(x2) = 1.5``.

Columns (guide families)
------------------------
``meanfield``, ``fullrank``, ``flow``, ``auto``
    ``ppvi.fit(model, *data, guide=name, seed=seed)`` with default options (stops on its own rule), then
    ``ppvi.compare(model, *data, guides={name: fit}, reference=..., seed=seed)`` for the errors (4000 guide
    draws). A family this ppvi does not know (``ValueError: unknown guide``) reads "n/a".
``numpyro_iaf``, ``numpyro_bnaf``
    NumPyro's ``AutoIAFNormal`` and ``AutoBNAFNormal`` (default architectures), ``SVI`` with ``Trace_ELBO`` and
    ``ClippedAdam`` (step size 3e-3, gradient norm clipped at 10), a fixed number of steps (10k; 1k with
    ``--quick``, a smoke run: too few for these flows), JAX on the CPU in its default float32. The models are
    written in NumPyro below, term for term as the Pyro ones (Stan's ``ordered`` prior of gauss_mix as
    ``ImproperUniform(ordered_vector)`` plus the normal density, which differs from ppvi's
    :class:`models.posteriordb.OrderedNormal` by the constant log 2; checked: the log densities agree at random
    points, to rounding, up to that constant).
``pyro_iaf``
    Pyro's ``AutoIAFNormal`` (default architecture), ``SVI`` with ``Trace_ELBO`` and ``ClippedAdam`` (same
    settings), the same Pyro models from :mod:`models` in torch's default float32; a flat ``ImproperUniform``
    prior (kidiq) is swapped for the density-identical ``Normal(0, 1).mask(False)`` so that Pyro's autoguide can
    initialise.

Peers run only where importable; otherwise their cells read "not installed". ppvi never imports them.

In every cell
-------------
``mean err``
    The worst ``|mean - reference mean| / reference sd`` over every scalar component, from 4000 guide draws
    (Monte Carlo error about 0.016 posterior sd on a well-fitted component).
``sd ratio``
    The range (min-max over the components) of guide sd / reference sd: 1 is right, below 1 too narrow.
``k-hat``
    PSIS k-hat of the 4000 importance ratios ``log p - log q`` (Yao et al. 2018; trust the fit below 0.7).
    For ppvi it is ``ppvi.compare``'s ``khat`` column, the same computation as ``fit.diagnose(seed=seed).khat``;
    for the peers :func:`ppvi.diagnostics.psis` of ratios computed from the guide's own density (NumPyro:
    ``get_posterior`` and ``potential_energy`` in the unconstrained space; Pyro:
    ``vectorized_importance_weights``), "n/a" where that fails.
``s``
    Wall seconds of the fit: ``fit.seconds`` for ppvi (start-up and Laplace start included), the whole SVI
    (construction, tracing and XLA compilation for NumPyro, the step loop) for the peers; drawing and diagnosing
    are not timed.
``conv``
    ``fit.converged`` for ppvi (its stopping rule held); "-" for the peers, which run a fixed number of steps.

A family that raises on a posterior shows the exception's class and first line in its cell (cut to fit; the
whole first line is listed under the table and written to the CSV), and the run goes on.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before any import of jax: the peers run on the CPU

import argparse
import csv
import functools
import importlib.metadata
import importlib.util
import logging
import math
import platform
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

import ppvi
from ppvi.compare import reference_moments
from ppvi.models import banana, eight_schools, funnel
from ppvi.summary import flatten_draws

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Guide draws behind every mean, sd and k-hat.
NUM_EVALUATION_DRAWS = 4000
#: ppvi's registry families in the table ("auto" reads n/a where this ppvi does not have it).
PPVI_FAMILIES = ("meanfield", "fullrank", "flow", "auto")
#: The peers' flow guides.
PEER_FAMILIES = ("numpyro_iaf", "numpyro_bnaf", "pyro_iaf")
FAMILIES = PPVI_FAMILIES + PEER_FAMILIES
#: Fixed SVI steps of the peers (full run, --quick).
PEER_STEPS = {"full": 10_000, "quick": 1_000}
#: The peers' optimiser: Adam with gradient-norm clipping (NumPyro's and Pyro's ClippedAdam).
PEER_LEARNING_RATE = 3e-3
PEER_CLIP_NORM = 10.0
#: NumPyro NUTS reference for the centred eight schools (on the non-centred model): chains, and per chain the
#: (warm-up, kept) iterations of a full and of a --quick run.
NUTS_CHAINS = 4
NUTS_ITERATIONS = {"full": (1000, 2000), "quick": (500, 1000)}
NUTS_TARGET_ACCEPT = 0.99
#: posteriordb names of the five posteriors of models.posteriordb, by their short row names.
POSTERIORDB = {
    "eight_schools_noncentered": "eight_schools-eight_schools_noncentered",
    "kidiq": "kidiq-kidscore_momiq",
    "arK": "arK-arK",
    "blr": "sblrc-blr",
    "gauss_mix": "low_dim_gauss_mix-low_dim_gauss_mix",
}
ROWS = (*POSTERIORDB, "eight_schools_centered", "funnel", "banana")
#: Rows of --quick: one posteriordb posterior with a hard geometry (kidiq), the funnels, the banana.
QUICK_ROWS = ("kidiq", "eight_schools_centered", "funnel", "banana")
#: Sub-columns of each family.
METRICS = ("mean err", "sd ratio", "k-hat", "s", "conv")


# --------------------------------------------------------------------------------------------------------------
# Posteriors
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Posterior:
    """One row: the Pyro model and data, the reference, and a builder of the NumPyro model.

    ``reference`` is what :func:`ppvi.compare` takes: draws ``{site: (num_draws, *shape)}`` or exact moments
    ``{site: (mean, sd)}``. ``numpyro_model()`` returns ``(model, args)`` with non-array arguments bound; it is
    called only when a NumPyro family runs.
    """

    name: str
    model: Callable
    args: tuple
    reference: dict[str, Any]
    numpyro_model: Callable[[], tuple[Callable, tuple]]
    notes: list[str] = field(default_factory=list)


def shared_folder() -> Path:
    """``$PPVI_SHARED``, else ``../shared`` beside the repository root (as the tests and benchmarks find it)."""
    candidate = os.environ.get("PPVI_SHARED")
    return Path(candidate) if candidate else REPO_ROOT.parent / "shared"


def _numpy(value: torch.Tensor) -> np.ndarray:
    return value.detach().cpu().double().numpy()


def numpyro_models() -> dict[str, Callable]:
    """The rows' models in NumPyro, written term for term as the Pyro models of :mod:`models`."""
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as nd
    from numpyro.distributions import constraints

    def eight_schools_noncentered(sigma, y):
        mu = numpyro.sample("mu", nd.Normal(0.0, 5.0))
        tau = numpyro.sample("tau", nd.HalfCauchy(5.0))
        with numpyro.plate("schools", sigma.shape[-1]):
            theta_trans = numpyro.sample("theta_trans", nd.Normal(0.0, 1.0))
            theta = numpyro.deterministic("theta", mu + tau * theta_trans)
            numpyro.sample("y", nd.Normal(theta, sigma), obs=y)

    def eight_schools_centered(sigma, y):
        mu = numpyro.sample("mu", nd.Normal(0.0, 5.0))
        tau = numpyro.sample("tau", nd.HalfCauchy(5.0))
        with numpyro.plate("schools", sigma.shape[-1]):
            theta = numpyro.sample("theta", nd.Normal(mu, tau))
            numpyro.sample("y", nd.Normal(theta, sigma), obs=y)

    def kidiq(mom_iq, kid_score):
        beta = numpyro.sample("beta", nd.ImproperUniform(constraints.real, (), (2,)))
        sigma = numpyro.sample("sigma", nd.HalfCauchy(2.5))
        with numpyro.plate("data", mom_iq.shape[-1]):
            numpyro.sample("kid_score", nd.Normal(beta[..., 0] + beta[..., 1] * mom_iq, sigma), obs=kid_score)

    def autoregressive(y, num_lags):
        length = y.shape[-1]
        alpha = numpyro.sample("alpha", nd.Normal(0.0, 10.0))
        beta = numpyro.sample("beta", nd.Normal(0.0, 10.0).expand([num_lags]).to_event(1))
        sigma = numpyro.sample("sigma", nd.HalfCauchy(2.5))
        lagged = jnp.stack([y[num_lags - k - 1 : length - k - 1] for k in range(num_lags)], axis=-1)
        mean = alpha[..., None] + (beta[..., None, :] * lagged).sum(-1)
        with numpyro.plate("data", length - num_lags):
            numpyro.sample("y", nd.Normal(mean, sigma[..., None]), obs=y[num_lags:])

    def blr(X, y):
        beta = numpyro.sample("beta", nd.Normal(0.0, 10.0).expand([X.shape[-1]]).to_event(1))
        sigma = numpyro.sample("sigma", nd.HalfNormal(10.0))
        with numpyro.plate("data", X.shape[-2]):
            numpyro.sample("y", nd.Normal(X @ beta, sigma), obs=y)

    def gauss_mix(y):
        # Stan: ordered[2] mu; mu ~ normal(0, 2);
        mu = numpyro.sample("mu", nd.ImproperUniform(constraints.ordered_vector, (), (2,)))
        numpyro.factor("mu_prior", nd.Normal(0.0, 2.0).log_prob(mu).sum(-1))
        sigma = numpyro.sample("sigma", nd.HalfNormal(2.0).expand([2]).to_event(1))
        theta = numpyro.sample("theta", nd.Beta(5.0, 5.0))
        weights = jnp.stack([theta, 1.0 - theta], axis=-1)
        with numpyro.plate("data", y.shape[-1]):
            numpyro.sample("y", nd.MixtureSameFamily(nd.Categorical(probs=weights), nd.Normal(mu, sigma)), obs=y)

    def neal_funnel(dimension):
        v = numpyro.sample("v", nd.Normal(0.0, funnel.V_SCALE))
        numpyro.sample("x", nd.Normal(jnp.zeros(dimension - 1), jnp.exp(v / 2)[..., None]).to_event(1))

    def twisted_gaussian(curvature, scale, noise):
        x1 = numpyro.sample("x1", nd.Normal(0.0, scale))
        numpyro.sample("x2", nd.Normal(curvature * (x1**2 - scale**2), noise))

    return {
        "eight_schools_noncentered": eight_schools_noncentered,
        "eight_schools_centered": eight_schools_centered,
        "kidiq": kidiq,
        "arK": autoregressive,
        "blr": blr,
        "gauss_mix": gauss_mix,
        "funnel": neal_funnel,
        "banana": twisted_gaussian,
    }


def _numpyro_builder(row: str, arrays: tuple[np.ndarray, ...], **constants: Any) -> Callable[[], tuple]:
    """A builder of ``(model, args)``: the NumPyro model of ``row`` with its non-array ``constants`` bound."""

    def build() -> tuple[Callable, tuple]:
        import jax.numpy as jnp

        model = numpyro_models()[row]
        if constants:
            model = functools.partial(model, **constants)
        return model, tuple(jnp.asarray(array) for array in arrays)

    return build


def make_posteriordb(row: str) -> Posterior | str:
    """A posteriordb row, or the reason it is skipped."""
    from ppvi.models.posteriordb import load_posterior

    root = shared_folder() / "posteriordb"
    try:
        case = load_posterior(POSTERIORDB[row], root)
    except FileNotFoundError as error:
        return f"skipped: {str(error).splitlines()[0]} (set PPVI_SHARED)"
    constants = dict(getattr(case.model, "keywords", {}) or {})  # arK's num_lags, bound by load_posterior
    return Posterior(
        name=row,
        model=case.model,
        args=case.args,
        reference=dict(case.reference_draws),
        numpyro_model=_numpyro_builder(row, tuple(_numpy(a) for a in case.args), **constants),
        notes=[
            f"reference: posteriordb {case.name}, {case.num_chains} chains, "
            f"{len(next(iter(case.reference_draws.values())))} draws"
        ],
    )


@functools.cache
def eight_schools_reference(seed: int, num_warmup: int, num_draws: int) -> tuple[dict[str, np.ndarray], str]:
    """NUTS draws of ``mu``, ``tau``, ``theta`` of eight schools (non-centred model), cached in memory."""
    sigma, y = (np.asarray(v, dtype=np.float64) for v in (eight_schools.SIGMA, eight_schools.Y))
    if importlib.util.find_spec("numpyro") is not None:
        import jax
        import jax.numpy as jnp
        from numpyro.infer import MCMC, NUTS

        started = time.perf_counter()
        kernel = NUTS(numpyro_models()["eight_schools_noncentered"], target_accept_prob=NUTS_TARGET_ACCEPT)
        mcmc = MCMC(
            kernel,
            num_warmup=num_warmup,
            num_samples=num_draws,
            num_chains=NUTS_CHAINS,
            chain_method="sequential",
            progress_bar=False,
        )
        mcmc.run(jax.random.PRNGKey(seed), jnp.asarray(sigma), jnp.asarray(y))
        samples = mcmc.get_samples()
        divergences = int(mcmc.get_extra_fields()["diverging"].sum())
        draws = {name: np.asarray(samples[name], dtype=np.float64) for name in ("mu", "tau", "theta")}
        note = (
            f"reference: NumPyro NUTS on the non-centred model, {NUTS_CHAINS} chains x {num_draws} "
            f"(target accept {NUTS_TARGET_ACCEPT}, {divergences} divergences), {time.perf_counter() - started:.0f} s"
        )
        return draws, note
    folder = shared_folder() / "posteriordb"
    from ppvi.models.posteriordb import load_posterior

    case = load_posterior(POSTERIORDB["eight_schools_noncentered"], folder)
    return dict(case.reference_draws), "reference: posteriordb eight_schools_noncentered draws (NumPyro not installed)"


def make_eight_schools_centered(seed: int, quick: bool = False) -> Posterior | str:
    try:
        draws, note = eight_schools_reference(seed, *NUTS_ITERATIONS["quick" if quick else "full"])
    except FileNotFoundError as error:
        return f"skipped: no NumPyro for a NUTS reference and {str(error).splitlines()[0]}"
    sigma, y = eight_schools.data()
    return Posterior(
        name="eight_schools_centered",
        model=eight_schools.centered,
        args=(sigma, y),
        reference=draws,
        numpyro_model=_numpyro_builder("eight_schools_centered", (_numpy(sigma), _numpy(y))),
        notes=[note],
    )


def make_funnel() -> Posterior:
    return Posterior(
        name="funnel",
        model=funnel.model,
        args=(),
        reference=funnel.exact_moments(funnel.DEFAULT_DIMENSION),
        numpyro_model=_numpyro_builder("funnel", (), dimension=funnel.DEFAULT_DIMENSION),
        notes=[f"reference: exact moments, dimension {funnel.DEFAULT_DIMENSION}"],
    )


def make_banana() -> Posterior:
    constants = {"curvature": banana.CURVATURE, "scale": banana.SCALE, "noise": banana.NOISE}
    return Posterior(
        name="banana",
        model=banana.model,
        args=(),
        reference=banana.exact_moments(**constants),
        numpyro_model=_numpyro_builder("banana", (), **constants),
        notes=[f"reference: exact moments ({', '.join(f'{k} {v:g}' for k, v in constants.items())})"],
    )


def make_posterior(row: str, seed: int, quick: bool = False) -> Posterior | str:
    if row in POSTERIORDB:
        return make_posteriordb(row)
    if row == "eight_schools_centered":
        return make_eight_schools_centered(seed, quick)
    return {"funnel": make_funnel, "banana": make_banana}[row]()


# --------------------------------------------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Cell:
    """One (posterior, family) result: the numbers, or ``status`` saying why there are none."""

    status: str = "ok"  # "ok", "n/a", "not installed", or "ExceptionClass: first line"
    mean_error: float = math.nan
    sd_ratio_min: float = math.nan
    sd_ratio_max: float = math.nan
    khat: float = math.nan
    seconds: float = math.nan
    converged: str = "-"
    note: str = ""


def accuracy(draws: dict[str, np.ndarray], reference: dict[str, Any]) -> tuple[float, float, float]:
    """Worst mean error (reference sds) and the min and max sd ratio over the reference's scalar components."""
    moments = reference_moments(reference)
    columns = flatten_draws(draws)
    missing = sorted(set(moments) - set(columns))
    if missing:
        raise ValueError(f"the guide's draws lack the reference components {missing[:5]}")
    mean_errors, ratios = [], []
    for label, (mean, sd) in moments.items():
        column = columns[label]
        if not np.isfinite(column).all():
            return math.inf, math.nan, math.nan
        mean_errors.append(abs(column.mean() - mean) / sd)
        ratios.append(column.std(ddof=1) / sd)
    return float(max(mean_errors)), float(min(ratios)), float(max(ratios))


def khat_of(log_weights: np.ndarray | torch.Tensor) -> float:
    from ppvi.diagnostics import psis

    return float(psis(torch.as_tensor(np.asarray(log_weights, dtype=np.float64)))[1])


def run_ppvi(posterior: Posterior, family: str, seed: int) -> Cell:
    try:
        result = ppvi.fit(posterior.model, *posterior.args, guide=family, seed=seed)
    except ValueError as error:
        if str(error).startswith("unknown guide"):
            return Cell(status="n/a", note=f"this ppvi has no guide {family!r}")
        raise
    table = ppvi.compare(
        posterior.model,
        *posterior.args,
        guides={family: result},
        reference=posterior.reference,
        num_samples=NUM_EVALUATION_DRAWS,
        seed=seed,
    )
    table = table.loc[table["reference_sd"].notna()]
    return Cell(
        mean_error=float(table["mean_error"].max()),
        sd_ratio_min=float(table["sd_ratio"].min()),
        sd_ratio_max=float(table["sd_ratio"].max()),
        khat=float(table["khat"].iloc[0]),
        seconds=result.seconds,
        converged="yes" if result.converged else "no",
        note="" if result.converged else f"not converged: {result.message}",
    )


def run_numpyro(posterior: Posterior, family: str, seed: int, steps: int) -> Cell:
    import jax
    import numpyro
    from numpyro.infer import SVI, Predictive, Trace_ELBO
    from numpyro.infer.autoguide import AutoBNAFNormal, AutoIAFNormal
    from numpyro.infer.util import potential_energy

    model, args = posterior.numpyro_model()
    started = time.perf_counter()
    guide = (AutoIAFNormal if family == "numpyro_iaf" else AutoBNAFNormal)(model)
    optimizer = numpyro.optim.ClippedAdam(step_size=PEER_LEARNING_RATE, clip_norm=PEER_CLIP_NORM)
    svi = SVI(model, guide, optimizer, Trace_ELBO())
    result = svi.run(jax.random.PRNGKey(seed), steps, *args, progress_bar=False)
    jax.block_until_ready(result.params)
    seconds = time.perf_counter() - started

    draw_key, weight_key = jax.random.split(jax.random.PRNGKey(seed + 1))
    sites = list(posterior.reference)
    predictive = Predictive(
        model, guide=guide, params=result.params, num_samples=NUM_EVALUATION_DRAWS, return_sites=sites
    )
    draws = {name: np.asarray(value, dtype=np.float64) for name, value in predictive(draw_key, *args).items()}
    mean_error, low, high = accuracy(draws, posterior.reference)
    note = "" if np.isfinite(result.losses[-1]) else "final loss not finite"
    try:
        distribution = guide.get_posterior(result.params)
        latent, intermediates = distribution.sample_with_intermediates(weight_key, (NUM_EVALUATION_DRAWS,))
        log_q = distribution.log_prob(latent, intermediates)
        log_p = -jax.vmap(lambda z: potential_energy(model, args, {}, guide._unpack_latent(z)))(latent)
        khat = khat_of(np.asarray(log_p, dtype=np.float64) - np.asarray(log_q, dtype=np.float64))
    except Exception as error:  # the guide's density is not available in every version: k-hat reads n/a
        khat, note = math.nan, f"k-hat n/a ({type(error).__name__}: {_first_line(error)})"
    return Cell(mean_error=mean_error, sd_ratio_min=low, sd_ratio_max=high, khat=khat, seconds=seconds, note=note)


class _SampleableFlatPriors(poutine.messenger.Messenger):
    """Replace each real-valued ``ImproperUniform`` prior by ``Normal(0, 1).mask(False)``: the same (zero) log
    density, but a distribution Pyro's autoguide initialisers can draw from (see the ``ImproperUniform`` docs)."""

    def _pyro_sample(self, msg):
        fn = msg["fn"]
        if isinstance(fn, pdist.ImproperUniform) and fn.support is pdist.constraints.real:
            shape = fn.batch_shape + fn.event_shape
            zero = torch.zeros((), dtype=torch.get_default_dtype())
            msg["fn"] = pdist.Normal(zero, 1.0).expand(shape).to_event(len(fn.event_shape)).mask(False)


def run_pyro(posterior: Posterior, family: str, seed: int, steps: int) -> Cell:
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoIAFNormal
    from pyro.infer.importance import vectorized_importance_weights

    model = _SampleableFlatPriors()(posterior.model)
    args = posterior.args
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    started = time.perf_counter()
    guide = AutoIAFNormal(model)
    svi = SVI(
        model, guide, pyro.optim.ClippedAdam({"lr": PEER_LEARNING_RATE, "clip_norm": PEER_CLIP_NORM}), Trace_ELBO()
    )
    for _ in range(steps):
        loss = svi.step(*args)
    seconds = time.perf_counter() - started

    structure = poutine.trace(model).get_trace(*args)
    plate_dims = [
        -frame.dim
        for site in structure.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    shapes = {name: tuple(structure.nodes[name]["value"].shape) for name in posterior.reference}
    with torch.no_grad():
        log_weights, model_trace, _ = vectorized_importance_weights(
            model, guide, *args, num_samples=NUM_EVALUATION_DRAWS, max_plate_nesting=max(plate_dims, default=0)
        )
    draws = {
        name: _numpy(model_trace.nodes[name]["value"]).reshape(NUM_EVALUATION_DRAWS, *shape)
        for name, shape in shapes.items()
    }
    mean_error, low, high = accuracy(draws, posterior.reference)
    note = "" if math.isfinite(loss) else "final loss not finite"
    return Cell(
        mean_error=mean_error,
        sd_ratio_min=low,
        sd_ratio_max=high,
        khat=khat_of(_numpy(log_weights)),
        seconds=seconds,
        note=note,
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def run_cell(posterior: Posterior, family: str, seed: int, steps: int, installed: dict[str, bool]) -> Cell:
    """One cell; an exception becomes the cell's status (class and first line) and the run goes on."""
    library = "ppvi" if family in PPVI_FAMILIES else family.split("_")[0]
    if not installed.get(library, True):
        return Cell(status="not installed")
    try:
        if library == "ppvi":
            return run_ppvi(posterior, family, seed)
        if library == "numpyro":
            return run_numpyro(posterior, family, seed, steps)
        return run_pyro(posterior, family, seed, steps)
    except Exception as error:  # a failing family is a result, not the end of the run
        return Cell(status=f"{type(error).__name__}: {_first_line(error)}")


# --------------------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------------------


def _format(value: float, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"  # PSIS gives k-hat -inf for a flat tail (an exact guide)
    return f"{value:.{digits}f}"


def _cell_texts(cell: Cell) -> list[str]:
    if cell.status != "ok":
        return [cell.status]
    ratio = f"{_format(cell.sd_ratio_min)}-{_format(cell.sd_ratio_max)}"
    if math.isnan(cell.sd_ratio_min):
        ratio = "n/a"
    seconds = _format(cell.seconds, 1 if cell.seconds < 100 else 0)
    return [_format(cell.mean_error), ratio, _format(cell.khat), seconds, cell.converged]


def render(rows: list[str], families: list[str], cells: dict[tuple[str, str], Cell]) -> str:
    """The text table: a family per group of columns, its metrics under it; a failed cell spans its group."""
    texts = {key: _cell_texts(cell) for key, cell in cells.items()}
    widths = {}
    for family in families:
        metric_widths = [len(m) for m in METRICS]
        for row in rows:
            parts = texts[row, family]
            if len(parts) == len(METRICS):
                metric_widths = [max(w, len(p)) for w, p in zip(metric_widths, parts, strict=True)]
        group = max(sum(metric_widths) + 2 * (len(METRICS) - 1), len(family))
        metric_widths[-1] += group - (sum(metric_widths) + 2 * (len(METRICS) - 1))
        widths[family] = metric_widths
    name_width = max(len("posterior"), *(len(r) for r in rows))

    def group_width(family: str) -> int:
        return sum(widths[family]) + 2 * (len(METRICS) - 1)

    def spanning(text: str, width: int) -> str:
        return text if len(text) <= width else text[: width - 3] + "..."

    lines = [
        " | ".join([" " * name_width] + [f.center(group_width(f)) for f in families]),
        " | ".join(
            ["posterior".ljust(name_width)]
            + [
                "  ".join(
                    m.rjust(w) if i < len(METRICS) - 1 else m.ljust(w)
                    for i, (m, w) in enumerate(zip(METRICS, widths[f], strict=True))
                )
                for f in families
            ]
        ),
        "-+-".join(["-" * name_width] + ["-" * group_width(f) for f in families]),
    ]
    for row in rows:
        parts = [row.ljust(name_width)]
        for family in families:
            texts_here = texts[row, family]
            if len(texts_here) == 1:
                parts.append(spanning(texts_here[0], group_width(family)).ljust(group_width(family)))
            else:
                parts.append(
                    "  ".join(
                        t.rjust(w) if i < len(METRICS) - 1 else t.ljust(w)
                        for i, (t, w) in enumerate(zip(texts_here, widths[family], strict=True))
                    )
                )
        lines.append(" | ".join(parts))
    return "\n".join(lines)


def write_csv(path: str, rows: list[str], families: list[str], cells: dict[tuple[str, str], Cell]) -> None:
    """One line per posterior; per family its status and numbers (empty where there are none)."""
    fields = ["status", "mean_error", "sd_ratio_min", "sd_ratio_max", "khat", "seconds", "converged"]
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["posterior"] + [f"{family} {name}" for family in families for name in fields])
        for row in rows:
            line = [row]
            for family in families:
                cell = cells[row, family]
                numbers = [cell.mean_error, cell.sd_ratio_min, cell.sd_ratio_max, cell.khat, cell.seconds]
                shown = ["" if math.isnan(x) else f"{x:.6g}" for x in numbers]
                line += [cell.status, *shown, cell.converged if cell.status == "ok" else ""]
            writer.writerow(line)


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _quiet() -> None:
    """Silence warnings and the peers' logs: the table is the output."""
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    for name in ("jax", "absl", "numpyro"):
        logging.getLogger(name).setLevel(logging.ERROR)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"rows {', '.join(QUICK_ROWS)} (unless --posteriors) and {PEER_STEPS['quick']} peer steps",
    )
    parser.add_argument("--posteriors", nargs="+", choices=ROWS, help="rows to run (default: all; --quick: four)")
    parser.add_argument(
        "--families",
        nargs="+",
        choices=FAMILIES,
        default=list(FAMILIES),
        help="guide families (columns) to run (default: all)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of every fit, draw and NUTS run (default 0)")
    parser.add_argument("--peer-steps", type=int, help="SVI steps of the peers (default 10k; 1k with --quick)")
    parser.add_argument("--csv", help="also write the table as CSV to this path")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    torch.set_num_threads(1)
    _quiet()
    rows = list(arguments.posteriors or (QUICK_ROWS if arguments.quick else ROWS))
    families = list(dict.fromkeys(arguments.families))
    steps = arguments.peer_steps or PEER_STEPS["quick" if arguments.quick else "full"]

    def log(message: str) -> None:
        print(message, flush=True)

    began = time.perf_counter()
    log(
        f"guide_accuracy: {'quick' if arguments.quick else 'full'} run, seed {arguments.seed}, "
        f"{NUM_EVALUATION_DRAWS} evaluation draws, peers {steps} steps"
    )
    log(
        f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, torch threads {torch.get_num_threads()}"
    )
    packages = ("ppvi", "torch", "pyro-ppl", "numpy", "numpyro", "jax", "jaxlib")
    log("versions: " + ", ".join(f"{p} {_version(p)}" for p in packages))
    installed = {library: importlib.util.find_spec(library) is not None for library in ("numpyro", "pyro")}
    installed["numpyro"] = installed["numpyro"] and importlib.util.find_spec("jax") is not None
    for family in families:
        library = family.split("_")[0]
        if family in PEER_FAMILIES and not installed[library]:
            log(f"{family}: {library} not installed (pip install -e .[bench])")

    posteriors = []
    for row in rows:
        made = make_posterior(row, arguments.seed, arguments.quick)
        if isinstance(made, str):
            log(f"{row}: {made}")
            continue
        posteriors.append(made)
        for note in made.notes:
            log(f"{row}: {note}")
    if not posteriors:
        log("no posterior to run")
        return 1

    if installed["numpyro"] and any(f.startswith("numpyro") for f in families):
        # JAX's backend start and first compilations, not to be charged to the first NumPyro cell
        started = time.perf_counter()
        run_cell(make_banana(), "numpyro_iaf", arguments.seed, 10, installed)
        log(f"numpyro: first fit in process {time.perf_counter() - started:.1f} s (untimed warm-up)")

    cells: dict[tuple[str, str], Cell] = {}
    for posterior in posteriors:
        for family in families:
            started = time.perf_counter()
            cell = run_cell(posterior, family, arguments.seed, steps, installed)
            cells[posterior.name, family] = cell
            log(f"  {posterior.name} / {family}: {' '.join(_cell_texts(cell))} ({time.perf_counter() - started:.1f} s)")

    names = [p.name for p in posteriors]
    log(f"\nTotal wall time {time.perf_counter() - began:.0f} s.\n")
    log(render(names, families, cells))
    log(
        "\nmean err: worst |mean - reference| / reference sd over all components; sd ratio: min-max of guide sd / "
        f"reference sd; k-hat: PSIS of {NUM_EVALUATION_DRAWS} guide draws; s: fit seconds; conv: ppvi's stopping "
        f"rule held (peers: '-', {steps} fixed steps)."
    )
    for (row, family), cell in cells.items():
        if cell.status not in ("ok", "n/a", "not installed"):
            log(f"error: {row} / {family}: {cell.status}")
        elif cell.note:
            log(f"note: {row} / {family}: {cell.note}")
    if arguments.csv:
        write_csv(arguments.csv, names, families, cells)
        log(f"CSV written to {arguments.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
