"""The model the reliability tests fit: small, conjugate, fast."""

from __future__ import annotations

import pyro
import pyro.distributions as dist


def normal_normal(y):
    """mu ~ N(0, 10), y_i ~ N(mu, 1): the posterior of mu is N(sum(y) / (n + 0.01), 1 / (n + 0.01))."""
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
