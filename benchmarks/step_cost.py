"""Per-step cost of training: ppvi's default step, its replayed graph and TorchInductor's compiled step, against
NumPyro's jitted SVI step (issues 12 and 24), and the steps after which a compilation pays back.

What one step costs once a fit is under way, set-up excluded, measured the same way for every method: a fit of
``N1`` steps and a fit of ``N2`` steps (fresh fits, same seed), their time difference divided by ``N2 - N1``.
``N2`` is chosen per method from a pilot pair of fits, so that the difference is about :data:`STEPPING_SECONDS` of
work (between :data:`STEPS_MORE` bounds). The machine is shared, so the methods and both run lengths are
interleaved within each repetition (the order of the methods rotating from one repetition to the next) and each
figure is the median over ``--repeats`` repetitions; the ratio to NumPyro is the median of the ratios within each
repetition. Set-up (tracing, the Laplace start, the C
kernel's build or its cache, TorchInductor's compilation, JAX's JIT) is the ``N1`` fit's time less ``N1`` steps.

- **ppvi default**: ``ppvi.fit(..., steps=N)`` as a user calls it (``engine="auto"``): the traced step run as one C
  kernel (:mod:`ppvi.native`), which TorchInductor does not replace at these step counts.
- **ppvi replay**: the same traced graph replayed op by op (``engine="traced"`` without the C kernel): the default
  step before issue 24, and the step of graphs the C kernel cannot write out.
- **ppvi compiled**: ``engine="compiled"``; its first fit compiles (column "first run s": a cold compilation when
  TorchInductor's cache is empty, hence ``--cold``), the others hit TorchInductor's on-disk cache.
- **NumPyro**: ``SVI.run`` (``AutoNormal`` / ``AutoMultivariateNormal``, Adam 0.01, ``progress_bar=False``: the
  whole loop inside one jitted ``fori_loop``), one particle as NumPyro's default (ppvi draws eight).

Break-even: the compilation (the first compiled fit's set-up less a warm one's) over the time it saves per step
(default less compiled); "never" where the compiled step is not faster. ``ppvi.fit``'s ``engine="auto"`` makes the
same decision from the constants ``ppvi.engine.INDUCTOR_COMPILE_SECONDS`` and ``INDUCTOR_CALL_SECONDS``
(:meth:`ppvi.engine.TracedStep.plan`).

Problems as in ``fit_speed.py``: the fake Gaussian (100 points) and posteriordb kidiq (434 points; needs the shared
data folder). torch and JAX on one thread each.

Usage::

    python benchmarks/step_cost.py --cold           # both problems, both guides, every method (~15 min on 2 cores)
    python benchmarks/step_cost.py --quick          # fake Gaussian, default and NumPyro only (~2 min)
    python benchmarks/step_cost.py --methods default numpyro --repeats 5
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

#: Steps of the short fit, by method.
SHORT_STEPS = {"default": 200, "replay": 200, "compiled": 200, "numpyro": 2_000}
#: Seconds of stepping the long fit adds to the short one: long against the jitter of a fit's set-up (0.05-0.2 s on
#: the busy development machine), short enough for a run of every case to take minutes.
STEPPING_SECONDS = 1.5
#: Bounds on the steps the long fit adds, by method: the lower one is also the pilot's, so that its own estimate
#: is not lost in the jitter (10,000 steps of a 30 us step are 0.3 s).
STEPS_MORE = {
    "default": (10_000, 100_000), "replay": (1_000, 10_000), "compiled": (10_000, 100_000),
    "numpyro": (100_000, 400_000),
}
METHODS = tuple(SHORT_STEPS)
GUIDES = {"meanfield": "AutoNormal", "fullrank": "AutoMultivariateNormal"}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", nargs="+", default=["fake_gaussian", "kidiq"])
    parser.add_argument("--guides", nargs="+", default=list(GUIDES), choices=list(GUIDES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cold", action="store_true", help="compile into an empty TorchInductor cache")
    parser.add_argument("--quick", action="store_true", help="fake Gaussian, default and NumPyro, two repeats")
    arguments = parser.parse_args(argv)
    if arguments.quick:
        arguments.problems, arguments.methods, arguments.repeats = ["fake_gaussian"], ["default", "numpyro"], 2
    return arguments


def main(argv: list[str] | None = None) -> int:
    arguments = _parse(argv)
    if arguments.cold:  # before torch's compiler is imported: it reads the variable once
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cold-")
    import fit_speed
    import torch

    import ppvi
    from ppvi import engine

    fit_speed._quiet()
    torch.set_num_threads(1)
    numpyro_installed = fit_speed.installed("numpyro")
    methods = [m for m in arguments.methods if m != "numpyro" or numpyro_installed]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s); "
          f"{fit_speed.library_version('ppvi')}; cold TorchInductor cache: {arguments.cold}; repeats: "
          f"{arguments.repeats}", flush=True)

    def replayed(*args, **kwargs):
        return original_trace_step(*args, **{**kwargs, "native_kernel": False})

    original_trace_step = engine.trace_step

    def run_ppvi(problem, guide: str, method: str, steps: int) -> float:
        options = {"default": {}, "replay": {"engine": "traced"}, "compiled": {"engine": "compiled"}}[method]
        engine.trace_step = replayed if method == "replay" else original_trace_step
        try:
            started = time.perf_counter()
            ppvi.fit(problem.ppvi_model, *problem.torch_args, guide=guide, steps=steps, seed=0, progress=False,
                     **options)
            return time.perf_counter() - started
        finally:
            engine.trace_step = original_trace_step

    def runner(problem, guide: str, method: str) -> Callable[[int], float]:
        if method == "numpyro":
            return lambda steps: fit_speed.fit_numpyro(problem, GUIDES[guide], steps, seed=0, evaluate=False).seconds
        return lambda steps: run_ppvi(problem, guide, method, steps)

    header = (f"{'problem':14} | {'guide':9} | {'method':14} | {'us/step':>8} | {'each repeat (us/step)':24} | "
              f"{'steps':>15} | {'set-up s':>8} | {'first run s':>11} | {'x NumPyro':>9}")
    rows, summaries = [], []
    for name in arguments.problems:
        problem = fit_speed.PROBLEMS[name]()
        if isinstance(problem, str):
            print(f"{name}: {problem}", flush=True)
            continue
        for guide in arguments.guides:
            run = {method: runner(problem, guide, method) for method in methods}
            first = {method: run[method](SHORT_STEPS[method]) for method in methods}  # warm-up, cold compile
            pairs = {}
            for method in methods:  # the pilot: the long fit's steps for STEPPING_SECONDS of work
                short, (fewest, most) = SHORT_STEPS[method], STEPS_MORE[method]
                pilot = max(run[method](short + fewest) - run[method](short), 1e-3) / fewest
                pairs[method] = (short, short + int(min(max(round(STEPPING_SECONDS / pilot, -3), fewest), most)))
            costs: dict[str, list[float]] = {method: [] for method in methods}
            setups: dict[str, list[float]] = {method: [] for method in methods}
            for repeat in range(arguments.repeats):
                order = methods[repeat % len(methods):] + methods[: repeat % len(methods)]
                for method in order:
                    short, long = pairs[method]
                    seconds_short, seconds_long = run[method](short), run[method](long)
                    cost = max(seconds_long - seconds_short, 0.0) / (long - short)
                    costs[method].append(cost)
                    setups[method].append(max(seconds_short - short * cost, 0.0))
            median = {method: statistics.median(costs[method]) for method in methods}
            for method in methods:
                ratio = "-"
                ratios = [c / n for c, n in zip(costs[method], costs.get("numpyro", []), strict=False) if n > 0]
                if ratios:
                    ratio = f"{statistics.median(ratios):.1f}"
                each = ", ".join(f"{c * 1e6:.1f}" for c in costs[method])
                steps = f"{pairs[method][0]}/{pairs[method][1]}"
                rows.append(f"{name:14} | {guide:9} | {method:14} | {median[method] * 1e6:8.1f} | {each:24} | "
                            f"{steps:>15} | {statistics.median(setups[method]):8.2f} | {first[method]:11.2f} | "
                            f"{ratio:>9}")
                print(rows[-1] if len(rows) > 1 else f"{header}\n{'-' * len(header)}\n{rows[-1]}", flush=True)
            if "compiled" in median and "default" in median:
                compile_seconds = max(first["compiled"] - statistics.median(setups["compiled"])
                                      - SHORT_STEPS["compiled"] * median["compiled"], 0.0)
                saving = median["default"] - median["compiled"]
                steps = f"{compile_seconds / saving:,.0f} steps" if saving > 0 else "never (not faster)"
                summaries.append(f"{name} {guide}: compilation {compile_seconds:.1f} s, saving "
                                 f"{saving * 1e6:.1f} us/step: break-even {steps}")
    print()
    for summary in summaries:
        print(summary)
    if hasattr(engine, "INDUCTOR_COMPILE_SECONDS"):  # absent from the code before issue 24
        print(f"ppvi.engine's constants: compilation {engine.INDUCTOR_COMPILE_SECONDS:g} s, compiled call "
              f"{engine.INDUCTOR_CALL_SECONDS * 1e6:g} us")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    raise SystemExit(main())
