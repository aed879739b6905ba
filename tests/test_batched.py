"""The batched engine under VSBC and SBC (``ppvi.batched``): the traced and compiled steps against the Pyro step.

The reference is the Pyro path of the same run: the same seed gives the same noise, so every replication must take
the same steps, stop at the same step and end at the same fit, whichever engine ran. The batch shrinks as
replications stop, so these runs also check that one trace serves every batch size.
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from ppvi import batched, sbc, vsbc
from ppvi.engine import NotTraceableError

NUM_POINTS = 5


def normal_model(n, y=None):
    """mu ~ N(0, 2), y_i ~ N(mu, 1)."""
    mu = pyro.sample("mu", dist.Normal(torch.zeros(()), 2.0))
    with pyro.plate("data", n):
        return pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def constrained_model(n, y=None):
    """A positive scale, a unit interval, and a bound that depends on another site (per-draw supports)."""
    scale = pyro.sample("scale", dist.HalfNormal(torch.ones(())))
    weight = pyro.sample("weight", dist.Beta(2.0, 2.0))
    alpha = pyro.sample("alpha", dist.Uniform(0.0, 1.0))
    beta = pyro.sample("beta", dist.Uniform(0.0, 1.0 - alpha))
    with pyro.plate("data", n):
        return pyro.sample("y", dist.Normal(2.0 * weight + beta, scale), obs=y)


def simplex_model(n, y=None):
    """A simplex site: torch's stick-breaking transform pads, which pins a symbolic batch size (ppvi.constrain
    writes the padding as a concatenation)."""
    weights = pyro.sample("weights", dist.Dirichlet(torch.ones(3)))
    with pyro.plate("data", n):
        return pyro.sample("y", dist.Normal((weights * torch.arange(3.0)).sum(-1), 1.0), obs=y)


def correlation_model(n, y=None):
    """An LKJ site: torch's map onto correlation Cholesky factors pads, and fills the factor through a boolean mask."""
    factor = pyro.sample("factor", dist.LKJCholesky(3, torch.tensor(2.0)))
    with pyro.plate("data", n):
        return pyro.sample("y", dist.Normal(factor[..., 2, :2].sum(-1) + factor[..., 1, 0], 1.0), obs=y)


def covariance_model(n, y=None):
    """LKJ correlations and scales, and a multivariate normal likelihood: torch's log_prob reshapes by a batch shape
    computed in Python, which a symbolic batch size breaks (ppvi.constrain.SymbolicMultivariateNormal)."""
    factor = pyro.sample("factor", dist.LKJCholesky(3, torch.tensor(2.0)))
    scales = pyro.sample("scales", dist.HalfNormal(torch.ones(3)).to_event(1))
    with pyro.plate("data", n):
        return pyro.sample("y", dist.MultivariateNormal(torch.zeros(3), scale_tril=scales[..., None] * factor), obs=y)


def branching_model(n, y=None):
    """Python control flow on a sampled value: no single graph can follow it. (Always 0, so that a batch of
    replications has the density of each one alone, which ppvi.calibration's probe checks before using the plates.)"""
    mu = pyro.sample("mu", dist.Normal(torch.zeros(()), 2.0))
    shift = 0.0 if bool((mu > 100.0).all()) else 0.0
    with pyro.plate("data", n):
        return pyro.sample("y", dist.Normal(mu + shift, 1.0), obs=y)


def noisy_model(n, y=None):
    """A random draw of the model's own, which a traced graph would freeze."""
    mu = pyro.sample("mu", dist.Normal(torch.zeros(()), 2.0))
    jitter = 1e-3 * torch.randn(())
    with pyro.plate("data", n):
        return pyro.sample("y", dist.Normal(mu + jitter, 1.0), obs=y)


def size_dependent_model(n, y=None):
    """Python arithmetic on the number of replications (through a sampled value's size). (Times 0, so that a batch of
    replications has the density of each one alone, which ppvi.calibration's probe checks before using the plates.)"""
    mu = pyro.sample("mu", dist.Normal(torch.zeros(()), 2.0))
    offset = 0.0 * float(mu.numel() % 7)
    with pyro.plate("data", n):
        return pyro.sample("y", dist.Normal(mu + offset, 1.0), obs=y)


def assert_same_run(left, right, rtol):
    np.testing.assert_array_equal(left.steps, right.steps)
    np.testing.assert_array_equal(left.converged, right.converged)
    np.testing.assert_array_equal(left.laplace_succeeded, right.laplace_succeeded)
    np.testing.assert_allclose(left.loc, right.loc, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(left.sd, right.sd, rtol=rtol, atol=rtol)
    for name in left.p_values:
        np.testing.assert_allclose(left.p_values[name], right.p_values[name], rtol=rtol, atol=rtol)


@pytest.mark.parametrize("guide", ["meanfield", "fullrank"])
def test_traced_step_takes_the_pyro_steps_on_every_batch_size(guide):
    # 20 replications stopping at different steps: the batch runs through many sizes, down to one replication
    # (run as two copies of itself), all on the graph traced at the first step.
    options = dict(observed="y", guide=guide, num_simulations=20, device="cpu", seed=3)
    reference = vsbc(constrained_model, NUM_POINTS, engine="pyro", **options)
    traced = vsbc(constrained_model, NUM_POINTS, engine="traced", **options)
    assert (reference.engine, traced.engine) == ("pyro", "traced")
    assert traced.engine_reason == ""
    assert len(np.unique(reference.steps)) >= 2  # the batch did shrink
    assert_same_run(traced, reference, rtol=1e-9)


def test_sbc_ranks_are_the_same_on_the_traced_step():
    options = dict(observed="y", num_simulations=12, num_draws=19, device="cpu", seed=1)
    reference = sbc(normal_model, NUM_POINTS, engine="pyro", **options)
    traced = sbc(normal_model, NUM_POINTS, engine="traced", **options)
    np.testing.assert_array_equal(traced.ranks["mu"], reference.ranks["mu"])


@pytest.mark.slow  # a cold TorchInductor compilation per guide family: 15-30 s each on 2 cores
@pytest.mark.parametrize("guide", ["meanfield", "fullrank"])
def test_compiled_step_takes_the_pyro_steps(guide):
    options = dict(observed="y", guide=guide, num_simulations=20, device="cpu", seed=3)
    reference = vsbc(constrained_model, NUM_POINTS, engine="pyro", **options)
    compiled = vsbc(constrained_model, NUM_POINTS, engine="compiled", **options)
    assert compiled.engine == "compiled"
    # Compiled kernels reassociate sums: equal to rounding, and the stopping decisions with them.
    assert_same_run(compiled, reference, rtol=1e-6)


def test_auto_falls_back_to_pyro_and_says_why(monkeypatch):
    monkeypatch.setattr("ppvi.calibration.COMPILE_MIN_SIMULATIONS", 5)  # auto would compile these 8
    result = vsbc(branching_model, NUM_POINTS, observed="y", num_simulations=8, steps=150, device="cpu")
    assert result.engine == "pyro"
    assert "control flow" in result.engine_reason
    assert np.isfinite(result.p_values["mu"]).all()


def test_a_model_the_trace_cannot_generalise_falls_back(monkeypatch):
    monkeypatch.setattr("ppvi.calibration.COMPILE_MIN_SIMULATIONS", 5)
    reference = vsbc(size_dependent_model, NUM_POINTS, observed="y", num_simulations=8, steps=150, device="cpu",
                     engine="pyro")
    result = vsbc(size_dependent_model, NUM_POINTS, observed="y", num_simulations=8, steps=150, device="cpu")
    assert result.engine == "pyro" and "number of replications" in result.engine_reason
    # The fallback starts afresh: the same run as Pyro's alone.
    np.testing.assert_array_equal(result.p_values["mu"], reference.p_values["mu"])


def low_rank_model(n, y=None):
    """A low-rank multivariate normal likelihood (ppvi.constrain.SymbolicLowRankMultivariateNormal)."""
    loc = pyro.sample("loc", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    with pyro.plate("data", n):
        return pyro.sample("y", dist.LowRankMultivariateNormal(loc, 0.5 * torch.ones(3, 1), torch.ones(3)), obs=y)


def student_t_model(n, y=None):
    """A multivariate Student t likelihood (ppvi.constrain.SymbolicMultivariateStudentT)."""
    loc = pyro.sample("loc", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    with pyro.plate("data", n):
        return pyro.sample("y", dist.MultivariateStudentT(torch.tensor(4.0), loc, torch.eye(2)), obs=y)


@pytest.mark.parametrize("model, guide", [
    (simplex_model, "meanfield"), (simplex_model, "fullrank"), (correlation_model, "meanfield"),
    (covariance_model, "meanfield"), (low_rank_model, "fullrank"), (student_t_model, "meanfield"),
])
def test_simplex_correlation_and_multivariate_sites_train_on_the_traced_step(model, guide):
    """Dirichlet and LKJ sites' maps and the densities of multivariate normals (full and low rank) and a
    multivariate Student t trace for every batch size, and take the Pyro path's steps."""
    options = dict(observed="y", guide=guide, num_simulations=12, device="cpu", seed=4)
    reference = vsbc(model, NUM_POINTS, engine="pyro", **options)
    traced = vsbc(model, NUM_POINTS, engine="traced", **options)
    assert (traced.engine, traced.engine_reason) == ("traced", "")
    assert_same_run(traced, reference, rtol=1e-9)


def test_auto_runs_pyro_below_the_compile_threshold():
    result = vsbc(normal_model, NUM_POINTS, observed="y", num_simulations=8, steps=150, device="cpu")
    assert (result.engine, result.engine_reason) == ("pyro", "")


@pytest.mark.parametrize(
    "model, message",
    [
        (branching_model, "control flow"),
        (noisy_model, "random draw"),
        (size_dependent_model, "number of replications"),
    ],
)
def test_an_untraceable_model_is_refused_by_name(model, message):
    with pytest.raises(ValueError, match=message) as raised:
        vsbc(model, NUM_POINTS, observed="y", num_simulations=8, steps=150, device="cpu", engine="traced")
    assert "engine='pyro'" in str(raised.value)


def test_unknown_engine_is_refused():
    with pytest.raises(ValueError, match="engine must be one of"):
        vsbc(normal_model, NUM_POINTS, observed="y", num_simulations=8, device="cpu", engine="jit")


def step_inputs(guide: str, A: int, D: int = 2, S: int = 3, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs of one batched step (as ppvi.batched.update assembles them) at a random state, and data ``y``."""
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    parameters = [0.3 * normal(A, D), 0.3 * normal(A, D)]
    factor = 1.0 + 0.1 * normal(A, D).abs()
    if guide == "fullrank":
        parameters.append(0.3 * normal(A, D, D))
        factor = torch.diag_embed(factor) + 0.1 * normal(A, D, D).tril(-1)
    return (
        *parameters, *(0.01 * normal(*p.shape) for p in parameters),
        *(0.01 * normal(*p.shape).abs() for p in parameters),
        torch.full((A,), 0.1, dtype=torch.float64), torch.full((1,), 0.5, dtype=torch.float64),
        torch.full((A,), 1e-8, dtype=torch.float64), normal(S, A, D), normal(A, D), factor, normal(A, D),
    )


def gaussian_log_density(z, y):
    return -0.5 * (z - y).pow(2).sum(-1)


@pytest.mark.parametrize("guide", ["meanfield", "fullrank"])
def test_one_trace_serves_every_batch_size_and_a_lone_replication(guide):
    eager = batched.eager_step(guide, gaussian_log_density)
    traced = batched.TracedBatchedStep(guide, gaussian_log_density, compile=False)
    for A in (6, 4, 1, 2, 9):  # traced at 6; a lone replication runs as two copies of itself
        inputs = step_inputs(guide, A, seed=A)
        for left, right in zip(traced(*inputs), eager(*inputs), strict=True):
            torch.testing.assert_close(left, right, rtol=1e-12, atol=1e-12)


def test_traced_step_refuses_a_graph_that_holds_the_batch_size():
    # The same refusal on the step itself, without VSBC around it.
    def log_density(z, y):
        return gaussian_log_density(z, y) * float(z.shape[1] % 5)

    step = batched.TracedBatchedStep("meanfield", log_density, compile=False)
    with pytest.raises(NotTraceableError, match="number of replications"):
        step(*step_inputs("meanfield", 6))


def test_full_rank_log_density_equals_torch_multivariate_normal():
    generator = torch.Generator().manual_seed(0)
    for dimension in (3, 20):  # written-out substitution, then torch.linalg.solve
        A, S = 4, 5
        scale = torch.randn(A, dimension, dimension, generator=generator, dtype=torch.float64).tril(-1)
        scale = scale + torch.diag_embed(torch.rand(A, dimension, generator=generator, dtype=torch.float64) + 0.5)
        loc = torch.randn(A, dimension, generator=generator, dtype=torch.float64)
        w = torch.randn(S, A, dimension, generator=generator, dtype=torch.float64)
        expected = torch.distributions.MultivariateNormal(loc, scale_tril=scale).log_prob(w)
        torch.testing.assert_close(batched.log_density_of("fullrank", loc, scale, w), expected, rtol=1e-12,
                                   atol=1e-10)


@pytest.mark.parametrize("dimension", [3, 20])
def test_own_draws_log_density_has_the_value_and_the_path_gradient_of_the_multivariate_normal(dimension):
    # At the guide's own draws w = loc + L noise, with loc and L held fixed, the value is torch's MultivariateNormal
    # log density, and the gradient in w (what the path-derivative estimator differentiates) is that density's.
    generator = torch.Generator().manual_seed(dimension)
    S, A = 5, 4
    scale = torch.randn(A, dimension, dimension, generator=generator, dtype=torch.float64).tril(-1) * 0.3
    scale = scale + torch.diag_embed(torch.rand(A, dimension, generator=generator, dtype=torch.float64) + 0.5)
    loc = torch.randn(A, dimension, generator=generator, dtype=torch.float64)
    noise = torch.randn(S, A, dimension, generator=generator, dtype=torch.float64)
    w = batched.transform("fullrank", loc, scale, noise).requires_grad_(True)
    reference = torch.distributions.MultivariateNormal(loc, scale_tril=scale).log_prob(w)
    value = batched.own_draws_log_density("fullrank", loc, scale, noise, w)
    torch.testing.assert_close(value, reference, rtol=1e-12, atol=1e-10)
    (expected,) = torch.autograd.grad(reference.sum(), w)
    (gradient,) = torch.autograd.grad(value.sum(), w)
    torch.testing.assert_close(gradient, expected, rtol=1e-10, atol=1e-10)



@pytest.mark.parametrize("guide", ["meanfield", "fullrank"])
def test_unwhitening_the_average_is_the_average_unwhitened(guide):
    # run() averages the whitened iterates and unwhitens once, which is exact because z = center + factor w is
    # affine: the result must equal the average of the iterates unwhitened one by one, each written out per
    # replication (center + factor @ loc, factor @ scale; elementwise for mean-field).
    generator = torch.Generator().manual_seed(1)
    A, D, T = 3, 4, 5
    *_, center, factor, _ = step_inputs(guide, A, D=D)
    locs = torch.randn(T, A, D, generator=generator, dtype=torch.float64)
    raw = [torch.randn(T, A, D, generator=generator, dtype=torch.float64)]
    if guide == "fullrank":
        raw.append(torch.randn(T, A, D, D, generator=generator, dtype=torch.float64))
    scales = torch.stack([batched.scale_of(guide, *(r[t] for r in raw)) for t in range(T)])
    loc, scale = batched.unwhiten(guide, center, factor, locs.mean(0), scales.mean(0))
    for m in range(A):
        if guide == "meanfield":
            expected_loc = torch.stack([center[m] + factor[m] * locs[t, m] for t in range(T)]).mean(0)
            expected_scale = torch.stack([factor[m] * scales[t, m] for t in range(T)]).mean(0)
        else:
            expected_loc = torch.stack([center[m] + factor[m] @ locs[t, m] for t in range(T)]).mean(0)
            expected_scale = torch.stack([factor[m] @ scales[t, m] for t in range(T)]).mean(0)
        torch.testing.assert_close(loc[m], expected_loc, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(scale[m], expected_scale, rtol=1e-12, atol=1e-12)
