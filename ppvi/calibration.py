"""Simulation-based calibration for variational inference: VSBC (Yao, Vehtari, Simpson & Gelman 2018, "Yes, but
did it work?: Evaluating variational inference", ICML, section 3).

Draw ``theta0`` from the prior and data ``y`` from the model given ``theta0``, fit the guide ``q`` to the posterior
``p(theta | y)``, and record, for every scalar component, ``p = P_q(theta < theta0)``. If ``q`` were the exact
posterior, ``p`` would be uniform on (0, 1) over replications (Cook, Gelman & Rubin 2006). An approximate ``q``
breaks uniformity in many harmless ways; VSBC asks only whether the distribution of ``p`` is *symmetric* about 0.5,
which an unbiased point estimate keeps: a two-sample Kolmogorov-Smirnov test of ``p`` against ``1 - p``.

Sign convention: ``p`` near 1 means most of ``q``'s mass lies *below* the true value. So ``mean(p) > 0.5`` says
``q`` sits too low (it underestimates the component), ``mean(p) < 0.5`` that it sits too high.

All replications are fitted in *one* vectorized optimisation: a Gaussian guide per replication over the flat
unconstrained latent vector (as :class:`ppvi.guides.MeanFieldGuide` / ``FullRankGuide`` build it), parameters of
shape ``(M, D)`` (and ``(M, D, D)`` Cholesky factors for ``"fullrank"``), the model traced once per step inside a
replication plate and a particle plate. Each replication's loss depends only on its own parameters, so the summed
loss gives every replication its own gradient.

A model written for one draw (``a + X @ beta``), or numpy-style with a batch dimension of its own
(``a[..., None] + ...``, which a replication plate silently counts once per replication), does not run inside those
plates. A probe (:meth:`_Problem.choose_vectorization`, as :func:`ppvi.vectorize.choose_strategy` for ``ppvi.fit``)
compares the plates' simulation and log densities of a few replications with single unbatched runs; where they
differ or fail, the simulation, the log density and the constrained draws run the model on one replication and one
point, batched over replications and points by :func:`torch.func.vmap` (``result.vectorization`` says which).
"""

from __future__ import annotations

import copy
import functools
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, NamedTuple

import numpy as np
import pyro
import torch
from pyro import poutine
from torch.distributions import biject_to

from ppvi import batched, vectorize
from ppvi.constrain import ConstrainMessenger, SymbolicBatchMessenger
from ppvi.engine import NotTraceableError
from ppvi.guides import MeanFieldGuide
from ppvi.initialization import batched_laplace_start
from ppvi.inputs import (
    computation,
    prepare_arguments,
    random_state_kept,
    resolve_device,
    resolve_dtype,
    threads_for,
)
from ppvi.options import OptionTypeError, check_model, validate
from ppvi.summary import component_names
from ppvi.tracing import max_plate_nesting_of as _max_plate_nesting
from ppvi.tracing import seeded as _seeded
from ppvi.tracing import structure_trace as _structure_trace
from ppvi.vectorize import Vectorization

if TYPE_CHECKING:
    import pandas as pd
    from distributed import Client

#: Significance level of the KS test behind the verdict: strict, because a VSBC table tests many components at
#: once and Yao et al. (2018) use the KS p-value as a screening statistic, not a single confirmatory test.
ALPHA = 0.001
#: Adam's learning rate in each replication's whitened coordinates (as ppvi.fit's PRECONDITIONED_LEARNING_RATE:
#: a tenth of a posterior sd per step), and in unconstrained units for replications without a Laplace start.
#: Measured before whitening, on eight schools (non-centred, mean-field, M = 1000): at 0.01 replications stopped
#: before mu had crossed its wide posterior and VSBC falsely flagged mu (KS p ~ 4e-20); at 0.1 it did not (0.22).
DEFAULT_LEARNING_RATE = 0.1
#: Cap on optimisation steps when ``steps`` is not given.
DEFAULT_MAX_STEPS = 5000
#: Guide draws per batch when counting SBC ranks (bounds memory at RANK_CHUNK x M x D values).
RANK_CHUNK = 100
#: Probability of the simultaneous ECDF band behind SBC's verdicts and plots.
BAND_PROBABILITY = 0.95
#: Simulated uniform samples behind the simultaneous band's pointwise level (Säilynoja et al. 2022, section 3.2).
BAND_SIMULATIONS = 2000
#: Guide draws per replication for ``p`` of components whose constraining transform is not elementwise monotone.
MONTE_CARLO_DRAWS = 1000
#: The training paths of :func:`vsbc` and :func:`sbc` (its ``engine`` option).
ENGINES = ("auto", "pyro", "traced", "compiled")
CalibrationEngine = Literal["auto", "pyro", "traced", "compiled"]
#: From this many replications ``engine="auto"`` compiles the batched step. Measured on eight schools, mean-field,
#: one thread of a 2-core CPU (``benchmarks/vsbc_speed.py``): at M = 1000 the compiled step saves 14 s of a 21 s
#: run once it is in TorchInductor's disk cache, and a machine's first run pays about 19 s of cold compilation. The
#: graph does not depend on M or on the simulated data, so that first compilation serves every later run; from
#: M = 500 the saving repays it within a few runs, below that the Pyro step costs a few seconds at most.
COMPILE_MIN_SIMULATIONS = 500
#: Replications simulated by the probe that chooses how the model is batched (:meth:`_Problem.choose_vectorization`):
#: as :data:`ppvi.vectorize.PROBE_DRAWS`, three, so that no dimension of size one or two in the model passes for
#: theirs.
PROBE_REPLICATIONS = vectorize.PROBE_DRAWS
#: Points per replication at which the probe compares log densities: two, on either side of the prior median (a
#: random offset and its negative), so that a model whose Python looks at all points at once (``bool((x > 0).all())``)
#: sees points on both sides of a threshold near the median; and two is a size the probe's replications do not
#: have, so that a model that mixes up points and replications shows it.
PROBE_POINTS = 2
#: Spread of the probe's points around the prior median, in unconstrained units: about a prior sd of a unit-scale
#: parameter, near enough to the prior's bulk for finite densities.
PROBE_SPREAD = 1.0


def _by_component(values_by_site: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``{site: (M, *shape)}`` -> ``{component name: (M,)}``, names as ArviZ writes them (``theta[0]``)."""
    columns = {}
    for name, values in values_by_site.items():
        flat = values.reshape(values.shape[0], -1)
        for index, label in enumerate(component_names(name, values.shape[1:])):
            columns[label] = flat[:, index]
    return columns


def _panels(count: int):
    """A figure with ``count`` small panels, four to a row; the unused ones of the last row hidden."""
    import matplotlib.pyplot as plt

    ncols = min(count, 4)
    nrows = math.ceil(count / ncols)
    figure, axes = plt.subplots(nrows, ncols, figsize=(3 * ncols, 2.4 * nrows), squeeze=False)
    for axis in list(axes.flat)[count:]:
        axis.set_visible(False)
    return figure, axes


@dataclass
class SimulationOutcome:
    """What VSBC and SBC share: the simulated replications and how their fits went.

    Attributes
    ----------
    theta0 : dict of str to numpy.ndarray
        The prior draws (true values), shape ``(num_simulations, *site_shape)`` per latent site.
    data : dict of str to numpy.ndarray
        The simulated observed sites, shape ``(num_simulations, *site_shape)``.
    converged : numpy.ndarray
        Per replication, whether its loss trace became stationary before the step cap (all ``False`` when a
        fixed number of ``steps`` was asked for: no test was made).
    steps : numpy.ndarray
        Steps each replication trained for.
    seconds : float
        Wall time of simulation, optimisation and the calibration statistics.
    guide : str
        ``"meanfield"`` or ``"fullrank"``.
    laplace_succeeded : numpy.ndarray
        Per replication, whether it started from (and was whitened by) its Laplace approximation.
    shards : pandas.DataFrame
        One row per batched run: its first replication, its number of replications, the worker that ran it
        (``"local"`` without a cluster) and its wall time in seconds.
    engine : str
        The training path that ran (``"pyro"``, ``"traced"`` or ``"compiled"``; see the ``engine`` option of
        :func:`vsbc`).
    engine_reason : str
        Why the Pyro path ran where ``engine="auto"`` asked for a traced one (empty otherwise).
    vectorization : ppvi.vectorize.Vectorization
        How the model ran over the replications and the points of each step: ``"broadcast"`` (inside a replication
        plate and a particle plate) or ``"vmap"`` (one replication at one point, batched by :func:`torch.func.vmap`),
        and why the plates were not used (see :meth:`_Problem.choose_vectorization`).
    """

    theta0: dict[str, np.ndarray]
    data: dict[str, np.ndarray]
    converged: np.ndarray
    steps: np.ndarray
    seconds: float
    guide: str
    laplace_succeeded: np.ndarray
    shards: pd.DataFrame | None = field(default=None, repr=False)
    engine: str = "pyro"
    engine_reason: str = ""
    vectorization: Vectorization = Vectorization("broadcast", "")

    @property
    def num_simulations(self) -> int:
        return int(self.converged.shape[0])

    @property
    def num_converged(self) -> int:
        return int(self.converged.sum())


@dataclass
class VSBCResult(SimulationOutcome):
    """The outcome of :func:`vsbc` (and the fields of :class:`SimulationOutcome`).

    Attributes
    ----------
    p_values : dict of str to numpy.ndarray
        ``P_q(theta < theta0)`` per latent site, shape ``(num_simulations, *site_shape)``.
    alpha : float
        Level of the KS test behind the verdicts.
    """

    p_values: dict[str, np.ndarray] = field(default_factory=dict)
    alpha: float = ALPHA
    #: The fitted guides: unconstrained means and marginal sds of the flat latent vector, shape ``(M, D)``.
    loc: np.ndarray | None = field(default=None, repr=False)
    sd: np.ndarray | None = field(default=None, repr=False)

    def components(self) -> dict[str, np.ndarray]:
        """``{component name: p over replications}``, names as ArviZ writes them (``theta[0]``)."""
        return _by_component(self.p_values)

    def to_dataframe(self) -> pd.DataFrame:
        """Per scalar component: KS statistic and p-value of ``p`` against ``1 - p``, ``mean_p`` and a verdict.

        The verdict is ``"symmetric"`` when the KS p-value is at least :attr:`alpha`, else ``"asymmetric (q too
        low)"`` when ``mean_p > 0.5`` (q's mass lies below the true values) or ``"asymmetric (q too high)"``.
        """
        import pandas as pd
        from scipy.stats import ks_2samp

        rows = {}
        for label, p in self.components().items():
            test = ks_2samp(p, 1.0 - p)
            mean_p = float(p.mean())
            if test.pvalue >= self.alpha:
                verdict = "symmetric"
            else:
                verdict = "asymmetric (q too low)" if mean_p > 0.5 else "asymmetric (q too high)"
            rows[label] = {
                "ks_statistic": float(test.statistic), "ks_pvalue": float(test.pvalue), "mean_p": mean_p,
                "verdict": verdict,
            }
        return pd.DataFrame.from_dict(rows, orient="index")

    def _repr_html_(self) -> str:
        """Jupyter's view: replications, KS table and verdict counts (:func:`ppvi.html.vsbc_html`)."""
        from ppvi.html import vsbc_html

        return vsbc_html(self)

    def plot(self, bins: int = 20):
        """Histograms of ``p`` per scalar component (a matplotlib Figure)."""

        columns = self.components()
        figure, axes = _panels(len(columns))
        table = self.to_dataframe()
        for axis, (label, p) in zip(axes.flat, columns.items(), strict=False):
            axis.hist(p, bins=bins, range=(0.0, 1.0), color="C0", alpha=0.8)
            axis.set_title(f"{label}  KS p={table.loc[label, 'ks_pvalue']:.2g}", fontsize=9)
            axis.set_xlim(0.0, 1.0)
        figure.supxlabel("p = P_q(theta < theta0)")
        figure.tight_layout()
        return figure


def simultaneous_ecdf_band(
    sample_size: int,
    cdf: np.ndarray,
    probability: float = BAND_PROBABILITY,
    num_simulations: int = BAND_SIMULATIONS,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Simultaneous ``probability`` band for the ECDF of ``sample_size`` draws, at points where the true CDF is
    ``cdf`` (Säilynoja, Bürkner & Vehtari 2022, "Graphical test for discrete uniformity and its applications in
    goodness-of-fit evaluation and multiple sample comparison", Statistics and Computing; simulation method).

    The ECDF counts at the points form a binomial process; simulating it (a multinomial over the gaps between
    points) gives the distribution of the smallest two-sided pointwise tail probability along a whole ECDF, and its
    ``1 - probability`` quantile ``gamma`` is the pointwise level at which binomial intervals hold the whole ECDF
    with probability ``probability``. Valid for discrete uniform ranks as for continuous PIT values.

    Returns
    -------
    lower, upper : numpy.ndarray
        Band limits for the ECDF (fractions in [0, 1]) at each point.
    """
    from scipy.stats import binom

    cdf = np.asarray(cdf, dtype=np.float64)
    if cdf.ndim != 1 or np.any(np.diff(cdf) < 0) or cdf.min() < 0 or cdf.max() > 1:
        raise ValueError("cdf must be a non-decreasing 1-D array of probabilities")
    gaps = np.diff(np.concatenate([[0.0], cdf, [1.0]])).clip(min=0.0)
    counts = np.random.default_rng(seed).multinomial(sample_size, gaps / gaps.sum(), size=num_simulations)
    counts = counts.cumsum(axis=1)[:, :-1]  # ECDF counts at the points, (num_simulations, points)
    tails = 2 * np.minimum(binom.cdf(counts, sample_size, cdf), binom.sf(counts - 1, sample_size, cdf))
    gamma = float(np.quantile(tails.min(axis=1), 1.0 - probability))
    lower = binom.ppf(gamma / 2, sample_size, cdf) / sample_size
    upper = binom.ppf(1 - gamma / 2, sample_size, cdf) / sample_size
    return lower, upper


@dataclass
class SBCResult(SimulationOutcome):
    """The outcome of :func:`sbc` (and the fields of :class:`SimulationOutcome`).

    Attributes
    ----------
    ranks : dict of str to numpy.ndarray
        ``#{l : theta_l < theta0}`` per latent site, integers in ``0..num_draws``, shape
        ``(num_simulations, *site_shape)``.
    num_draws : int
        Guide draws per replication (``L``).
    """

    ranks: dict[str, np.ndarray] = field(default_factory=dict)
    num_draws: int = 0

    def components(self) -> dict[str, np.ndarray]:
        """``{component name: ranks over replications}``, names as ArviZ writes them."""
        return _by_component(self.ranks)

    def ecdf_difference(self, probability: float = BAND_PROBABILITY) -> dict[str, tuple[np.ndarray, ...]]:
        """Per component: fractional ranks ``x``, ECDF minus uniform CDF at ``x``, and the simultaneous band
        (lower, upper) minus the uniform CDF, at the ``L`` points ``x_i = (i + 1) / (L + 1)``, ``i = 0..L-1``."""
        L, M = self.num_draws, self.num_simulations
        x = np.arange(1, L + 1) / (L + 1)  # P(rank <= i) under uniformity
        lower, upper = simultaneous_ecdf_band(M, x, probability)
        result = {}
        for label, ranks in self.components().items():
            ecdf = np.searchsorted(np.sort(ranks), np.arange(L), side="right") / M
            result[label] = (x, ecdf - x, lower - x, upper - x)
        return result

    def to_dataframe(self, probability: float = BAND_PROBABILITY, bins: int = 20) -> pd.DataFrame:
        """Per scalar component: the mean fractional rank ``rank / L`` (above 0.5: ``q`` sits too low), the share of
        ranks in the outer halves (above 0.5: ``q`` too narrow), a chi-square test of uniform ranks over ``bins``
        equal-width bins, whether the ECDF stays inside the simultaneous band, and a verdict."""
        import pandas as pd
        from scipy.stats import chisquare

        L, M = self.num_draws, self.num_simulations
        bins = min(bins, L + 1)
        edges = np.linspace(0, L + 1, bins + 1).round().astype(int)  # bins of rank values [edges[b], edges[b+1])
        expected = M * np.diff(edges) / (L + 1)
        rows = {}
        for label, (_, difference, lower, upper) in self.ecdf_difference(probability).items():
            ranks = self.components()[label]
            fraction = ranks / L
            observed = np.histogram(ranks, bins=edges)[0]
            inside = bool(np.all((difference >= lower - 1e-12) & (difference <= upper + 1e-12)))
            mean_rank = float(fraction.mean())
            outer = float(np.mean((fraction < 0.25) | (fraction > 0.75)))
            if inside:
                verdict = "uniform"
            elif abs(mean_rank - 0.5) > 2 * math.sqrt(1 / 12 / M):  # two standard errors of a uniform mean
                verdict = "non-uniform (q too low)" if mean_rank > 0.5 else "non-uniform (q too high)"
            else:
                verdict = "non-uniform (q too narrow)" if outer > 0.5 else "non-uniform (q too wide)"
            rows[label] = {
                "mean_rank": mean_rank, "outer_share": outer,
                "chi2_pvalue": float(chisquare(observed, expected).pvalue), "within_band": inside, "verdict": verdict,
            }
        return pd.DataFrame.from_dict(rows, orient="index")

    def _repr_html_(self) -> str:
        """Jupyter's view: replications, rank table and verdict counts (:func:`ppvi.html.sbc_html`)."""
        from ppvi.html import sbc_html

        return sbc_html(self)

    def plot(self, probability: float = BAND_PROBABILITY):
        """ECDF difference plots of the ranks with the simultaneous band, one panel per component (a Figure)."""

        curves = self.ecdf_difference(probability)
        figure, axes = _panels(len(curves))
        for axis, (label, (x, difference, lower, upper)) in zip(axes.flat, curves.items(), strict=False):
            axis.fill_between(x, lower, upper, step="post", color="C0", alpha=0.2, linewidth=0)
            axis.step(x, difference, where="post", color="C0")
            axis.axhline(0.0, color="0.5", linewidth=0.5)
            axis.set_title(label, fontsize=9)
            axis.set_xlim(0.0, 1.0)
        figure.supxlabel("fractional rank")
        figure.supylabel("ECDF difference")
        figure.tight_layout()
        return figure


def vsbc(
    model: Callable,
    *args,
    observed: str | Sequence[str],
    guide: Literal["meanfield", "fullrank"] = "meanfield",
    num_simulations: int = 1000,
    steps: int | None = None,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    num_particles: int = 8,
    seed: int = 0,
    device: str | torch.device = "auto",
    cluster: Client | None = None,
    num_shards: int | None = None,
    engine: CalibrationEngine = "auto",
    _shift: float = 0.0,
) -> VSBCResult:
    """VSBC of a Gaussian ADVI guide on ``model``.

    Parameters
    ----------
    model : callable
        A Pyro model, ``model(*args)``: one that broadcasts over batch dimensions left of its own plates runs
        inside a replication plate and a particle plate; one written for a single draw (``a + X @ beta``) or
        numpy-style (``a[..., None] + ...``) runs on one replication at one point, batched by
        :func:`torch.func.vmap`, with the same results. A probe chooses (``result.vectorization`` says which and
        why); a model neither can batch (Python control flow on sampled values) is refused with a ValueError.
    *args
        The model's inputs other than the observed data (eight schools: ``sigma``).
    observed : str or sequence of str
        Names of the observed sample sites; they are simulated (any ``obs=`` the model was given is dropped).
    guide : {"meanfield", "fullrank"}
        Gaussian family on the unconstrained latent vector.
    num_simulations : int
        Replications ``M``.
    steps : int, optional
        Train every replication for exactly this many steps (the result is the average of the last
        ``min(100, steps // 2)`` iterates). By default each replication trains until its loss trace is stationary
        (:func:`ppvi.convergence.is_stationary`, window 100, checked every 100 steps); at each stationary point its
        learning rate moves to the next stage of :data:`ppvi.training.STAGES`; stationary in the last, it averages
        its next 100 iterates (Polyak averaging) and stops. Each replication goes through
        :func:`ppvi.training.run_batch`, the loop ``ppvi.fit`` trains through, with its own stages, stopping, and
        non-finite and divergence checks (a replication whose loss is not finite stops at its last finite check,
        one that diverges at its best). At most :data:`DEFAULT_MAX_STEPS` steps; replications still running then
        keep their last iterate (or their average so far) and are reported ``converged=False``. Stopped
        replications leave the batch, so the cost of a step falls as replications converge.
    learning_rate : float
        Adam's learning rate, in the whitened coordinates of each replication's Laplace approximation (the guide
        starts there at N(0, I)); replications without a mode start at the prior median with scale 0.1 and train in
        unconstrained units. See
        :data:`DEFAULT_LEARNING_RATE`.
    num_particles : int
        Monte Carlo draws per replication per step.
    seed : int
        Seed of the simulation, the optimisation and the Monte Carlo ``p`` (the global state is restored).
    device : {"auto", "cpu", "cuda"}
        Where to compute (float64 on the CPU, float32 on a GPU); with ``cluster``, where each worker computes.
    cluster : dask.distributed.Client, optional
        Fit the replications on this Dask cluster (``pip install ppvi[distributed]``): they are cut into
        ``num_shards`` contiguous shards, each one batched run on a worker (:mod:`ppvi.sharding`). The simulation
        stays in this process. Every replication draws its noise from its own stream
        (:class:`ppvi.batched.ReplicationStreams`), so the result equals the unsharded one for the same seed. A
        shard whose worker dies is retried by Dask. ``result.shards`` says which worker ran which replications and
        for how long.
    num_shards : int, optional
        Shards for ``cluster`` (default: one per worker). More shards balance load better; fewer vectorise more.
    engine : {"auto", "pyro", "traced", "compiled"}
        How the batched training step runs (:mod:`ppvi.batched`). ``"pyro"`` runs the model through Pyro at
        every step. ``"traced"`` traces the step (model, gradient and Adam) once into one graph for every batch
        size (:class:`ppvi.batched.TracedBatchedStep`) and replays it; ``"compiled"`` also compiles that graph
        with TorchInductor, several times faster per step but with a cold compilation of 15-20 s on a
        small CPU (cached on disk for later runs). ``"auto"`` compiles when there are at least
        :data:`COMPILE_MIN_SIMULATIONS` replications (where compiling repays itself) and runs Pyro below that. A
        model that does not trace (control flow on sampled values, random draws of its own) trains through Pyro
        under ``"auto"``, and ``result.engine_reason`` says why; under ``"traced"`` or ``"compiled"`` it raises.

    Returns
    -------
    VSBCResult
    """
    started = time.perf_counter()
    check_model(model, "ppvi.vsbc")
    fields, computed, loc, scale = _simulate_and_fit(
        model, args, observed, guide, num_simulations, steps, learning_rate, num_particles, seed, device,
        _shift, cluster, num_shards, engine=engine,
    )
    sd = _marginal_sd(scale, guide)
    return VSBCResult(
        p_values=computed, **fields, seconds=time.perf_counter() - started,
        loc=loc.double().cpu().numpy(), sd=sd.double().cpu().numpy(),
    )


def sbc(
    model: Callable,
    *args,
    observed: str | Sequence[str],
    guide: Literal["meanfield", "fullrank"] = "meanfield",
    num_simulations: int = 1000,
    num_draws: int = 99,
    steps: int | None = None,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    num_particles: int = 8,
    seed: int = 0,
    device: str | torch.device = "auto",
    cluster: Client | None = None,
    num_shards: int | None = None,
    engine: CalibrationEngine = "auto",
    _shift: float = 0.0,
) -> SBCResult:
    """Simulation-based calibration (Talts, Betancourt, Simpson, Vehtari & Gelman 2018) of a Gaussian ADVI guide.

    The simulations and the batched fits are those of :func:`vsbc`; each fitted guide then gives ``num_draws``
    independent draws ``theta_1..theta_L`` and, per scalar component, the rank ``#{l : theta_l < theta0}`` in
    ``0..L``. For the exact posterior the ranks are uniform on ``0..L``; SBC asks for that (a stronger demand than
    VSBC's symmetry, which a variational approximation rarely meets exactly, so read its verdicts as a description
    of *how* ``q`` is off). :meth:`SBCResult.plot` draws the ECDF difference with simultaneous bands
    (Säilynoja, Bürkner & Vehtari 2022).

    Parameters
    ----------
    model, *args, observed, guide, num_simulations, steps, learning_rate, num_particles, seed, device, cluster
    num_shards, engine
        As :func:`vsbc`.
    num_draws : int
        ``L``, guide draws per replication; ranks take ``L + 1`` values. Talts et al. suggest ``L + 1`` dividing
        into equal histogram bins, hence the default 99 (100 rank values).

    Returns
    -------
    SBCResult
    """
    started = time.perf_counter()
    check_model(model, "ppvi.sbc")
    num_draws = validate({"num_draws": num_draws})["num_draws"]
    fields, computed, _, _ = _simulate_and_fit(
        model, args, observed, guide, num_simulations, steps, learning_rate, num_particles, seed, device,
        _shift, cluster, num_shards, num_draws=num_draws, engine=engine,
    )
    return SBCResult(ranks=computed, num_draws=num_draws, **fields, seconds=time.perf_counter() - started)


def _marginal_sd(scale: torch.Tensor, guide: str) -> torch.Tensor:
    return scale if guide == "meanfield" else scale.pow(2).sum(-1).sqrt()


#: The purposes of :class:`ppvi.batched.ReplicationStreams`: separate random streams for training noise,
#: Monte Carlo p-values and SBC draws, so that one never shifts another.
TRAINING_STREAM, P_VALUE_STREAM, RANK_STREAM = 0, 1, 2


def _simulate_and_fit(
    model, args, observed, guide, num_simulations, steps, learning_rate, num_particles, seed, device, shift,
    cluster, num_shards, num_draws=None, engine="auto",
):
    """Validate, simulate ``M`` data sets, fit every replication (in this process, or in shards on ``cluster``)
    and compute p-values (``num_draws=None``) or SBC ranks; returns the result's common fields and the
    replications' ``computed``, ``loc`` and ``scale``."""
    if not isinstance(guide, str) or guide not in ("meanfield", "fullrank"):
        raise ValueError(f"guide must be 'meanfield' or 'fullrank', got {guide!r}")
    if not isinstance(engine, str) or engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(map(repr, ENGINES))}, got {engine!r}")
    if engine == "auto":
        engine = "compiled" if num_simulations >= COMPILE_MIN_SIMULATIONS else "pyro"
        required = False
    else:
        required = engine != "pyro"
    checked = validate(
        dict(num_simulations=num_simulations, steps=steps, learning_rate=learning_rate, num_particles=num_particles,
             seed=seed, device=device),
        optional=("steps", "seed"),
    )
    num_simulations, steps, learning_rate = checked["num_simulations"], checked["steps"], checked["learning_rate"]
    num_particles, seed = checked["num_particles"], checked["seed"]
    observed = [observed] if isinstance(observed, str) else observed
    if (
        not isinstance(observed, (list, tuple))
        or not observed
        or not all(isinstance(name, str) for name in observed)
    ):
        raise OptionTypeError(
            f"observed must name the model's observed sample site(s), e.g. observed='y' or observed=('y', 'z'), "
            f"got {observed!r}"
        )
    observed = list(observed)
    if seed is None:  # one seed for every shard; drawn from (and so reproducible under) torch's global state
        seed = int(torch.randint(2**62, ()).item())
    resolved_device = resolve_device(device)
    dtype = resolve_dtype("auto", resolved_device)
    with computation(resolved_device, dtype, threads_for(args, {}, resolved_device, num_simulations)), _seeded(seed):
        args, _ = prepare_arguments(model, args, {}, resolved_device, dtype)
        problem = _Problem(model, args, observed)
        theta0, data = problem.simulate(num_simulations)
    task = _ShardTask(
        model=model, args=args, observed=observed, guide=guide, steps=steps, learning_rate=learning_rate,
        num_particles=num_particles, seed=seed, device=str(resolved_device), shift=shift, num_draws=num_draws,
        prototype_data={name: value[:1] for name, value in data.items()}, engine=engine,
        engine_required=required, vectorization=problem.vectorization,
    )
    if cluster is None:
        outcomes = [task(0, data, theta0)]
    else:
        from ppvi.sharding import run_sharded

        outcomes = run_sharded(cluster, task, data, theta0, num_simulations, num_shards)
    return _gather(outcomes, theta0, data, problem, guide)


class _ShardTask(NamedTuple):
    """Everything a worker needs to fit a contiguous range of replications (picklable, for Dask)."""

    model: Callable
    args: tuple
    observed: list[str]
    guide: str
    steps: int | None
    learning_rate: float
    num_particles: int
    seed: int
    device: str
    shift: float
    num_draws: int | None
    prototype_data: dict[str, torch.Tensor]
    engine: str = "traced"
    engine_required: bool = False
    #: How the model runs over replications (the probe's choice in the process that simulated); ``None``: probe
    #: again here.
    vectorization: Vectorization | None = None

    def __call__(self, first: int, data: dict[str, torch.Tensor], theta0: dict[str, torch.Tensor]) -> dict:
        """Fit replications ``first .. first + len`` (global indices) and compute their p-values or ranks."""
        started = time.perf_counter()
        device = torch.device(self.device)
        dtype = resolve_dtype("auto", device)
        # The fit's thread rule over the replications' ops (data of every replication, times the particles): VSBC
        # of a small model on a busy machine slowed 20-30 fold on two threads (10.6 s quiet, 214-308 s busy).
        threads = threads_for((*self.args, *data.values()), {}, device, self.num_particles)
        with computation(device, dtype, threads), _seeded(self.seed):
            data = {name: value.to(device) for name, value in data.items()}
            theta0 = {name: value.to(device) for name, value in theta0.items()}
            problem = _Problem(
                self.model, self.args, self.observed, self.prototype_data, self.seed, self.vectorization
            )
            replications = _Replications(problem, data, theta0, first)
            fit, succeeded, engine, reason = replications.optimise(
                self.guide, self.steps, self.learning_rate, self.num_particles, self.engine, self.engine_required
            )
            with torch.no_grad():
                loc = fit.loc + self.shift * _marginal_sd(fit.scale, self.guide)  # a deliberately biased guide
                if self.num_draws is None:
                    computed = replications.p_values(loc, fit.scale, self.guide)
                else:
                    computed = replications.ranks(loc, fit.scale, self.guide, self.num_draws)
        return {
            "first": first, "computed": computed, "loc": loc.cpu(), "scale": fit.scale.cpu(),
            "converged": fit.converged, "steps": fit.steps, "laplace_succeeded": succeeded,
            "seconds": time.perf_counter() - started, "worker": _worker_name(), "engine": engine,
            "engine_reason": reason,
        }


def _worker_name() -> str:
    """The Dask worker running this task, or ``"local"``. A worker has imported ``distributed``; a plain process
    need not pay for importing it (seconds) just to learn that it is not one."""
    module = sys.modules.get("distributed")
    if module is None:
        return "local"
    try:
        return module.get_worker().address
    except ValueError:  # distributed is imported, but this is not a worker
        return "local"


def _gather(outcomes: list[dict], theta0, data, problem: _Problem, guide: str):
    """Concatenate the shards' outcomes (in replication order) into the result's fields."""
    import pandas as pd  # here, not at the top: pandas costs a third of a second at start-up

    outcomes = sorted(outcomes, key=lambda outcome: outcome["first"])

    def joined(key):
        return np.concatenate([outcome[key] for outcome in outcomes])

    computed = {name: np.concatenate([outcome["computed"][name] for outcome in outcomes])
                for name in outcomes[0]["computed"]}
    loc = torch.cat([outcome["loc"] for outcome in outcomes])
    scale = torch.cat([outcome["scale"] for outcome in outcomes])
    shards = pd.DataFrame({
        "first": [outcome["first"] for outcome in outcomes],
        "replications": [len(outcome["converged"]) for outcome in outcomes],
        "worker": [outcome["worker"] for outcome in outcomes],
        "seconds": [outcome["seconds"] for outcome in outcomes],
    })
    fields = {
        "theta0": {name: value.double().cpu().numpy() for name, value in theta0.items()},
        "data": {name: value.double().cpu().numpy().reshape(value.shape[0], *problem.observed_shapes[name])
                 for name, value in data.items()},
        "converged": joined("converged"), "steps": joined("steps"), "guide": guide,
        "laplace_succeeded": joined("laplace_succeeded"), "shards": shards,
        "engine": ", ".join(dict.fromkeys(outcome["engine"] for outcome in outcomes)),
        "engine_reason": "; ".join(dict.fromkeys(outcome["engine_reason"] for outcome in outcomes if
                                                 outcome["engine_reason"])),
        "vectorization": problem.vectorization,
    }
    return fields, computed, loc, scale


class _Problem:
    """The model, its plates, its flat latent layout (a :class:`ppvi.guides.MeanFieldGuide` prototype) and how it
    runs over a batch of replications (:attr:`vectorization`).

    Parameters
    ----------
    vectorization : ppvi.vectorize.Vectorization, optional
        How the model runs over replications, as :meth:`choose_vectorization` chose it (in the process that
        simulated, for a shard); by default chosen on first use.
    """

    def __init__(
        self, model: Callable, args: tuple, observed: list[str], prototype_data=None, seed=None,
        vectorization: Vectorization | None = None,
    ):
        self.model, self.args, self.observed, self.seed = model, args, observed, seed
        structure = _structure_trace(model, args, {})
        missing = [name for name in observed if name not in structure.nodes]
        if missing:
            raise ValueError(f"observed site(s) {missing} not found in the model")
        self.max_plate_nesting = _max_plate_nesting(structure)
        self.observed_shapes = {name: tuple(structure.nodes[name]["value"].shape) for name in observed}
        # One replication's data as a replication plate left of the model's plates lays it out: its batch
        # dimensions padded with ones on the left to the model's plates (an observed site outside a plate of a
        # model with one: (1, *event_shape)). Every replication's data is stored so, whichever way it was simulated.
        self.data_shapes = {}
        for name in observed:
            shape = self.observed_shapes[name]
            batch_dims = len(shape) - len(structure.nodes[name]["fn"].event_shape)
            self.data_shapes[name] = (1,) * max(0, self.max_plate_nesting - batch_dims) + shape
        self._vectorization = vectorization
        # Whether vmap batches the simulation; None: not known yet (try it). torch's Dirichlet sampler (and the Beta
        # and LKJ samplers built on it) is an autograd.Function that vmap cannot batch.
        self._vmapped_simulation: bool | None = None
        if prototype_data is not None:
            self.build_prototype(prototype_data, seed)

    @property
    def vectorization(self) -> Vectorization:
        """How the model runs over a batch of replications: given, or chosen by :meth:`choose_vectorization`."""
        if self._vectorization is None:
            self._vectorization = self.choose_vectorization()
        return self._vectorization

    def simulate(self, M: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``theta0`` and the observed sites of ``M`` prior predictive draws, batched as :attr:`vectorization`
        says. Builds the prototype on the first replication's data. Data have shape ``(M, *data_shapes[name])``:
        the replication dim, then the site's shape with its batch padded to the model's plates."""
        with torch.no_grad():
            if self.vectorization.strategy == "broadcast":
                simulation = self._broadcast_simulation(M)
                values = {name: site["value"] for name, site in simulation.nodes.items() if site["type"] == "sample"}
                data = {name: values[name].detach() for name in self.observed}
            else:
                values = self._simulate_each(M)
                data = {name: values[name].detach().reshape(M, *self.data_shapes[name]) for name in self.observed}
        self.build_prototype({name: value[:1] for name, value in data.items()}, None)
        theta0 = {name: values[name].detach().reshape(M, *site["value"].shape) for name, site in self.sites.items()}
        return theta0, data

    def _simulate_one(self) -> dict[str, torch.Tensor]:
        """One prior predictive draw, unbatched: the value of every site the simulation samples."""
        with poutine.block():
            trace = poutine.trace(_Uncondition(self.observed)(self.model)).get_trace(*self.args)
        return {
            name: site["value"] for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"]
        }

    def _broadcast_simulation(self, M: int) -> poutine.Trace:
        """``M`` prior predictive draws in one trace, inside a replication plate left of the model's plates."""
        replications = pyro.plate("_ppvi_replications", M, dim=-(self.max_plate_nesting + 1))
        with poutine.block(), replications:
            return poutine.trace(_Uncondition(self.observed)(self.model)).get_trace(*self.args)

    def _simulate_each(self, M: int) -> dict[str, torch.Tensor]:
        """``M`` prior predictive draws of the unbatched model, ``{site: (M, *shape)}``: batched by
        :func:`ppvi.vectorize.vmapped_random_runs` (the random stream of the plates' simulation), or, where vmap
        cannot batch the model's samplers, one at a time (a simulation is one run of the model per replication;
        the fits, thousands of steps each, stay batched)."""
        like = torch.empty(())
        if self._vmapped_simulation is not False:
            try:
                values = vectorize.vmapped_random_runs(self._simulate_one, M, like.device)
            except Exception:  # noqa: BLE001 - any failure of vmap means: one replication at a time
                if self._vmapped_simulation:
                    raise  # it batched the probe's replications: an error of this simulation's own
                self._vmapped_simulation = False
            else:
                self._vmapped_simulation = True
                return values
        runs = [self._simulate_one() for _ in range(M)]
        return {name: torch.stack([run[name] for run in runs]) for name in runs[0]}

    def choose_vectorization(self) -> Vectorization:
        """How to run the model over a batch of replications, by a probe (the global random state is restored
        afterwards, so that the simulation draws what it would have drawn without it).

        The probe simulates :data:`PROBE_REPLICATIONS` replications with single unbatched runs of the model, and
        compares their log densities at :data:`PROBE_POINTS` points each, evaluated one replication and one point
        at a time (correct by construction), with those of the plates (``"broadcast"``): the plates must simulate
        every replication without a site whose log-probability shape breaks the convention of a batch dimension
        left of the model's plates (:func:`ppvi.vectorize.particle_shape_problems`) and give the same log
        densities. If they do not, :func:`torch.func.vmap` over single runs must give them (``"vmap"``). A model
        whose density is random (a draw of its own) cannot be compared by value; the plates then need only to run
        without a shape problem.

        Raises
        ------
        ValueError
            When neither gives the single runs' log densities: calibration fits its replications in one batched
            optimisation and does not offer them one at a time.
        """
        M = PROBE_REPLICATIONS
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        with random_state_kept(), torch.random.fork_rng(devices=devices), torch.no_grad():
            runs = [self._simulate_one() for _ in range(M)]
            values = {name: torch.stack([run[name] for run in runs]) for name in runs[0]}
            data = {name: values[name].reshape(M, *self.data_shapes[name]) for name in self.observed}
            probe = copy.copy(self)  # its own prototype, on the probe's data; this problem's is built by simulate
            probe.build_prototype({name: value[:1] for name, value in data.items()}, None)
            replications = _Replications(probe, data, {name: values[name] for name in probe.sites})
            offset = PROBE_SPREAD * torch.randn(M, probe.latent_dim)
            points = probe.init_loc + torch.stack([offset, -offset])  # (PROBE_POINTS, M, D)

            def one_at_a_time() -> torch.Tensor:
                return torch.stack([
                    torch.stack([
                        replications.single_log_density(points[s, m], *(value[m] for value in data.values()))
                        for m in range(M)
                    ]) for s in range(PROBE_POINTS)
                ])

            reference = one_at_a_time()
            deterministic = vectorize.log_densities_agree(one_at_a_time(), reference)
            probe._vectorization = Vectorization("broadcast", "")
            problems, failure = [], ""
            try:
                problems = vectorize.particle_shape_problems(
                    self._broadcast_simulation(M), M, self.max_plate_nesting
                )
                total = replications.log_density(points, *data.values())
            except (ValueError, RuntimeError, IndexError, TypeError) as error:
                failure = f"it does not broadcast over a batch of replications ({vectorize.first_line(error)})"
            else:
                if not problems and (not deterministic or vectorize.log_densities_agree(total, reference)):
                    return probe._vectorization
            # The shape problems first: they say what is wrong where the error they lead to does not.
            reason = (
                f"in a plate of {M} replications, {'; '.join(problems)}" if problems
                else failure or "its log densities over a batch of replications differ from those of single runs"
            )
            probe._vectorization = Vectorization("vmap", reason)
            try:
                total = replications.log_density(points, *data.values())
            except Exception as error:  # noqa: BLE001 - any failure of vmap: the model cannot be batched
                raise ValueError(
                    _refusal(reason, f"torch.func.vmap cannot batch it ({vectorize.first_line(error)})")
                ) from error
            if deterministic and not vectorize.log_densities_agree(total, reference):
                raise ValueError(_refusal(reason, "torch.func.vmap changes its log densities"))
            try:
                vectorize.vmapped_random_runs(self._simulate_one, M, points.device)
            except Exception as error:  # noqa: BLE001 - the fits batch; the simulation runs one at a time
                self._vmapped_simulation = False
                reason += (
                    f"; its prior predictive draws are simulated one replication at a time, as torch.func.vmap "
                    f"cannot batch its samplers ({vectorize.first_line(error)})"
                )
            else:
                self._vmapped_simulation = True
            return Vectorization("vmap", reason)

    def build_prototype(self, first_data: dict[str, torch.Tensor], seed: int | None) -> None:
        """The flat latent layout and the prior-median start, from the model conditioned on ``first_data`` (the
        first replication's data) under ``seed``: the same on every worker."""
        values = {name: value.reshape(self.observed_shapes[name]) for name, value in first_data.items()}
        self.prototype = MeanFieldGuide(poutine.condition(self.model, data=values))
        with poutine.block(), torch.no_grad(), _seeded(seed):
            self.prototype(*self.args)
        self.latent_dim = self.prototype.latent_dim
        self.init_loc = self.prototype.preconditioner_loc.detach().clone()
        self.sites = {name: site for name, site in self.prototype.prototype_trace.iter_stochastic_nodes()}


def _refusal(reason: str, vmap_problem: str) -> str:
    """The error for a model neither the plates nor vmap can batch over replications: what is wrong, and the fix."""
    return (
        f"ppvi.vsbc and ppvi.sbc cannot batch this model over replications: {reason}, and {vmap_problem}. "
        "Calibration fits all its replications in one batched optimisation; it does not fit them one at a time. "
        "Replace Python control flow on sampled values (if x > 0:, float(x), x.item()) with torch.where, so that "
        "torch.func.vmap can batch the model, or write the model to broadcast over batch dimensions left of its "
        "plates (a + (X * beta).sum(-1) rather than a + X @ beta)."
    )


class _Replications:
    """``M`` simulated replications of a :class:`_Problem` (global indices ``first .. first + M``): their log
    joint, the batched fit (:mod:`ppvi.batched`), and their p-values and ranks."""

    def __init__(self, problem: _Problem, data: dict, theta0: dict, first: int = 0):
        self.problem, self.data, self.theta0 = problem, data, theta0
        self.M = next(iter(theta0.values())).shape[0]
        self.index = torch.arange(first, first + self.M)
        self.latent_dim, self.max_plate_nesting = problem.latent_dim, problem.max_plate_nesting

    def observed_values(self) -> dict[str, torch.Tensor]:
        return {name: value.reshape(self.M, *self.problem.observed_shapes[name]) for name, value in self.data.items()}

    # -- the objective -------------------------------------------------------------------------------------------
    def _unpack(self, z: torch.Tensor) -> dict[str, tuple[dict, torch.Tensor]]:
        """``z`` of shape ``(*batch, M, D)`` -> per site, unconstrained values of shape ``(*batch, M, 1.., *)``."""
        batch = z.shape[:-1]
        shaped = z.reshape(*batch, *(1,) * self.max_plate_nesting, self.latent_dim)
        return {site["name"]: (site, value) for site, value in self.problem.prototype._unpack_latent(shaped)}

    @property
    def vmapped(self) -> bool:
        """Whether the model runs on one replication at one point, batched by :func:`torch.func.vmap` (the
        problem's :attr:`_Problem.vectorization`), rather than inside a replication plate and a particle plate."""
        return self.problem.vectorization.strategy == "vmap"

    def single_run(self, z: torch.Tensor, *values: torch.Tensor) -> tuple[poutine.Trace, ConstrainMessenger]:
        """The model run unbatched on one point ``z`` ``(D,)`` of one replication, conditioned on its observed
        ``values`` (each ``data_shapes[name]``, in the order of ``self.data``), each site constrained by the support
        of this run (:mod:`ppvi.constrain`). Without argument validation, as :meth:`_constrained_run`, and so that
        :func:`torch.func.vmap` can batch it."""
        pieces = {site["name"]: value for site, value in self.problem.prototype._unpack_latent(z)}
        messenger = ConstrainMessenger(pieces, ())
        shapes = self.problem.observed_shapes
        data = {name: value.reshape(shapes[name]) for name, value in zip(self.data, values, strict=True)}
        with pyro.validation_enabled(False):
            model = poutine.condition(messenger(SymbolicBatchMessenger()(self.problem.model)), data=data)
            trace = poutine.trace(model).get_trace(*self.problem.args)
        return trace, messenger

    def single_log_density(self, z: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
        """``log p(y, T(z)) + log|det J_T(z)|`` (0-dim) of one point ``z`` ``(D,)`` of one replication with observed
        ``values``: :meth:`single_run`'s trace."""
        trace, messenger = self.single_run(z, *values)
        with pyro.validation_enabled(False):
            total = trace.log_prob_sum()
        return total + messenger.log_abs_det_jacobian

    def _over_points_and_replications(self, function: Callable, z: torch.Tensor, values: tuple) -> object:
        """``function(z[s, a], *(value[a] for value in values))`` for every point ``s`` and replication ``a`` of
        ``z`` ``(S, A, D)``, by two nested :func:`torch.func.vmap`: over the replications (points and data), then
        over the points (the data shared). Every tensor ``function`` returns gains the dimensions ``(S, A)``."""
        count = len(values)
        over_replications = torch.func.vmap(function, in_dims=(0,) * (1 + count), randomness="different")
        over_points = torch.func.vmap(over_replications, in_dims=(0,) + (None,) * count, randomness="different")
        with vectorize.without_fallback_warnings():
            return over_points(z, *values)

    def _constrained_run(self, z: torch.Tensor, data: dict) -> tuple[poutine.Trace, ConstrainMessenger]:
        """The model run on ``z`` of shape ``(S, A, D)``, each site constrained by the support of its own run
        (:mod:`ppvi.constrain`: bounds that depend on other sites), conditioned on ``data`` ``(A, ...)``."""
        S, A = z.shape[0], z.shape[1]
        messenger = ConstrainMessenger({name: value for name, (_, value) in self._unpack(z).items()}, (S, A))
        particles = pyro.plate("_ppvi_particles", S, dim=-(self.max_plate_nesting + 2))
        replications = pyro.plate("_ppvi_replications", A, dim=-(self.max_plate_nesting + 1))
        # Without argument validation: one replication's out-of-support value (a Newton trial step, an early Adam
        # step) must give that replication a non-finite log density, which is handled per replication, not an
        # exception that stops all M.
        with particles, replications, pyro.validation_enabled(False):
            model = poutine.condition(messenger(SymbolicBatchMessenger()(self.problem.model)), data=data)
            trace = poutine.trace(model).get_trace(*self.problem.args)
        return trace, messenger

    @functools.cached_property
    def dependent_sites(self) -> frozenset[str]:
        """Sites whose support moves with the other sites' values (``beta ~ Uniform(0, 1 - alpha)``): their support
        differs between two runs at different points. Their p-values and ranks come from constrained draws."""
        like = next(iter(self.theta0.values()))
        supports = []
        for level in (-1.0, 1.0):
            if self.vmapped:  # the model runs on one replication: the first one's
                point = torch.full((self.latent_dim,), level, dtype=like.dtype, device=like.device)
                trace, _ = self.single_run(point, *(value[0] for value in self.data.values()))
            else:
                point = torch.full((1, self.M, self.latent_dim), level, dtype=like.dtype, device=like.device)
                trace, _ = self._constrained_run(point, self.data)
            supports.append({name: str(trace.nodes[name]["fn"].support) for name in self.theta0})
        return frozenset(name for name in self.theta0 if supports[0][name] != supports[1][name])

    def _draw_values(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Constrained values of guide draws ``z`` ``(S, M, D)``: each site by its prototype's transform, or, for
        :attr:`dependent_sites`, by the support of its own run."""
        values = {name: biject_to(site["fn"].support)(value) for name, (site, value) in self._unpack(z).items()}
        if self.dependent_sites and self.vmapped:

            def constrained(point: torch.Tensor, *data: torch.Tensor) -> dict[str, torch.Tensor]:
                messenger = self.single_run(point, *data)[1]
                return {name: messenger.values[name] for name in self.dependent_sites}

            values.update(self._over_points_and_replications(constrained, z, tuple(self.data.values())))
        elif self.dependent_sites:
            _, messenger = self._constrained_run(z, self.data)
            values.update({name: messenger.values[name] for name in self.dependent_sites})
        return values

    def log_density(self, z: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
        """``log p(y_m, T(z)) + log|det J_T(z)|`` for ``z`` of shape ``(S, A, D)`` and the ``A`` replications'
        observed ``values`` (in the order of ``self.data``): shape ``(S, A)``. A pure function of its inputs,
        which :class:`ppvi.batched.TracedBatchedStep` traces (through :func:`torch.func.vmap` too).

        Inside a replication plate and a particle plate, or, for a model that does not run in them
        (:attr:`vmapped`), :meth:`single_log_density` batched over points and replications by vmap."""
        if self.vmapped:
            return self._over_points_and_replications(self.single_log_density, z, values)
        batch = z.shape[:2]
        trace, messenger = self._constrained_run(z, dict(zip(self.data, values, strict=True)))
        with pyro.validation_enabled(False):  # a replication's non-finite density is handled, not warned about
            trace.compute_log_prob()
        total = messenger.log_abs_det_jacobian
        mpn = self.max_plate_nesting
        for site in trace.nodes.values():
            if site["type"] == "sample":
                log_prob = site["log_prob"]
                if mpn and log_prob.dim() >= mpn:
                    log_prob = log_prob.sum(dim=tuple(range(-mpn, 0)))
                total = total + log_prob.broadcast_to(batch)
        return total

    def log_joint(self, z: torch.Tensor, replications: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`log_density` of the replications at positions ``replications`` (default: all ``M``)."""
        values = self.data.values()
        if replications is not None:
            values = [value[replications] for value in values]
        return self.log_density(z, *values)

    def negative_log_joint(self, z: torch.Tensor, replications: torch.Tensor | None = None) -> torch.Tensor:
        """``-(log p(y_m, T(z_m)) + log|det J|)`` for ``z`` of shape ``(A, D)`` at the replications at positions
        ``replications`` (default: all ``M``): shape ``(A,)``."""
        return -self.log_joint(z.unsqueeze(0), replications).squeeze(0)

    # -- optimisation --------------------------------------------------------------------------------------------
    def optimise(
        self, guide: str, steps: int | None, learning_rate: float, num_particles: int, engine: str = "pyro",
        engine_required: bool = True,
    ):
        """Train all replications (:func:`ppvi.batched.run`) from their batched Laplace start; returns the
        :class:`ppvi.batched.BatchedFit`, per replication whether its Laplace start succeeded, the engine that
        ran and, when a traced step was asked for without ``engine_required`` and the model did not trace, why.

        Each replication is trained in the whitened coordinates of its own Laplace approximation, where its
        posterior is about N(0, I): one learning rate then suits replications whose posteriors differ by orders
        of magnitude in scale. Replications without a usable mode start at the prior median with scale 0.1.
        """
        M, D = self.M, self.latent_dim
        start = batched_laplace_start(
            self.negative_log_joint, self.problem.init_loc.expand(M, D), "diagonal" if guide == "meanfield" else "full"
        )
        like = start.center

        def training_streams() -> batched.ReplicationStreams:
            return batched.ReplicationStreams(
                self.problem.seed, TRAINING_STREAM, like.device, like.dtype,
                batched.training_draws_per_call(num_particles, D),
            )

        streams = training_streams()
        options = dict(
            max_steps=steps if steps is not None else DEFAULT_MAX_STEPS, stopping=steps is None,
            learning_rate=learning_rate, num_particles=num_particles, replication_index=self.index,
            data=tuple(self.data.values()),
        )
        reason = ""
        if engine != "pyro":
            step = batched.TracedBatchedStep(guide, self.log_density, compile=engine == "compiled")
            try:
                fit = batched.run(step, start, guide, streams=streams, **options)
                return fit, start.succeeded.cpu().numpy(), engine, reason
            except NotTraceableError as error:
                if engine_required:
                    raise ValueError(f"engine={engine!r}: {error}; use engine='pyro' for this model") from error
                reason = str(error)
            streams = training_streams()
        fit = batched.run(batched.eager_step(guide, self.log_density), start, guide, streams=streams, **options)
        return fit, start.succeeded.cpu().numpy(), "pyro", reason

    # -- calibration ---------------------------------------------------------------------------------------------
    def _guide_draws(self, loc, scale, guide, count: int, purpose: int) -> torch.Tensor:
        """``count`` unconstrained draws ``(count, M, D)`` of each replication's guide, from its own stream."""
        streams = batched.ReplicationStreams(self.problem.seed, purpose, loc.device, loc.dtype)
        epsilon = streams.normal((count,), self.index, (self.latent_dim,))
        return batched.transform(guide, loc, scale, epsilon)

    def p_values(self, loc: torch.Tensor, scale: torch.Tensor, guide: str) -> dict[str, np.ndarray]:
        """``P_q(theta < theta0)`` per site: exact for elementwise monotone transforms, else from guide draws."""
        sd = _marginal_sd(scale, guide)
        unpacked_loc = self._unpack(loc)
        unpacked_sd = self._unpack(sd)
        draws = None
        result = {}
        for name, (site, site_loc) in unpacked_loc.items():
            transform = biject_to(site["fn"].support)
            theta0 = self.theta0[name]
            sign = _monotone_sign(transform)
            if sign is not None and transform.domain.event_dim == 0 and name not in self.dependent_sites:
                standardized = (transform.inv(theta0) - site_loc.reshape(theta0.shape)) / unpacked_sd[name][
                    1
                ].reshape(theta0.shape)
                p = torch.special.ndtr(standardized if sign > 0 else -standardized)
            else:
                if draws is None:
                    z = self._guide_draws(loc, scale, guide, MONTE_CARLO_DRAWS, P_VALUE_STREAM)
                    draws = self._draw_values(z)
                value = draws[name].reshape(MONTE_CARLO_DRAWS, *theta0.shape)
                p = (value < theta0).double().mean(0)
            result[name] = p.double().cpu().numpy()
        return result

    def ranks(self, loc: torch.Tensor, scale: torch.Tensor, guide: str, num_draws: int) -> dict[str, np.ndarray]:
        """SBC ranks ``#{l : theta_l < theta0}`` of ``num_draws`` independent guide draws, per site (drawn in
        chunks of :data:`RANK_CHUNK` to bound memory)."""
        counts = {name: torch.zeros(value.shape, dtype=torch.long, device=value.device)
                  for name, value in self.theta0.items()}
        streams = batched.ReplicationStreams(self.problem.seed, RANK_STREAM, loc.device, loc.dtype)
        for first in range(0, num_draws, RANK_CHUNK):
            chunk = min(RANK_CHUNK, num_draws - first)
            epsilon = streams.normal((chunk,), self.index, (self.latent_dim,))
            z = batched.transform(guide, loc, scale, epsilon)
            for name, value in self._draw_values(z).items():
                theta0 = self.theta0[name]
                counts[name] += (value.reshape(chunk, *theta0.shape) < theta0).sum(0)
        return {name: count.cpu().numpy() for name, count in counts.items()}


class _Uncondition(poutine.messenger.Messenger):
    """Sample the named observed sites from the model instead of observing them. Pyro's ``uncondition`` frees
    every observed site, ``pyro.deterministic`` ones included, whose ``Delta`` then broadcasts wrongly in plates."""

    def __init__(self, names: list[str]):
        super().__init__()
        self.names = set(names)

    def _process_message(self, msg):
        if msg["type"] == "sample" and msg["name"] in self.names and msg["is_observed"]:
            msg["is_observed"] = False
            msg["value"] = None
            msg["done"] = False


def _monotone_sign(transform) -> int | None:
    """+1 or -1 for an elementwise transform known to be increasing or decreasing, else ``None``."""
    if transform.domain.event_dim != 0 or transform.codomain.event_dim != 0:
        return None
    try:
        sign = transform.sign
    except NotImplementedError:
        return None
    if isinstance(sign, torch.Tensor):
        if (sign > 0).all():
            return 1
        if (sign < 0).all():
            return -1
        return None
    return 1 if sign > 0 else -1
