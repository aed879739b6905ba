"""The banana, or twisted Gaussian (Haario, Saksman & Tamminen 1999, "Adaptive proposal distribution for random
walk Metropolis algorithm", Computational Statistics 14(3)): a curved 2-D posterior with exactly known moments.

.. math::

    x_1 \\sim \\mathcal{N}(0, s), \\quad
    x_2 \\mid x_1 \\sim \\mathcal{N}\\big(c\\,(x_1^2 - s^2),\\ \\sigma\\big),

with ``s`` the ``scale``, ``c`` the ``curvature`` and ``sigma`` the ``noise``. Haario et al. bend a Gaussian
``N(0, diag(100, 1))`` by ``x_2 -> x_2 + b x_1^2 - 100 b``; that is this model with ``s = 10``, ``sigma = 1`` and
``c = -b`` (``b = 0.03``: "moderately", ``b = 0.1``: "strongly twisted"). What sets the shape is the ratio of the
bend over the central 2 sd of ``x_1`` to the noise, ``c s^2 / sigma`` (Haario et al.'s b = 0.03: 3). The
defaults here, ``s = 1``, ``c = 1``, ``sigma = 0.5`` (ratio 2), give a clearly curved banana that a Gaussian
cannot follow but whose moments are well defined and whose tails are light.

There are no data: the model is its own posterior, so prior draws are exact posterior draws. Latent sites:
``x1`` and ``x2``, two scalars (so that ``ppvi.compare`` and the summaries name them ``x1`` and ``x2``).

Exact moments (:func:`exact_moments`): ``E[x_1] = 0``, ``sd(x_1) = s``; ``E[x_2] = c (E[x_1^2] - s^2) = 0`` and
``Var(x_2) = c^2 Var(x_1^2) + sigma^2 = 2 c^2 s^4 + sigma^2`` (``Var(x_1^2) = 2 s^4`` for a centred normal).
``x_1`` and ``x_2`` are uncorrelated (``Cov(x_1, x_2) = c E[x_1^3] = 0``) but far from independent.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import torch

#: Default bend ``c`` of the conditional mean ``c (x1^2 - s^2)``.
CURVATURE = 1.0
#: Default sd ``s`` of ``x1``.
SCALE = 1.0
#: Default conditional sd ``sigma`` of ``x2`` given ``x1``.
NOISE = 0.5


def _check(scale: float, noise: float) -> None:
    if not scale > 0 or not noise > 0:
        raise ValueError(f"scale and noise must be positive, got scale={scale!r}, noise={noise!r}")


def model(
    curvature: float = CURVATURE, scale: float = SCALE, noise: float = NOISE, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The banana: ``x1 ~ N(0, scale)`` and ``x2 | x1 ~ N(curvature * (x1^2 - scale^2), noise)``.

    Broadcasts over leading batch dimensions of its latent values (vectorised particles, ``pyro.plate`` at
    ``dim=-1``): both sites then have the batch shape.

    Parameters
    ----------
    curvature : float
        The bend ``c`` (0 gives independent normals; the sign only flips the banana).
    scale : float
        Standard deviation ``s`` of ``x1``.
    noise : float
        Conditional standard deviation ``sigma`` of ``x2`` given ``x1``.
    dtype : torch.dtype, optional
        Floating dtype of the constants (default: torch's default dtype, which :func:`ppvi.fit` sets).

    Returns
    -------
    tuple of torch.Tensor
        The draws ``(x1, x2)``.
    """
    _check(scale, noise)
    dtype = dtype or torch.get_default_dtype()
    zero, s, sigma, c = (torch.tensor(float(value), dtype=dtype) for value in (0.0, scale, noise, curvature))
    x1 = pyro.sample("x1", dist.Normal(zero, s))
    x2 = pyro.sample("x2", dist.Normal(c * (x1**2 - s**2), sigma))
    return x1, x2


def exact_moments(
    curvature: float = CURVATURE, scale: float = SCALE, noise: float = NOISE
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The exact marginal mean and sd of ``x1`` and ``x2``, ``{site: (mean, sd)}`` (0-d arrays; the form
    :func:`ppvi.compare` takes as ``reference``): ``x1``: ``(0, s)``; ``x2``: ``(0, sqrt(2 c^2 s^4 + sigma^2))``.
    """
    _check(scale, noise)
    x2_sd = math.sqrt(2.0 * curvature**2 * scale**4 + noise**2)
    return {"x1": (np.zeros(()), np.full((), float(scale))), "x2": (np.zeros(()), np.full((), x2_sd))}


def exact_draws(
    num_draws: int, curvature: float = CURVATURE, scale: float = SCALE, noise: float = NOISE, seed: int = 0
) -> dict[str, np.ndarray]:
    """Independent exact draws (numpy, float64): ``{"x1": (num_draws,), "x2": (num_draws,)}``.

    Drawn with ``numpy.random.default_rng(seed)``, so they do not touch torch's or Pyro's random state.
    """
    _check(scale, noise)
    if not isinstance(num_draws, int) or num_draws < 1:
        raise ValueError(f"num_draws must be a positive integer, got {num_draws!r}")
    rng = np.random.default_rng(seed)
    x1 = scale * rng.standard_normal(num_draws)
    x2 = curvature * (x1**2 - scale**2) + noise * rng.standard_normal(num_draws)
    return {"x1": x1, "x2": x2}
