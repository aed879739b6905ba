"""Per-step cost of training: ppvi's three engines against NumPyro's jitted SVI step (issue 12).

What one step costs once a fit is under way, set-up excluded, measured the same way for every method: time runs
of ``N1`` steps and of ``N2`` steps (fresh fits, same seed; after one untimed warm-up run), take the fastest of
``--repeats`` of each length (the machine's noise only ever adds time) and divide the difference by ``N2 - N1``.
Set-up (tracing, the Laplace start, compilation, JAX's JIT) is the ``N1`` run's time less ``N1`` steps at that
cost. TorchInductor caches compiled graphs on disk, so after the warm-up the compiled engine's set-up is a cache
hit (the cold compilation is the warm-up run's, printed separately as "first run s": cold only when the cache is
empty, hence ``TORCHINDUCTOR_CACHE_DIR`` pointing at a new folder below).

- **ppvi pyro / traced / compiled**: ``ppvi.fit(..., steps=N, engine=...)`` with the registry guide (8 particles,
  path-derivative ELBO, Adam, Polyak averaging over the last steps), whole fit timed.
- **NumPyro**: ``SVI.run`` (``AutoNormal`` / ``AutoMultivariateNormal``, Adam 0.01, ``progress_bar=False``, which
  runs the loop inside one jitted ``fori_loop``), one particle as NumPyro's default.

Problems as in ``fit_speed.py``: the fake Gaussian (100 points) and posteriordb kidiq (434 points; needs the shared
data folder). torch and JAX on one thread each (``XLA_FLAGS`` single-threaded Eigen is JAX's default on CPU for
these sizes).

Usage::

    python benchmarks/step_cost.py                 # both problems, both guides, every engine (~3-5 min)
    python benchmarks/step_cost.py --quick         # fake Gaussian, mean-field and full-rank, no compiled engine
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python benchmarks/step_cost.py --repeats 2   # cold compilation timed
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

import fit_speed  # noqa: E402
import torch

import ppvi  # noqa: E402

#: Step counts of the two runs whose difference gives the per-step cost, per engine: enough steps that the
#: difference is a second or more of work at the engine's speed.
STEP_PAIRS = {"pyro": (200, 1_200), "traced": (200, 2_200), "compiled": (200, 20_200), "numpyro": (2_000, 202_000)}
GUIDES = {"meanfield": "AutoNormal", "fullrank": "AutoMultivariateNormal"}


def time_ppvi(problem: fit_speed.Problem, guide: str, engine: str, steps: int) -> float:
    started = time.perf_counter()
    ppvi.fit(
        problem.ppvi_model, *problem.torch_args, guide=guide, steps=steps, engine=engine, seed=0, progress=False
    )
    return time.perf_counter() - started


def time_numpyro(problem: fit_speed.Problem, guide: str, steps: int) -> float:
    return fit_speed.fit_numpyro(problem, GUIDES[guide], steps, seed=0, evaluate=False).seconds


def per_step(run: Callable[[int], float], pair: tuple[int, int], repeats: int) -> tuple[float, float, float]:
    """Seconds per step, set-up seconds and the warm-up run's seconds, from the fastest of ``repeats`` runs.

    One warm-up short run first (imports, caches, JAX's first compilation); then the minimum time of each length,
    since the machine's noise (and the peers' compilation jitter) only ever adds time.
    """
    short, long = pair
    cold = run(short)
    first = min(run(short) for _ in range(repeats))
    second = min(run(long) for _ in range(repeats))
    cost = max(second - first, 0.0) / (long - short)
    return cost, max(first - short * cost, 0.0), cold


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", nargs="+", default=["fake_gaussian", "kidiq"], choices=sorted(fit_speed.PROBLEMS))
    parser.add_argument("--guides", nargs="+", default=list(GUIDES), choices=list(GUIDES))
    parser.add_argument("--engines", nargs="+", default=["pyro", "traced", "compiled"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="fake Gaussian only, no compiled engine, one repeat")
    arguments = parser.parse_args(argv)
    if arguments.quick:
        arguments.problems, arguments.repeats = ["fake_gaussian"], 1
        arguments.engines = [engine for engine in arguments.engines if engine != "compiled"]
    fit_speed._quiet()
    torch.set_num_threads(1)
    numpyro_installed = fit_speed.installed("numpyro")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s); "
          f"{fit_speed.library_version('ppvi')}")
    header = (
        f"{'problem':14} | {'guide':9} | {'method':30} | {'us/step':>9} | {'set-up s':>8} | {'first run s':>11} | "
        f"{'x NumPyro':>9}"
    )
    print(header)
    print("-" * len(header))
    for name in arguments.problems:
        problem = fit_speed.PROBLEMS[name]()
        if isinstance(problem, str):
            print(f"{name}: {problem}")
            continue
        for guide in arguments.guides:
            rows = []
            for engine in arguments.engines:
                cost, setup, cold = per_step(
                    lambda steps, p=problem, g=guide, e=engine: time_ppvi(p, g, e, steps), STEP_PAIRS[engine],
                    arguments.repeats,
                )
                rows.append((f"ppvi {engine}", cost, setup, cold))
            reference = None
            if numpyro_installed:
                cost, setup, cold = per_step(
                    lambda steps, p=problem, g=guide: time_numpyro(p, g, steps), STEP_PAIRS["numpyro"],
                    arguments.repeats,
                )
                rows.append((f"numpyro {GUIDES[guide]}", cost, setup, cold))
                reference = cost
            for method, cost, setup, cold in rows:
                ratio = f"{cost / reference:9.1f}" if reference else f"{'-':>9}"
                print(
                    f"{name:14} | {guide:9} | {method:30} | {cost * 1e6:9.1f} | {setup:8.2f} | {cold:11.2f} | {ratio}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
