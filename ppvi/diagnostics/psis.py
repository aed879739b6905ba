"""Pareto smoothed importance sampling (PSIS) in torch, as pure, shape-fixed functions.

Given draws ``theta_s ~ q`` from a variational guide and the log importance ratios

    log w_s = log p(x, theta_s) - log q(theta_s),

PSIS (Vehtari, Simpson, Gelman, Yao & Gabry 2024, "Pareto smoothed importance sampling", Journal of Machine
Learning Research 25(72):1-58) fits a generalized Pareto distribution to the largest ``M`` ratios, replaces
them by the fitted distribution's expected order statistics, and reports the fitted shape ``khat``. ``khat``
estimates how many moments the ratios have (the ``r``-th exists for ``r < 1/k``), hence whether importance
sampling, and by extension the guide, can be trusted (Yao, Vehtari, Simpson & Gelman 2018, "Yes, but did it
work?: Evaluating variational inference", ICML).

Conventions
-----------
* Input: log importance ratios exactly as above, *not* negated. This is the convention of arviz 0.x
  ``az.psislw`` and of R ``loo::psis``. (arviz-stats' internal ``_psislw`` negates its input, because it is
  fed log-likelihoods for PSIS-LOO, where ``log w = -log p(y_i | theta)``; do not negate here.)
* Every function works along ``dim`` and is batched over all other dimensions, on any device.
* Computation is in float64 whatever the input dtype, and the results are returned in float64 (the normalised
  log weights of thousands of draws and small differences of ``khat`` deserve the precision); cast back if
  needed.
* No boolean indexing, no ``.item()`` and no Python branches on tensor values, so that a CUDA call runs
  without host synchronisation. The only branch is on the (static) number of draws.

This reproduces arviz 0.x ``az.psislw`` (and its private ``_gpdfit`` and ``_gpinv``) to rounding error,
including its tail rule: the tail length is ``M = ceil(min(S / 5, 3 sqrt(S / r_eff)))`` (``loo::n_pareto`` and
posterior's ``ps_tail_length`` also round up; arviz-stats rounds *down*, so it can use one tail draw fewer),
and the tail is the draws *strictly* above the ``(M + 1)``-th largest log ratio and above ``log(tiny)``
relative to the maximum, so ties at the cut-off shorten the tail. One deliberate deviation, for flat tails
(constant weights, or constant up to rounding), is documented in :func:`psis`.

References
----------
* Vehtari, A., Simpson, D., Gelman, A., Yao, Y. and Gabry, J. (2024). Pareto smoothed importance sampling.
  Journal of Machine Learning Research, 25(72):1-58.
* Zhang, J. and Stephens, M. A. (2009). A new and efficient estimation method for the generalized Pareto
  distribution. Technometrics, 51(3):316-325.
"""

from __future__ import annotations

import math
import sys
import warnings

import torch

__all__ = [
    "PSISWarning",
    "fit_generalized_pareto",
    "generalized_pareto_quantile",
    "khat_threshold",
    "khat_verdict",
    "psis",
    "psis_effective_sample_size",
    "tail_length",
]

#: Fewest tail draws for which the generalized Pareto fit is attempted (as arviz 0.x, loo and posterior).
MINIMUM_TAIL_LENGTH = 5
#: Classic khat bands (Vehtari et al. 2024): at or below 0.5 the ratios have a finite variance and PSIS
#: converges at the usual Monte Carlo rate; between 0.5 and 0.7 it is still usable.
KHAT_GOOD = 0.5
KHAT_OK = 0.7

_FLOAT64_EPS = torch.finfo(torch.float64).eps
#: arviz 0.x never lets the tail cut-off fall below log(smallest normal float64) relative to the largest log
#: ratio, so that exp(cut-off) does not underflow to zero.
_LOG_TINY = math.log(sys.float_info.min)
#: Zhang & Stephens (2009) evaluate the profile likelihood on a grid of GRID_BASE + floor(sqrt(n)) points;
#: they use 20, loo's and arviz 0.x's ``gpdfit`` use 30, which we follow.
_GRID_BASE = 30
#: The grid is scaled by PRIOR_GRID_SCALE times the first quartile of the data (Zhang & Stephens 2009,
#: their "prior" for theta; 3 in loo and arviz).
_PRIOR_GRID_SCALE = 3.0
#: Weakly informative prior on k (Vehtari et al. 2024; loo's gpdfit): k is shrunk toward 0.5 as if
#: PRIOR_K_STRENGTH pseudo-observations had k = PRIOR_K_MEAN.
_PRIOR_K_STRENGTH = 10.0
_PRIOR_K_MEAN = 0.5
#: Grid points whose normalised posterior weight is below this are dropped before averaging (as arviz, loo).
_NEGLIGIBLE_WEIGHT = 10 * _FLOAT64_EPS


class PSISWarning(UserWarning):
    """Warning raised when Pareto smoothing cannot be done (too few draws for a tail fit)."""


def tail_length(num_samples: int, relative_efficiency: float = 1.0) -> int:
    """Number of largest importance ratios to which the generalized Pareto distribution is fitted.

    ``M = ceil(min(S / 5, 3 sqrt(S / r_eff)))`` (Vehtari et al. 2024, Appendix H): 20 % of the draws for small
    ``S``, then ``3 sqrt(S)`` so that the tail fraction goes to zero and the fit is consistent. Rounding up
    matches arviz 0.x ``psislw`` and R ``loo``/``posterior``; arviz-stats rounds down.

    Parameters
    ----------
    num_samples : int
        Number of draws ``S``.
    relative_efficiency : float, default 1.0
        ``ESS / S`` of the ratios; 1 for independent draws from a variational guide, less for MCMC draws.

    Returns
    -------
    int
        The tail length ``M``. PSIS needs ``M >= 5``, that is ``S >= 21`` for independent draws.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    if relative_efficiency <= 0:
        raise ValueError(f"relative_efficiency must be positive, got {relative_efficiency}")
    # Same floating-point expression as arviz 0.x so that the rounding agrees draw for draw.
    return int(math.ceil(min(num_samples / 5.0, 3 * (num_samples / relative_efficiency) ** 0.5)))


def generalized_pareto_quantile(
    probability: torch.Tensor | float, shape: torch.Tensor | float, scale: torch.Tensor | float
) -> torch.Tensor:
    """Quantile function of the generalized Pareto distribution with location 0.

    ``Q(p) = sigma ((1 - p)^(-k) - 1) / k`` for ``k != 0`` and ``-sigma log(1 - p)`` for ``k = 0`` (used when
    ``|k|`` is below float64 machine epsilon, as arviz's ``_gpinv``). Arguments broadcast against each other.

    Parameters
    ----------
    probability : Tensor or float
        Probabilities ``p`` in ``[0, 1]``; ``p = 1`` gives ``inf`` for ``k >= 0`` and the upper end point
        ``-sigma / k`` for ``k < 0``; outside ``[0, 1]`` gives ``nan``.
    shape : Tensor or float
        Shape ``k`` (the sign convention of Vehtari et al. 2024 and scipy's ``genpareto`` ``c``; Zhang &
        Stephens 2009 use ``-k``).
    scale : Tensor or float
        Scale ``sigma``; the quantile is ``nan`` where ``sigma <= 0`` (as arviz's ``_gpinv``).

    Returns
    -------
    Tensor
        float64 quantiles, on the device of ``probability``.
    """
    probability = torch.as_tensor(probability, dtype=torch.float64)
    shape = torch.as_tensor(shape, dtype=torch.float64, device=probability.device)
    scale = torch.as_tensor(scale, dtype=torch.float64, device=probability.device)
    log_survival = torch.log1p(-probability)
    exponential = -log_survival
    general = torch.expm1(-shape * log_survival) / shape
    standardised = torch.where(shape.abs() < _FLOAT64_EPS, exponential, general)
    return torch.where(scale > 0, standardised * scale, torch.nan)


def _fit_sorted_generalized_pareto(
    exceedances: torch.Tensor, num_valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zhang-Stephens fit with the weakly informative prior on the last dimension, shape-fixed.

    ``exceedances`` (float64, ``(..., n_max)``) is sorted ascending; in each row only the last ``num_valid``
    entries are data, the leading ones are padding and must be 0 (they then add log(1 - b * 0) = 0 to the sums
    over the data, which saves masking the largest intermediate). ``num_valid`` (int64, ``(...)``) may vary
    across rows, which is how ties at the PSIS cut-off are handled without boolean indexing.
    """
    n_max = exceedances.shape[-1]
    device = exceedances.device
    n = num_valid.to(torch.float64)
    first_valid = n_max - num_valid  # index of the smallest data point of each row
    is_data = torch.arange(n_max, device=device) >= first_valid.unsqueeze(-1)

    # Grid for b = -k / sigma (Zhang & Stephens' theta, whose k has the opposite sign) of
    # m = 30 + floor(sqrt(n)) points, b_j = 1 / x_(n) + (1 - sqrt(m / (j - 1/2))) / (3 x_*), with x_* the
    # first quartile x_(floor(n/4 + 1/2)). Rows with fewer data use a prefix of the longest grid, masked.
    grid_size_max = _GRID_BASE + math.isqrt(n_max)
    grid_size = _GRID_BASE + torch.floor(torch.sqrt(n))
    j = torch.arange(1, grid_size_max + 1, dtype=torch.float64, device=device)
    on_grid = j <= grid_size.unsqueeze(-1)
    # floor(n / 4 + 1/2) = (n + 2) // 4 for integer n; minus 1 for zero-based indexing.
    quartile_index = (first_valid + (num_valid + 2) // 4 - 1).clamp(0, n_max - 1)
    first_quartile = torch.gather(exceedances, -1, quartile_index.unsqueeze(-1))
    maximum = exceedances[..., -1:]
    grid_shape = 1 - torch.sqrt(grid_size.unsqueeze(-1) / (j - 0.5))
    b = grid_shape / (_PRIOR_GRID_SCALE * first_quartile) + 1 / maximum

    # Profile log-likelihood (Zhang & Stephens) l(b) = n (log(-b / k(b)) - k(b) - 1),
    # with k(b) = mean log(1 - b x). The largest intermediate, (..., grid, n_max); zero padding contributes 0.
    log_terms = ((-b).unsqueeze(-1) * exceedances.unsqueeze(-2)).log1p_()
    k_grid = log_terms.sum(-1) / n.unsqueeze(-1)
    profile = n.unsqueeze(-1) * (torch.log(-b / k_grid) - k_grid - 1)
    profile = torch.where(on_grid, profile, -torch.inf)
    # Posterior weights of the grid points, w_j = 1 / sum_i exp(l_i - l_j), i.e. a softmax of the profile.
    weights = torch.exp(profile - torch.logsumexp(profile, dim=-1, keepdim=True))
    weights = torch.where(weights >= _NEGLIGIBLE_WEIGHT, weights, 0.0)
    weights = weights / weights.sum(-1, keepdim=True)
    b_posterior = torch.where(on_grid, b * weights, 0.0).sum(-1, keepdim=True)

    log_terms = torch.log1p(-b_posterior * exceedances)
    k = torch.where(is_data, log_terms, 0.0).sum(-1) / n
    sigma = -k / b_posterior.squeeze(-1)
    # Weakly informative prior (Vehtari et al. 2024): k <- (n k + 10 * 0.5) / (n + 10).
    k = (n * k + _PRIOR_K_STRENGTH * _PRIOR_K_MEAN) / (n + _PRIOR_K_STRENGTH)
    return k, sigma


def fit_generalized_pareto(exceedances: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit a generalized Pareto distribution (location 0) to exceedances, batched, shape-fixed.

    Empirical Bayes estimator of Zhang & Stephens (2009): the posterior mean of ``b = -k / sigma`` over a grid
    of ``30 + floor(sqrt(n))`` points weighted by the profile likelihood, followed by
    ``k = mean log(1 - b x)`` and ``sigma = -k / b``; then ``k`` is shrunk toward 0.5 with the weakly
    informative prior of Vehtari et al. (2024), ``k <- (n k + 10 * 0.5) / (n + 10)``. ``sigma`` is computed
    before the shrinkage. This is R ``loo::gpdfit`` and arviz 0.x ``_gpdfit`` (grid of 30 + floor(sqrt(n))
    points, as arviz) vectorised.

    Parameters
    ----------
    exceedances : Tensor
        Non-negative amounts by which the data exceed the threshold, along ``dim``, in any order. At least 5.
    dim : int, default -1
        Dimension holding the exceedances; all other dimensions are batch dimensions.

    Returns
    -------
    k : Tensor
        float64 shape estimates (scipy ``genpareto`` ``c``), batch shape.
    sigma : Tensor
        float64 scale estimates, batch shape.

    References
    ----------
    Zhang, J. and Stephens, M. A. (2009). A new and efficient estimation method for the generalized Pareto
    distribution. Technometrics, 51(3):316-325.
    """
    values = torch.as_tensor(exceedances).to(torch.float64).movedim(dim, -1)
    n = values.shape[-1]
    if n < MINIMUM_TAIL_LENGTH:
        raise ValueError(f"need at least {MINIMUM_TAIL_LENGTH} exceedances to fit, got {n}")
    values, _ = torch.sort(values, dim=-1)
    num_valid = torch.full(values.shape[:-1], n, dtype=torch.int64, device=values.device)
    return _fit_sorted_generalized_pareto(values, num_valid)


def psis(
    log_weights: torch.Tensor, dim: int = -1, *, relative_efficiency: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pareto smoothed importance sampling: smoothed, normalised log weights and the Pareto ``khat``.

    Along ``dim``: take the ``M`` largest ratios (:func:`tail_length`) strictly above the ``(M + 1)``-th
    largest (the cut-off, floored at ``log(tiny)`` below the maximum); fit a generalized Pareto distribution
    to ``exp(tail) - exp(cut-off)`` (:func:`fit_generalized_pareto`); replace the ``i``-th smallest tail ratio
    by ``exp(cut-off)`` plus the fitted quantile at ``(i - 1/2) / M`` (``M``: the number of tail draws);
    truncate at the largest raw ratio; normalise. All of it is batched over the other dimensions with fixed
    shapes (Vehtari et al. 2024).

    Parameters
    ----------
    log_weights : Tensor
        Log importance ratios ``log p(x, theta_s) - log q(theta_s)`` (not negated; unnormalised is fine), any
        dtype and device. ``-inf`` entries (zero weight) are fine; a row containing ``nan`` or ``+inf``, or
        only ``-inf``, gives ``nan`` weights and ``khat = inf``.
    dim : int, default -1
        Dimension of the ``S`` draws; the others are batch dimensions.
    relative_efficiency : float, default 1.0
        ``ESS / S`` of the ratios, only used for the tail length; 1 for independent draws.

    Returns
    -------
    smoothed_log_weights : Tensor
        float64, same shape as ``log_weights``: smoothed log weights normalised to log-sum-exp 0 along ``dim``
        (as arviz's ``psislw`` with its default ``normalize=True``; R ``loo`` returns them unnormalised).
    khat : Tensor
        float64 Pareto shape estimates, the batch shape (``dim`` removed). Read it with :func:`khat_verdict`.
        ``inf`` where the tail has fewer than 5 draws (then the weights are only normalised, not smoothed);
        ``-inf`` where the ``M + 1`` largest ratios are equal up to rounding (a flat tail, see Notes).

    Warns
    -----
    PSISWarning
        When ``M < 5`` (fewer than 21 draws for ``relative_efficiency=1``), which is known from the shape
        alone. A tail shortened below 5 draws by ties at the cut-off also gives ``khat = inf``, silently:
        detecting it would need a host synchronisation.

    Notes
    -----
    Matches arviz 0.x ``az.psislw`` to rounding error, with one deliberate deviation, for a *flat tail*: when
    the ``M + 1`` largest log ratios agree to within ``sqrt(eps)`` of the input dtype (1.5e-8 for float64,
    3.5e-4 for float32; differences that small are indistinguishable from the rounding error of
    ``log p - log q``). This is what a guide equal to the posterior gives: constant log ratios, or ``log Z``
    plus a few distinct rounding levels. arviz then returns ``khat = inf`` (exact ties leave no draw strictly
    above the cut-off) or, with a few rounding levels, ``inf`` or a fit to rounding noise; R ``loo`` warns and
    returns ``Inf``. Both flag a perfect proposal as unreliable. A flat upper tail is a point mass, lighter
    than any generalized Pareto (all moments exist, and no normalised weight exceeds about ``1 / (M + 1)``),
    so we return ``khat = -inf`` and leave the weights unsmoothed.

    References
    ----------
    Vehtari, A., Simpson, D., Gelman, A., Yao, Y. and Gabry, J. (2024). Pareto smoothed importance sampling.
    Journal of Machine Learning Research, 25(72):1-58.
    """
    values = torch.as_tensor(log_weights)
    input_dtype = values.dtype if values.dtype.is_floating_point else torch.float64
    flat_tolerance = math.sqrt(torch.finfo(input_dtype).eps)
    values = values.to(torch.float64).movedim(dim, -1)
    num_samples = values.shape[-1]
    tail = tail_length(num_samples, relative_efficiency)

    if tail < MINIMUM_TAIL_LENGTH:
        warnings.warn(
            f"PSIS needs at least {MINIMUM_TAIL_LENGTH} tail draws but {num_samples} draws give a tail of "
            f"{tail}; khat is set to inf and the weights are not smoothed",
            PSISWarning,
            stacklevel=2,
        )
        khat = torch.full(values.shape[:-1], torch.inf, dtype=torch.float64, device=values.device)
        normalised = values - torch.logsumexp(values, dim=-1, keepdim=True)
        return normalised.movedim(-1, dim), khat

    # Only the M + 1 largest are needed, ascending: top-k, several times faster than a full sort. They are
    # shifted so that the largest is 0, whence exp() of the tail can neither overflow nor underflow early.
    top_values, top_indices = torch.topk(values, tail + 1, dim=-1)
    maximum = top_values[..., :1]
    top_values, top_indices = (top_values - maximum).flip(-1), top_indices.flip(-1)
    # The (M + 1)-th largest is the cut-off; the largest is 0, so the tail is flat if it is above -tolerance.
    flat = top_values[..., 0] >= -flat_tolerance
    cutoff = top_values[..., :1].clamp_min(_LOG_TINY)
    top = top_values[..., 1:]  # the M largest, ascending
    in_tail = top > cutoff  # ties at the cut-off are excluded, as arviz 0.x
    num_tail = in_tail.sum(-1)
    exp_cutoff = torch.exp(cutoff)
    exceedances = torch.where(in_tail, torch.exp(top) - exp_cutoff, 0.0)
    # in_tail is a suffix of the ascending slice, as _fit_sorted_generalized_pareto expects.
    k, sigma = _fit_sorted_generalized_pareto(exceedances, num_tail)
    khat = torch.where(num_tail >= MINIMUM_TAIL_LENGTH, k, torch.inf)
    khat = torch.where(flat, -torch.inf, khat)

    # Expected order statistics of the fitted distribution: rank i (1-based, in the tail) -> (i - 1/2) / n.
    # (Integer tensors are cast to float64 explicitly: int64 + 0.5 would give the default dtype, float32.)
    rank = torch.arange(tail, device=values.device) - (tail - num_tail).unsqueeze(-1)
    probability = (rank.to(torch.float64) + 0.5) / num_tail.to(torch.float64).unsqueeze(-1)
    quantile = generalized_pareto_quantile(probability, khat.unsqueeze(-1), sigma.unsqueeze(-1))
    smoothed = torch.log(quantile + exp_cutoff)
    smooth_here = in_tail & torch.isfinite(khat).unsqueeze(-1)
    # Truncate at the largest raw ratio, 0 after the shift (Vehtari et al. 2024).
    top = torch.where(smooth_here, smoothed, top).clamp_max(0.0)

    # Normalise: log-sum-exp of the shifted log weights with the tail replaced, computed with two passes over
    # the full array (this and the subtraction below); on the CPU the memory traffic dominates the cost.
    tail_indices = top_indices[..., 1:]
    weights = torch.sub(values, maximum).exp_().scatter_(-1, tail_indices, torch.exp(top))
    log_total = torch.log(weights.sum(-1, keepdim=True))
    normalised = torch.sub(values, maximum + log_total).scatter_(-1, tail_indices, top - log_total)
    return normalised.movedim(-1, dim), khat


def psis_effective_sample_size(
    smoothed_log_weights: torch.Tensor, dim: int = -1, *, relative_efficiency: float = 1.0
) -> torch.Tensor:
    """PSIS effective sample size ``r_eff / sum_s w_s^2`` of the normalised weights.

    As R ``loo``'s ``psis_n_eff`` (Vehtari et al. 2024, with the relative efficiency of MCMC draws). The
    weights are normalised here, so unnormalised log weights are accepted. Computed in log space for
    stability.

    Parameters
    ----------
    smoothed_log_weights : Tensor
        Log weights, typically the first output of :func:`psis`.
    dim : int, default -1
        Dimension of the draws.
    relative_efficiency : float, default 1.0
        ``ESS / S`` of the draws; 1 for independent draws from a guide.

    Returns
    -------
    Tensor
        float64, batch shape; between ``r_eff`` (one weight dominates) and ``r_eff * S`` (equal weights).
    """
    values = torch.as_tensor(smoothed_log_weights).to(torch.float64)
    normalised = values - torch.logsumexp(values, dim=dim, keepdim=True)
    return relative_efficiency * torch.exp(-torch.logsumexp(2 * normalised, dim=dim))


def khat_threshold(num_samples: int) -> float:
    """Sample-size dependent khat threshold ``min(1 - 1 / log10(S), 0.7)``.

    Vehtari et al. (2024): with ``S`` draws, the PSIS estimate's relative error is small when
    ``khat < 1 - 1/log10(S)``; above 0.7 more draws hardly help. The threshold is 0.5 at ``S = 100``, 2/3 at
    ``S = 1000`` and reaches 0.7 at ``S ~ 2154``; it is 0 or negative for ``S <= 10`` (no khat is then
    acceptable).

    Parameters
    ----------
    num_samples : int
        Number of draws ``S`` (at least 2).

    Returns
    -------
    float
    """
    if num_samples < 2:
        raise ValueError(f"num_samples must be at least 2, got {num_samples}")
    return min(1 - 1 / math.log10(num_samples), KHAT_OK)


def khat_verdict(khat: torch.Tensor | float, num_samples: int) -> str:
    """Classify one Pareto ``khat`` as ``"good"``, ``"ok"`` or ``"bad"``.

    Bands of Vehtari et al. (2024), as in R ``loo`` and arviz:

    * ``"good"``: ``khat <= 0.5``; the weights have finite variance and PSIS converges at the Monte Carlo
      rate.
    * ``"ok"``: ``0.5 < khat <= 0.7``; PSIS is still reliable, with slower convergence.
    * ``"bad"``: ``khat > 0.7`` (unreliable; above 1 even the mean of the weights does not exist), or ``khat``
      above the sample-size threshold :func:`khat_threshold` ``min(1 - 1/log10(S), 0.7)`` (too few draws for
      this ``khat``, e.g. any ``khat > 0.5`` with ``S = 100``), or ``khat`` not a number (``inf`` when the
      tail was too short, ``nan`` for a failed fit).

    Parameters
    ----------
    khat : Tensor or float
        A single khat (a one-element tensor is fine); ``-inf`` (constant weights, see :func:`psis`) is good.
    num_samples : int
        Number of draws ``S`` that gave it.

    Returns
    -------
    str
        ``"good"``, ``"ok"`` or ``"bad"``.
    """
    value = float(khat)
    # Written so that nan compares false and falls through to "bad".
    if not value <= khat_threshold(num_samples):
        return "bad"
    return "good" if value <= KHAT_GOOD else "ok"
