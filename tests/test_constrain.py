"""Tests of ppvi.constrain: each draw constrained by its own support, with the Jacobian of the whole map.

Outside reference: the density of ``alpha ~ Uniform(0, 1)``, ``beta ~ Uniform(0, 1 - alpha)`` written out by hand
in the unconstrained coordinates (two logistic maps, the second scaled by ``1 - alpha``).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from ppvi.constrain import constrained_trace


def dependent_bounds():
    alpha = pyro.sample("alpha", dist.Uniform(torch.tensor(0.0, dtype=torch.float64), 1.0))
    pyro.sample("beta", dist.Uniform(torch.zeros_like(alpha), 1.0 - alpha))


def by_hand(u_alpha: torch.Tensor, u_beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """alpha, beta and log p(alpha, beta) + log|J| in the unconstrained coordinates."""
    alpha = torch.sigmoid(u_alpha)
    beta = (1 - alpha) * torch.sigmoid(u_beta)
    log_prior = -torch.log1p(-alpha)  # Uniform(0, 1) times Uniform(0, 1 - alpha)
    log_jacobian = (
        torch.log(alpha * (1 - alpha))
        + torch.log(1 - alpha)
        + torch.log(torch.sigmoid(u_beta) * (1 - torch.sigmoid(u_beta)))
    )
    return alpha, beta, log_prior + log_jacobian


def test_each_draw_gets_its_own_bound_and_the_jacobian_of_the_whole_map():
    u = torch.randn(500, 2, dtype=torch.float64) * 2
    trace, messenger = constrained_trace(
        dependent_bounds, (), {}, {"alpha": u[:, 0], "beta": u[:, 1]}, num_draws=500, max_plate_nesting=0
    )
    alpha, beta, expected = by_hand(u[:, 0], u[:, 1])
    torch.testing.assert_close(messenger.values["alpha"], alpha)
    torch.testing.assert_close(messenger.values["beta"], beta)
    assert (messenger.values["beta"] < 1 - messenger.values["alpha"]).all()
    trace.compute_log_prob()
    log_joint = trace.nodes["alpha"]["log_prob"] + trace.nodes["beta"]["log_prob"]
    torch.testing.assert_close(log_joint + messenger.log_abs_det_jacobian, expected)


def test_one_point_runs_the_model_unbatched():
    u = torch.tensor([0.3, -1.2], dtype=torch.float64)
    trace, messenger = constrained_trace(
        dependent_bounds, (), {}, {"alpha": u[0], "beta": u[1]}, num_draws=None, max_plate_nesting=0
    )
    _, beta, expected = by_hand(u[0], u[1])
    assert messenger.values["beta"].shape == ()
    torch.testing.assert_close(messenger.values["beta"], beta)
    torch.testing.assert_close(trace.log_prob_sum() + messenger.log_abs_det_jacobian, expected)


def test_observed_and_unlisted_sites_are_left_alone():
    def model(y):
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0))
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    y = torch.tensor(0.5, dtype=torch.float64)
    trace, messenger = constrained_trace(model, (y,), {}, {"mu": torch.tensor(0.2, dtype=torch.float64)}, None, 0)
    assert torch.equal(trace.nodes["y"]["value"], y) and set(messenger.values) == {"mu"}
    assert float(messenger.log_abs_det_jacobian) == 0.0  # the real line: the identity
