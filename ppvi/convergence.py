"""The stopping rule of stochastic VI, as pure functions on the loss trace.

Stochastic optimisation of the ELBO never reaches a fixed point: after a transient, the iterates fluctuate around
the optimum. Following Dhaka, Catalina, Andersen, Magnusson, Huggins & Vehtari (2020, "Robust, accurate
stochastic optimization for variational inference", NeurIPS), ``ppvi`` detects the end of the transient with a
split-R-hat (Gelman & Rubin 1992; Vehtari et al. 2021) of the recent trace, then averages the iterates (Polyak &
Juditsky 1992) over a further window so the answer is not the last noisy iterate. Dhaka et al. compute R-hat on
parameter iterates; ``ppvi`` computes it on the negative ELBO, a single scalar whose per-step noise comes from the
Monte Carlo estimate, which keeps the check cheap for guides with millions of parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: R-hat below which the trace is taken as stationary; 1.1 is the classic cut-off (Gelman & Rubin 1992) and the
#: one Dhaka et al. (2020) use to detect stationarity of the iterates.
DEFAULT_RHAT_THRESHOLD = 1.1
#: Steps per stationarity check; long enough that four quarters each hold dozens of Monte Carlo draws.
DEFAULT_WINDOW = 200
#: Pieces the window is split into for R-hat (four, as split-R-hat with two chains).
NUM_SPLITS = 4


@dataclass(frozen=True)
class StoppingRule:
    """When :func:`ppvi.training.run` stops.

    Attributes
    ----------
    window : int
        Steps per stationarity check, and the length of the final iterate-averaging phase.
    rhat_threshold : float
        The trace of the last ``window`` losses is stationary when its split-R-hat is below this.
    max_steps : int
        Cap on steps; a run that reaches it without becoming stationary reports ``converged=False``.
    """

    window: int = DEFAULT_WINDOW
    rhat_threshold: float = DEFAULT_RHAT_THRESHOLD
    max_steps: int = 20_000

    def __post_init__(self):
        if self.window < 4 * NUM_SPLITS:
            raise ValueError(f"window must be at least {4 * NUM_SPLITS} steps, got {self.window}")
        if self.rhat_threshold <= 1.0:
            raise ValueError(f"rhat_threshold must exceed 1, got {self.rhat_threshold}")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be positive, got {self.max_steps}")


def split_rhat(trace: np.ndarray, num_splits: int = NUM_SPLITS) -> float:
    """Potential scale reduction of one trace split into ``num_splits`` consecutive pieces.

    Parameters
    ----------
    trace : numpy.ndarray
        One-dimensional trace; trailing values that do not fill a piece are dropped from the front.
    num_splits : int
        Number of pieces, treated as chains.

    Returns
    -------
    float
        ``sqrt(((n - 1) / n * W + B / n) / W)`` with ``W`` the mean within-piece variance and ``B / n`` the
        variance of the piece means (Gelman et al. 2013, BDA3, eq. 11.4). 1 for a constant trace, ``inf`` if the
        trace is constant within pieces but not across them.
    """
    trace = np.asarray(trace, dtype=np.float64)
    length = trace.shape[0] // num_splits
    if length < 2:
        raise ValueError(f"need at least {2 * num_splits} values, got {trace.shape[0]}")
    pieces = trace[trace.shape[0] - length * num_splits :].reshape(num_splits, length)
    within = pieces.var(axis=1, ddof=1).mean()
    between_over_n = pieces.mean(axis=1).var(ddof=1)
    if within == 0.0:
        return 1.0 if between_over_n == 0.0 else float("inf")
    return float(np.sqrt(((length - 1) / length * within + between_over_n) / within))


def is_stationary(losses: np.ndarray, rule: StoppingRule) -> bool:
    """Whether the last ``rule.window`` losses look stationary (split-R-hat below the threshold)."""
    if losses.shape[0] < rule.window:
        return False
    return split_rhat(losses[-rule.window :]) < rule.rhat_threshold
