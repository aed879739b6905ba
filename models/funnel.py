"""Neal's funnel (Neal 2003, "Slice sampling", Annals of Statistics 31(3), section 8): a hard posterior with
exactly known marginals.

.. math::

    v \\sim \\mathcal{N}(0, 3), \\quad x_i \\mid v \\sim \\mathcal{N}(0, e^{v/2}), \\quad i = 1, \\dots, d - 1.

The scale of ``x`` changes by orders of magnitude along ``v`` (from the neck, ``v = -6``, where ``x`` has sd
0.05, to the mouth, ``v = 6``, where it has sd 20), so no single Gaussian in the unconstrained space fits it:
it is the canonical stress test for Gaussian variational families (and for HMC with one step size). There are
no data; the model is its own posterior, so prior draws are exact posterior draws.

Latent sites: ``v`` (a scalar) and ``x`` (shape ``(d - 1,)``, one ``.to_event(1)`` site: the components are
conditionally independent given ``v``, but they are one vector, not a data plate).

Exact marginals (:func:`exact_moments`): ``E[v] = 0``, ``sd(v) = 3``; ``E[x_i] = 0`` and
``Var(x_i) = E[Var(x_i | v)] = E[e^v] = e^{9/2}`` (the log-normal mean), so ``sd(x_i) = e^{9/4} ~ 9.49``. The
marginal of ``x_i`` is a scale mixture of normals with very heavy tails (kurtosis ``3 e^9 ~ 24,000``), so the
Monte Carlo error of a sample sd of ``x`` is large: judge it with many draws.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import torch

#: Neal's choice: ``v`` and nine ``x`` (d = 10).
DEFAULT_DIMENSION = 10
#: Standard deviation of ``v``.
V_SCALE = 3.0


def _check_dimension(dimension: int) -> int:
    if not isinstance(dimension, int) or isinstance(dimension, bool) or dimension < 2:
        raise ValueError(f"dimension must be an integer of at least 2 (v and one x), got {dimension!r}")
    return dimension


def model(dimension: int = DEFAULT_DIMENSION, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Neal's funnel in ``dimension`` dimensions: ``v ~ N(0, 3)`` and ``x ~ N(0, exp(v / 2))`` of shape
    ``(dimension - 1,)``.

    The model broadcasts over leading batch dimensions (vectorised particles: a ``pyro.plate`` at ``dim=-1``,
    left of the event dimension of ``x``): ``v`` then has the batch shape and ``x`` the batch shape plus
    ``(dimension - 1,)``.

    Parameters
    ----------
    dimension : int
        Total number of latent scalars, ``v`` and ``dimension - 1`` components of ``x`` (Neal: 10).
    dtype : torch.dtype, optional
        Floating dtype of the constants (default: torch's default dtype, which :func:`ppvi.fit` sets).

    Returns
    -------
    tuple of torch.Tensor
        The draws ``(v, x)``.
    """
    _check_dimension(dimension)
    dtype = dtype or torch.get_default_dtype()
    zero = torch.zeros((), dtype=dtype)
    v = pyro.sample("v", dist.Normal(zero, torch.full((), V_SCALE, dtype=dtype)))
    # loc (d - 1,) broadcasts against the scale (..., 1): the batch shape of v, then the event dimension.
    x_loc = torch.zeros(dimension - 1, dtype=dtype)
    x = pyro.sample("x", dist.Normal(x_loc, torch.exp(v / 2).unsqueeze(-1)).to_event(1))
    return v, x


def exact_moments(dimension: int = DEFAULT_DIMENSION) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The exact marginal mean and sd of every latent site, ``{site: (mean, sd)}`` with arrays of the site's
    shape (the form :func:`ppvi.compare` takes as ``reference``).

    ``v``: ``(0, 3)``. ``x_i``: mean 0 by symmetry, sd ``sqrt(E[exp(v)]) = exp(9 / 4)`` (the log-normal mean
    ``E[exp(v)] = exp(sd(v)^2 / 2)``).
    """
    _check_dimension(dimension)
    x_sd = math.exp(V_SCALE**2 / 4)
    return {
        "v": (np.zeros(()), np.full((), V_SCALE)),
        "x": (np.zeros(dimension - 1), np.full(dimension - 1, x_sd)),
    }


def exact_draws(num_draws: int, dimension: int = DEFAULT_DIMENSION, seed: int = 0) -> dict[str, np.ndarray]:
    """Independent exact draws of the funnel (numpy, float64): ``{"v": (num_draws,), "x": (num_draws, d - 1)}``.

    Drawn with ``numpy.random.default_rng(seed)``, so they do not touch torch's or Pyro's random state.
    """
    _check_dimension(dimension)
    if not isinstance(num_draws, int) or num_draws < 1:
        raise ValueError(f"num_draws must be a positive integer, got {num_draws!r}")
    rng = np.random.default_rng(seed)
    v = V_SCALE * rng.standard_normal(num_draws)
    x = np.exp(v / 2)[:, None] * rng.standard_normal((num_draws, dimension - 1))
    return {"v": v, "x": x}
