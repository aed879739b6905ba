"""Tests of ppvi.constrain: each draw constrained by its own support, with the Jacobian of the whole map.

Outside reference: the density of ``alpha ~ Uniform(0, 1)``, ``beta ~ Uniform(0, 1 - alpha)`` written out by hand
in the unconstrained coordinates (two logistic maps, the second scaled by ``1 - alpha``).
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import ppvi
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


#: Ten noisy observations (sd 0.1) of alpha and ten of beta, drawn once at alpha = 0.55, beta = 0.42: their sum
#: sits 1.2 standard errors below the bound alpha + beta < 1, which truncates the posterior along a line that moves
#: with alpha.
Y_ALPHA = (0.581, 0.502, 0.618, 0.423, 0.556, 0.598, 0.489, 0.641, 0.537, 0.552)
Y_BETA = (0.395, 0.512, 0.433, 0.301, 0.457, 0.384, 0.466, 0.428, 0.371, 0.449)
NOISE = 0.1


def against_a_moving_bound(y_alpha, y_beta):
    alpha = pyro.sample("alpha", dist.Uniform(y_alpha.new_tensor(0.0), 1.0))
    beta = pyro.sample("beta", dist.Uniform(torch.zeros_like(alpha), 1.0 - alpha))
    with pyro.plate("alpha_data", y_alpha.shape[-1]):
        pyro.sample("y_alpha", dist.Normal(alpha, NOISE), obs=y_alpha)
    with pyro.plate("beta_data", y_beta.shape[-1]):
        pyro.sample("y_beta", dist.Normal(beta, NOISE), obs=y_beta)


def quadrature_moments(num_points: int = 1500) -> dict[str, tuple[float, float]]:
    """Outside reference: the posterior's means and sds by the midpoint rule on ``(alpha, t)``, ``beta = (1 - alpha)
    t``, where the prior density 1 / (1 - alpha) and the Jacobian 1 - alpha cancel."""
    grid = (np.arange(num_points) + 0.5) / num_points
    alpha, t = np.meshgrid(grid, grid, indexing="ij")
    beta = (1 - alpha) * t
    log_likelihood = sum(
        (-0.5 * ((np.asarray(data)[None, None, :] - value[..., None]) / NOISE) ** 2).sum(-1)
        for data, value in ((Y_ALPHA, alpha), (Y_BETA, beta))
    )
    weights = np.exp(log_likelihood - log_likelihood.max())
    weights /= weights.sum()
    moments = {}
    for name, values in (("alpha", alpha), ("beta", beta)):
        mean = float((weights * values).sum())
        moments[name] = (mean, float(np.sqrt((weights * (values - mean) ** 2).sum())))
    return moments


@pytest.mark.parametrize("guide", ["fullrank", "flow"])
def test_fits_keep_each_draws_bound_and_find_the_posterior_against_it(guide):
    data = (torch.tensor(Y_ALPHA, dtype=torch.float64), torch.tensor(Y_BETA, dtype=torch.float64))
    fit = ppvi.fit(against_a_moving_bound, *data, guide=guide)
    draws = fit.sample(20000, seed=1)
    assert (draws["beta"] > 0).all() and (draws["beta"] < 1 - draws["alpha"]).all()
    summary = fit.summary(20000, seed=1)
    # A Gaussian in the unconstrained space cannot take the posterior's shape against the bound exactly; the
    # flow can. Measured errors: full rank 0.05 sd and sds 0.97-1.0; flow 0.02 sd.
    tolerance = {"fullrank": (0.15, 0.15), "flow": (0.1, 0.1)}[guide]
    for name, (mean, sd) in quadrature_moments().items():
        assert abs(summary.loc[name, "mean"] - mean) / sd < tolerance[0], name
        assert summary.loc[name, "sd"] / sd == pytest.approx(1.0, abs=tolerance[1]), name
    # The importance weights use the same per-draw bound: PSIS-corrected means agree with the quadrature too.
    corrected = fit.expectation(lambda d: torch.stack([d["alpha"], d["beta"]], -1)).corrected
    for index, (name, (mean, sd)) in enumerate(quadrature_moments().items()):
        assert abs(float(corrected[index]) - mean) / sd < 0.1, name


@pytest.mark.slow
def test_vsbc_simulates_and_scores_each_replication_within_its_own_bound():
    # Data as informative as above: full rank is close to each replication's posterior, so with every draw held to
    # its own bound the p-values of alpha and of beta (whose bound moves with alpha) are symmetric.
    data = (torch.tensor(Y_ALPHA, dtype=torch.float64), torch.tensor(Y_BETA, dtype=torch.float64))
    result = ppvi.vsbc(
        against_a_moving_bound, *data, observed=["y_alpha", "y_beta"], guide="fullrank", num_simulations=200, seed=0
    )
    table = result.to_dataframe()
    assert set(table.index) == {"alpha", "beta"}
    for name in ("alpha", "beta"):
        probabilities = np.asarray(result.p_values[name])
        # beta's come from 1,000 constrained guide draws (its bound moves), so 0 and 1 are possible values.
        assert np.isfinite(probabilities).all() and ((probabilities >= 0) & (probabilities <= 1)).all(), name
    assert (table["ks_pvalue"] > 0.01).all(), table


def test_simplex_map_is_torchs_stick_breaking():
    """The concatenating stick-breaking map computes torch's values and Jacobian (that it traces for every batch
    size is tested in test_batched, on a model with a Dirichlet site)."""
    from torch.distributions.transforms import StickBreakingTransform

    from ppvi.constrain import SymbolicStickBreakingTransform, support_transform

    transform = support_transform(dist.constraints.simplex)
    assert isinstance(transform, SymbolicStickBreakingTransform)
    reference = StickBreakingTransform()
    x = 3.0 * torch.randn(4, 6, 3, dtype=torch.float64)
    x[0, 0] = torch.tensor([-800.0, 0.0, 800.0])  # the clipping at both ends of the sigmoid
    y = transform(x)
    torch.testing.assert_close(y, reference(x), rtol=0, atol=0)
    torch.testing.assert_close(transform.log_abs_det_jacobian(x, y), reference.log_abs_det_jacobian(x, y))
    torch.testing.assert_close(transform.inv(y[1:]), x[1:])


def test_correlation_cholesky_map_is_torchs():
    """The concatenating, gathering map onto correlation Cholesky factors computes torch's values and Jacobian, and
    lays a vector out below the diagonal as torch does."""
    from torch.distributions.transforms import CorrCholeskyTransform
    from torch.distributions.utils import vec_to_tril_matrix

    from ppvi.constrain import SymbolicCorrCholeskyTransform, _strictly_lower_matrix, support_transform

    for size in (2, 3, 5):
        vector = torch.randn(4, size * (size - 1) // 2, dtype=torch.float64)
        torch.testing.assert_close(_strictly_lower_matrix(vector), vec_to_tril_matrix(vector, diag=-1), rtol=0, atol=0)
    transform = support_transform(dist.constraints.corr_cholesky)
    assert isinstance(transform, SymbolicCorrCholeskyTransform)
    reference = CorrCholeskyTransform()
    x = 2.0 * torch.randn(3, 5, 6, dtype=torch.float64)  # 4 x 4 factors
    y = transform(x)
    torch.testing.assert_close(y, reference(x), rtol=0, atol=0)
    torch.testing.assert_close(transform.log_abs_det_jacobian(x, y), reference.log_abs_det_jacobian(x, y))
    torch.testing.assert_close(transform.inv(y), x)


@pytest.mark.parametrize("size", [3, 20])  # written-out solve up to 16 coordinates, torch.linalg.solve above
def test_symbolic_multivariate_normal_density_is_torchs(size):
    """The density written for a symbolic batch equals torch's MultivariateNormal.log_prob, with broadcast
    parameters, also under to_event; other distributions pass through unchanged."""
    from ppvi.constrain import SymbolicMultivariateNormal, _symbolic_distribution

    generator = torch.Generator().manual_seed(5)
    factor = torch.randn(4, 1, size, size, generator=generator, dtype=torch.float64).tril()
    factor.diagonal(dim1=-2, dim2=-1).copy_(torch.rand(4, 1, size, generator=generator, dtype=torch.float64) + 0.5)
    loc = torch.randn(6, size, generator=generator, dtype=torch.float64)
    value = torch.randn(2, 4, 6, size, generator=generator, dtype=torch.float64)
    reference = dist.MultivariateNormal(loc, scale_tril=factor)
    symbolic = _symbolic_distribution(reference)
    assert isinstance(symbolic, SymbolicMultivariateNormal) and symbolic.batch_shape == reference.batch_shape
    torch.testing.assert_close(symbolic.log_prob(value), reference.log_prob(value), rtol=1e-12, atol=1e-10)
    wrapped = _symbolic_distribution(reference.to_event(1))
    assert isinstance(wrapped.base_dist, SymbolicMultivariateNormal)
    torch.testing.assert_close(wrapped.log_prob(value), reference.to_event(1).log_prob(value), rtol=1e-12, atol=1e-10)
    other = dist.Normal(0.0, 1.0)
    assert _symbolic_distribution(other) is other


@pytest.mark.parametrize("size, rank", [(3, 2), (20, 18)])  # written-out solve up to 16 ranks, torch.linalg above
def test_symbolic_low_rank_multivariate_normal_density_is_torchs(size, rank):
    from ppvi.constrain import SymbolicLowRankMultivariateNormal, _symbolic_distribution

    generator = torch.Generator().manual_seed(size)
    cov_factor = torch.randn(4, 1, size, rank, generator=generator, dtype=torch.float64)
    cov_diag = torch.rand(6, size, generator=generator, dtype=torch.float64) + 0.5
    loc = torch.randn(6, size, generator=generator, dtype=torch.float64)
    value = torch.randn(2, 4, 6, size, generator=generator, dtype=torch.float64)
    reference = dist.LowRankMultivariateNormal(loc, cov_factor, cov_diag)
    symbolic = _symbolic_distribution(reference)
    assert isinstance(symbolic, SymbolicLowRankMultivariateNormal)
    # Against the dense multivariate normal of the same covariance, not torch's own Woodbury code.
    covariance = cov_factor @ cov_factor.transpose(-1, -2) + torch.diag_embed(cov_diag)
    dense = torch.distributions.MultivariateNormal(loc, covariance_matrix=covariance)
    torch.testing.assert_close(symbolic.log_prob(value), dense.log_prob(value), rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("size", [3, 20])
def test_symbolic_multivariate_student_t_density_is_scipys(size):
    from scipy.stats import multivariate_t

    from ppvi.constrain import SymbolicMultivariateStudentT, _symbolic_distribution

    generator = torch.Generator().manual_seed(size)
    factor = torch.randn(3, size, size, generator=generator, dtype=torch.float64).tril()
    factor.diagonal(dim1=-2, dim2=-1).copy_(torch.rand(3, size, generator=generator, dtype=torch.float64) + 0.5)
    loc = torch.randn(3, size, generator=generator, dtype=torch.float64)
    df = torch.tensor([3.0, 5.5, 30.0], dtype=torch.float64)
    value = torch.randn(2, 3, size, generator=generator, dtype=torch.float64)
    symbolic = _symbolic_distribution(dist.MultivariateStudentT(df, loc, factor))
    assert isinstance(symbolic, SymbolicMultivariateStudentT)
    density = symbolic.log_prob(value)
    for m in range(3):
        shape = (factor[m] @ factor[m].T).numpy()
        expected = multivariate_t(loc[m].numpy(), shape, df=float(df[m])).logpdf(value[:, m].numpy())
        np.testing.assert_allclose(density[:, m].numpy(), expected, rtol=1e-10)
