"""Eight schools (Rubin 1981; Gelman et al. 2013, BDA3 section 5.5): the standard example for VI diagnostics.

.. math::

    \\mu \\sim \\mathcal{N}(0, 5), \\quad \\tau \\sim \\mathrm{HalfCauchy}(5), \\quad
    \\theta_j \\sim \\mathcal{N}(\\mu, \\tau), \\quad y_j \\sim \\mathcal{N}(\\theta_j, \\sigma_j), \\quad j = 1..8.

:func:`centered` samples ``theta`` directly (a funnel in ``(log tau, theta)`` that defeats Gaussian guides);
:func:`noncentered` samples ``theta_trans ~ N(0, 1)`` and sets ``theta = mu + tau * theta_trans``
(a ``pyro.deterministic`` site), the reparameterisation that removes the funnel (Papaspiliopoulos, Roberts &
Skold 2007). Yao, Vehtari, Simpson & Gelman (2018) use both to show what PSIS and VSBC diagnose.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

#: Estimated coaching effects and their standard errors (BDA3, table 5.2).
Y = (28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0)
SIGMA = (15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0)


def data(dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sigma, y)``: the model's positional arguments, in ``dtype`` (default: torch's default dtype)."""
    dtype = dtype or torch.get_default_dtype()
    return torch.tensor(SIGMA, dtype=dtype), torch.tensor(Y, dtype=dtype)


def _hyperparameters(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``mu ~ N(0, 5)`` and ``tau ~ HalfCauchy(5)``, with constants in the data's dtype and device."""
    five = sigma.new_tensor(5.0)
    mu = pyro.sample("mu", dist.Normal(torch.zeros_like(five), five))
    tau = pyro.sample("tau", dist.HalfCauchy(five))
    return mu, tau


def centered(sigma: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """The centred parameterisation; ``y=None`` draws the effects from the model."""
    mu, tau = _hyperparameters(sigma)
    with pyro.plate("schools", sigma.shape[-1]):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        return pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def noncentered(sigma: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """The non-centred parameterisation; ``y=None`` draws the effects from the model."""
    mu, tau = _hyperparameters(sigma)
    with pyro.plate("schools", sigma.shape[-1]):
        theta_trans = pyro.sample("theta_trans", dist.Normal(torch.zeros_like(sigma), torch.ones_like(sigma)))
        theta = pyro.deterministic("theta", mu + tau * theta_trans)
        return pyro.sample("y", dist.Normal(theta, sigma), obs=y)
