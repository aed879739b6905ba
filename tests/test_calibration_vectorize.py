"""VSBC and SBC on models that do not broadcast over replications (ppvi.calibration through torch.func.vmap).

The reference for a model written for one draw (``a + X @ beta``) or numpy-style (``a[..., None] + ...``, which a
replication plate silently counts once per replication) is its broadcasting twin, ``a + (X * beta).sum(-1)``: the same
density written for Pyro's plates. The vmapped simulation draws from the random stream of the twin's plates, so the
same seed gives the same simulated data, the same log densities (to round-off: ``X @ beta`` and
``(X * beta).sum(-1)`` add the same products in another order), the same fits and the same p-values and ranks.
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import ppvi
from ppvi.calibration import _Problem, _Replications, _ShardTask
from ppvi.initialization import batched_laplace_start

NUM_POINTS, NUM_PREDICTORS = 30, 3
#: Replications of the end-to-end runs: enough for every replication path (stopped, frozen) to show, few enough for
#: the file to run in well under a minute on a 2-core CPU.
NUM_SIMULATIONS = 24
#: Fixed steps: the runs compare replication by replication, so no stopping rule is needed to make them comparable.
STEPS = 100
#: Agreement of values computed from the same inputs by the same arithmetic in another order (X @ beta against
#: (X * beta).sum(-1)): round-off, amplified at most a few hundred times by 100 Adam steps.
RTOL = 1e-9


@pytest.fixture(scope="module")
def X() -> torch.Tensor:
    return torch.randn(NUM_POINTS, NUM_PREDICTORS, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _priors() -> tuple[torch.Tensor, torch.Tensor]:
    a = pyro.sample("a", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 2.0))
    beta = pyro.sample("beta", dist.Normal(torch.zeros(NUM_PREDICTORS, dtype=torch.float64), 1.0).to_event(1))
    return a, beta


def _likelihood(mean: torch.Tensor) -> None:
    with pyro.plate("data", NUM_POINTS):
        pyro.sample("y", dist.Normal(mean, 1.0))


def broadcasting(X):
    """The reference: written for Pyro's plates."""
    a, beta = _priors()
    _likelihood(a + (X * beta).sum(-1))


def matrix_product(X):
    """Written for one draw: ``X @ beta`` raises inside a replication plate."""
    a, beta = _priors()
    _likelihood(a + X @ beta)


def numpy_style(X):
    """Broadcasts wrongly: ``a[..., None]`` adds a dimension left of the plate, which the replication plate expands."""
    a, beta = _priors()
    _likelihood(a[..., None] + (X * beta[..., None, :]).sum(-1))


def _bounded(X, product: bool):
    """A support that depends on another site (``b ~ Uniform(0, 1 - alpha)``): the constrained draws behind p-values
    and ranks run the model."""
    alpha = pyro.sample("alpha", dist.Uniform(torch.tensor(0.0, dtype=torch.float64), 1.0))
    b = pyro.sample("b", dist.Uniform(torch.tensor(0.0, dtype=torch.float64), 1.0 - alpha))
    beta = pyro.sample("beta", dist.Normal(torch.zeros(NUM_PREDICTORS, dtype=torch.float64), 1.0).to_event(1))
    _likelihood(4.0 * b + (X @ beta if product else (X * beta).sum(-1)))


def bounded_broadcasting(X):
    _bounded(X, product=False)


def bounded_matrix_product(X):
    _bounded(X, product=True)


def control_flow(X):
    """Python control flow on a sampled value: neither the plates nor vmap can batch it."""
    a, beta = _priors()
    shift = 1.0 if float(a) > 0 else 0.0
    _likelihood(a + shift + X @ beta)


def test_the_probe_batches_each_way_of_writing_the_model_as_is_right_for_it(X):
    assert _Problem(broadcasting, (X,), ["y"]).vectorization == ("broadcast", "")
    product = _Problem(matrix_product, (X,), ["y"]).vectorization
    assert product.strategy == "vmap" and "does not broadcast over a batch of replications" in product.reason
    extra = _Problem(numpy_style, (X,), ["y"]).vectorization
    assert extra.strategy == "vmap"
    assert f"site 'y' has a log-probability of shape (3, 3, {NUM_POINTS})" in extra.reason


@pytest.mark.parametrize(
    "reference_model, model",
    [(broadcasting, matrix_product), (broadcasting, numpy_style), (bounded_broadcasting, bounded_matrix_product)],
)
def test_simulation_log_density_laplace_start_and_draws_equal_the_twins(X, reference_model, model):
    M = 8
    reference_problem = _Problem(reference_model, (X,), ["y"], seed=0)
    problem = _Problem(model, (X,), ["y"], seed=0)
    assert (reference_problem.vectorization.strategy, problem.vectorization.strategy) == ("broadcast", "vmap")
    # The vmapped simulation draws the plates' random stream: the same data and true values.
    pyro.set_rng_seed(5)
    reference_theta0, reference_data = reference_problem.simulate(M)
    pyro.set_rng_seed(5)
    theta0, data = problem.simulate(M)
    for name, value in {**reference_theta0, **reference_data}.items():
        torch.testing.assert_close({**theta0, **data}[name], value, rtol=1e-12, atol=1e-12)
    reference = _Replications(reference_problem, reference_data, reference_theta0)
    replications = _Replications(problem, reference_data, reference_theta0)
    assert replications.vmapped and not reference.vmapped
    z = reference_problem.init_loc + torch.randn(5, M, reference.latent_dim, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(replications.log_density(z, *reference_data.values()),
                               reference.log_density(z, *reference_data.values()), rtol=1e-10, atol=1e-10)
    # The batched Laplace start differentiates the log density twice (Hessian-vector products through vmap).
    initial = reference_problem.init_loc.expand(M, reference.latent_dim)
    start = batched_laplace_start(replications.negative_log_joint, initial, "full")
    reference_start = batched_laplace_start(reference.negative_log_joint, initial, "full")
    assert start.succeeded.all() and reference_start.succeeded.all()
    torch.testing.assert_close(start.center, reference_start.center, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(start.factor, reference_start.factor, rtol=1e-6, atol=1e-8)
    # Constrained draws, by the support of each draw's own run where it depends on other sites.
    assert replications.dependent_sites == reference.dependent_sites
    for name, value in reference._draw_values(z).items():
        torch.testing.assert_close(replications._draw_values(z)[name].reshape(value.shape), value)


@pytest.fixture(scope="module")
def reference_vsbc(X) -> ppvi.VSBCResult:
    return ppvi.vsbc(broadcasting, X, observed="y", guide="fullrank", num_simulations=NUM_SIMULATIONS, steps=STEPS,
                     seed=3, device="cpu", engine="pyro")


def assert_same_run(result, reference) -> None:
    np.testing.assert_array_equal(result.steps, reference.steps)
    np.testing.assert_array_equal(result.laplace_succeeded, reference.laplace_succeeded)
    for name, value in reference.theta0.items():
        np.testing.assert_allclose(result.theta0[name], value, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(result.data["y"], reference.data["y"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(result.loc, reference.loc, rtol=RTOL, atol=RTOL)
    np.testing.assert_allclose(result.sd, reference.sd, rtol=RTOL, atol=RTOL)
    for name, value in reference.p_values.items():
        np.testing.assert_allclose(result.p_values[name], value, rtol=RTOL, atol=RTOL)
    assert list(result.to_dataframe()["verdict"]) == list(reference.to_dataframe()["verdict"])


@pytest.mark.parametrize("model", [matrix_product, numpy_style])
def test_vsbc_of_a_model_that_does_not_broadcast_equals_its_twins(X, reference_vsbc, model):
    result = ppvi.vsbc(model, X, observed="y", guide="fullrank", num_simulations=NUM_SIMULATIONS, steps=STEPS,
                       seed=3, device="cpu", engine="pyro")
    assert reference_vsbc.vectorization.strategy == "broadcast"
    assert result.vectorization.strategy == "vmap" and result.engine == "pyro"
    assert_same_run(result, reference_vsbc)


def test_the_traced_step_traces_through_vmap(X, reference_vsbc):
    result = ppvi.vsbc(matrix_product, X, observed="y", guide="fullrank", num_simulations=NUM_SIMULATIONS,
                       steps=STEPS, seed=3, device="cpu", engine="traced")
    assert (result.engine, result.engine_reason, result.vectorization.strategy) == ("traced", "", "vmap")
    assert_same_run(result, reference_vsbc)


def test_sbc_ranks_of_a_model_that_does_not_broadcast_equal_its_twins(X):
    options = dict(observed="y", num_simulations=16, num_draws=19, steps=100, seed=4, device="cpu", engine="pyro")
    reference = ppvi.sbc(bounded_broadcasting, X, **options)
    result = ppvi.sbc(bounded_matrix_product, X, **options)
    assert (reference.vectorization.strategy, result.vectorization.strategy) == ("broadcast", "vmap")
    for name, ranks in reference.ranks.items():
        np.testing.assert_array_equal(result.ranks[name], ranks)


def test_a_shard_carries_the_choice_or_makes_it_again(X, reference_vsbc):
    problem = _Problem(matrix_product, (X,), ["y"])
    task = _ShardTask(
        model=matrix_product, args=(X,), observed=["y"], guide="fullrank", steps=STEPS, learning_rate=0.1,
        num_particles=8, seed=3, device="cpu", shift=0.0, num_draws=None, engine="pyro",
        prototype_data={"y": torch.as_tensor(reference_vsbc.data["y"][:1])}, vectorization=problem.vectorization,
    )
    first, stop = 8, 12  # any range of replications: each draws from its own stream
    data = {"y": torch.as_tensor(reference_vsbc.data["y"][first:stop])}
    theta0 = {name: torch.as_tensor(value[first:stop]) for name, value in reference_vsbc.theta0.items()}
    for shard in (task, task._replace(vectorization=None)):
        outcome = shard(first, data, theta0)
        for name, value in reference_vsbc.p_values.items():
            np.testing.assert_allclose(outcome["computed"][name], value[first:stop], rtol=RTOL, atol=RTOL)


def test_a_model_neither_the_plates_nor_vmap_can_batch_is_refused_with_the_fix(X):
    with pytest.raises(ValueError, match="cannot batch this model over replications") as raised:
        ppvi.vsbc(control_flow, X, observed="y", num_simulations=8, steps=50, device="cpu")
    message = str(raised.value)
    assert "torch.func.vmap cannot batch it" in message and "torch.where" in message
