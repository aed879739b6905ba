"""VSBC speed: ppvi's batched run against a loop of ``ppvi.fit`` calls and NumPyro's ``vsbc_diagnostic``.

Task (issue 4): eight schools, non-centred, ``M = 1000`` replications, mean-field and full-rank Gaussian guides.

- **ppvi batched**: ``ppvi.vsbc`` with its defaults (all replications fitted in one vectorized optimisation, each
  stopping on its own rule), once per ``--engines`` entry: ``pyro`` (the model run through Pyro at every step) and
  ``compiled`` (the step traced once and compiled by TorchInductor, what ``engine="auto"`` picks from M = 500).
  Timed once, end to end (simulation, Laplace starts, tracing and compilation, training, p values), after an
  untimed run on 2 replications, as NumPyro gets: it loads the libraries and, for ``compiled``, leaves the
  compiled step in TorchInductor's on-disk cache (the step's graph does not depend on M), so the timed run is
  that of every run after a machine's first. ``--cold`` adds the first run itself: the same run in a fresh
  process with an empty cache directory.
- **ppvi loop**: what a user without ``vsbc`` writes: one ``ppvi.fit`` per simulated data set (default options:
  Laplace start, stopping rule) followed by ``P_q(theta < theta0)`` from 1000 guide draws. Timed on the first
  ``--loop-fits`` (20) data sets of the batched run and scaled by ``M / loop_fits``.
- **NumPyro** (when installed: ``pip install -e .[bench]``): ``numpyro.infer.calibration.vsbc_diagnostic`` with
  ``AutoNormal`` / ``AutoMultivariateNormal``, Adam(0.01), 3000 SVI steps, 1000 draws, ``chain_method="sequential"``
  (its CPU recommendation), the configuration the issue measured at 33 s. Timed end to end, JIT compilation
  included, after an untimed run on 2 replications to load JAX.

Usage::

    python benchmarks/vsbc_speed.py                      # M = 1000, both guides, CPU (+ GPU when available)
    python benchmarks/vsbc_speed.py --num-simulations 200 --loop-fits 5 --skip-numpyro    # a quick look
    python benchmarks/vsbc_speed.py --guides meanfield --engines compiled --cold --threads 1

Prints a table (seconds, speed-ups, what each method flags at alpha = 0.001) and writes nothing else.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

import ppvi  # noqa: E402
from ppvi.calibration import ALPHA  # noqa: E402
from ppvi.models import eight_schools  # noqa: E402

#: Guide draws behind each looped fit's p (as NumPyro's num_samples).
LOOP_DRAWS = 1000


def flagged(table) -> str:
    names = [name for name, verdict in table["verdict"].items() if verdict != "symmetric"]
    return ", ".join(names) or "nothing"


def ppvi_batched(guide: str, M: int, device: str, engine: str):
    sigma, _ = eight_schools.data(torch.float64 if device == "cpu" else torch.float32)
    start = time.perf_counter()
    result = ppvi.vsbc(
        eight_schools.noncentered, sigma, observed="y", guide=guide, num_simulations=M, device=device, engine=engine
    )
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def cold_seconds(guide: str, M: int, device: str, threads: int | None) -> float:
    """Seconds of a compiled run in a fresh process whose TorchInductor cache directory is empty."""
    with tempfile.TemporaryDirectory() as cache:
        environment = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        command = [sys.executable, __file__, "--one-run", guide, str(M), device]
        if threads is not None:
            command += ["--threads", str(threads)]
        output = subprocess.run(command, env=environment, check=True, capture_output=True, text=True).stdout
    return float(output.strip().splitlines()[-1])


def ppvi_loop(guide: str, batched, count: int, device: str) -> float:
    """Seconds for ``count`` separate fits (and their p values) of the batched run's data sets."""
    sigma, _ = eight_schools.data()
    start = time.perf_counter()
    for m in range(count):
        fit = ppvi.fit(
            eight_schools.noncentered, sigma, torch.as_tensor(batched.data["y"][m]), guide=guide, device=device,
            seed=m,
        )
        draws = fit.sample(LOOP_DRAWS, seed=m)
        for name in ("mu", "tau", "theta_trans"):
            # The draws are on the fit's device; the simulated truth came back as numpy (the CPU).
            truth = torch.as_tensor(batched.theta0[name][m], device=draws[name].device, dtype=draws[name].dtype)
            (draws[name] < truth).double().mean(0)
    return time.perf_counter() - start


def numpyro_vsbc(guide: str, M: int):
    try:
        import jax
        import numpyro
        import numpyro.distributions as dist
        from numpyro.infer import Trace_ELBO
        from numpyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
        from numpyro.infer.calibration import vsbc_diagnostic
    except ImportError:
        return None
    jax.config.update("jax_enable_x64", True)
    sigma = np.asarray(eight_schools.SIGMA)

    def model(y=None):
        mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
        with numpyro.plate("schools", len(sigma)):
            theta_trans = numpyro.sample("theta_trans", dist.Normal(0.0, 1.0))
            numpyro.sample("y", dist.Normal(mu + tau * theta_trans, sigma), obs=y)

    family = AutoNormal if guide == "meanfield" else AutoMultivariateNormal

    def run(num_simulations: int):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return vsbc_diagnostic(
                jax.random.PRNGKey(0), model, family(model), numpyro.optim.Adam(0.01), Trace_ELBO(),
                observed_sites=["y"], num_simulations=num_simulations, num_svi_steps=3000, num_samples=1000,
                chain_method="sequential",
            )

    run(2)  # load and initialise JAX (not timed)
    start = time.perf_counter()
    result = run(M)
    seconds = time.perf_counter() - start
    pvalues = {name: np.atleast_1d(np.asarray(value)) for name, value in result.ks_pvalues.items()}
    flags = [
        f"{name}[{i}]" if value.size > 1 else name
        for name, value in pvalues.items() for i, v in enumerate(value) if v < ALPHA
    ]
    flags.append(f"tau KS p {float(pvalues['tau'][0]):.2g}")
    return seconds, ", ".join(flags)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-simulations", type=int, default=1000)
    parser.add_argument("--loop-fits", type=int, default=20)
    parser.add_argument("--guides", nargs="+", default=["meanfield", "fullrank"])
    parser.add_argument("--engines", nargs="+", default=["pyro", "compiled"], choices=["pyro", "traced", "compiled"])
    parser.add_argument("--cold", action="store_true", help="also time a compiled run with an empty cache")
    parser.add_argument("--skip-numpyro", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--one-run", nargs=3, metavar=("GUIDE", "M", "DEVICE"), help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.threads is not None:
        torch.set_num_threads(arguments.threads)
    if arguments.one_run:  # what cold_seconds runs in a fresh process
        guide, M, device = arguments.one_run
        print(ppvi_batched(guide, int(M), device, "compiled")[0])
        return
    M = arguments.num_simulations
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"eight schools non-centred, M = {M}, torch threads {torch.get_num_threads()}, devices {devices}")
    rows = []
    for guide in arguments.guides:
        for device in devices:
            reference = None
            for engine in arguments.engines:
                ppvi_batched(guide, 2, device, engine)  # load the libraries, fill the compile cache (not timed)
                seconds, result = ppvi_batched(guide, M, device, engine)
                reference = reference or (seconds, result)
                table = result.to_dataframe()
                rows.append((
                    f"ppvi batched {guide} ({device}, {result.engine})", seconds, "",
                    f"{flagged(table)}; tau KS p {table.loc['tau', 'ks_pvalue']:.2g}, mean p "
                    f"{table.loc['tau', 'mean_p']:.3f}; {result.num_converged}/{M} converged, median steps "
                    f"{int(np.median(result.steps))}",
                ))
                if engine == "compiled" and arguments.cold:
                    rows.append((
                        f"ppvi batched {guide} ({device}, compiled, cold cache)",
                        cold_seconds(guide, M, device, arguments.threads), "", "first run on a machine",
                    ))
            if arguments.loop_fits:
                loop = ppvi_loop(guide, reference[1], arguments.loop_fits, device) * M / arguments.loop_fits
                rows.append((f"ppvi loop of fits {guide} ({device}, {arguments.loop_fits} timed)", loop, "", ""))
        if not arguments.skip_numpyro:
            outcome = numpyro_vsbc(guide, M)
            if outcome is None:
                print("numpyro not installed: skipped (pip install -e .[bench])")
            else:
                rows.append((f"numpyro vsbc_diagnostic {guide} (cpu, 3000 steps)", outcome[0], "", outcome[1]))
                for i, row in enumerate(rows):
                    if row[0].startswith(f"ppvi batched {guide} (cpu"):
                        rows[i] = (row[0], row[1], f"{outcome[0] / row[1]:.1f}x NumPyro", row[3])
    width = max(len(row[0]) for row in rows)
    print(f"{'method':{width}} | seconds | speed-up | flagged (alpha {ALPHA})")
    for name, seconds, speedup, note in rows:
        print(f"{name:{width}} | {seconds:7.1f} | {speedup} | {note}")


if __name__ == "__main__":
    main()
