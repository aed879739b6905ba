"""Every public call on a model written for one draw, against its broadcasting twin (issue 24, item 1).

A Bayesian logistic regression written three ways:

- ``broadcasting``: ``a + (X * beta).sum(-1)``, Pyro's particle convention (the reference);
- ``matrix_product``: ``a + X @ beta``, written for one draw (does not broadcast: ppvi batches it with vmap);
- ``numpy_style``: ``a[..., None] + (X * beta[..., None, :]).sum(-1)``, which broadcasts wrongly (an extra
  dimension left of the plate; ppvi detects it and batches with vmap).

Each call of a user's session is timed on each model, in this order, in one process, after one untimed warm-up
fit of each (so no model pays the process's first-call costs): ``ppvi.fit`` (full-rank, default options),
``Fit.summary()``, ``Fit.diagnose()``, ``Fit.to_arviz()``, ``ppvi.compare`` (mean-field and full-rank), and the CLI's
``ppvi compare`` in a subprocess (start-up included). The table gives seconds (best of ``--repeats``) and the ratio
to the broadcasting model; the target is at most 1.5x in every call. Also printed: the final ELBO of each (the same
for all three when nothing is over-counted).

Usage::

    python benchmarks/vectorization.py               # 3 repeats, ~2 min on 2 cores
    python benchmarks/vectorization.py --repeats 1 --no-cli
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch

import ppvi

NUM_POINTS, NUM_PREDICTORS = 500, 8

MODELS_SOURCE = '''
import pyro, pyro.distributions as dist, torch

def _priors(X):
    a = pyro.sample("a", dist.Normal(torch.tensor(0.0, dtype=X.dtype), 2.0))
    beta = pyro.sample("beta", dist.Normal(torch.zeros(X.shape[1], dtype=X.dtype), 1.0).to_event(1))
    return a, beta

def _likelihood(logits, y):
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=logits), obs=y)

def broadcasting(X, y):
    a, beta = _priors(X)
    _likelihood(a + (X * beta).sum(-1), y)

def matrix_product(X, y):
    a, beta = _priors(X)
    _likelihood(a + X @ beta, y)

def numpy_style(X, y):
    a, beta = _priors(X)
    _likelihood(a[..., None] + (X * beta[..., None, :]).sum(-1), y)
'''


def simulate(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(NUM_POINTS, NUM_PREDICTORS, generator=generator, dtype=torch.float64)
    beta = torch.randn(NUM_PREDICTORS, generator=generator, dtype=torch.float64)
    y = torch.bernoulli(torch.sigmoid(0.5 + X @ beta), generator=generator)
    return X, y


def timed(function) -> tuple[float, object]:
    """Seconds of one call, after collecting the garbage of the calls before it (so that no call pays for
    another's)."""
    gc.collect()
    started = time.perf_counter()
    value = function()
    return time.perf_counter() - started, value


def session(model, X, y) -> dict[str, float]:
    """Seconds of each call of a user's session, and the fit's final ELBO."""
    seconds: dict[str, float] = {}
    seconds["fit"], fit = timed(lambda: ppvi.fit(model, X, y, guide="fullrank", seed=0, progress=False))
    seconds["summary"], _ = timed(fit.summary)
    seconds["diagnose"], _ = timed(fit.diagnose)
    seconds["to_arviz"], _ = timed(fit.to_arviz)
    seconds["compare"], _ = timed(
        lambda: ppvi.compare(model, X, y, guides=("meanfield", "fullrank"), seed=0, progress=False)
    )
    seconds["elbo"] = fit.final_elbo
    seconds["strategy"] = fit.vectorization.strategy
    return seconds


def cli_compare(folder: Path, name: str) -> float:
    command = [
        sys.executable, "-m", "ppvi", "compare", f"{folder / 'models.py'}:{name}", "--data", str(folder / "data.npz"),
        "--guides", "meanfield", "fullrank", "--seed", "0", "--no-figure",
    ]
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {completed.stderr[-2000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-cli", action="store_true", help="skip the CLI's compare")
    parser.add_argument("--json", type=Path, help="also write the results here")
    options = parser.parse_args()
    warnings.simplefilter("ignore")
    X, y = simulate()
    folder = Path(tempfile.mkdtemp())
    (folder / "models.py").write_text(MODELS_SOURCE)
    np.savez(folder / "data.npz", X=X.numpy(), y=y.numpy())
    namespace: dict = {}
    exec(compile(MODELS_SOURCE, str(folder / "models.py"), "exec"), namespace)  # noqa: S102 - our own source
    names = ("broadcasting", "matrix_product", "numpy_style")
    models = {name: namespace[name] for name in names}
    for model in models.values():  # warm-up: the process's first-call costs (imports, first traces) paid by none
        ppvi.fit(model, X, y, guide="fullrank", seed=0, steps=50, progress=False)
    results: dict[str, dict[str, float]] = {name: {} for name in names}
    for _ in range(options.repeats):
        for name, model in models.items():  # interleaved, so machine noise hits every model alike
            pyro.clear_param_store()
            outcome = session(model, X, y)
            if not options.no_cli:
                outcome["cli compare"] = cli_compare(folder, name)
            for key, value in outcome.items():
                if isinstance(value, float) and key != "elbo":
                    results[name][key] = min(results[name].get(key, np.inf), value)
                else:
                    results[name][key] = value
    calls = [key for key in results["broadcasting"] if key not in ("elbo", "strategy")]
    print(f"{NUM_POINTS} points, {NUM_PREDICTORS} predictors, torch threads {torch.get_num_threads()}, "
          f"best of {options.repeats}")
    print(f"{'model':<16}{'strategy':<11}{'final ELBO':>11}" + "".join(f"{call:>14}" for call in calls))
    for name in names:
        row = results[name]
        cells = "".join(
            f"{row[call]:>7.2f}s {row[call] / results['broadcasting'][call]:>4.2f}x" for call in calls
        )
        print(f"{name:<16}{row['strategy']:<11}{row['elbo']:>11.2f}{cells}")
    if options.json:
        options.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    _ = dist  # the models live in MODELS_SOURCE, so that the CLI can import them from a file
    main()
