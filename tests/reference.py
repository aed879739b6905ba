"""Outside references for the tests: exact posteriors by quadrature, and NUTS.

Nothing here uses ppvi's own inference.
"""

from __future__ import annotations

import numpy as np
import pyro
import torch
from pyro.infer import MCMC, NUTS
from scipy import stats


def fake_gaussian_quadrature(y: np.ndarray, points: int = 401) -> dict[str, tuple[float, float]]:
    """Posterior mean and sd of ``mu`` and ``sd`` for the fake-Gaussian model, by 2-D quadrature on a grid.

    The grid spans +-8 Laplace-free standard errors around the sample mean and sd, wide enough that the
    truncated mass is below float64 round-off.
    """
    y = np.asarray(y, dtype=np.float64)
    n, mean, spread = y.shape[0], y.mean(), y.std()
    mu = np.linspace(mean - 8 * spread / np.sqrt(n), mean + 8 * spread / np.sqrt(n), points)
    sd = np.linspace(spread * (1 - 8 / np.sqrt(2 * n)), spread * (1 + 8 / np.sqrt(2 * n)), points)
    grid_mu, grid_sd = np.meshgrid(mu, sd, indexing="ij")
    log_joint = (
        stats.norm.logpdf(grid_mu, 0, 1)
        + stats.halfnorm.logpdf(grid_sd, scale=1)
        + stats.norm.logpdf(y[None, None, :], grid_mu[..., None], grid_sd[..., None]).sum(-1)
    )
    weights = np.exp(log_joint - log_joint.max())
    weights /= weights.sum()
    moments = {}
    for name, grid in (("mu", grid_mu), ("sd", grid_sd)):
        first = (weights * grid).sum()
        moments[name] = (float(first), float(np.sqrt((weights * (grid - first) ** 2).sum())))
    return moments


def nuts_draws(model, *args, num_samples: int = 2000, warmup: int = 500, seed: int = 0) -> dict[str, np.ndarray]:
    """Draws from Pyro's NUTS (Hoffman & Gelman 2014), one chain."""
    pyro.set_rng_seed(seed)
    kernel = NUTS(model, target_accept_prob=0.9)
    mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup, disable_progbar=True)
    mcmc.run(*args)
    return {name: value.detach().double().numpy() for name, value in mcmc.get_samples().items()}


def moment_errors(draws: dict[str, torch.Tensor], reference: dict[str, tuple[float, float]]) -> dict[str, tuple]:
    """Per site: (|mean - reference mean| / reference sd, sd / reference sd - 1)."""
    errors = {}
    for name, (mean, sd) in reference.items():
        values = draws[name].double().cpu().numpy()
        errors[name] = (abs(values.mean() - mean) / sd, values.std() / sd - 1)
    return errors
