"""Bayesian linear regression, the first example of Yao, Vehtari, Simpson & Gelman (2018, "Yes, but did it work?:
Evaluating variational inference", section 4.1), where mean-field ADVI is close to exact and VSBC flags nothing.

.. math::

    \\beta_k \\sim \\mathcal{N}(0, 1), \\quad \\sigma \\sim \\mathrm{Gamma}(0.5, 0.5), \\quad
    y_i \\sim \\mathcal{N}(x_i^\\top \\beta, \\sigma), \\quad i = 1..n.

The paper takes ``n = 10000`` and ``K = 100`` regressors; :func:`design` draws ``x_ij ~ N(0, 1)``, so the columns
are nearly orthogonal and the posterior nearly independent across coefficients (mean-field's best case).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch


def design(num_points: int, num_predictors: int, seed: int = 0, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An ``(n, K)`` design with independent standard normal entries (a fixed seed: the design is data)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_points, num_predictors, generator=generator, dtype=dtype or torch.get_default_dtype())


def model(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """``y=None`` draws the responses from the model. Broadcasts over batch dimensions left of the data plate."""
    num_predictors = x.shape[-1]
    beta = pyro.sample("beta", dist.Normal(x.new_zeros(num_predictors), 1.0).to_event(1))
    sigma = pyro.sample("sigma", dist.Gamma(x.new_tensor(0.5), x.new_tensor(0.5)))
    # beta has batch shape (..., 1) inside the data plate: (x * beta) is (..., n, K), its sum the mean (..., n).
    mean = (x * beta).sum(-1)
    with pyro.plate("data", x.shape[-2]):
        return pyro.sample("y", dist.Normal(mean, sigma), obs=y)
