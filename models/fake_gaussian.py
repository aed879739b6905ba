"""The lecture's "fake Gaussian" (the PyMC introductory example).

.. math::

    \\mu \\sim \\mathcal{N}(0, 1), \\quad \\sigma \\sim \\mathrm{HalfNormal}(1), \\quad
    y_i \\mid \\mu, \\sigma \\sim \\mathcal{N}(\\mu, \\sigma), \\quad i = 1, \\dots, n.

Latent sites: ``mu`` (real) and ``sd`` (positive). Observed site: ``y``.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

#: The lecture draws 100 points.
DEFAULT_NUM_POINTS = 100


def model(y: torch.Tensor | None = None, num_points: int = DEFAULT_NUM_POINTS) -> torch.Tensor:
    """Pyro model; with ``y=None`` it draws ``num_points`` observations from the prior predictive.

    Parameters
    ----------
    y : torch.Tensor, optional
        Observations, shape ``(n,)``.
    num_points : int
        Number of points drawn when ``y`` is None.
    """
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    sd = pyro.sample("sd", dist.HalfNormal(1.0))
    with pyro.plate("data", num_points if y is None else y.shape[0]):
        return pyro.sample("y", dist.Normal(mu, sd), obs=y)


def simulate(
    num_points: int = DEFAULT_NUM_POINTS, mu: float = 1.0, sd: float = 2.0, seed: int = 0
) -> torch.Tensor:
    """Draw ``num_points`` observations from ``Normal(mu, sd)`` with a private generator.

    The defaults (mu = 1, sd = 2) are a draw the prior finds plausible but not central, so the posterior is
    informed by the data rather than by the prior. The global random state is left untouched.
    """
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(num_points, generator=generator, dtype=torch.get_default_dtype())
    return mu + sd * noise
