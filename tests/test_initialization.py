"""Tests of ppvi.initialization: the Laplace start against the closed-form mode and precision of a Gaussian, its
failure reports on densities without a mode or with a saddle, L-BFGS on non-finite losses, and the sampling-free
initial values on supports where the answer is known (T(0) of torch's bijections, the median of a normal)."""

from __future__ import annotations

import math

import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from torch.distributions import biject_to

from ppvi.initialization import (
    init_to_feasible_point,
    init_to_median_or_feasible,
    laplace_start,
    minimize,
)

pytestmark = pytest.mark.usefixtures("float64_default")


def random_gaussian(seed: int, dimension: int = 5):
    generator = torch.Generator().manual_seed(seed)
    factor = torch.randn(dimension, dimension, generator=generator)
    precision = factor @ factor.T + 0.5 * torch.eye(dimension)  # symmetric positive definite
    mode = 3.0 * torch.randn(dimension, generator=generator)
    return mode, precision


# --- laplace_start ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_laplace_start_recovers_the_mode_and_precision_of_a_gaussian(seed):
    mode, precision = random_gaussian(seed)
    # Minus the log of N(mode, precision^-1), normalising constant included.
    log_normaliser = 0.5 * torch.logdet(precision) - 0.5 * len(mode) * math.log(2 * math.pi)

    def negative_log_density(z):
        difference = z - mode
        return 0.5 * difference @ precision @ difference - log_normaliser

    start = laplace_start(negative_log_density, torch.zeros(5))
    assert start.succeeded and start.message == "ok"
    torch.testing.assert_close(start.loc, mode, rtol=0, atol=1e-6)
    torch.testing.assert_close(start.precision, precision, rtol=0, atol=1e-6)
    assert start.log_density == pytest.approx(float(log_normaliser), abs=1e-9)
    assert 0 < start.iterations < 500
    assert not start.loc.requires_grad


def test_laplace_start_agrees_with_torch_multivariate_normal():
    mode, precision = random_gaussian(3)
    target = torch.distributions.MultivariateNormal(mode, precision_matrix=precision)
    start = laplace_start(lambda z: -target.log_prob(z), torch.ones(5))
    assert start.succeeded
    torch.testing.assert_close(start.loc, mode, rtol=0, atol=1e-6)
    torch.testing.assert_close(start.precision, precision, rtol=0, atol=1e-6)
    assert start.log_density == pytest.approx(float(target.log_prob(mode)), abs=1e-9)


def test_laplace_start_fails_on_a_funnel_that_grows_without_bound():
    # A hierarchical scale with no prior: -log p(s, theta) = sum(theta^2) / (2 exp(2 s)) + 3 s, whose infimum along
    # theta = 0, s -> -inf is -inf. There is no mode.
    def negative_log_density(z):
        log_scale, theta = z[0], z[1:]
        return (theta**2).sum() / (2 * torch.exp(2 * log_scale)) + 3 * log_scale

    start = laplace_start(negative_log_density, torch.tensor([0.0, 1.0, -0.5, 0.3]))
    assert not start.succeeded
    assert start.loc is None and start.precision is None
    assert "mode" in start.message and start.message != "ok"


def test_laplace_start_fails_without_crashing_on_an_unbounded_linear_density():
    start = laplace_start(lambda z: -z[0], torch.zeros(2), maximum_iterations=20)
    assert not start.succeeded
    assert start.loc is None and start.precision is None
    assert start.message and start.message != "ok"


def test_laplace_start_says_no_mode_for_an_unbounded_linear_density():
    # -log p = -z0 has gradient (-1, 0) everywhere: there is no mode. L-BFGS's line search extrapolates z0 to about
    # 1e24 (or 6e307 with the default iteration cap), and the point should be rejected for its gradient of 1.
    for iterations in (20, 500):
        start = laplace_start(lambda z: -z[0], torch.zeros(2), maximum_iterations=iterations)
        assert not start.succeeded
        assert "no mode found" in start.message, start.message


def test_laplace_start_rejects_a_saddle():
    # f = z0^2 / 2 - z1^2 / 2 + z1^4 / 4: starting on z1 = 0 the gradient in z1 stays 0, so L-BFGS converges to
    # the stationary point (0, 0), where the Hessian is diag(1, -1).
    def negative_log_density(z):
        return 0.5 * z[0] ** 2 - 0.5 * z[1] ** 2 + 0.25 * z[1] ** 4

    start = laplace_start(negative_log_density, torch.tensor([2.0, 0.0]))
    assert not start.succeeded
    assert start.message.startswith("the Hessian at the stationary point is not positive definite (a saddle")
    assert start.log_density == pytest.approx(0.0, abs=1e-12)
    # From a generic start it finds one of the two true modes, (0, +-1), where the Hessian is diag(1, 2).
    start = laplace_start(negative_log_density, torch.tensor([2.0, 0.3]))
    assert start.succeeded
    torch.testing.assert_close(start.loc, torch.tensor([0.0, 1.0]), rtol=0, atol=1e-6)
    torch.testing.assert_close(start.precision, torch.diag(torch.tensor([1.0, 2.0])), rtol=0, atol=1e-6)


def test_laplace_start_refuses_large_dimensions_without_evaluating():
    calls = []
    start = laplace_start(lambda z: calls.append(1) or (z**2).sum(), torch.zeros(11), maximum_dimension=10)
    assert not start.succeeded and not calls
    assert start.message == "latent dimension 11 > 10"


def test_laplace_start_reports_a_non_finite_density():
    start = laplace_start(lambda z: (z**2).sum() * math.nan, torch.ones(3))
    assert not start.succeeded
    assert start.message == "the log density was not finite along the path"
    assert start.log_density == -math.inf


def test_laplace_start_accepts_a_mode_where_the_log_density_is_large():
    # A Gaussian whose log density is ~1e6 at the mode is accepted: the gradient test scales with 1 + |log p|.
    mode, precision = random_gaussian(4, dimension=3)
    start = laplace_start(lambda z: 0.5 * (z - mode) @ precision @ (z - mode) + 1e6, torch.zeros(3))
    assert start.succeeded
    torch.testing.assert_close(start.loc, mode, rtol=0, atol=1e-5)


# --- minimize -----------------------------------------------------------------------------------------------------


def test_minimize_finds_the_minimum_of_a_quadratic():
    mode, precision = random_gaussian(5, dimension=4)
    x = torch.zeros(4, requires_grad=True)
    loss, iterations = minimize(lambda: 0.5 * (x - mode) @ precision @ (x - mode) + 2.0, [x])
    assert loss == pytest.approx(2.0, abs=1e-12) and iterations > 0
    torch.testing.assert_close(x.detach(), mode, rtol=0, atol=1e-6)


def test_minimize_returns_inf_and_restores_finite_parameters_when_the_loss_turns_nan():
    x = torch.tensor([4.0, -3.0], requires_grad=True)
    finite_points = []

    def loss_function():
        value = ((x - 1.0) ** 2).sum()
        if len(finite_points) >= 3:  # from the fourth evaluation on, the loss is NaN
            return value * math.nan
        finite_points.append(x.detach().clone())
        return value

    loss, _ = minimize(loss_function, [x])
    assert loss == math.inf
    assert torch.isfinite(x).all()
    # The parameters are back at a point where the loss was finite.
    assert any(torch.equal(x.detach(), point) for point in finite_points)


def test_minimize_returns_inf_when_the_start_is_not_finite():
    x = torch.tensor([-1.0, 2.0], requires_grad=True)
    loss, _ = minimize(lambda: torch.log(x).sum(), [x])  # log(-1) is NaN from the start
    assert loss == math.inf
    torch.testing.assert_close(x.detach(), torch.tensor([-1.0, 2.0]), rtol=0, atol=0)


# --- init_to_feasible_point / init_to_median_or_feasible ----------------------------------------------------------


def site(fn) -> dict:
    return {"name": "z", "fn": fn, "type": "sample", "is_observed": False, "value": None, "infer": {}}


@pytest.mark.parametrize("strategy", [init_to_feasible_point, init_to_median_or_feasible])
def test_improper_flat_prior_needs_no_sampling(strategy):
    improper = dist.ImproperUniform(constraints.real, (), (2,))
    with pytest.raises(NotImplementedError):
        improper.sample()  # the reason Pyro's own feasible/median inits fail on it
    torch.testing.assert_close(strategy(site(improper)), torch.zeros(2), rtol=0, atol=0)
    batched = dist.ImproperUniform(constraints.real, (3,), (2,))
    torch.testing.assert_close(strategy(site(batched)), torch.zeros(3, 2), rtol=0, atol=0)
    scalar = dist.ImproperUniform(constraints.real, (), ())
    assert strategy(site(scalar)).shape == () and float(strategy(site(scalar))) == 0.0


@pytest.mark.parametrize("strategy", [init_to_feasible_point, init_to_median_or_feasible])
def test_improper_positive_prior_starts_at_exp_zero(strategy):
    improper = dist.ImproperUniform(constraints.positive, (), (3,))
    torch.testing.assert_close(strategy(site(improper)), torch.ones(3), rtol=0, atol=0)


@pytest.mark.parametrize("strategy", [init_to_feasible_point, init_to_median_or_feasible])
def test_simplex_prior_starts_on_the_simplex(strategy):
    dirichlet = dist.Dirichlet(torch.tensor([0.5, 2.0, 3.0, 1.0]))
    value = strategy(site(dirichlet))
    assert value.shape == (4,)
    assert bool(constraints.simplex.check(value))
    assert float(value.sum()) == pytest.approx(1.0, abs=1e-12) and bool((value > 0).all())
    # T(0) of torch's stick-breaking bijection is the centre of the simplex (it ignores the concentration).
    torch.testing.assert_close(value, biject_to(constraints.simplex)(torch.zeros(3)), rtol=0, atol=1e-15)
    torch.testing.assert_close(value, torch.full((4,), 0.25), rtol=0, atol=1e-12)



def test_a_discrete_data_site_run_without_data_gets_a_value_of_its_support():
    # VSBC and SBC trace the model with its data site unobserved; a multinomial's counts have no bijection from the
    # real space and no median in Pyro, which stopped a Dirichlet-multinomial model before its first simulation.
    multinomial = dist.Multinomial(10, torch.tensor([0.1, 0.2, 0.3, 0.4])).expand([6])
    value = init_to_median_or_feasible(site(multinomial))
    assert value.shape == (6, 4) and bool(multinomial.support.check(value).all())
    torch.testing.assert_close(value.sum(-1), torch.full((6,), 10.0), rtol=0, atol=0)

def test_init_to_feasible_point_ignores_the_distribution_parameters():
    torch.testing.assert_close(init_to_feasible_point(site(dist.Normal(5.0, 0.1))), torch.tensor(0.0))
    torch.testing.assert_close(init_to_feasible_point(site(dist.LogNormal(3.0, 1.0))), torch.tensor(1.0))
    interval = init_to_feasible_point(site(dist.Uniform(2.0, 4.0)))
    torch.testing.assert_close(interval, torch.tensor(3.0))  # the sigmoid of 0, halfway along the interval


def test_samplable_prior_starts_near_its_median():
    # The median of 15 draws of N(5, 0.1^2) has sd about 1.25 * 0.1 / sqrt(15) = 0.03 around the true median 5.
    value = init_to_median_or_feasible(site(dist.Normal(5.0, 0.1)))
    assert abs(float(value) - 5.0) < 0.15
    # A lognormal's median is exp(mu), not its mean exp(mu + s^2 / 2) = 4.5 exp(mu).
    value = init_to_median_or_feasible(site(dist.LogNormal(0.0, 1.7).expand([200])))
    assert float(value.log().median()) == pytest.approx(0.0, abs=0.5)


def test_strategies_return_themselves_without_a_site():
    assert init_to_feasible_point() is init_to_feasible_point
    assert init_to_median_or_feasible() is init_to_median_or_feasible
