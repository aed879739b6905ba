"""ppvi against NUTS: seconds, gradient evaluations and accuracy on posteriordb and on hard geometries, one table.

Usage::

    python benchmarks/vs_nuts.py                                          # everything (about 1-2 h on one core)
    python benchmarks/vs_nuts.py --quick                                  # 250 + 500 NUTS iterations, 1,000 VI draws
    python benchmarks/vs_nuts.py --posteriors kidiq banana --methods ppvi_auto numpyro_nuts
    python benchmarks/vs_nuts.py --output vs_nuts.md                      # also write the table as markdown
    python benchmarks/vs_nuts.py --check-models                           # Pyro and NumPyro models agree?

Rows (posteriors; models and references in ``benchmarks/posteriordb_models.py``)
------------------------------------------------------------------------------
The ten posteriordb posteriors of the shared folder (``$PPVI_SHARED/posteriordb``, else ``../shared/posteriordb``
beside the repository): arK, earnings, eight schools non-centred, garch, gp_pois_regr, kidiq, kilpisjarvi,
low_dim_gauss_mix, mesquite, sblrc; reference: posteriordb's draws (rstan NUTS, 10 chains x 1,000). Then eight
schools centred (reference: posteriordb's non-centred draws, the same posterior of ``mu``, ``tau``, ``theta``),
Neal's funnel in 10 dimensions and the banana of ``ppvi.models.banana`` (reference: exact moments). ``--posteriors``
takes the names or unique prefixes of them (``kidiq``, ``gp``).

Columns (methods)
-----------------
``ppvi_auto``, ``ppvi_fullrank``
    ``ppvi.fit(model, *data, guide=..., seed=seed, progress=False)``: default options, stopping on its own rule;
    float64 (ppvi's default on the CPU). Accuracy from ``fit.sample(4000, seed=seed)`` (1,000 with ``--quick``).
``numpyro_nuts``
    ``MCMC(NUTS(model), num_warmup=500, num_samples=1000, num_chains=1)`` (250 + 500 with ``--quick``), NumPyro's
    defaults otherwise (diagonal mass matrix, target acceptance 0.8, tree depth 10, initialisation uniform on
    (-2, 2) unconstrained), float64 (``numpyro.enable_x64()``; Stan's precision, and gp_pois_regr's Cholesky needs
    it). Accuracy from the kept draws.
``pyro_nuts``
    Pyro's ``MCMC(NUTS(model), warmup_steps=500, num_samples=1000)``, Pyro's defaults (no JIT) and the same
    initialisation (Pyro's ``init_to_uniform`` draws from the prior, which Stan's flat priors cannot do: the
    initial point here is drawn uniformly on (-2, 2) in unconstrained coordinates without it); float64 (torch's
    default dtype set). The same Pyro model that ppvi fits.

Protocol
--------
Every (posterior, method) cell runs in its own fresh Python process (``--worker``), one thread:
``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=1`` (and MKL's, OpenBLAS's), and for JAX
``XLA_FLAGS=--xla_force_host_platform_device_count=1 --xla_cpu_multi_thread_eigen=false
intra_op_parallelism_threads=1`` on the CPU backend. In that process the method runs twice with the same seed:

* ``cold s``: the first run, wall seconds, with every compilation and first-call cost it incurs (NumPyro's tracing
  and XLA compilation; ppvi's graph tracing and Laplace start). Imports and data loading are not timed.
* ``warm s``: the second run in the same process (NumPyro's compiled kernel is cached; Pyro has nothing to cache).

Each run is capped (``--cap``, default 1800 s; Pyro NUTS ``--pyro-cap``, default 300 s): the process is killed and
the cell reads ``>300``. A crash or an exception in one cell is reported in it, and the table goes on.

``grad evals``: gradient evaluations of the log density, warm-up included.

* NumPyro: leapfrog steps, the sum of ``num_steps`` over warm-up and sampling. ``run()`` reports them for the kept
  draws only, so after the timed runs the process runs once more, untimed, as ``warmup(collect_warmup=True)`` then
  ``run()`` with the same key (the same chain: the worker checks that the sampling steps match the timed run's).
  The step-size searches of the warm-up (a few hundred evaluations) are not in ``num_steps``.
* Pyro: every call of ``pyro.ops.integrator.potential_grad`` (leapfrog steps, step-size searches, the
  initialisation), counted by wrapping it.
* ppvi: per attempt (``guide="auto"`` fits mean-field, then full-rank, then a flow while PSIS rejects the fit)
  training steps x particles (each step evaluates the gradient at 8 draws of the guide, vectorised), plus the
  Laplace start's: every evaluation of the log density by L-BFGS and its gradient check (each with its gradient)
  and one Hessian-vector product per coordinate for the Hessian. Counted by wrapping ``ppvi.fit._fit_one`` and
  ``ppvi.fit.laplace_start``. Not counted: evaluations without a gradient (the PSIS diagnosis of ``"auto"``,
  the ELBO checks at the start and end of training).

``mean err``: the worst ``|mean - reference mean| / reference sd`` over every scalar component; ``sd ratio``: the
min-max over the components of sd / reference sd. Monte Carlo error: about 0.016 reference sd for 4,000 VI draws,
``1 / sqrt(ESS)`` for NUTS's 1,000 (0.03-0.1 when mixing is good). The funnel's ``x`` has kurtosis ~24,000, so its
sd ratios are noisy for every method.

``note``: NUTS: divergent transitions among the kept draws. ppvi: the families tried (``auto``), the final fit's
PSIS k-hat and whether its stopping rule held (``conv``).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.metadata
import json
import math
import os
import platform
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import posteriordb_models as pdb

METHODS = ("ppvi_auto", "ppvi_fullrank", "numpyro_nuts", "pyro_nuts")
#: NUTS warm-up and kept iterations (one chain), full and --quick.
NUTS_ITERATIONS = {"full": (500, 1000), "quick": (250, 500)}
#: Draws of a fitted ppvi approximation behind its means and sds, full and --quick.
VI_DRAWS = {"full": 4000, "quick": 1000}
#: Default per-run caps, seconds: Pyro NUTS (slow by design: Python at every leapfrog step) and the others.
PYRO_CAP = 300.0
CAP = 1800.0
#: Seconds a worker may spend outside the timed runs at a stretch (imports and data loading, drawing and
#: scoring after a run): generous, as a busy machine may take a minute to import torch and JAX.
SETUP_LIMIT = 600.0
#: One thread for each library, set in every worker's environment before torch or JAX is imported.
WORKER_ENVIRONMENT = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": "--xla_force_host_platform_device_count=1 --xla_cpu_multi_thread_eigen=false "
    "intra_op_parallelism_threads=1",
}
#: Prefix of the worker's result lines on its stdout (anything else it prints is ignored).
MARKER = "VS_NUTS_EVENT "
COLUMNS = ("posterior", "method", "cold s", "warm s", "grad evals", "mean err", "sd ratio", "note")


# --------------------------------------------------------------------------------------------------------------
# Accuracy
# --------------------------------------------------------------------------------------------------------------


def _components(name: str, values: np.ndarray, leading: int) -> dict[str, np.ndarray]:
    """``{"theta[0]": ..., ...}``: a site's scalar components (0-based, row-major), ``leading`` axes kept."""
    values = np.asarray(values, dtype=np.float64)
    shape = values.shape[leading:]
    if not shape:
        return {name: values}
    flat = values.reshape(*values.shape[:leading], -1)
    return {
        f"{name}[{', '.join(map(str, index))}]": flat[..., i] for i, index in enumerate(np.ndindex(*shape))
    }


def reference_moments(reference: pdb.Reference) -> dict[str, tuple[float, float]]:
    """``{component: (mean, sd)}`` from reference draws ``{site: (num_draws, *shape)}`` or exact ``(mean, sd)``."""
    moments = {}
    for name, value in reference.items():
        if isinstance(value, tuple):
            means, sds = _components(name, value[0], 0), _components(name, value[1], 0)
            moments.update({label: (float(means[label]), float(sds[label])) for label in means})
        else:
            for label, column in _components(name, value, 1).items():
                moments[label] = (float(column.mean()), float(column.std(ddof=1)))
    return moments


def accuracy(draws: dict[str, np.ndarray], reference: pdb.Reference) -> tuple[float, float, float]:
    """Worst mean error in reference sds, and the min and max sd ratio, over the reference's scalar components."""
    columns: dict[str, np.ndarray] = {}
    for name, values in draws.items():
        columns.update(_components(name, values, 1))
    errors, ratios = [], []
    for label, (mean, sd) in reference_moments(reference).items():
        if label not in columns:
            raise KeyError(f"the draws lack the reference component {label!r}")
        column = columns[label]
        if not np.isfinite(column).all():
            return math.inf, math.nan, math.nan
        errors.append(abs(column.mean() - mean) / sd)
        ratios.append(column.std(ddof=1) / sd)
    return float(max(errors)), float(min(ratios)), float(max(ratios))


# --------------------------------------------------------------------------------------------------------------
# The methods (run in the worker process)
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One timed run: wall seconds, draws ``{site: (num_draws, *shape)}``, gradient evaluations (None: counted
    later) and a note; ``extra`` carries what a later phase of the same worker needs."""

    seconds: float
    draws: dict[str, np.ndarray]
    gradients: int | None
    note: str
    extra: dict[str, Any] = field(default_factory=dict)


class PpviGradientCounter:
    """Counts the gradient evaluations of ``ppvi.fit`` by wrapping two functions of :mod:`ppvi.fit` (module
    docstring: "grad evals"). ``exact`` is False where this ppvi lacks them; then only the returned fit's
    ``steps x 8`` is counted, and the note says so."""

    def __init__(self) -> None:
        self.training = 0
        self.laplace = 0
        module = importlib.import_module("ppvi.fit")
        self.exact = all(hasattr(module, name) for name in ("_fit_one", "laplace_start", "resolve_guide"))
        if not self.exact:
            return
        fit_one, laplace_start = module._fit_one, module.laplace_start
        default_particles = getattr(module, "PRECONDITIONED_NUM_PARTICLES", 8)

        def particles(guide: Any, options: dict[str, Any]) -> int:
            if options.get("num_particles") is not None:
                return int(options["num_particles"])
            if isinstance(guide, str):
                return module.resolve_guide(guide).num_particles or default_particles
            return 1

        def counted_fit_one(model, args, guide, start, **options):
            try:
                result = fit_one(model, args, guide, start, **options)
            except module.NonFiniteELBOError as error:
                self.training += error.fit.steps * particles(guide, options)
                raise
            self.training += result.steps * particles(guide, options)
            return result

        def counted_laplace_start(negative_log_density, initial, *args, **kwargs):
            calls = 0

            def counted(point):
                nonlocal calls
                calls += 1
                return negative_log_density(point)

            result = laplace_start(counted, initial, *args, **kwargs)
            # Every call but L-BFGS's final, value-only one is followed by a gradient; the Hessian (when formed)
            # is one gradient with its graph (a call) and one Hessian-vector product per coordinate.
            hessian_formed = result.succeeded or "Hessian" in result.message
            self.laplace += max(calls - 1, 0) + (initial.numel() if hessian_formed else 0)
            return result

        module._fit_one = counted_fit_one
        module.laplace_start = counted_laplace_start

    def reset(self) -> None:
        self.training = self.laplace = 0


def run_ppvi(name: str, family: str, seed: int, num_draws: int, counter: PpviGradientCounter) -> Run:
    import ppvi

    model, args = pdb.pyro_model(name)
    counter.reset()
    started = time.perf_counter()
    fit = ppvi.fit(model, *args, guide=family, seed=seed, progress=False)
    seconds = time.perf_counter() - started
    draws = {key: value.detach().cpu().double().numpy() for key, value in fit.sample(num_draws, seed=seed).items()}
    if counter.exact:
        gradients = counter.training + counter.laplace
        counted = f"Laplace {counter.laplace}"
    else:
        gradients = fit.steps * 8
        counted = "final attempt's steps x 8 only"
    if fit.history:
        khat = next((a.khat for a in reversed(fit.history) if a.guide == fit.guide_name), math.nan)
        tried = ">".join(attempt.guide for attempt in fit.history)
        family_note = f"{tried}: {fit.guide_name}"
    else:
        khat = fit.diagnose(seed=seed).khat
        family_note = fit.guide_name or family
    converged = "conv" if fit.converged else "not conv"
    return Run(seconds, draws, gradients, f"{family_note}, k-hat {khat:.2f}, {converged}, {counted}")


def run_numpyro_nuts(name: str, seed: int, num_warmup: int, num_samples: int) -> Run:
    import jax
    import numpyro
    from numpyro.infer import MCMC, NUTS

    numpyro.enable_x64()
    model, args = pdb.numpyro_model(name)
    started = time.perf_counter()
    mcmc = MCMC(NUTS(model), num_warmup=num_warmup, num_samples=num_samples, num_chains=1, progress_bar=False)
    mcmc.run(jax.random.PRNGKey(seed), *args, extra_fields=("num_steps",))
    samples = jax.block_until_ready(mcmc.get_samples())
    seconds = time.perf_counter() - started
    fields = mcmc.get_extra_fields()
    draws = {key: np.asarray(value, dtype=np.float64) for key, value in samples.items()}
    divergences = int(np.asarray(fields["diverging"]).sum())
    sampling_steps = int(np.asarray(fields["num_steps"]).sum())
    return Run(seconds, draws, None, f"{divergences} divergent", {"sampling_steps": sampling_steps})


def count_numpyro_gradients(name: str, seed: int, num_warmup: int, num_samples: int) -> tuple[int, int]:
    """Leapfrog steps of warm-up and of sampling, from an untimed ``warmup`` + ``run`` with the same key."""
    import jax
    import numpyro
    from numpyro.infer import MCMC, NUTS

    numpyro.enable_x64()
    model, args = pdb.numpyro_model(name)
    mcmc = MCMC(NUTS(model), num_warmup=num_warmup, num_samples=num_samples, num_chains=1, progress_bar=False)
    mcmc.warmup(jax.random.PRNGKey(seed), *args, collect_warmup=True, extra_fields=("num_steps",))
    warmup_steps = int(np.asarray(mcmc.get_extra_fields()["num_steps"]).sum())
    mcmc.run(mcmc.post_warmup_state.rng_key, *args, extra_fields=("num_steps",))
    return warmup_steps, int(np.asarray(mcmc.get_extra_fields()["num_steps"]).sum())


def _init_uniform_unconstrained(site: dict) -> Any:
    """Pyro's ``init_to_uniform`` (uniform on (-2, 2) in unconstrained coordinates) without its draw from the
    prior, which Stan's flat priors (``ImproperUniform``) refuse."""
    import torch
    from torch.distributions import biject_to

    fn = site["fn"]
    transform = biject_to(fn.support)
    shape = transform.inverse_shape(fn.batch_shape + fn.event_shape)
    return transform(4.0 * torch.rand(shape) - 2.0)


def _count_pyro_gradients() -> list[int]:
    """Wrap ``potential_grad`` where Pyro's HMC and NUTS call it; returns the (mutable) count."""
    import pyro.infer.mcmc.hmc
    import pyro.infer.mcmc.nuts
    import pyro.infer.mcmc.util
    import pyro.ops.integrator

    original = pyro.ops.integrator.potential_grad
    count = [0]

    def counted(potential_fn, z):
        count[0] += 1
        return original(potential_fn, z)

    for module in (pyro.ops.integrator, pyro.infer.mcmc.hmc, pyro.infer.mcmc.nuts, pyro.infer.mcmc.util):
        if getattr(module, "potential_grad", None) is original:
            module.potential_grad = counted
    return count


def run_pyro_nuts(name: str, seed: int, num_warmup: int, num_samples: int, count: list[int]) -> Run:
    import pyro
    import torch
    from pyro import poutine
    from pyro.infer import MCMC, NUTS
    from pyro.infer.autoguide.initialization import InitMessenger

    model, args = pdb.pyro_model(name)
    prototype = poutine.trace(InitMessenger(_init_uniform_unconstrained)(model)).get_trace(*args)
    plate_dims = [
        -frame.dim
        for site in prototype.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    deterministic = [
        key for key, site in prototype.nodes.items() if site["type"] == "sample" and site["infer"].get("_deterministic")
    ]
    pyro.set_rng_seed(seed)
    count[0] = 0
    started = time.perf_counter()
    # max_plate_nesting given: Pyro would otherwise run the model once from the prior to find it.
    kernel = NUTS(model, init_strategy=_init_uniform_unconstrained, max_plate_nesting=max(plate_dims, default=0))
    mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=num_warmup, num_chains=1, disable_progbar=True)
    mcmc.run(*args)
    samples = mcmc.get_samples()
    seconds = time.perf_counter() - started
    gradients = count[0]
    draws = {key: value.detach().double().numpy() for key, value in samples.items()}
    if deterministic:  # e.g. eight schools' theta: recomputed from each draw's latent values
        values: dict[str, list[np.ndarray]] = {key: [] for key in deterministic}
        with torch.no_grad():
            for index in range(num_samples):
                conditioned = poutine.condition(model, data={key: value[index] for key, value in samples.items()})
                trace = poutine.trace(conditioned).get_trace(*args)
                for key in deterministic:
                    values[key].append(trace.nodes[key]["value"].double().numpy())
        draws.update({key: np.stack(stack) for key, stack in values.items()})
    divergences = mcmc.diagnostics().get("divergences", {})
    divergent = sum(len(indices) for indices in divergences.values())
    return Run(seconds, draws, gradients, f"{divergent} divergent")


# --------------------------------------------------------------------------------------------------------------
# The worker: one (posterior, method) in a fresh process
# --------------------------------------------------------------------------------------------------------------


def _emit(event: str, **payload: Any) -> None:
    print(MARKER + json.dumps({"event": event, **payload}), flush=True)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def worker(name: str, method: str, seed: int, quick: bool) -> int:
    """Run ``method`` on ``name`` twice (cold, warm), reporting on stdout; see the module docstring."""
    warnings.filterwarnings("ignore")
    setting = "quick" if quick else "full"
    num_warmup, num_samples = NUTS_ITERATIONS[setting]
    phase = "setup"
    try:
        reference, _ = pdb.load_reference(name)
        if method == "numpyro_nuts":
            import jax
            import numpyro

            numpyro.enable_x64()
            jax.numpy.zeros(())  # the backend starts here, not in the timed run
            runner: Callable[[], Run] = functools.partial(run_numpyro_nuts, name, seed, num_warmup, num_samples)
        else:
            import torch

            torch.set_num_threads(1)
            torch.set_default_dtype(torch.float64)
            if method == "pyro_nuts":
                count = _count_pyro_gradients()
                runner = functools.partial(run_pyro_nuts, name, seed, num_warmup, num_samples, count)
            else:
                import ppvi  # noqa: F401 (imported before the timed run)

                counter = PpviGradientCounter()
                family = method.removeprefix("ppvi_")
                runner = functools.partial(run_ppvi, name, family, seed, VI_DRAWS[setting], counter)
        for phase in ("cold", "warm"):
            _emit("start", phase=phase)
            run = runner()
            if phase == "cold":
                mean_error, low, high = accuracy(run.draws, reference)
                cold = run
                _emit(
                    "result", phase=phase, seconds=run.seconds, gradients=run.gradients, note=run.note,
                    mean_error=mean_error, sd_ratio_min=low, sd_ratio_max=high,
                )
            else:
                _emit("result", phase=phase, seconds=run.seconds)
        if method == "numpyro_nuts":
            phase = "count"
            _emit("start", phase=phase)
            warmup_steps, sampling_steps = count_numpyro_gradients(name, seed, num_warmup, num_samples)
            matches = sampling_steps == cold.extra["sampling_steps"]
            _emit(
                "result", phase=phase, gradients=warmup_steps + sampling_steps,
                note="" if matches else "count run's chain differed from the timed one",
            )
    except Exception as error:  # reported in the cell; the table goes on
        _emit("error", phase=phase, message=_first_line(error))
        return 1
    _emit("done")
    return 0


# --------------------------------------------------------------------------------------------------------------
# The parent: run the workers, collect the cells
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Cell:
    posterior: str
    method: str
    cold: float | None = None
    warm: float | None = None
    cold_capped: bool = False
    warm_capped: bool = False
    gradients: int | None = None
    mean_error: float = math.nan
    sd_ratio_min: float = math.nan
    sd_ratio_max: float = math.nan
    note: str = ""
    error: str = ""
    cap: float = CAP


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def run_cell(name: str, method: str, seed: int, quick: bool, cap: float) -> Cell:
    """One worker process, each of its runs capped at ``cap`` seconds (then killed)."""
    cell = Cell(name, method, cap=cap)
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", name, method, "--seed", str(seed)]
    if quick:
        command.append("--quick")
    environment = dict(os.environ, **WORKER_ENVIRONMENT)
    with tempfile.TemporaryFile("w+") as errors:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=errors, text=True, env=environment, start_new_session=True
        )
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_pump, args=(process.stdout, lines), daemon=True).start()
        phase, deadline, finished, killed = "setup", time.monotonic() + SETUP_LIMIT, False, False
        while True:
            try:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                os.killpg(process.pid, signal.SIGKILL)  # the worker's own process group (start_new_session)
                killed = True
                if phase == "cold":
                    cell.cold_capped = True
                elif phase == "warm":
                    cell.warm_capped = True
                elif phase == "count":
                    cell.note += "; gradient count run over the cap"
                else:
                    cell.error = f"no progress in {SETUP_LIMIT:.0f} s outside the timed runs ({phase})"
                break
            if line is None:
                break
            if not line.startswith(MARKER):
                continue
            event = json.loads(line[len(MARKER) :])
            if event["event"] == "start":
                phase, deadline = event["phase"], time.monotonic() + cap
            elif event["event"] == "result":
                _record(cell, event)
                phase, deadline = "after " + event["phase"], time.monotonic() + SETUP_LIMIT
            elif event["event"] == "error":
                cell.error = f"{event['phase']}: {event['message']}"
            elif event["event"] == "done":
                finished = True
        code = process.wait()
        if not finished and not killed and not cell.error:
            errors.seek(0)
            tail = [text for text in errors.read().strip().splitlines() if text.strip()][-1:]
            cell.error = f"worker died in {phase} (exit code {code})" + (f": {tail[0]}" if tail else "")
    return cell


def _record(cell: Cell, event: dict[str, Any]) -> None:
    if event["phase"] == "cold":
        cell.cold, cell.gradients, cell.note = event["seconds"], event["gradients"], event["note"]
        cell.mean_error, cell.sd_ratio_min, cell.sd_ratio_max = (
            event["mean_error"], event["sd_ratio_min"], event["sd_ratio_max"]
        )
    elif event["phase"] == "warm":
        cell.warm = event["seconds"]
    elif event["phase"] == "count":
        cell.gradients = event["gradients"]
        if event["note"]:
            cell.note += f"; {event['note']}"


# --------------------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------------------


def _seconds(value: float | None, capped: bool, cap: float) -> str:
    if capped:
        return f">{cap:g}"
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _number(value: float, digits: int = 2) -> str:
    if math.isnan(value):
        return "-"
    return "inf" if math.isinf(value) else f"{value:.{digits}f}"


def cell_texts(cell: Cell) -> list[str]:
    cold = _seconds(cell.cold, cell.cold_capped, cell.cap)
    warm = "-" if cell.cold_capped else _seconds(cell.warm, cell.warm_capped, cell.cap)
    gradients = "-" if cell.gradients is None else f"{cell.gradients:,}"
    ratio = "-" if math.isnan(cell.sd_ratio_min) else f"{cell.sd_ratio_min:.2f}-{cell.sd_ratio_max:.2f}"
    note = "; ".join(text for text in (cell.error, cell.note) if text)
    return [cell.posterior, cell.method, cold, warm, gradients, _number(cell.mean_error), ratio, note]


def render_text(cells: list[Cell]) -> str:
    rows = [list(COLUMNS)] + [cell_texts(cell) for cell in cells]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    numeric = {2, 3, 4, 5, 6}

    def line(row: list[str]) -> str:
        return " | ".join(
            text.rjust(width) if i in numeric else text.ljust(width)
            for i, (text, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()

    separator = "-+-".join("-" * width for width in widths)
    lines = [line(rows[0]), separator]
    previous = None
    for row in rows[1:]:
        if previous is not None and row[0] != previous:
            lines.append(separator)
        lines.append(line(row))
        previous = row[0]
    return "\n".join(lines)


def render_markdown(cells: list[Cell]) -> str:
    alignments = ["---:" if i in {2, 3, 4, 5} else "---" for i in range(len(COLUMNS))]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(alignments) + "|"]
    for cell in cells:
        lines.append("| " + " | ".join(text.replace("|", "/") for text in cell_texts(cell)) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def posterior_name(text: str) -> str:
    """A posterior's name from itself or a unique prefix of it (``kidiq``, ``gp``)."""
    if text in pdb.POSTERIORS:
        return text
    matches = [name for name in pdb.POSTERIORS if name.startswith(text)]
    if len(matches) != 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} names {'no' if not matches else 'more than one'} posterior of: {', '.join(pdb.POSTERIORS)}"
        )
    return matches[0]


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--posteriors", nargs="+", type=posterior_name, help="rows (names or unique prefixes)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="columns")
    parser.add_argument("--quick", action="store_true", help="NUTS 250 + 500 iterations, 1,000 VI draws")
    parser.add_argument("--pyro-cap", type=float, default=PYRO_CAP, help=f"Pyro NUTS per-run cap, s ({PYRO_CAP:g})")
    parser.add_argument("--cap", type=float, default=CAP, help=f"per-run cap of the other methods, s ({CAP:g})")
    parser.add_argument("--seed", type=int, default=0, help="seed of every run (default 0)")
    parser.add_argument("--output", help="also write the table as markdown to this file")
    parser.add_argument(
        "--check-models", action="store_true", help="compare the Pyro and NumPyro log densities, then exit"
    )
    parser.add_argument("--worker", nargs=2, metavar=("POSTERIOR", "METHOD"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def check_models(names: list[str], seed: int) -> int:
    os.environ.update({key: value for key, value in WORKER_ENVIRONMENT.items() if key != "XLA_FLAGS"})
    print("log p(Pyro) - log p(NumPyro) at 20 random points (spread: 0 up to rounding when the models agree)")
    for name in names:
        spread, constant = pdb.check_log_densities(name, seed=seed)
        print(f"  {name:40s} spread {spread:.2e}  constant {constant:+.6f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    if arguments.worker:
        name, method = arguments.worker
        return worker(posterior_name(name), method, arguments.seed, arguments.quick)
    names = list(dict.fromkeys(arguments.posteriors or pdb.POSTERIORS))
    if arguments.check_models:
        return check_models(names, arguments.seed)
    methods = list(dict.fromkeys(arguments.methods))
    setting = "quick" if arguments.quick else "full"
    num_warmup, num_samples = NUTS_ITERATIONS[setting]
    command = "python benchmarks/vs_nuts.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = [
        f"command: {command.strip()}",
        f"setting: {setting}; NUTS 1 chain, {num_warmup} warm-up + {num_samples} draws; ppvi {VI_DRAWS[setting]} "
        f"draws; seed {arguments.seed}; caps {arguments.cap:g} s (Pyro NUTS {arguments.pyro_cap:g} s) per run",
        f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}; one thread per worker",
        "versions: " + ", ".join(
            f"{package} {_version(package)}" for package in ("ppvi", "torch", "pyro-ppl", "numpyro", "jax", "jaxlib")
        ),
    ]
    print("\n".join(header), flush=True)
    began = time.perf_counter()
    cells = []
    for name in names:
        for method in methods:
            cap = arguments.pyro_cap if method == "pyro_nuts" else arguments.cap
            started = time.perf_counter()
            cell = run_cell(name, method, arguments.seed, arguments.quick, cap)
            cells.append(cell)
            texts = cell_texts(cell)
            print(
                f"  {name} / {method}: cold {texts[2]} s, warm {texts[3]} s, {texts[4]} gradients, mean err "
                f"{texts[5]}, sd ratio {texts[6]}; {texts[7]} ({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
    total = time.perf_counter() - began
    legend = (
        "cold s / warm s: wall seconds of the first / second run in a fresh process (compilation in the first); "
        "grad evals: gradient evaluations of the log density, warm-up or Laplace start included; mean err: worst "
        "|mean - reference| / reference sd; sd ratio: min-max of sd / reference sd (see the module docstring)."
    )
    print(f"\nTotal wall time {total:.0f} s.\n\n{render_text(cells)}\n\n{legend}")
    if arguments.output:
        with open(arguments.output, "w") as file:
            file.write("\n\n".join(["  \n".join(header), render_markdown(cells), legend, f"Total {total:.0f} s."]))
            file.write("\n")
        print(f"markdown written to {arguments.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
