"""Tests of ppvi.guides' flow family: it starts exactly at the Gaussian it is given, and refuses bad options."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

from ppvi.guides import FlowGuide, _autoregressive_order


def gaussian_model():
    pyro.sample("a", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0))
    pyro.sample("b", dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1))


def built_guide(**options) -> FlowGuide:
    guide = FlowGuide(gaussian_model, **options)
    with pyro.poutine.block(), torch.no_grad():
        guide()
    return guide.double()


@pytest.mark.parametrize("num_transforms", [1, 3])
def test_affine_flow_starts_exactly_at_the_gaussian_it_is_given(num_transforms, float64_default):
    # float64 default: Pyro's affine autoregressive inverse builds its work tensor in the default dtype.
    guide = built_guide(num_transforms=num_transforms)
    loc = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    scale_tril = torch.tensor([[1.0, 0.0, 0.0], [0.3, 0.5, 0.0], [-0.2, 0.4, 2.0]], dtype=torch.float64)
    guide.set_gaussian(loc, scale_tril)
    # Outside reference: torch's multivariate normal with the same mean and Cholesky factor.
    gaussian = torch.distributions.MultivariateNormal(loc, scale_tril=scale_tril)
    with torch.no_grad():
        draws = guide.posterior().sample((2000,))
        points = gaussian.sample((50,))
        flow_density = guide.posterior().log_prob(points)
    assert torch.allclose(flow_density, gaussian.log_prob(points), atol=1e-10)
    assert torch.allclose(draws.mean(0), loc, atol=0.15)
    assert torch.allclose(torch.cov(draws.T), scale_tril @ scale_tril.T, atol=0.3)


def test_block_flow_starts_near_the_gaussian_and_its_density_is_that_of_its_draws():
    guide = built_guide(kind="block")
    with torch.no_grad():
        posterior = guide.posterior()
        draws = posterior.sample((4000,))
        log_density = posterior.log_prob(draws)  # the flows' cache: the density of their own draws
    standard = torch.distributions.MultivariateNormal(guide.preconditioner_loc, scale_tril=guide.preconditioner_scale)
    # 99 % of the way to the identity: the densities of the start and of the Gaussian agree to a few percent.
    assert torch.isfinite(log_density).all()
    assert (log_density - standard.log_prob(draws)).abs().mean() < 0.1
    assert torch.allclose(draws.std(0), guide.preconditioner_scale.diagonal(), rtol=0.15)


def test_the_last_layer_reads_the_coordinates_in_the_model_order():
    assert _autoregressive_order(4, 2, 3).tolist() == [0, 1, 2, 3]
    assert _autoregressive_order(4, 1, 3).tolist() == [3, 2, 1, 0]


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"num_transforms": 0}, "num_transforms must be a positive integer"),
        ({"num_transforms": True}, "num_transforms must be a positive integer"),
        ({"hidden_dims": []}, "hidden_dims must be a non-empty list"),
        ({"hidden_dims": [8, -1]}, "hidden_dims must be a non-empty list"),
        ({"kind": "spline"}, "kind must be 'affine' or 'block'"),
    ],
)
def test_bad_flow_options_are_named(options, words):
    with pytest.raises(ValueError, match=words):
        FlowGuide(gaussian_model, **options)


def test_set_gaussian_needs_a_full_preconditioner():
    from ppvi.guides import MeanFieldGuide

    guide = MeanFieldGuide(gaussian_model)
    with pyro.poutine.block(), torch.no_grad():
        guide()
    with pytest.raises(ValueError, match="full preconditioner"):
        guide.set_gaussian(torch.zeros(3), torch.eye(3))
