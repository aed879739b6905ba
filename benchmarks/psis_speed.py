"""Speed of ppvi's batched torch PSIS against arviz 0.x ``psislw`` (a Python loop over rows of numpy code).

Usage::

    python benchmarks/psis_speed.py                        # 1000 x 4000 log weights, median of 5 repeats
    python benchmarks/psis_speed.py --rows 200 --samples 1000 --repeats 9

Runs ppvi on the CPU and, when available, on CUDA (timed with synchronisation, after a warm-up call), and
prints a table of median wall-clock times with each implementation's largest khat difference from arviz.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch

from ppvi.diagnostics import psis

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # arviz 0.x announces its 1.0 refactor at import
    import arviz as az


def median_seconds(function: Callable[[], object], repeats: int, synchronise: Callable[[], None]) -> float:
    """Median wall-clock time of ``repeats`` calls, after one untimed warm-up call."""
    function()
    synchronise()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        synchronise()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000, help="batch size: independent sets of log weights")
    parser.add_argument("--samples", type=int, default=4000, help="draws S per row")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per implementation (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    arguments = parser.parse_args()
    if arguments.threads is not None:
        torch.set_num_threads(arguments.threads)

    rng = np.random.default_rng(arguments.seed)
    # Importance ratios of N(0, 1) against proposals N(0, s^2) with s from 0.3 (khat ~ 0.9) to 1.5 (bounded).
    scales = rng.uniform(0.3, 1.5, size=(arguments.rows, 1))
    theta = scales * rng.standard_normal((arguments.rows, arguments.samples))
    log_weights = -0.5 * theta**2 + 0.5 * (theta / scales) ** 2 + np.log(scales)

    def no_synchronisation() -> None:
        pass

    with np.errstate(over="ignore"):  # harmless overflow inside arviz's grid weights, see tests/diagnostics
        _, reference_khat = az.psislw(log_weights.copy())
    rows = [
        (
            "arviz.psislw",
            "cpu",
            median_seconds(lambda: az.psislw(log_weights.copy()), arguments.repeats, no_synchronisation),
            0.0,
        )
    ]

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        tensor = torch.from_numpy(log_weights).to(device)
        synchronise = torch.cuda.synchronize if device == "cuda" else no_synchronisation
        seconds = median_seconds(lambda tensor=tensor: psis(tensor), arguments.repeats, synchronise)
        khat = psis(tensor)[1].cpu().numpy()
        rows.append(("ppvi.psis", device, seconds, float(np.max(np.abs(khat - reference_khat)))))

    print(
        f"PSIS on {arguments.rows} x {arguments.samples} float64 log weights, median of {arguments.repeats} "
        f"repeats, torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
    )
    print(f"{'implementation':<16}{'device':<8}{'seconds':>10}{'speed-up':>10}{'max |khat - arviz|':>20}")
    arviz_seconds = rows[0][2]
    for name, device, seconds, difference in rows:
        print(f"{name:<16}{device:<8}{seconds:>10.4f}{arviz_seconds / seconds:>9.1f}x{difference:>20.1e}")


if __name__ == "__main__":
    main()
